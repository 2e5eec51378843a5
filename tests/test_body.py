"""The opt-in body class (issue 14): derived from the CT in `prepare`, or from a mask's organs for `generate --mask`."""

import json

import nibabel as nib
import numpy as np
import pytest

from conftest import synthetic_case, write_nifti
from custom_components.data.body import add_body_class, add_body_class_to_mask_file, body_from_mask
from custom_components.data.class_map import body_class_map_path, load_class_map
from custom_components.data.prepare import PrepareSettings, prepare_dataset
from custom_components.errors import GuideGenInputError

LIVER, LUNG, BODY = 4, 12, 20


def torso_phantom() -> tuple[np.ndarray, np.ndarray]:
    """(X, Y, Z) RAS CT and labels: a soft-tissue body with a liver, an air-filled lung, unlabelled bowel gas,
    an unlabelled airway open at the top of the volume, and the scanner table below the body."""
    ct = np.full((40, 40, 12), -1000.0, dtype=np.float32)
    ct[8:32, 8:32, :] = 40.0  # body
    ct[5:35, 2:5, :] = 200.0  # table, separated from the body by air (y = 5..7)
    labels = np.zeros(ct.shape, dtype=np.uint8)
    labels[10:16, 10:16, 2:6] = LIVER
    ct[22:30, 20:28, 4:12] = -850.0  # lung: air, but labelled
    labels[22:30, 20:28, 4:12] = LUNG
    ct[18:21, 12:15, 3:6] = -1000.0  # bowel gas: enclosed air pocket, unlabelled
    ct[13, 24, 6:12] = -1000.0  # airway: reaches the top slice, so only a per-slice fill closes it
    return ct, labels


def test_body_class_from_ct():
    ct, labels = torso_phantom()
    before = labels.copy()
    out = add_body_class(labels, ct, BODY, threshold_hu=-500.0)
    assert np.array_equal(labels, before)  # the input is left alone
    assert out[0, 0, 0] == 0 and out[36, 20, 6] == 0  # air outside the body
    assert out[20, 9, 6] == BODY and out[31, 31, 0] == BODY  # tissue inside, up to the skin and the end slices
    assert np.all(out[18:21, 12:15, 3:6] == BODY)  # bowel gas filled
    assert np.all(out[13, 24, 6:12] == BODY)  # airway open at the border filled slice by slice
    assert np.all(out[5:35, 2:5, :] == 0)  # the table is not the largest component
    organs = before > 0
    assert np.array_equal(out[organs], before[organs])  # other classes untouched
    assert set(np.unique(out)) == {0, LIVER, LUNG, BODY}
    assert np.array_equal(out == BODY, (before == 0) & (out != 0))


def test_body_class_needs_matching_grids():
    ct, labels = torso_phantom()
    with pytest.raises(GuideGenInputError, match="same shape"):
        add_body_class(labels[:-1], ct, BODY)


def test_body_from_mask_grows_the_organs_by_the_margin():
    labels = np.zeros((40, 40, 10), dtype=np.uint8)
    labels[10:18, 10:30, :] = LIVER
    labels[22:30, 10:30, :] = LUNG  # a gap of 4 voxels (8 mm) between the organs
    body = body_from_mask(labels, spacing_mm=(2.0, 2.0, 2.0), margin_mm=6.0)
    assert body[19:22, 20, 5].all()  # the gap between organs is inside
    assert body[7, 20, 5] and not body[6, 20, 5]  # 3 voxels = 6 mm beyond the liver, not 4
    assert not body[0, 0, 0]


def _mask_file(tmp_path, labels, spacing=2.0):
    affine = np.diag([spacing, spacing, spacing, 1.0])
    return write_nifti(tmp_path / "mask.nii.gz", labels, affine=affine, dtype=np.uint8)


def test_mask_file_without_ct(tmp_path):
    labels = np.zeros((30, 30, 10), dtype=np.uint8)
    labels[8:14, 8:22, :] = LIVER
    labels[16:22, 8:22, :] = LUNG
    source = _mask_file(tmp_path, labels)
    written = add_body_class_to_mask_file(source, tmp_path / "with_body.nii.gz", margin_mm=4.0)
    image = nib.load(str(written))
    out = np.asarray(image.dataobj)
    np.testing.assert_allclose(image.affine, nib.load(str(source)).affine)
    assert np.array_equal(out[labels > 0], labels[labels > 0])
    assert out[15, 15, 5] == BODY and out[6, 15, 5] == BODY and out[0, 0, 0] == 0


def test_mask_file_with_a_ct_on_a_finer_grid(tmp_path):
    ct, labels = torso_phantom()
    source = _mask_file(tmp_path, labels[::2, ::2, ::2], spacing=2.0)
    # The CT covers the same field of view at 1 mm: its first voxel centre sits half a mask voxel lower.
    ct_affine = np.diag([1.0, 1.0, 1.0, 1.0])
    ct_affine[:3, 3] = -0.5
    ct_path = write_nifti(tmp_path / "ct.nii.gz", ct, affine=ct_affine)
    out = np.asarray(nib.load(str(add_body_class_to_mask_file(source, tmp_path / "o.nii.gz", ct=ct_path))).dataobj)
    assert out[10, 5, 3] == BODY and out[0, 0, 0] == 0 and out[10, 1, 3] == 0  # body, air, table


def test_mask_file_rejects_a_class_map_without_body(tmp_path):
    source = _mask_file(tmp_path, np.zeros((4, 4, 4), dtype=np.uint8))
    with pytest.raises(GuideGenInputError, match="has no body_class"):
        add_body_class_to_mask_file(source, tmp_path / "o.nii.gz", class_map=str(load_class_map().path))


def test_prepare_with_the_body_class_map(make_dataset):
    paths = make_dataset(("a",), records=[{"case_id": "a", "tumor_organ": "liver", "tumor_count": 1}])
    ct, seg = synthetic_case()
    tumor = np.zeros_like(seg)
    tumor[6:8, 6:8, 5:7] = 1
    write_nifti(paths["raw"] / "tumors/a.nii.gz", tumor, dtype=np.uint8)
    class_map = load_class_map(body_class_map_path())
    settings = PrepareSettings(mask_size=None, image_size=None, ts_version="v1", margin_mm=100)
    report = prepare_dataset(paths["images"], paths["segmentations"], paths["records"], paths["output"],
                             tumors_dir=paths["raw"] / "tumors", class_map=class_map, settings=settings, progress=False)
    assert not report.failed
    summary = json.loads((paths["output"] / "cases/a.json").read_text())
    body_voxels = int((ct > -500).sum() - ((seg > 0) & (seg != 93)).sum())  # the face label maps to background
    assert summary["class_voxels"]["body"] == body_voxels
    assert summary["class_voxels"]["tumor"] == 8 and class_map.tumor_index == 19
    labels = np.asarray(nib.load(str(paths["output"] / "labels/a.nii.gz")).dataobj)
    assert labels.max() == BODY and json.loads(report.datalist.read_text())["num_classes"] == 21


def test_cli_body_class_switch(make_dataset, tmp_path):
    from custom_components import cli

    paths = make_dataset(("a",))
    datalist = cli.prepare(images_dir=str(paths["images"]), segmentations_dir=str(paths["segmentations"]),
                           records=str(paths["records"]), output_dir=str(paths["output"]), ts_version="v1",
                           mask_size=16, image_size=32, body_class="true")
    assert json.loads(open(datalist).read())["num_classes"] == 21
    with pytest.raises(GuideGenInputError, match="has no body_class"):
        cli.prepare(images_dir=str(paths["images"]), segmentations_dir=str(paths["segmentations"]),
                    records=str(paths["records"]), output_dir=str(tmp_path / "o"), class_map=str(load_class_map().path),
                    body_class=True)


def test_guidegen_body_class_command(tmp_path, capsys):
    """`guidegen body-class` writes the mask with the body class; a misspelt flag or a missing mask is refused with
    the fix before anything is written."""
    from custom_components.cli import main

    labels = np.zeros((30, 30, 10), dtype=np.uint8)
    labels[8:14, 8:22, :] = LIVER
    source = _mask_file(tmp_path, labels)
    main(["body-class", "--mask", str(source), "--output", str(tmp_path / "out" / "with_body.nii.gz"), "--margin_mm", "4"])
    out = np.asarray(nib.load(str(tmp_path / "out" / "with_body.nii.gz")).dataobj)
    assert out[6, 15, 5] == BODY and out[10, 15, 5] == LIVER and out[0, 0, 0] == 0
    for argv, expected in (
        (["body-class", "--mask", str(source), "--outptu", str(tmp_path / "x.nii.gz")], "did you mean --output"),
        (["body-class", "--mask", str(tmp_path / "missing.nii.gz"), "--output", str(tmp_path / "x.nii.gz")], "not found"),
        (["body-class", "--mask", str(source), "--output", str(tmp_path / "x.nii.gz"), "--margin_mm", "-3"], "margin_mm"),
        (["body-class", "--mask", str(source), "--output", str(tmp_path / "out")], "is a folder"),
    ):
        with pytest.raises(SystemExit) as stopped:
            main(argv)
        assert stopped.value.code == 2 and expected in capsys.readouterr().err
        assert not (tmp_path / "x.nii.gz").exists()
