"""guidegen prepare: mapping correctness on the real example CT, geometry, resumption, and bad input."""

import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import V1_FACE, V1_LIVER, V1_SPLEEN, synthetic_case, write_nifti
from custom_components.data.class_map import load_class_map, totalsegmentator_label_maps
from custom_components.data.datalist import load_datalist, split_cases
from custom_components.data.writers import atomic_write
from custom_components.data.prepare import PrepareSettings, parse_size, prepare_dataset
from custom_components.errors import GuideGenInputError

NATIVE = PrepareSettings(mask_size=None, image_size=None, ts_version="v1")
SMALL = PrepareSettings(mask_size=16, image_size=32, ts_version="v1")


def expected_class_counts(segmentation: np.ndarray, version: str) -> dict[str, int]:
    """Count voxels per class straight from the class map file's source lists (independent of the code under test)."""
    raw = json.loads(load_class_map().to_json())
    names = totalsegmentator_label_maps()[version]
    values, counts = np.unique(segmentation, return_counts=True)
    count_of = {names.get(int(v)): int(c) for v, c in zip(values, counts) if v}
    expected = {}
    for entry in raw["classes"]:
        total = sum(count_of.get(structure, 0) for structure in entry.get("sources", {}).get(version, []))
        if total:
            expected[entry["name"]] = total
    return expected


def _example_raw(tmp_path: Path, example_files) -> dict[str, Path]:
    raw = tmp_path / "raw"
    (raw / "images").mkdir(parents=True)
    (raw / "segmentations").mkdir()
    shutil.copy(example_files["image"], raw / "images" / "ex.nii.gz")
    shutil.copy(example_files["segmentation"], raw / "segmentations" / "ex.nii.gz")
    (raw / "records.csv").write_text("case_id,age,sex,diagnosis\nex,60,M,no abnormality\n")
    return {"images": raw / "images", "segmentations": raw / "segmentations", "records": raw / "records.csv"}


def test_example_ct_organ_voxel_counts_match_the_source_mapping(tmp_path, example_files):
    raw = _example_raw(tmp_path, example_files)
    report = prepare_dataset(raw["images"], raw["segmentations"], raw["records"], tmp_path / "out", settings=NATIVE, progress=False)
    assert report.prepared == ["ex"] and not report.failed
    source = np.asarray(nib.load(str(example_files["segmentation"])).dataobj)
    expected = expected_class_counts(source, "total_v1")
    labels = np.asarray(nib.load(str(tmp_path / "out/labels/ex.nii.gz")).dataobj)
    class_names = load_class_map().class_names
    values, counts = np.unique(labels, return_counts=True)
    produced = {class_names[v]: int(c) for v, c in zip(values, counts) if v}
    assert produced == expected
    assert {"liver", "spleen", "kidney", "colon", "bone", "urinary_bladder"} <= set(produced)
    summary = json.loads((tmp_path / "out/cases/ex.json").read_text())
    assert summary["source_class_voxels"] == expected == summary["class_voxels"]
    assert summary["sources"]["labelling"] == "total_v1"


def test_example_ct_resized_volumes_share_field_of_view(tmp_path, example_files):
    raw = _example_raw(tmp_path, example_files)
    settings = PrepareSettings(mask_size=32, image_size=64, ts_version="v1")
    prepare_dataset(raw["images"], raw["segmentations"], raw["records"], tmp_path / "out", settings=settings, progress=False)
    image = nib.load(str(tmp_path / "out/images/ex.nii.gz"))
    mask = nib.load(str(tmp_path / "out/labels/ex.nii.gz"))
    assert image.shape == (64, 64, 64) and mask.shape == (32, 32, 32)
    assert image.get_data_dtype() == np.int16 and mask.get_data_dtype() == np.uint8
    assert nib.aff2axcodes(image.affine) == ("R", "A", "S") == nib.aff2axcodes(mask.affine)

    def extent(img):  # world coordinates of the outer voxel edges
        corners = np.array([[-0.5, -0.5, -0.5], np.array(img.shape) - 0.5])
        return nib.affines.apply_affine(img.affine, corners)

    np.testing.assert_allclose(extent(image), extent(mask), atol=1e-3)
    source = nib.load(str(example_files["image"]))
    # Nothing is cropped from this tightly framed scan, so the field of view is the source's.
    np.testing.assert_allclose(extent(image), extent(source), atol=1e-3)
    ct = np.asarray(image.dataobj)
    assert -1100 < ct.min() < -800 and 1000 < ct.max() <= 3071
    # Organ volumes in mm^3 survive nearest-neighbour resizing roughly (large organs within 15%).
    labels = np.asarray(mask.dataobj)
    voxel_mm3 = abs(np.linalg.det(mask.affine[:3, :3]))
    expected = expected_class_counts(np.asarray(nib.load(str(example_files["segmentation"])).dataobj), "total_v1")
    names = load_class_map().class_names
    for organ in ("liver", "colon", "bone"):
        produced_mm3 = np.sum(labels == names.index(organ)) * voxel_mm3
        assert produced_mm3 == pytest.approx(expected[organ] * 27.0, rel=0.15), organ


def test_v2_label_table_is_detected(tmp_path):
    shared = Path(__file__).resolve().parent / "resources"
    # The v2 sample carries TotalSegmentator's label table in its header extension.
    seg = nib.load(str(shared / "seg_small_total_v2.nii.gz"))
    raw = tmp_path / "raw"
    write_nifti(raw / "images/small.nii.gz", np.asarray(nib.load(str(shared / "ct_small.nii.gz")).dataobj), seg.affine)
    (raw / "segmentations").mkdir()
    shutil.copy(shared / "seg_small_total_v2.nii.gz", raw / "segmentations/small.nii.gz")
    (raw / "records.csv").write_text("case_id\nsmall\n")
    settings = PrepareSettings(mask_size=None, image_size=None)  # ts_version auto
    prepare_dataset(raw / "images", raw / "segmentations", raw / "records.csv", tmp_path / "out", settings=settings, progress=False)
    summary = json.loads((tmp_path / "out/cases/small.json").read_text())
    assert summary["sources"]["labelling"] == "total_v2"
    assert summary["class_voxels"] == expected_class_counts(np.asarray(seg.dataobj), "total_v2")


def test_per_structure_folder_and_tumor_mask(tmp_path):
    ct, seg = synthetic_case()
    raw = tmp_path / "raw"
    write_nifti(raw / "images/p1.nii.gz", ct)
    for name, value in (("liver", 5), ("spleen", 1), ("kidney_left", 3)):
        write_nifti(raw / f"segmentations/p1/segmentations/{name}.nii.gz", seg == value, dtype=np.uint8)
    tumor = np.zeros_like(seg)
    tumor[6:8, 6:8, 5:7] = 1
    write_nifti(raw / "tumors/p1.nii.gz", tumor, dtype=np.uint8)
    (raw / "records.csv").write_text("case_id,tumor_organ,tumor_count\np1,liver,1\n")
    settings = PrepareSettings(mask_size=None, image_size=None, margin_mm=100)
    report = prepare_dataset(raw / "images", raw / "segmentations", raw / "records.csv", tmp_path / "out", tumors_dir=raw / "tumors", settings=settings, progress=False)
    assert not report.failed
    summary = json.loads((tmp_path / "out/cases/p1.json").read_text())
    liver_total = int((seg == V1_LIVER).sum())
    assert summary["class_voxels"] == {"liver": liver_total - 8, "spleen": int((seg == 1).sum()), "kidney": int((seg == 3).sum()), "tumor": 8}
    assert summary["entry"]["text"] == "In this imaging, the patient's condition is described as a tumor in the liver."


def test_datalist_is_complete_and_loads(make_dataset):
    paths = make_dataset(("a", "b", "c", "d", "e"))
    report = prepare_dataset(paths["images"], paths["segmentations"], paths["records"], paths["output"], settings=SMALL, progress=False)
    datalist = load_datalist(report.datalist)
    ids = [item["case_id"] for item in datalist["training"] + datalist["validation"]]
    assert sorted(ids) == ["a", "b", "c", "d", "e"] and len(datalist["validation"]) == 1
    item = datalist["training"][0]
    assert Path(item["image"]).is_file() and Path(item["label"]).is_file()
    assert item["text"] == "The patient is a 50-year-old female." and item["record"]["sex"] == "female"
    assert datalist["num_classes"] == 20 and datalist["class_map"].num_classes == 20
    assert (paths["output"] / "class_map.json").is_file()
    assert all((paths["output"] / f"previews/{case}.png").is_file() for case in "abcde")


def test_split_is_deterministic_and_order_independent():
    ids = [f"c{i}" for i in range(10)]
    first = split_cases(ids, 0.3, seed=1)
    assert first == split_cases(list(reversed(ids)), 0.3, seed=1)
    assert len(first[1]) == 3 and sorted(first[0] + first[1]) == sorted(ids)
    assert split_cases(ids, 0.3, seed=2) != first
    assert split_cases(["a", "b"], 0.01, seed=0)[1] != []  # at least one validation case
    assert split_cases(["a"], 0.5, seed=0) == (["a"], [])


def test_rerun_skips_done_cases_and_redoes_changed_ones(make_dataset):
    paths = make_dataset(("a", "b"))
    args = (paths["images"], paths["segmentations"], paths["records"], paths["output"])
    prepare_dataset(*args, settings=SMALL, progress=False)
    mtime = (paths["output"] / "labels/a.nii.gz").stat().st_mtime_ns
    report = prepare_dataset(*args, settings=SMALL, progress=False)
    assert report.skipped == ["a", "b"] and report.prepared == []
    assert (paths["output"] / "labels/a.nii.gz").stat().st_mtime_ns == mtime
    paths["records"].write_text("case_id,age,sex\na,50,F\nb,70,M\n")  # b's record changed
    report = prepare_dataset(*args, settings=SMALL, progress=False)
    assert report.skipped == ["a"] and report.prepared == ["b"]
    report = prepare_dataset(*args, settings=PrepareSettings(mask_size=8, image_size=16, ts_version="v1"), progress=False)
    assert report.prepared == ["a", "b"]  # new sizes -> redone
    assert nib.load(str(paths["output"] / "labels/a.nii.gz")).shape == (8, 8, 8)


def test_no_temporary_files_are_left(make_dataset):
    paths = make_dataset(("a",))
    prepare_dataset(paths["images"], paths["segmentations"], paths["records"], paths["output"], settings=SMALL, progress=False)
    assert not [p for p in paths["output"].rglob("*") if ".tmp" in p.name]


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "x.json"
    target.write_text("old")

    def failing(temporary: Path) -> None:
        temporary.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, failing)
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


# ---------------------------------------------------------------- bad input: each case is named, others survive


def _run(paths, settings=SMALL, **kwargs):
    return prepare_dataset(paths["images"], paths["segmentations"], paths["records"], paths["output"], settings=settings, progress=False, **kwargs)


def _assert_only_good_survives(paths, report, bad: str, message: str, good: str = "a"):
    assert list(report.failed) == [bad], report.failed
    assert message in report.failed[bad], report.failed[bad]
    assert (paths["output"] / f"labels/{good}.nii.gz").is_file()
    datalist = json.loads(report.datalist.read_text())
    listed = [item["case_id"] for item in datalist["training"] + datalist["validation"]]
    assert good in listed and bad not in listed


def test_corrupt_nifti(make_dataset):
    paths = make_dataset(("a", "b"))
    good_bytes = (paths["images"] / "b.nii.gz").read_bytes()
    (paths["images"] / "b.nii.gz").write_bytes(good_bytes[: len(good_bytes) // 2])  # truncated download
    report = _run(paths)
    _assert_only_good_survives(paths, report, "b", "b.nii.gz")
    assert "corrupt" in report.failed["b"] or "not a readable NIfTI" in report.failed["b"]


def test_not_a_nifti_at_all(make_dataset):
    paths = make_dataset(("a", "b"))
    (paths["segmentations"] / "b.nii.gz").write_bytes(gzip.compress(b"hello"))
    _assert_only_good_survives(paths, _run(paths), "b", "is not a readable NIfTI file")


def test_shape_mismatch(make_dataset):
    paths = make_dataset(("a", "b"))
    ct, seg = synthetic_case()
    write_nifti(paths["segmentations"] / "b.nii.gz", seg[:, :, :-2], dtype=np.uint8)
    _assert_only_good_survives(paths, _run(paths), "b", "has shape (24, 20, 14)")


def test_affine_mismatch(make_dataset):
    paths = make_dataset(("a", "b"))
    _, seg = synthetic_case()
    write_nifti(paths["segmentations"] / "b.nii.gz", seg, affine=np.diag([2.0, 2.0, 2.5, 1.0]), dtype=np.uint8)
    report = _run(paths)
    _assert_only_good_survives(paths, report, "b", "affine")
    assert "must share orientation, spacing and origin" in report.failed["b"]


def test_labels_outside_the_source_map_are_named(make_dataset):
    paths = make_dataset(("a", "b"))
    _, seg = synthetic_case()
    seg[0, 0, 0], seg[1, 0, 0] = 150, 200
    write_nifti(paths["segmentations"] / "b.nii.gz", seg, dtype=np.uint8)
    _assert_only_good_survives(paths, _run(paths), "b", "label values [150, 200] that are not in total_v1")


def test_nan_intensities(make_dataset):
    paths = make_dataset(("a", "b"))
    ct, _ = synthetic_case()
    ct = ct.astype(np.float32)
    ct[2, 2, 2] = np.nan
    ct[3, 3, 3] = np.inf
    write_nifti(paths["images"] / "b.nii.gz", ct, dtype=np.float32)
    _assert_only_good_survives(paths, _run(paths), "b", "holds 2 NaN/Inf voxels")


def test_non_3d_volume(make_dataset):
    paths = make_dataset(("a", "b"))
    ct, _ = synthetic_case()
    write_nifti(paths["images"] / "b.nii.gz", np.stack([ct, ct], axis=-1))
    _assert_only_good_survives(paths, _run(paths), "b", "expected a 3D volume")


def test_trailing_singleton_dimension_is_accepted(make_dataset):
    paths = make_dataset(("a",))
    ct, _ = synthetic_case()
    write_nifti(paths["images"] / "a.nii.gz", ct[..., None])
    assert not _run(paths).failed


@pytest.mark.parametrize("content, message", [("zeros", "is empty (every voxel is 0)"), ("unmapped", "no voxel of")])
def test_empty_masks(make_dataset, content, message):
    paths = make_dataset(("a", "b"))
    _, seg = synthetic_case()
    seg[:] = 0
    if content == "unmapped":
        seg[4:6, 4:6, 4:6] = 93  # 'face' maps to background in the default class map
    write_nifti(paths["segmentations"] / "b.nii.gz", seg, dtype=np.uint8)
    _assert_only_good_survives(paths, _run(paths), "b", message)


def test_record_without_image_and_image_without_record(make_dataset):
    paths = make_dataset(("a", "b"), records=[{"case_id": "a"}, {"case_id": "zz"}])
    report = _run(paths)
    assert set(report.failed) == {"b", "zz"}
    assert "has no record; add a row with case_id 'b'" in report.failed["b"]
    assert "record has no image" in report.failed["zz"] and "zz.nii.gz" in report.failed["zz"]
    assert (paths["output"] / "labels/a.nii.gz").is_file()


def test_missing_segmentation(make_dataset):
    paths = make_dataset(("a", "b"))
    (paths["segmentations"] / "b.nii.gz").unlink()
    _assert_only_good_survives(paths, _run(paths), "b", "no segmentation: expected")


def test_duplicate_case_ids(make_dataset):
    paths = make_dataset(("a",), records=[{"case_id": "a"}, {"case_id": "a"}])
    with pytest.raises(GuideGenInputError, match="duplicate case ids .*'a'"):
        _run(paths)
    paths = make_dataset(("a",))
    ct, _ = synthetic_case()
    write_nifti(paths["images"] / "a_0000.nii.gz", ct)  # same case id as a.nii.gz
    with pytest.raises(GuideGenInputError, match=r"duplicate case ids in .*'a': \['a.nii.gz', 'a_0000.nii.gz'\]"):
        _run(paths)
    assert not (paths["output"] / "labels").exists()  # nothing half-done


def test_unknown_class_map_version(make_dataset):
    paths = make_dataset(("a",))
    # refused for the whole run before any case is read (it used to fail every case one by one)
    with pytest.raises(GuideGenInputError, match="--ts_version 'v3'.*unknown class-map version 'v3'"):
        _run(paths, settings=PrepareSettings(mask_size=16, image_size=32, ts_version="v3"))
    assert not paths["output"].exists()


def test_ambiguous_version_asks_to_state_it(make_dataset):
    paths = make_dataset(("a",))
    _, seg = synthetic_case()
    seg[seg == V1_SPLEEN] = 7  # aorta in v1, pancreas in v2: both soft tissue, so the HU cannot tell
    seg[seg == V1_FACE] = 0  # 'face' in v1 but 'rib_left_2' in v2, which its HU would rule out
    write_nifti(paths["segmentations"] / "a.nii.gz", seg, dtype=np.uint8)
    with pytest.raises(GuideGenInputError, match="state it with --ts_version v1 or --ts_version v2"):
        _run(paths, settings=PrepareSettings(mask_size=16, image_size=32))


def test_stated_version_contradicting_the_file_names(tmp_path):
    ct, seg = synthetic_case()
    raw = tmp_path / "raw"
    write_nifti(raw / "images/p.nii.gz", ct)
    write_nifti(raw / "segmentations/p/heart.nii.gz", seg == 5, dtype=np.uint8)  # 'heart' exists only in v2
    (raw / "records.csv").write_text("case_id\np\n")
    with pytest.raises(GuideGenInputError, match="you stated total_v1 but the structure file names only fit total_v2"):
        prepare_dataset(raw / "images", raw / "segmentations", raw / "records.csv", tmp_path / "o", settings=SMALL, progress=False)


def test_datalist_pointing_at_missing_files(make_dataset):
    paths = make_dataset(("a", "b"))
    report = _run(paths)
    (paths["output"] / "labels/a.nii.gz").unlink()
    with pytest.raises(GuideGenInputError, match=r"'label' points at .*labels/a.nii.gz, which does not exist"):
        load_datalist(report.datalist)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.pop("training"), "'training' must be a non-empty list"),
        (lambda d: d["training"][0].pop("text"), r"training\[0\]: missing key\(s\) \['text'\]"),
        (lambda d: d["training"][0].update(text=" "), "non-empty prompt"),
        (lambda d: d.update(num_classes=5), "declares num_classes = 5 but class map"),
    ],
)
def test_bad_datalists(make_dataset, mutate, message):
    paths = make_dataset(("a", "b", "c"))
    report = _run(paths)
    content = json.loads(report.datalist.read_text())
    mutate(content)
    report.datalist.write_text(json.dumps(content))
    with pytest.raises(GuideGenInputError, match=message):
        load_datalist(report.datalist)


def test_unreadable_datalist(tmp_path):
    with pytest.raises(GuideGenInputError, match="not found; create it with `guidegen prepare`"):
        load_datalist(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(GuideGenInputError, match="not readable JSON"):
        load_datalist(tmp_path / "bad.json")


@pytest.mark.parametrize("value, expected", [(128, (128, 128, 128)), ("64", (64, 64, 64)), ("32,32,40", (32, 32, 40)), ((8, 9, 10), (8, 9, 10)), ("none", None), (None, None), ("32x32x40", (32, 32, 40))])
def test_parse_size(value, expected):
    assert parse_size(value, "mask_size") == expected


@pytest.mark.parametrize("value", ["abc", "1,2", -4, "0,1,2"])
def test_parse_size_rejects(value):
    with pytest.raises(GuideGenInputError, match="--mask_size"):
        parse_size(value, "mask_size")


def test_missing_folders_are_named(make_dataset, tmp_path):
    paths = make_dataset(("a",))
    with pytest.raises(GuideGenInputError, match="images folder .*nope not found"):
        prepare_dataset(tmp_path / "nope", paths["segmentations"], paths["records"], paths["output"], settings=SMALL)
    with pytest.raises(GuideGenInputError, match="tumor mask folder .*nada not found"):
        prepare_dataset(paths["images"], paths["segmentations"], paths["records"], paths["output"], tumors_dir=tmp_path / "nada", settings=SMALL)


# ---------------------------------------------------------------- issue 16: data that would be written wrong


def _write_with_pixdim(path: Path, array: np.ndarray, pixdim: tuple[float, float, float]) -> None:
    """A NIfTI whose header holds the given voxel size as written (nibabel would repair 0 or negative on save)."""
    image = nib.Nifti1Image(np.asarray(array, dtype=np.int16), None)  # no sform/qform: pixdim sets the spacing
    image.header.set_zooms((2.0, 2.0, 3.0))
    content = bytearray(image.to_bytes())
    content[80:92] = np.asarray(pixdim, dtype="<f4").tobytes()  # pixdim[1..3] of the NIfTI-1 header
    path.write_bytes(gzip.compress(bytes(content)))


@pytest.mark.parametrize("pixdim", [(0.0, 0.0, 0.0), (2.0, -2.0, 3.0), (2.0, float("nan"), 3.0)])
def test_zero_negative_or_nan_spacing_fails_that_case_only(make_dataset, pixdim):
    paths = make_dataset(("a", "b"))
    ct, seg = synthetic_case()
    _write_with_pixdim(paths["images"] / "b.nii.gz", ct, pixdim)
    _write_with_pixdim(paths["segmentations"] / "b.nii.gz", seg, pixdim)
    report = _run(paths)
    _assert_only_good_survives(paths, report, "b", "b.nii.gz")
    assert "voxel size" in report.failed["b"] and "pixdim" in report.failed["b"]


@pytest.mark.parametrize(
    "transform, message",
    [(lambda ct: ct.astype(np.float32) * 1000, "scaled"), (lambda ct: ct + 1024, "no air")],
    ids=["times_1000", "no_intercept"],
)
def test_ct_not_in_hounsfield_units_fails_that_case_only(make_dataset, transform, message):
    paths = make_dataset(("a", "b"))
    ct, _ = synthetic_case()
    write_nifti(paths["images"] / "b.nii.gz", transform(ct), dtype=np.float32)
    report = _run(paths)
    _assert_only_good_survives(paths, report, "b", "does not look like Hounsfield units")
    assert message in report.failed["b"] and "scl_slope" in report.failed["b"]


def test_scanner_padding_below_minus_1024_is_accepted(make_dataset):
    paths = make_dataset(("a",))
    ct, _ = synthetic_case()
    ct[:3, :3, :] = -3024  # outside the reconstruction circle
    write_nifti(paths["images"] / "a.nii.gz", ct)
    assert not _run(paths).failed


def test_bad_record_field_fails_that_case_only_with_row_and_column(make_dataset):
    paths = make_dataset(("a", "b"), records=[{"case_id": "a", "age": 50}, {"case_id": "b", "age": -3}])
    report = _run(paths)
    _assert_only_good_survives(paths, report, "b", "records.csv line 3")
    assert "'age' = '-3' must be a whole number" in report.failed["b"]


def test_ragged_record_row_fails_that_case_only(make_dataset):
    paths = make_dataset(("a", "b"))
    paths["records"].write_text("case_id,age,diagnosis\na,50,liver cancer\nb,60,liver, metastatic\n")
    report = _run(paths)
    _assert_only_good_survives(paths, report, "b", "line 3")
    summary = json.loads((paths["output"] / "cases/a.json").read_text())
    assert "None" not in summary["entry"]["record"]


def test_record_row_without_case_id_is_reported_and_others_written(make_dataset):
    paths = make_dataset(("a",))
    paths["records"].write_text("case_id,age\na,50\n,60\n")
    report = _run(paths)
    assert [key for key in report.failed] == [f"{paths['records']} line 3"]
    assert "'case_id' is missing" in next(iter(report.failed.values()))
    assert (paths["output"] / "labels/a.nii.gz").is_file()


def test_unexpected_error_in_one_case_is_reported_and_others_written(make_dataset, monkeypatch):
    import custom_components.data.prepare as prepare_module

    real = prepare_module.prepare_case

    def crash_on_b(case_id, *args, **kwargs):
        if case_id == "b":
            raise RuntimeError("boom")
        return real(case_id, *args, **kwargs)

    monkeypatch.setattr(prepare_module, "prepare_case", crash_on_b)
    paths = make_dataset(("a", "b"))
    report = _run(paths)
    _assert_only_good_survives(paths, report, "b", "RuntimeError: boom")
    assert "report" in report.failed["b"]


def test_auto_version_places_the_shipped_v1_example(tmp_path, example_files):
    raw = _example_raw(tmp_path, example_files)
    settings = PrepareSettings(mask_size=None, image_size=None)  # ts_version auto
    report = prepare_dataset(raw["images"], raw["segmentations"], raw["records"], tmp_path / "out", settings=settings, progress=False)
    assert report.prepared == ["ex"] and not report.failed
    summary = json.loads((tmp_path / "out/cases/ex.json").read_text())
    assert summary["sources"]["labelling"] == "total_v1"
    source = np.asarray(nib.load(str(example_files["segmentation"])).dataobj)
    assert summary["class_voxels"] == expected_class_counts(source, "total_v1")


def test_auto_version_uses_hu_evidence_for_label_values(make_dataset):
    # 93 is 'face' in v1 but 'rib_left_2' in v2; at 40 HU it cannot be a rib.
    paths = make_dataset(("a",))
    report = _run(paths, settings=PrepareSettings(mask_size=16, image_size=32))
    assert not report.failed
    assert json.loads((paths["output"] / "cases/a.json").read_text())["sources"]["labelling"] == "total_v1"
