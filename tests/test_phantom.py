"""Tests of the procedural torso phantom (:mod:`custom_components.data.demo.phantom` and its records)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from custom_components.data.demo.labels import LABELS, TUMOR_ORGANS
from custom_components.data.demo.phantom import Phantom, generate_phantom
from custom_components.data.demo.records import make_phantom_record
from custom_components.data.records import RECORD_FIELDS, normalize_record

DEFAULT_SHAPE = (64, 64, 80)
DEFAULT_SPACING = (6.0, 4.5, 6.0)
HEALTHY = {"case_id": "healthy", "sex": "female", "age": 47, "tumor_organ": None, "tumor_count": 0}
LIVER_TWO_TUMORS = {"case_id": "liver", "tumor_organ": "liver", "tumor_count": 2, "tumor_size_mm": 25.0}
BIG_ORGANS = (
    "liver",
    "spleen",
    "kidney_right",
    "kidney_left",
    "stomach",
    "urinary_bladder",
    "aorta",
    "heart_myocardium",
    "lung_upper_lobe_left",
    "lung_lower_lobe_left",
    "lung_upper_lobe_right",
    "lung_lower_lobe_right",
)
VERTEBRAE = tuple(range(LABELS["vertebrae_L5"], LABELS["vertebrae_T1"] + 1))


@pytest.fixture(scope="module")
def healthy() -> Phantom:
    return generate_phantom(HEALTHY, seed=0)


@pytest.fixture(scope="module")
def liver_tumors() -> Phantom:
    return generate_phantom(LIVER_TWO_TUMORS, seed=3)


def _world_centroid(phantom: Phantom, labels: int | tuple[int, ...]) -> np.ndarray:
    """Centroid of the given labels in world (RAS+ mm) coordinates, through the affine."""
    mask = np.isin(phantom.segmentation, labels)
    assert mask.any(), labels
    voxel_centroid = np.argwhere(mask).mean(axis=0)
    return phantom.affine[:3, :3] @ voxel_centroid + phantom.affine[:3, 3]


def test_shapes_dtypes_and_affine(healthy: Phantom) -> None:
    assert healthy.ct.shape == healthy.segmentation.shape == healthy.tumor.shape == DEFAULT_SHAPE
    assert healthy.ct.dtype == np.int16
    assert healthy.segmentation.dtype == np.uint8
    assert healthy.tumor.dtype == np.uint8
    assert healthy.affine.dtype == np.float64 and healthy.affine.shape == (4, 4)
    np.testing.assert_allclose(np.diag(healthy.affine)[:3], DEFAULT_SPACING)
    np.testing.assert_allclose(healthy.affine[:3, :3], np.diag(DEFAULT_SPACING))
    # The volume is centred on the world origin.
    centre_voxel = (np.asarray(DEFAULT_SHAPE) - 1) / 2.0
    np.testing.assert_allclose(healthy.affine[:3, :3] @ centre_voxel + healthy.affine[:3, 3], 0.0, atol=1e-9)
    assert nib.aff2axcodes(healthy.affine) == ("R", "A", "S")
    assert not healthy.tumor.any()


def test_hu_range_and_tissue_values(healthy: Phantom) -> None:
    ct, seg = healthy.ct, healthy.segmentation
    assert ct.min() >= -1024 and ct.max() <= 3071
    assert np.median(ct[:2, :2, :]) < -950  # air in the corners of the field of view
    assert -950 < np.median(ct[np.isin(seg, (13, 14, 15, 16, 17))]) < -750  # lungs
    assert 40 < np.median(ct[seg == LABELS["liver"]]) < 80
    assert np.median(ct[seg == LABELS["aorta"]]) > 150  # contrast-enhanced
    assert np.percentile(ct[np.isin(seg, VERTEBRAE)], 90) > 600  # cortical bone
    body_background = (seg == 0) & (ct > -500)
    assert np.percentile(ct[body_background], 10) < -60  # fat
    assert np.percentile(ct[body_background], 90) > 20  # muscle


@pytest.mark.parametrize("seed", [0, 7])
def test_every_structure_present_at_default_shape(seed: int) -> None:
    phantom = generate_phantom(HEALTHY, seed=seed)
    counts = np.bincount(phantom.segmentation.ravel(), minlength=256)
    missing = [name for name, label in LABELS.items() if counts[label] == 0]
    assert not missing, f"empty structures: {missing}"
    assert set(np.unique(phantom.segmentation)) <= {0, *LABELS.values()}


@pytest.mark.parametrize(
    "spacing, seed",
    [(DEFAULT_SPACING, 0), (DEFAULT_SPACING, 1), ((12.0, 9.0, 12.0), 0)],  # half / same field of view
)
def test_big_organs_present_on_a_tiny_grid(spacing: tuple[float, float, float], seed: int) -> None:
    phantom = generate_phantom(HEALTHY, shape=(32, 32, 40), spacing=spacing, seed=seed)
    assert phantom.ct.shape == (32, 32, 40)
    counts = np.bincount(phantom.segmentation.ravel(), minlength=256)
    missing = [name for name in BIG_ORGANS if counts[LABELS[name]] == 0]
    assert not missing, f"empty structures: {missing}"
    assert counts[list(VERTEBRAE)].sum() > 0


def test_anatomy_scales_with_the_field_of_view() -> None:
    """A coarser grid over the same field of view holds the same patient (organ volumes agree)."""
    fine = generate_phantom(HEALTHY, seed=2)
    coarse = generate_phantom(HEALTHY, shape=(32, 32, 40), spacing=(12.0, 9.0, 12.0), seed=2)
    for name in ("liver", "heart_myocardium", "urinary_bladder"):
        fine_ml = (fine.segmentation == LABELS[name]).sum() * np.prod(DEFAULT_SPACING)
        coarse_ml = (coarse.segmentation == LABELS[name]).sum() * 12.0 * 9.0 * 12.0
        assert 0.8 < coarse_ml / fine_ml < 1.25, name


def test_orientation_in_world_coordinates(healthy: Phantom) -> None:
    # In RAS+ world space +x is the patient's Right, +y Anterior and +z Superior.
    assert nib.aff2axcodes(healthy.affine)[0] == "R"
    liver = _world_centroid(healthy, LABELS["liver"])
    spleen = _world_centroid(healthy, LABELS["spleen"])
    assert liver[0] > 20.0, "liver must lie on the patient's right"
    assert spleen[0] < -20.0, "spleen must lie on the patient's left"
    assert _world_centroid(healthy, LABELS["gallbladder"])[0] > 0.0
    assert _world_centroid(healthy, LABELS["stomach"])[0] < 0.0
    assert _world_centroid(healthy, LABELS["inferior_vena_cava"])[0] > _world_centroid(healthy, LABELS["aorta"])[0]
    kidneys = _world_centroid(healthy, LABELS["kidney_right"]), _world_centroid(healthy, LABELS["kidney_left"])
    assert kidneys[0][0] > 0.0 > kidneys[1][0]
    assert _world_centroid(healthy, LABELS["heart_ventricle_left"])[0] < 0.0  # the heart leans left
    lungs = _world_centroid(healthy, (13, 14, 15, 16, 17))
    bladder = _world_centroid(healthy, LABELS["urinary_bladder"])
    assert lungs[2] > bladder[2] + 150.0, "lungs must be superior to the bladder"
    assert _world_centroid(healthy, VERTEBRAE)[1] < liver[1] - 20.0, "vertebrae must be posterior to the liver"
    assert _world_centroid(healthy, LABELS["vertebrae_T1"])[2] > _world_centroid(healthy, LABELS["vertebrae_L5"])[2]
    assert _world_centroid(healthy, LABELS["lung_upper_lobe_right"])[0] > 0.0
    assert _world_centroid(healthy, LABELS["lung_upper_lobe_left"])[0] < 0.0
    assert _world_centroid(healthy, LABELS["rib_right_6"])[0] > 0.0 > _world_centroid(healthy, LABELS["rib_left_6"])[0]
    assert _world_centroid(healthy, LABELS["hip_right"])[0] > 0.0 > _world_centroid(healthy, LABELS["hip_left"])[0]


def test_same_inputs_give_identical_arrays() -> None:
    first = generate_phantom(LIVER_TWO_TUMORS, seed=11)
    second = generate_phantom(LIVER_TWO_TUMORS, seed=11)
    for a, b in ((first.ct, second.ct), (first.segmentation, second.segmentation), (first.tumor, second.tumor)):
        assert a.tobytes() == b.tobytes()
    np.testing.assert_array_equal(first.affine, second.affine)


def test_different_seeds_give_different_phantoms() -> None:
    first = generate_phantom(HEALTHY, seed=0)
    second = generate_phantom(HEALTHY, seed=1)
    assert not np.array_equal(first.segmentation, second.segmentation)
    assert not np.array_equal(first.ct, second.ct)


def test_liver_tumors_count_location_and_density(liver_tumors: Phantom) -> None:
    tumor = liver_tumors.tumor.astype(bool)
    _, count = ndimage.label(tumor)
    assert count == 2
    assert np.all(liver_tumors.segmentation[tumor] == LABELS["liver"]), "tumors keep the liver label"
    liver_only = (liver_tumors.segmentation == LABELS["liver"]) & ~tumor
    assert liver_tumors.ct[tumor].mean() < liver_tumors.ct[liver_only].mean() - 20.0  # hypodense
    # A 25 mm tumor spans several 6 mm voxels.
    assert tumor.sum() >= 2 * 10


def test_sub_voxel_tumors_keep_their_count() -> None:
    record = {"tumor_organ": "kidney", "tumor_count": 3, "tumor_size_mm": 0.5}
    phantom = generate_phantom(record, seed=5)
    labels, count = ndimage.label(phantom.tumor)
    assert count == 3
    assert np.all(np.bincount(labels.ravel())[1:] >= 1)
    kidney = np.isin(phantom.segmentation, (LABELS["kidney_right"], LABELS["kidney_left"]))
    assert np.all(kidney[phantom.tumor > 0])


@pytest.mark.parametrize("organ", sorted(TUMOR_ORGANS))
def test_tumors_stay_inside_every_supported_organ(organ: str) -> None:
    phantom = generate_phantom({"tumor_organ": organ, "tumor_count": 2, "tumor_size_mm": 15.0}, seed=4)
    tumor = phantom.tumor.astype(bool)
    assert tumor.any()
    allowed = [label for side in TUMOR_ORGANS[organ] for label in side]
    assert np.all(np.isin(phantom.segmentation[tumor], allowed))
    assert ndimage.label(tumor)[1] == 2
    if organ == "lung":
        assert phantom.ct[tumor].mean() > -200  # a solid nodule, not aerated lung


def test_missing_tumor_fields_use_defaults() -> None:
    no_count = generate_phantom({"tumor_organ": "liver"}, seed=0)
    assert not no_count.tumor.any()
    default_size = generate_phantom({"tumor_organ": "spleen", "tumor_count": 1, "tumor_size_mm": None}, seed=0)
    assert ndimage.label(default_size.tumor)[1] == 1


def test_unknown_tumor_organ_is_rejected() -> None:
    with pytest.raises(ValueError, match="brain") as info:
        generate_phantom({"tumor_organ": "brain", "tumor_count": 1, "tumor_size_mm": 10.0})
    assert "liver" in str(info.value) and "pancreas" in str(info.value)


@pytest.mark.parametrize("fields", [{"tumor_count": -1}, {"tumor_count": 1.5}, {"tumor_size_mm": 0.0}])
def test_bad_tumor_fields_are_rejected(fields: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(fields))):
        generate_phantom({"tumor_organ": "liver", "tumor_count": 1, "tumor_size_mm": 10.0, **fields})


def test_tumor_organ_names_are_normalised() -> None:
    phantom = generate_phantom({"tumor_organ": " Urinary bladder", "tumor_count": 1, "tumor_size_mm": 20.0}, seed=0)
    assert np.all(phantom.segmentation[phantom.tumor > 0] == LABELS["urinary_bladder"])


@pytest.mark.parametrize(
    "kwargs",
    [{"shape": (64, 64)}, {"shape": (0, 64, 80)}, {"spacing": (6.0, -1.0, 6.0)}],
)
def test_bad_geometry_is_rejected(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        generate_phantom(HEALTHY, **kwargs)


def test_make_phantom_record_schema_and_determinism() -> None:
    records = [make_phantom_record(f"case_{i}", np.random.default_rng(i)) for i in range(200)]
    again = [make_phantom_record(f"case_{i}", np.random.default_rng(i)) for i in range(200)]
    assert records == again
    healthy = [r for r in records if r["tumor_organ"] is None]
    assert 0.1 < len(healthy) / len(records) < 0.4
    for i, record in enumerate(records):
        assert tuple(record) == RECORD_FIELDS
        assert record["case_id"] == f"case_{i}"
        assert type(record["age"]) is int and 25 <= record["age"] <= 85
        assert record["sex"] in ("male", "female")
        assert record["race"] in ("White", "Black or African American", "Asian", "Hispanic or Latino")
        assert isinstance(record["diagnosis"], str) and record["diagnosis"]
        assert record["remarks"] is None or isinstance(record["remarks"], str)
        if record["tumor_organ"] is None:
            assert record["diagnosis"] == "no abnormality"
            assert record["tumor_count"] == 0 and record["tumor_size_mm"] is None and record["stage"] is None
        else:
            assert record["tumor_organ"] in TUMOR_ORGANS
            assert type(record["tumor_count"]) is int and 1 <= record["tumor_count"] <= 3
            assert type(record["tumor_size_mm"]) is float and 10.0 <= record["tumor_size_mm"] <= 45.0
            assert round(record["tumor_size_mm"], 1) == record["tumor_size_mm"]
            assert record["stage"] in ("I", "II", "III", "IV")
        # The record passes the project's own record validation unchanged.
        assert normalize_record(record) == record


def test_generated_records_drive_the_generator() -> None:
    rng = np.random.default_rng(123)
    for index in range(3):
        record = make_phantom_record(f"phantom_{index}", rng)
        phantom = generate_phantom(record, shape=(32, 32, 40), spacing=(12.0, 9.0, 12.0), seed=index)
        assert phantom.tumor.any() == (record["tumor_count"] > 0)
