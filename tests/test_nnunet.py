"""nnU-Net v2 raw dataset writing from mask + CT pairs of different resolution, and the rule checker's teeth."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from custom_components.data.io import centred_affine
from custom_components.data.writers import save_nifti
from custom_components.data.nnunet import check_nnunet_raw_dataset, dataset_folder_name, write_nnunet_dataset
from custom_components.errors import GuideGenInputError

CLASSES = ["background", "liver", "tumor"]


def make_pair(folder, case_id, seed):
    """A 16³ CT at 2 mm and its 8³ mask at 4 mm over the same field of view."""
    rng = np.random.default_rng(seed)
    ct = save_nifti(rng.integers(-1000, 500, (16, 16, 16)), centred_affine((16, 16, 16), (2, 2, 2)), folder / f"{case_id}_ct.nii.gz", np.int16)
    mask = save_nifti(rng.integers(0, 3, (8, 8, 8)), centred_affine((8, 8, 8), (4, 4, 4)), folder / f"{case_id}_mask.nii.gz", np.uint8)
    return {"case_id": case_id, "ct": ct, "mask": mask}


def test_written_dataset_passes_the_checker(tmp_path):
    cases = [make_pair(tmp_path, f"guidegen_{k:03d}", k) for k in range(2)]
    folder = write_nnunet_dataset(cases, CLASSES, tmp_path / "raw", dataset_id=7, name="GuideGenDemo")
    assert folder.name == "Dataset007_GuideGenDemo"
    assert check_nnunet_raw_dataset(folder) == []
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "liver": 1, "tumor": 2} and meta["numTraining"] == 2
    label = nib.load(str(folder / "labelsTr/guidegen_000.nii.gz"))
    image = nib.load(str(folder / "imagesTr/guidegen_000_0000.nii.gz"))
    assert label.shape == image.shape == (16, 16, 16) and np.allclose(label.affine, image.affine)
    # nearest-neighbour upsampling keeps the mask's labels and blocks
    mask = np.asarray(nib.load(str(cases[0]["mask"])).dataobj)
    assert np.array_equal(np.asarray(label.dataobj)[::2, ::2, ::2], mask)


def test_checker_finds_broken_rules(tmp_path):
    folder = write_nnunet_dataset([make_pair(tmp_path, "a", 0)], CLASSES, tmp_path / "raw")
    meta_path = folder / "dataset.json"
    meta = json.loads(meta_path.read_text())
    meta["labels"] = {"background": 0, "liver": 1}  # label 2 present in the data but not declared
    meta["numTraining"] = 3
    meta_path.write_text(json.dumps(meta))
    (folder / "imagesTr/a_0000.nii.gz").rename(folder / "imagesTr/a.nii.gz")
    problems = " | ".join(check_nnunet_raw_dataset(folder))
    assert "numTraining is 3" in problems and "missing ['a_0000.nii.gz']" in problems
    assert "without a _XXXX channel suffix" in problems
    (folder / "imagesTr/a.nii.gz").rename(folder / "imagesTr/a_0000.nii.gz")
    assert "label values [2] not declared" in " | ".join(check_nnunet_raw_dataset(folder))
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 15), np.int16), np.eye(4)), str(folder / "imagesTr/a_0000.nii.gz"))
    assert "differ in shape or geometry" in " | ".join(check_nnunet_raw_dataset(folder))


def test_bad_input_is_refused(tmp_path):
    case = make_pair(tmp_path, "a", 0)
    with pytest.raises(GuideGenInputError, match="no cases"):
        write_nnunet_dataset([], CLASSES, tmp_path / "raw")
    with pytest.raises(GuideGenInputError, match="repeated"):
        write_nnunet_dataset([case, dict(case)], CLASSES, tmp_path / "raw")
    with pytest.raises(GuideGenInputError, match="outside the 2 classes"):
        write_nnunet_dataset([case], CLASSES[:2], tmp_path / "raw2")
    other = dict(case, mask=save_nifti(np.zeros((8, 8, 8)), centred_affine((8, 8, 8), (9, 9, 9)), tmp_path / "far.nii.gz", np.uint8))
    with pytest.raises(GuideGenInputError, match="same field of view"):
        write_nnunet_dataset([other], CLASSES, tmp_path / "raw3")
    with pytest.raises(GuideGenInputError, match="1..999"):
        dataset_folder_name(1000, "x")
