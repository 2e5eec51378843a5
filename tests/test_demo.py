"""guidegen demo-data: phantoms + the real example CT run through prepare."""

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from custom_components.data.class_map import load_class_map
from custom_components.data.datalist import load_datalist
from custom_components.data.demo.dataset import build_demo_dataset
from custom_components.data.demo.example import EXAMPLE_CASE_ID, HELD_OUT_SLICES, example_ct_files, example_parts
from custom_components.errors import GuideGenInputError


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    output = tmp_path_factory.mktemp("demo")
    datalist = build_demo_dataset(output, num_phantoms=4, mask_size=32, image_size=48, progress=False)
    return output, datalist


def test_demo_datalist_is_complete(demo):
    output, datalist_path = demo
    datalist = load_datalist(datalist_path)
    items = datalist["training"] + datalist["validation"]
    ids = sorted(item["case_id"] for item in items)
    assert ids == ["phantom_000", "phantom_001", "phantom_002", "phantom_003", EXAMPLE_CASE_ID]
    assert len(datalist["validation"]) == 1
    for item in items:
        image, label = nib.load(item["image"]), nib.load(item["label"])
        assert image.shape == (48, 48, 48) and label.shape == (32, 32, 32)
        assert item["text"].endswith(".") and "None" not in item["text"]
    raw_records = (output / "raw/records.csv").read_text()
    assert raw_records.startswith("case_id,age,sex,race,diagnosis,tumor_organ,tumor_count,tumor_size_mm,stage,remarks")
    assert (output / "raw/LICENSE-TotalSegmentator.txt").is_file()


def test_demo_holds_out_the_ct_small_slab_of_the_example_ct(demo):
    """The last 30 slices of the example CT (TotalSegmentator's ct_small) are the held-out test case of the
    autoencoder benchmark and of the demo weights: the demo trains on the slices before them only."""
    output, _ = demo
    first = HELD_OUT_SLICES[0]
    shipped = example_ct_files()
    for kind, source in (("images", shipped["image"]), ("segmentations", shipped["segmentation"])):
        raw, full = nib.load(str(output / "raw" / kind / f"{EXAMPLE_CASE_ID}.nii.gz")), nib.load(str(source))
        assert HELD_OUT_SLICES == (82, 112) and full.shape[2] == 112
        assert raw.shape == full.shape[:2] + (first,)
        np.testing.assert_array_equal(np.asarray(raw.dataobj), np.asarray(full.dataobj)[:, :, :first])
        np.testing.assert_allclose(raw.affine, full.affine)
    assert not (output / "raw" / "images" / f"{EXAMPLE_CASE_ID}_above.nii.gz").exists()


def test_example_parts_around_a_held_out_slab() -> None:
    assert example_parts(112) == {EXAMPLE_CASE_ID: (0, 82)}
    assert example_parts(112, (52, 82)) == {EXAMPLE_CASE_ID: (0, 52), f"{EXAMPLE_CASE_ID}_above": (82, 112)}
    assert example_parts(112, (0, 30)) == {f"{EXAMPLE_CASE_ID}_above": (30, 112)}
    for bad in ((82, 82), (-1, 30), (100, 113), (50, 40)):
        with pytest.raises(ValueError, match="inside the example CT"):
            example_parts(112, bad)


def test_a_mid_abdomen_hold_out_trains_on_both_sides_of_the_gap(tmp_path) -> None:
    """--held_out_slices 52,82: two raw cases, each the example CT's own slices and world position, none of 52-81."""
    datalist = load_datalist(build_demo_dataset(tmp_path, num_phantoms=0, mask_size=16, image_size=32, val_fraction=0.0,
                                                progress=False, held_out_slices=(52, 82)))
    assert sorted(item["case_id"] for item in datalist["training"]) == [EXAMPLE_CASE_ID, f"{EXAMPLE_CASE_ID}_above"]
    full = nib.load(str(example_ct_files()["image"]))
    for case_id, (first, stop) in ((EXAMPLE_CASE_ID, (0, 52)), (f"{EXAMPLE_CASE_ID}_above", (82, 112))):
        raw = nib.load(str(tmp_path / "raw" / "images" / f"{case_id}.nii.gz"))
        np.testing.assert_array_equal(np.asarray(raw.dataobj), np.asarray(full.dataobj)[:, :, first:stop])
        np.testing.assert_allclose(raw.affine, full.slicer[:, :, first:stop].affine)


def test_demo_tumors_sit_in_the_organ_their_record_names(demo):
    _, datalist_path = demo
    datalist = load_datalist(datalist_path)
    class_map = load_class_map()
    checked = 0
    for item in datalist["training"] + datalist["validation"]:
        record = item["record"]
        labels = np.asarray(nib.load(item["label"]).dataobj)
        tumor = labels == class_map.tumor_index
        if not record.get("tumor_count"):
            assert not tumor.any(), item["case_id"]
            continue
        assert tumor.any(), item["case_id"]
        rim = ndimage.binary_dilation(tumor) & ~tumor
        neighbours = np.bincount(labels[rim], minlength=class_map.num_classes)
        assert class_map.class_names[int(np.argmax(neighbours[:-1]))] == record["tumor_organ"], item["case_id"]
        checked += 1
    if checked == 0:
        pytest.skip("no tumor record among the seeded demo phantoms")


def test_demo_rerun_skips_everything_and_is_identical(demo, tmp_path):
    output, datalist_path = demo
    before = datalist_path.read_text()
    mtimes = {p: p.stat().st_mtime_ns for p in output.rglob("*.nii.gz")}
    build_demo_dataset(output, num_phantoms=4, mask_size=32, image_size=48, progress=False)
    assert datalist_path.read_text() == before
    assert {p: p.stat().st_mtime_ns for p in output.rglob("*.nii.gz")} == mtimes


def test_demo_is_reproducible_from_its_seed(demo, tmp_path):
    output, _ = demo
    other = build_demo_dataset(tmp_path / "again", num_phantoms=2, mask_size=32, image_size=48, include_example_ct=False, progress=False)
    for case in ("phantom_000", "phantom_001"):
        first = np.asarray(nib.load(str(output / f"labels/{case}.nii.gz")).dataobj)
        second = np.asarray(nib.load(str(other.parent / f"labels/{case}.nii.gz")).dataobj)
        assert np.array_equal(first, second)


def test_demo_with_fewer_phantoms_drops_stale_cases(tmp_path):
    build_demo_dataset(tmp_path, num_phantoms=2, mask_size=16, image_size=24, include_example_ct=False, progress=False)
    datalist = build_demo_dataset(tmp_path, num_phantoms=1, mask_size=16, image_size=24, include_example_ct=False, progress=False)
    content = json.loads(datalist.read_text())
    assert [item["case_id"] for item in content["training"] + content["validation"]] == ["phantom_000"]


def test_demo_needs_some_case(tmp_path):
    with pytest.raises(GuideGenInputError, match="need at least one phantom or the example CT"):
        build_demo_dataset(tmp_path, num_phantoms=0, include_example_ct=False)
