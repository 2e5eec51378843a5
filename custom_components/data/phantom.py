"""Procedural full-torso CT phantoms: a paired CT volume, TotalSegmentator-v1 label map and tumor mask.

The phantoms exist so that every stage of the pipeline (data preparation, mask generation, CT generation,
evaluation) can be trained and tested on a laptop CPU and in CI without downloading real scans. They are
**not anatomically faithful**: organs are analytic shapes (ellipsoids, superquadrics and tubes along smooth
centre lines) whose surfaces are perturbed by low-frequency noise, laid out in roughly the right places
and painted in a fixed order so that later structures overwrite earlier ones. The CT intensities are plausible
Hounsfield units with organ-specific texture, which is enough for a model to learn "what goes where".

Geometry is built in world millimetres. The volume is a torso from the lung apices to the pelvis, designed
for a reference field of view of 384 x 288 x 480 mm (the default ``shape`` x ``spacing``). Other grids are
handled by scaling the reference anatomy uniformly so it fits the requested field of view, then sampling it
at the voxel centres given by the affine, so the same patient looks the same (up to resolution) at any size.
Very small structures are thickened to about one voxel so they do not vanish on coarse grids.

Orientation follows nibabel's RAS+ convention: world ``+x`` points to the patient's Right, ``+y`` to the
Anterior and ``+z`` to the Superior. With the diagonal affine used here, array index ``i`` therefore grows
toward the patient's right, ``j`` toward the front and ``k`` toward the head.

Labels use the TotalSegmentator v1 indices (see ``LABELS``); the body outside organs (fat, muscle,
mediastinal and mesenteric fat, the sternum) is background (0). Tumors are a separate mask: tumor voxels keep
the label of the organ that holds them.

Everything random is drawn from ``np.random.default_rng(seed)``, so a given (record, shape, spacing, seed)
reproduces the same arrays byte for byte.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from custom_components.data.io import centred_affine

__all__ = [
    "LABELS",
    "REFERENCE_FIELD_OF_VIEW_MM",
    "TUMOR_ORGANS",
    "Phantom",
    "generate_phantom",
    "make_phantom_record",
]

# --------------------------------------------------------------------------------------------------------
# Label space (TotalSegmentator v1)
# --------------------------------------------------------------------------------------------------------

_VERTEBRA_NAMES = ("L5", "L4", "L3", "L2", "L1") + tuple(f"T{k}" for k in range(12, 0, -1))

LABELS: Mapping[str, int] = MappingProxyType(
    {
        "spleen": 1,
        "kidney_right": 2,
        "kidney_left": 3,
        "gallbladder": 4,
        "liver": 5,
        "stomach": 6,
        "aorta": 7,
        "inferior_vena_cava": 8,
        "portal_vein_and_splenic_vein": 9,
        "pancreas": 10,
        "adrenal_gland_right": 11,
        "adrenal_gland_left": 12,
        "lung_upper_lobe_left": 13,
        "lung_lower_lobe_left": 14,
        "lung_upper_lobe_right": 15,
        "lung_middle_lobe_right": 16,
        "lung_lower_lobe_right": 17,
        **{f"vertebrae_{name}": 18 + k for k, name in enumerate(_VERTEBRA_NAMES)},
        "esophagus": 42,
        "trachea": 43,
        "heart_myocardium": 44,
        "heart_atrium_left": 45,
        "heart_ventricle_left": 46,
        "heart_atrium_right": 47,
        "heart_ventricle_right": 48,
        "small_bowel": 55,
        "duodenum": 56,
        "colon": 57,
        **{f"rib_left_{k}": 57 + k for k in range(1, 13)},
        **{f"rib_right_{k}": 69 + k for k in range(1, 13)},
        "femur_left": 88,
        "femur_right": 89,
        "hip_left": 90,
        "hip_right": 91,
        "sacrum": 92,
        "urinary_bladder": 104,
    }
)
"""TotalSegmentator v1 name -> label index of every structure the phantom draws."""

# GuideGen tumor organ (class name) -> candidate sides, each a tuple of v1 labels. Paired organs list one
# entry per side and a side is drawn at random.
TUMOR_ORGANS: Mapping[str, tuple[tuple[int, ...], ...]] = MappingProxyType(
    {
        "liver": ((LABELS["liver"],),),
        "spleen": ((LABELS["spleen"],),),
        "pancreas": ((LABELS["pancreas"],),),
        "kidney": ((LABELS["kidney_right"],), (LABELS["kidney_left"],)),
        "adrenal_gland": ((LABELS["adrenal_gland_right"],), (LABELS["adrenal_gland_left"],)),
        "gallbladder": ((LABELS["gallbladder"],),),
        "stomach": ((LABELS["stomach"],),),
        "duodenum": ((LABELS["duodenum"],),),
        "small_bowel": ((LABELS["small_bowel"],),),
        "colon": ((LABELS["colon"],),),
        "esophagus": ((LABELS["esophagus"],),),
        "urinary_bladder": ((LABELS["urinary_bladder"],),),
        "lung": (
            (LABELS["lung_upper_lobe_right"], LABELS["lung_middle_lobe_right"], LABELS["lung_lower_lobe_right"]),
            (LABELS["lung_upper_lobe_left"], LABELS["lung_lower_lobe_left"]),
        ),
    }
)
"""Accepted ``record["tumor_organ"]`` values -> the label sets a tumor may be placed in."""

# Parenchymal organs show hypodense tumors (organ HU - 40); in hollow, fluid-filled or air-filled organs a
# tumor is an enhancing soft-tissue mass, and in the lung a solid nodule.
_TUMOR_HU_HOLLOW = 45.0
_TUMOR_HU_LUNG = 30.0
_HOLLOW_TUMOR_ORGANS = frozenset(
    {"gallbladder", "stomach", "duodenum", "small_bowel", "colon", "esophagus", "urinary_bladder"}
)

REFERENCE_FIELD_OF_VIEW_MM = (384.0, 288.0, 480.0)
"""Field of view (x, y, z in mm) the anatomy is designed for; other fields of view scale it uniformly."""

# Base HU (before texture) of the parenchymal organs, used for hypodense tumors.
_ORGAN_BASE_HU: Mapping[int, float] = MappingProxyType(
    {
        LABELS["liver"]: 60.0,
        LABELS["spleen"]: 50.0,
        LABELS["pancreas"]: 45.0,
        LABELS["kidney_right"]: 150.0,
        LABELS["kidney_left"]: 150.0,
        LABELS["adrenal_gland_right"]: 35.0,
        LABELS["adrenal_gland_left"]: 35.0,
    }
)

_BONE_LABELS = (
    tuple(range(LABELS["vertebrae_L5"], LABELS["vertebrae_T1"] + 1))
    + tuple(range(LABELS["rib_left_1"], LABELS["rib_right_12"] + 1))
    + (LABELS["femur_left"], LABELS["femur_right"], LABELS["hip_left"], LABELS["hip_right"], LABELS["sacrum"])
)

_HU_AIR = -1000.0
_HU_FAT = -100.0
_HU_VISCERAL_FAT = -90.0
_HU_MUSCLE = 50.0
_HU_CANCELLOUS = 250.0
_HU_CORTEX = 850.0
_WHITE_NOISE_HU = 12.0
_HU_RANGE = (-1024.0, 3071.0)

# Record generation vocabulary.
_RACES = ("White", "Black or African American", "Asian", "Hispanic or Latino")
_DIAGNOSES = MappingProxyType(
    {
        "liver": "hepatocellular carcinoma",
        "pancreas": "pancreatic ductal adenocarcinoma",
        "kidney": "renal cell carcinoma",
        "spleen": "splenic lymphoma",
        "lung": "lung adenocarcinoma",
        "colon": "colorectal carcinoma",
        "urinary_bladder": "urothelial carcinoma of the bladder",
    }
)
_STAGES = ("I", "II", "III", "IV")
_REMARKS = (None, "follow-up scan", "post-contrast portal venous phase", "baseline staging scan", "no prior imaging")
_HEALTHY_FRACTION = 0.25


# --------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------


@dataclass
class Phantom:
    """One generated case.

    Attributes:
        ct: int16 Hounsfield units, shape ``shape``, RAS voxel order.
        segmentation: uint8 TotalSegmentator v1 labels (see :data:`LABELS`), same shape.
        tumor: uint8 mask, 1 inside tumors and 0 elsewhere, same shape.
        affine: 4x4 float64 voxel -> RAS+ world (mm) matrix, ``diag(spacing)`` with the volume centred at 0.
    """

    ct: np.ndarray
    segmentation: np.ndarray
    tumor: np.ndarray
    affine: np.ndarray


def make_phantom_record(case_id: str, rng: np.random.Generator) -> dict[str, Any]:
    """Draw a plausible clinical record for a phantom case.

    About a quarter of the records are healthy ("no abnormality", no tumor); the others carry one to three
    tumors in an organ the phantom can draw, with a matching diagnosis, size and stage.

    Args:
        case_id: identifier stored in the record.
        rng: source of randomness; the same generator state gives the same record.

    Returns:
        a dict with exactly the keys ``case_id, age, sex, race, diagnosis, tumor_organ, tumor_count,
        tumor_size_mm, stage, remarks`` holding plain Python values.
    """
    age = int(rng.integers(25, 86))
    sex = "male" if rng.random() < 0.5 else "female"
    race = _RACES[int(rng.integers(len(_RACES)))]
    remarks = _REMARKS[int(rng.integers(len(_REMARKS)))]
    if rng.random() < _HEALTHY_FRACTION:
        return {
            "case_id": str(case_id),
            "age": age,
            "sex": sex,
            "race": race,
            "diagnosis": "no abnormality",
            "tumor_organ": None,
            "tumor_count": 0,
            "tumor_size_mm": None,
            "stage": None,
            "remarks": remarks,
        }
    organs = tuple(_DIAGNOSES)
    organ = organs[int(rng.integers(len(organs)))]
    return {
        "case_id": str(case_id),
        "age": age,
        "sex": sex,
        "race": race,
        "diagnosis": _DIAGNOSES[organ],
        "tumor_organ": organ,
        "tumor_count": int(rng.integers(1, 4)),
        "tumor_size_mm": round(float(rng.uniform(10.0, 45.0)), 1),
        "stage": _STAGES[int(rng.integers(len(_STAGES)))],
        "remarks": remarks,
    }


def generate_phantom(
    record: Mapping[str, Any],
    shape: Sequence[int] = (64, 64, 80),
    spacing: Sequence[float] = (6.0, 4.5, 6.0),
    seed: int = 0,
) -> Phantom:
    """Generate a torso phantom for a clinical record.

    Args:
        record: clinical record; reads ``tumor_organ`` (a key of :data:`TUMOR_ORGANS`, or None for none),
            ``tumor_count`` (missing -> 0), ``tumor_size_mm`` (diameter of the largest tumor, missing -> 20),
            and optionally ``sex`` and ``age``, which mildly change body width and fat.
        shape: voxel grid (x, y, z).
        spacing: voxel size in mm (x, y, z).
        seed: seed of every random choice (patient size, organ sizes and positions, deformations, texture,
            tumor placement).

    Returns:
        the :class:`Phantom`.

    Raises:
        ValueError: unknown ``tumor_organ``, a negative tumor count, a non-positive tumor size, a bad
            shape or spacing, or a tumor organ that the grid is too small to contain.
    """
    shape_t, spacing_t = _check_geometry(shape, spacing)
    tumor_request = _tumor_request(record)
    rng = np.random.default_rng(seed)
    affine = centred_affine(shape_t, spacing_t)
    patient = _PatientModel.draw(record, rng)
    grid = _Grid.create(shape_t, spacing_t, patient.scale_for(shape_t, spacing_t))
    ctx = _Context(grid=grid, canvas=_Canvas.empty(shape_t), noise=_NoiseBank.draw(grid, rng), rng=rng, patient=patient)

    _paint_body_wall(ctx)
    for painter in _ORGAN_PAINTERS:
        painter(ctx)
    tumor = _paint_tumors(ctx, tumor_request, np.asarray(spacing_t))
    _finish_bone(ctx)
    ct = _finish_ct(ctx)
    return Phantom(ct=ct, segmentation=ctx.canvas.labels, tumor=tumor, affine=affine)


# --------------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TumorRequest:
    organ: str | None
    count: int
    size_mm: float


def _check_geometry(
    shape: Sequence[int], spacing: Sequence[float]
) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    shape_t = tuple(int(n) for n in shape)
    spacing_t = tuple(float(s) for s in spacing)
    if len(shape_t) != 3 or min(shape_t) < 1:
        raise ValueError(f"shape must be three positive integers, got {tuple(shape)!r}")
    if len(spacing_t) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing_t):
        raise ValueError(f"spacing must be three positive numbers (mm), got {tuple(spacing)!r}")
    return shape_t, spacing_t  # type: ignore[return-value]


def _tumor_request(record: Mapping[str, Any]) -> _TumorRequest:
    """Read and validate the tumor fields of a record (before any heavy work is done)."""
    organ = record.get("tumor_organ")
    if organ is None or (isinstance(organ, str) and not organ.strip()):
        return _TumorRequest(None, 0, 20.0)
    key = str(organ).strip().lower().replace(" ", "_").replace("-", "_")
    if key not in TUMOR_ORGANS:
        raise ValueError(
            f"tumor_organ {organ!r} is not supported by the phantom generator; accepted organs: "
            f"{', '.join(sorted(TUMOR_ORGANS))}"
        )
    raw_count, raw_size = record.get("tumor_count"), record.get("tumor_size_mm")
    count = _as_number(raw_count, default=0.0)
    if not (math.isfinite(count) and count >= 0 and count == int(count)):
        raise ValueError(f"tumor_count must be a whole number >= 0, got {raw_count!r}")
    size = _as_number(raw_size, default=20.0)
    if not (math.isfinite(size) and size > 0):
        raise ValueError(f"tumor_size_mm must be a positive number of millimetres, got {raw_size!r}")
    return _TumorRequest(key, int(count), size)


def _as_number(value: Any, default: float) -> float:
    """``value`` as a float, ``default`` when missing, NaN when it is not a number."""
    if value is None:
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


# --------------------------------------------------------------------------------------------------------
# Grid, canvas and noise
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Box:
    """An axis-aligned sub-grid: the slices into the volume and broadcastable reference coordinates."""

    sl: tuple[slice, slice, slice]
    x: np.ndarray  # (nx, 1, 1)
    y: np.ndarray  # (1, ny, 1)
    z: np.ndarray  # (1, 1, nz)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.x.shape[0], self.y.shape[1], self.z.shape[2])


@dataclass(frozen=True)
class _Grid:
    """Voxel centres in *reference* millimetres (world mm divided by the anatomy scale), per axis.

    All anatomy is described in the reference frame, so organs keep their place and proportions whatever the
    grid; ``voxel`` is the voxel size in that frame and sets how much small structures must be thickened.
    """

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    voxel: np.ndarray
    half_extent: np.ndarray  # half the field of view, reference mm

    @staticmethod
    def create(shape: tuple[int, int, int], spacing: tuple[float, float, float], scale: np.ndarray) -> _Grid:
        axes = [
            ((np.arange(n, dtype=np.float64) - (n - 1) / 2.0) * s / k).astype(np.float32)
            for n, s, k in zip(shape, spacing, scale)
        ]
        voxel = np.asarray(spacing) / scale
        return _Grid(x=axes[0], y=axes[1], z=axes[2], voxel=voxel, half_extent=np.asarray(shape) * voxel / 2.0)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.x.size, self.y.size, self.z.size)

    @property
    def min_radius(self) -> float:
        """Smallest radius (reference mm) a structure needs to contain a voxel centre wherever it lies."""
        return 0.9 * float(self.voxel.max())

    def box(self, low: Sequence[float], high: Sequence[float]) -> _Box | None:
        """The sub-grid of voxel centres inside [low, high], or None when it holds no voxel."""
        slices = []
        for axis, lo, hi in zip((self.x, self.y, self.z), low, high):
            start = int(np.searchsorted(axis, lo, side="left"))
            stop = int(np.searchsorted(axis, hi, side="right"))
            if stop <= start:
                return None
            slices.append(slice(start, stop))
        return self.from_slices((slices[0], slices[1], slices[2]))

    def full(self) -> _Box:
        return self.from_slices((slice(0, self.x.size), slice(0, self.y.size), slice(0, self.z.size)))

    def from_slices(self, sl: tuple[slice, slice, slice]) -> _Box:
        x, y, z = self.x[sl[0]], self.y[sl[1]], self.z[sl[2]]
        return _Box(sl=sl, x=x[:, None, None], y=y[None, :, None], z=z[None, None, :])


@dataclass
class _Canvas:
    """The label and HU volumes being painted; later paint overwrites earlier paint."""

    labels: np.ndarray
    hu: np.ndarray

    @staticmethod
    def empty(shape: tuple[int, int, int]) -> _Canvas:
        return _Canvas(labels=np.zeros(shape, dtype=np.uint8), hu=np.full(shape, _HU_AIR, dtype=np.float32))

    def paint(self, box: _Box, mask: np.ndarray, label: int | None, hu: float | np.ndarray) -> None:
        """Write ``label`` (None: keep the label, change only HU) and ``hu`` where ``mask`` is set."""
        mask = np.broadcast_to(mask, box.shape)
        if label is not None:
            self.labels[box.sl][mask] = label
        hu_view = self.hu[box.sl]
        hu_view[mask] = np.broadcast_to(np.asarray(hu, dtype=np.float32), box.shape)[mask]


def _smooth_noise(rng: np.random.Generator, grid: _Grid, correlation_mm: float) -> np.ndarray:
    """Unit-variance, smooth random field with the given correlation length (reference mm).

    Random values on a coarse lattice are blended with separable Gaussian weights (three small matrix
    products), which is much cheaper than filtering white noise on the full grid. The lattice is anchored on
    the field of view, not on the voxels, so grids of different resolution over the same field of view
    draw the same lattice and see the same field.
    """
    weights = []
    for axis, half in zip((grid.x, grid.y, grid.z), grid.half_extent):
        count = int(math.ceil(2.0 * float(half) / correlation_mm)) + 3
        nodes = (np.arange(count, dtype=np.float64) - (count - 1) / 2.0) * correlation_mm
        w = np.exp(-0.5 * ((axis[:, None] - nodes[None, :]) / (0.6 * correlation_mm)) ** 2)
        weights.append((w / np.sqrt((w**2).sum(axis=1, keepdims=True))).astype(np.float32))
    lattice = rng.standard_normal((weights[0].shape[1], weights[1].shape[1], weights[2].shape[1])).astype(np.float32)
    field = np.tensordot(weights[0], lattice, axes=(1, 0))  # (nx, b, c)
    field = np.tensordot(field, weights[1], axes=(1, 1))  # (nx, c, ny)
    field = np.tensordot(field, weights[2], axes=(1, 1))  # (nx, ny, nz)
    return np.ascontiguousarray(field, dtype=np.float32)


@dataclass(frozen=True)
class _NoiseBank:
    """A few shared smooth noise fields; each organ mixes them with its own random weights.

    Mixing unit-variance fields with a random unit vector gives every organ an independent-looking,
    unit-variance texture or surface deformation at the cost of only a handful of full-volume fields.
    """

    coarse: tuple[np.ndarray, ...]  # ~45 mm: organ deformations and slow intensity drifts
    medium: tuple[np.ndarray, ...]  # ~16 mm: bowel loops, lobulation
    fine: tuple[np.ndarray, ...]  # ~7 mm: mottling, gas pockets, vessels

    @staticmethod
    def draw(grid: _Grid, rng: np.random.Generator) -> _NoiseBank:
        return _NoiseBank(
            coarse=tuple(_smooth_noise(rng, grid, 45.0) for _ in range(3)),
            medium=tuple(_smooth_noise(rng, grid, 16.0) for _ in range(2)),
            fine=tuple(_smooth_noise(rng, grid, 7.0) for _ in range(2)),
        )

    def mix(self, scale: str, box: _Box, rng: np.random.Generator) -> np.ndarray:
        fields = getattr(self, scale)
        weights = rng.standard_normal(len(fields))
        weights /= max(float(np.linalg.norm(weights)), 1e-6)
        out = np.zeros(box.shape, dtype=np.float32)
        for weight, field in zip(weights, fields):
            out += np.float32(weight) * field[box.sl]
        return out


# --------------------------------------------------------------------------------------------------------
# Patient model: body outline and per-patient variation
# --------------------------------------------------------------------------------------------------------

# Body outline (skin) semi-axes along z, reference mm; interpolated linearly between knots.
_BODY_Z = (-240.0, -150.0, -60.0, 0.0, 100.0, 240.0)
_BODY_SEMI_X = (158.0, 166.0, 150.0, 155.0, 160.0, 150.0)
_BODY_SEMI_Y = (100.0, 106.0, 112.0, 110.0, 105.0, 95.0)
# Centre of the vertebral bodies in y along z (thoracic kyphosis, lumbar lordosis).
_SPINE_Z = (-240.0, -130.0, -100.0, -60.0, 0.0, 60.0, 150.0, 240.0)
_SPINE_Y = (-40.0, -40.0, -32.0, -30.0, -40.0, -46.0, -48.0, -44.0)
_MUSCLE_WALL_MM = 12.0


@dataclass(frozen=True)
class _PatientModel:
    """Per-patient body proportions (reference frame) and the anatomy scale."""

    size_xy: float
    size_z: float
    width: float  # extra body-width factor (sex)
    fat_mm: float
    spine_pitch: float  # vertebral height factor

    @staticmethod
    def draw(record: Mapping[str, Any], rng: np.random.Generator) -> _PatientModel:
        sex = str(record.get("sex") or "").strip().lower()
        female = sex in {"female", "f", "woman"}
        try:
            age = float(record.get("age"))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            age = math.nan
        age = age if math.isfinite(age) else 50.0
        # Older patients carry a little more subcutaneous fat; women a little more and a narrower torso.
        fat = 14.0 + 0.12 * float(np.clip(age - 40.0, -15.0, 40.0)) + (4.0 if female else 0.0)
        return _PatientModel(
            size_xy=float(rng.uniform(0.9, 1.1)),
            size_z=float(rng.uniform(0.96, 1.04)),
            width=0.95 if female else 1.0,
            fat_mm=fat * float(rng.uniform(0.75, 1.3)),
            spine_pitch=float(rng.uniform(0.97, 1.03)),
        )

    def scale_for(self, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
        """World mm per reference mm along (x, y, z): fit the reference field of view, then patient size."""
        fov = np.asarray(shape, dtype=np.float64) * np.asarray(spacing, dtype=np.float64)
        fit = float(np.min(fov / np.asarray(REFERENCE_FIELD_OF_VIEW_MM)))
        return fit * np.array([self.size_xy, self.size_xy, self.size_z])

    def body_semi_axes(self, z: np.ndarray, inset_mm: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """Semi-axes (x, y) of the body outline at heights ``z`` (reference mm), shrunk by ``inset_mm``."""
        ax = np.interp(z, _BODY_Z, _BODY_SEMI_X).astype(np.float32) * np.float32(self.width)
        ay = np.interp(z, _BODY_Z, _BODY_SEMI_Y).astype(np.float32)
        return np.maximum(ax - np.float32(inset_mm), 1.0), np.maximum(ay - np.float32(inset_mm), 1.0)


def _spine_y(z: np.ndarray) -> np.ndarray:
    return np.interp(z, _SPINE_Z, _SPINE_Y).astype(np.float32)


def _diaphragm_z(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Height of the diaphragm: two domes, the right one higher (it sits on the liver)."""
    right = 30.0 - ((x - 65.0) ** 2 + (y - 10.0) ** 2) / 350.0
    left = 20.0 - ((x + 65.0) ** 2 + (y - 10.0) ** 2) / 350.0
    blend = 1.0 / (1.0 + np.exp(-x / 20.0))
    return np.maximum(blend * right + (1.0 - blend) * left, -25.0)


@dataclass
class _Context:
    """Everything the painters share for one phantom."""

    grid: _Grid
    canvas: _Canvas
    noise: _NoiseBank
    rng: np.random.Generator
    patient: _PatientModel
    cavity: np.ndarray | None = None  # inside the muscle wall, minus the back muscles

    def jitter_point(self, point: Sequence[float], size: float, fraction: float = 0.1) -> np.ndarray:
        """Move a landmark by up to ``fraction`` of the structure size along each axis."""
        return np.asarray(point, dtype=np.float64) + self.rng.uniform(-fraction, fraction, 3) * size

    def jitter_factor(self, spread: float = 0.1) -> float:
        return float(self.rng.uniform(1.0 - spread, 1.0 + spread))

    def in_cavity(self, box: _Box) -> np.ndarray:
        assert self.cavity is not None
        return self.cavity[box.sl]


# --------------------------------------------------------------------------------------------------------
# Shape primitives (all in reference mm)
# --------------------------------------------------------------------------------------------------------


def _rotation(rx: float = 0.0, ry: float = 0.0, rz: float = 0.0) -> np.ndarray:
    """Rotation matrix (columns: the local axes in world coordinates) from x, y, z Euler angles (radians)."""
    cx, sx, cy, sy, cz, sz = math.cos(rx), math.sin(rx), math.cos(ry), math.sin(ry), math.cos(rz), math.sin(rz)
    rot_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rot_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rot_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rot_z @ rot_y @ rot_x


def _frame_along(direction: Sequence[float]) -> np.ndarray:
    """Rotation whose first local axis points along ``direction``."""
    u = np.asarray(direction, dtype=np.float64)
    u /= np.linalg.norm(u)
    helper = np.array([0.0, 0.0, 1.0]) if abs(u[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    v = np.cross(helper, u)
    v /= np.linalg.norm(v)
    return np.stack([u, v, np.cross(u, v)], axis=1)


@dataclass(frozen=True)
class _Field:
    """A scalar shape field on a box: ``value <= 1`` inside the shape."""

    box: _Box
    value: np.ndarray


def _ellipsoid(
    grid: _Grid,
    center: Sequence[float],
    semi: Sequence[float],
    rotation: np.ndarray | None = None,
    exponents: Sequence[float] = (2.0, 2.0, 2.0),
    margin: float = 1.25,
) -> _Field | None:
    """Superquadric ``sum |local_k / semi_k| ** e_k`` (an ellipsoid for e = 2), thickened to >= 1 voxel."""
    semi = np.maximum(np.asarray(semi, dtype=np.float64), grid.min_radius)
    center = np.asarray(center, dtype=np.float64)
    reach = np.full(3, semi.max()) if rotation is not None else semi
    box = grid.box(center - margin * reach, center + margin * reach)
    if box is None:
        return None
    d = (box.x - center[0], box.y - center[1], box.z - center[2])
    if rotation is None:
        local = d
    else:
        local = tuple(
            np.float32(rotation[0, k]) * d[0] + np.float32(rotation[1, k]) * d[1] + np.float32(rotation[2, k]) * d[2]
            for k in range(3)
        )
    value = np.zeros(box.shape, dtype=np.float32)
    for coord, s, e in zip(local, semi, exponents):
        ratio = np.abs(coord) / np.float32(s)
        value = value + (ratio * ratio if e == 2.0 else ratio ** np.float32(e))
    return _Field(box, value)


def _catmull_rom(points: np.ndarray, samples_per_segment: int) -> np.ndarray:
    """Smooth curve through ``points`` (N, D) as a uniform Catmull-Rom spline."""
    if len(points) < 3:
        t = np.linspace(0.0, 1.0, samples_per_segment + 1)[:, None]
        return points[0] + t * (points[-1] - points[0])
    padded = np.vstack([2 * points[0] - points[1], points, 2 * points[-1] - points[-2]])
    t = np.linspace(0.0, 1.0, samples_per_segment, endpoint=False)[:, None]
    pieces = []
    for i in range(1, len(padded) - 2):
        p0, p1, p2, p3 = padded[i - 1], padded[i], padded[i + 1], padded[i + 2]
        cubic = (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2 + (-p0 + 3 * p1 - 3 * p2 + p3) * t**3
        pieces.append(0.5 * ((2 * p1) + (-p0 + p2) * t + cubic))
    pieces.append(points[-1:])
    return np.vstack(pieces)


@dataclass(frozen=True)
class _TubeField:
    """Distance to a tube's centre line and the tube radius at the nearest centre-line point."""

    box: _Box
    distance: np.ndarray
    radius: np.ndarray

    def inside(self, wobble: np.ndarray | float = 0.0) -> np.ndarray:
        return self.distance <= self.radius * (1.0 + wobble)


def _tube(grid: _Grid, points: Sequence[Sequence[float]], radii: Sequence[float] | float) -> _TubeField | None:
    """A tube of varying radius along a smooth curve through ``points`` (reference mm).

    The curve is sampled densely and the distance from each voxel in the bounding box to the nearest sample
    is found with a k-d tree, which handles arbitrary curved, self-approaching centre lines.
    """
    control = np.asarray(points, dtype=np.float64)
    radius_control = np.broadcast_to(np.asarray(radii, dtype=np.float64), (len(control),))
    radius_control = np.maximum(radius_control, grid.min_radius)
    # Sample so neighbouring centre-line points are much closer than the radius (smooth surface).
    length = float(np.linalg.norm(np.diff(control, axis=0), axis=1).sum())
    step = max(min(float(radius_control.min()) / 3.0, float(grid.voxel.min()) / 2.0), 0.5)
    per_segment = max(int(math.ceil(length / step / max(len(control) - 1, 1))), 2)
    curve = _catmull_rom(np.column_stack([control, radius_control]), per_segment)
    centre, radius = curve[:, :3], np.maximum(curve[:, 3], grid.min_radius)
    reach = float(radius.max()) * 1.3
    box = grid.box(centre.min(axis=0) - reach, centre.max(axis=0) + reach)
    if box is None:
        return None
    xs, ys, zs = np.broadcast_arrays(box.x, box.y, box.z)
    query = np.column_stack([xs.ravel(), ys.ravel(), zs.ravel()]).astype(np.float64)
    distance, index = cKDTree(centre).query(query, distance_upper_bound=reach)
    far = ~np.isfinite(distance)
    index = np.where(far, 0, index)
    distance = np.where(far, np.inf, distance).astype(np.float32).reshape(box.shape)
    return _TubeField(
        box=box,
        distance=distance,
        radius=radius[index].astype(np.float32).reshape(box.shape),
    )


# --------------------------------------------------------------------------------------------------------
# Body wall
# --------------------------------------------------------------------------------------------------------


def _superellipse_inside(
    box: _Box, semi_x: np.ndarray, semi_y: np.ndarray, wobble: np.ndarray | float = 0.0
) -> np.ndarray:
    """Inside a body-like cross-section: flatter at the back (larger exponent) than at the front."""
    exponent = np.where(box.y >= 0, np.float32(2.3), np.float32(3.0))
    radius = (np.abs(box.x) / semi_x) ** exponent + (np.abs(box.y) / semi_y) ** exponent
    return radius <= 1.0 + wobble


def _paint_body_wall(ctx: _Context) -> None:
    """Skin-fat-muscle layers, the back and psoas muscles, the diaphragm; defines the body cavity."""
    grid, rng = ctx.grid, ctx.rng
    box = grid.full()
    wobble = 0.04 * ctx.noise.mix("coarse", box, rng)
    fat_mm = ctx.patient.fat_mm
    skin = _superellipse_inside(box, *ctx.patient.body_semi_axes(box.z), wobble)
    fascia = _superellipse_inside(box, *ctx.patient.body_semi_axes(box.z, fat_mm), wobble)
    peritoneum = _superellipse_inside(box, *ctx.patient.body_semi_axes(box.z, fat_mm + _MUSCLE_WALL_MM), wobble)
    ctx.canvas.paint(box, skin, None, _HU_FAT + 10.0 * ctx.noise.mix("medium", box, rng))
    ctx.canvas.paint(box, fascia, None, _HU_MUSCLE + 8.0 * ctx.noise.mix("medium", box, rng))
    ctx.canvas.paint(box, peritoneum, None, _HU_VISCERAL_FAT + 15.0 * ctx.noise.mix("medium", box, rng))

    # Back (erector spinae) muscles either side of the spine, and the psoas muscles along the lumbar spine.
    spine_y = _spine_y(box.z)
    back_muscles = np.zeros(box.shape, dtype=bool)
    for side in (1.0, -1.0):
        lumbar = np.clip((-box.z - 0.0) / 120.0, 0.0, 1.0)
        semi_x = 24.0 + 8.0 * lumbar
        across = (box.x - side * (30.0 + 4.0 * lumbar)) / semi_x
        front_back = (box.y - (spine_y - 44.0)) / 26.0
        back_muscles |= (across**2 + front_back**2 <= 1.0) & fascia & (box.z > -200.0)
    ctx.canvas.paint(box, back_muscles, None, _HU_MUSCLE + 8.0 * ctx.noise.mix("medium", box, rng))
    ctx.cavity = peritoneum & ~back_muscles

    for side in (1.0, -1.0):
        psoas_path = [(side * 28, -28, 5), (side * 40, -22, -70), (side * 55, -5, -150), (side * 60, 10, -215)]
        psoas = _tube(grid, psoas_path, [9, 17, 22, 16])
        if psoas is not None:
            ctx.canvas.paint(psoas.box, psoas.inside() & ctx.in_cavity(psoas.box), None, _HU_MUSCLE)
        gluteal = _ellipsoid(grid, (side * 80, -70, -215), (55, 30, 50))
        if gluteal is not None:
            sl = gluteal.box.sl
            ctx.canvas.paint(gluteal.box, (gluteal.value <= 1.0) & skin[sl] & ~peritoneum[sl], None, _HU_MUSCLE)

    # The diaphragm: a thin muscle sheet on the dome surface, inside the cavity.
    dome = _diaphragm_z(box.x, box.y)
    sheet = (np.abs(box.z - dome) <= 4.0 + 0.5 * float(grid.voxel[2])) & ctx.cavity
    ctx.canvas.paint(box, sheet, None, _HU_MUSCLE - 10.0)

    # Spinal canal (cord and CSF) along the whole column; the vertebral arches are painted around it later.
    canal_path = [(0.0, float(_spine_y(np.float32(z))) - 26.0, z) for z in (-160, -100, -40, 20, 90, 160, 250)]
    canal = _tube(grid, canal_path, 8.0)
    if canal is not None:
        ctx.canvas.paint(canal.box, canal.inside(), None, 25.0)


# --------------------------------------------------------------------------------------------------------
# Organ painters (called in this order; later ones overwrite earlier ones)
# --------------------------------------------------------------------------------------------------------


def _paint_solid(
    ctx: _Context,
    field: _Field | None,
    label: int,
    hu: float,
    texture_hu: float,
    deform: float = 0.12,
    extra: Callable[[_Box], np.ndarray] | None = None,
) -> np.ndarray | None:
    """Paint an organ defined by ``field <= 1`` (surface perturbed by coarse noise) with textured HU.

    Returns the painted mask on ``field.box`` (or None when off the grid)."""
    if field is None:
        return None
    box = field.box
    mask = field.value + deform * ctx.noise.mix("coarse", box, ctx.rng) <= 1.0
    if extra is not None:
        mask &= extra(box)
    texture = ctx.noise.mix("coarse", box, ctx.rng) + 0.5 * ctx.noise.mix("medium", box, ctx.rng)
    values = hu + texture_hu * texture
    ctx.canvas.paint(box, mask, label, values)
    return mask


def _paint_small_bowel(ctx: _Context) -> None:
    center = ctx.jitter_point((0.0, 25.0, -122.0), 50.0)
    region = _ellipsoid(ctx.grid, center, np.array([82.0, 50.0, 58.0]) * ctx.jitter_factor())
    if region is None:
        return
    box = region.box
    # Loops separated by thin strands of mesenteric fat: keep the voxels where a medium-scale field is high.
    loops = ctx.noise.mix("medium", box, ctx.rng) > -0.5
    mask = (region.value + 0.15 * ctx.noise.mix("coarse", box, ctx.rng) <= 1.0) & loops & ctx.in_cavity(box)
    mottling = ctx.noise.mix("fine", box, ctx.rng)
    values = 30.0 + 22.0 * mottling
    values = np.where(ctx.noise.mix("fine", box, ctx.rng) > 1.9, -850.0, values)  # small gas bubbles
    ctx.canvas.paint(box, mask, LABELS["small_bowel"], values)


def _paint_hollow_tube(
    ctx: _Context,
    points: Sequence[Sequence[float]],
    radii: Sequence[float] | float,
    label: int,
    content: Callable[[_TubeField, np.ndarray], np.ndarray],
    region: Callable[[_Box], np.ndarray] | None = None,
    wall_hu: float = 40.0,
) -> None:
    """Paint a gut segment: a wall of ``wall_hu`` around a lumen whose HU comes from ``content``."""
    shift = ctx.rng.uniform(-6.0, 6.0, 3)
    control = np.asarray(points, dtype=np.float64) + shift + ctx.rng.uniform(-3.0, 3.0, (len(points), 3))
    tube = _tube(ctx.grid, control, np.asarray(radii, dtype=np.float64) * ctx.jitter_factor())
    if tube is None:
        return
    box = tube.box
    mask = tube.inside(0.12 * ctx.noise.mix("coarse", box, ctx.rng)) & ctx.in_cavity(box)
    if region is not None:
        mask &= region(box)
    wall_mm = 3.0
    lumen = mask & (tube.distance < tube.radius - wall_mm)
    values = np.where(lumen, content(tube, lumen), wall_hu + 6.0 * ctx.noise.mix("medium", box, ctx.rng))
    ctx.canvas.paint(box, mask, label, values)


def _paint_colon(ctx: _Context) -> None:
    points = [
        (88, 22, -150), (98, 4, -122), (102, -4, -92), (96, 10, -78), (80, 32, -90), (45, 52, -100), (0, 56, -110),
        (-45, 52, -95), (-80, 30, -50), (-96, 8, -28), (-104, -12, -60), (-104, -14, -110), (-88, 0, -150),
        (-55, 10, -165), (-25, -10, -172), (-5, -30, -188), (0, -32, -215), (0, -30, -250),
    ]  # fmt: skip
    radii = [26, 24, 22, 22, 22, 21, 21, 21, 21, 21, 20, 19, 18, 17, 17, 18, 18, 16]

    def stool(tube: _TubeField, lumen: np.ndarray) -> np.ndarray:
        box = tube.box
        mottling = ctx.noise.mix("fine", box, ctx.rng)
        # Gas rises to the front of the supine patient: more gas pockets anteriorly.
        gas = ctx.noise.mix("medium", box, ctx.rng) + 0.02 * (box.y - 10.0) > 0.4
        return np.where(gas, -950.0, -30.0 + 70.0 * mottling)

    _paint_hollow_tube(ctx, points, radii, LABELS["colon"], stool)


def _paint_bladder(ctx: _Context) -> None:
    center = ctx.jitter_point((0.0, 28.0, -192.0), 30.0)
    field = _ellipsoid(ctx.grid, center, np.array([44.0, 36.0, 32.0]) * float(ctx.rng.uniform(0.75, 1.15)))
    mask = _paint_solid(ctx, field, LABELS["urinary_bladder"], 10.0, 3.0, deform=0.08, extra=ctx.in_cavity)
    if field is not None and mask is not None:
        ctx.canvas.paint(field.box, mask & (field.value > 0.8), None, 35.0)  # enhancing wall


def _below_diaphragm(gap_mm: float = 4.0) -> Callable[[_Box], np.ndarray]:
    return lambda box: box.z < _diaphragm_z(box.x, box.y) - gap_mm


def _above_diaphragm(gap_mm: float = 2.0) -> Callable[[_Box], np.ndarray]:
    return lambda box: box.z > _diaphragm_z(box.x, box.y) + gap_mm


def _paint_stomach(ctx: _Context) -> None:
    points = [(-58, -2, 14), (-64, 18, -8), (-48, 40, -30), (-22, 52, -45), (2, 50, -50), (20, 42, -46)]
    radii = [36, 34, 30, 24, 17, 11]

    def gastric_content(tube: _TubeField, lumen: np.ndarray) -> np.ndarray:
        box = tube.box
        ys = np.broadcast_to(box.y, box.shape)[lumen]
        # Supine patient: the gas bubble floats on the fluid at the front of the stomach.
        level = float(np.quantile(ys, 0.65)) if ys.size else np.inf
        fluid = 15.0 + 6.0 * ctx.noise.mix("medium", box, ctx.rng)
        return np.where(box.y > level, _HU_AIR, fluid)

    below = _below_diaphragm()
    _paint_hollow_tube(ctx, points, radii, LABELS["stomach"], gastric_content, region=below)


def _paint_duodenum(ctx: _Context) -> None:
    points = [
        (20, 42, -46), (40, 34, -48), (55, 16, -58), (58, 10, -80), (52, 12, -100), (30, 22, -110), (0, 26, -112),
        (-24, 22, -102), (-32, 16, -82),
    ]  # fmt: skip

    def fluid(tube: _TubeField, lumen: np.ndarray) -> np.ndarray:
        return 18.0 + 5.0 * ctx.noise.mix("medium", tube.box, ctx.rng)

    _paint_hollow_tube(ctx, points, 12.0, LABELS["duodenum"], fluid)


def _paint_liver(ctx: _Context) -> None:
    center = ctx.jitter_point((55.0, 20.0, -20.0), 60.0)
    size = ctx.jitter_factor()
    semi = np.array([105.0, 80.0, 65.0]) * size
    field = _ellipsoid(ctx.grid, center, semi)
    if field is None:
        return
    box = field.box
    # The left lobe is thin: shrink the vertical semi-axis toward the patient's left (-x).
    thickness = np.clip(0.35 + 0.65 * (box.x - (center[0] - semi[0])) / (1.4 * semi[0]), 0.35, 1.0)
    dz = (box.z - center[2]) / (semi[2] * thickness)
    base = ((box.x - center[0]) / semi[0]) ** 2 + ((box.y - center[1]) / semi[1]) ** 2
    field = _Field(box, (base + dz * dz).astype(np.float32))
    below = _below_diaphragm()
    mask = _paint_solid(
        ctx, field, LABELS["liver"], 60.0, 8.0, deform=0.1, extra=lambda b: below(b) & ctx.in_cavity(b)
    )
    if mask is None:
        return
    # Hepatic and portal vessel branches: thin bright curves where two fine fields both cross zero.
    f1, f2 = ctx.noise.mix("fine", box, ctx.rng), ctx.noise.mix("fine", box, ctx.rng)
    vessels = mask & (f1 * f1 + f2 * f2 < 0.04)
    ctx.canvas.paint(box, vessels, None, 130.0)


def _paint_gallbladder(ctx: _Context) -> None:
    center = ctx.jitter_point((50.0, 58.0, -62.0), 20.0)
    semi = np.array([17.0, 16.0, 34.0]) * ctx.jitter_factor()
    field = _ellipsoid(ctx.grid, center, semi, rotation=_rotation(rx=-0.5, ry=0.2))
    _paint_solid(ctx, field, LABELS["gallbladder"], 10.0, 3.0, deform=0.06, extra=ctx.in_cavity)


def _paint_spleen(ctx: _Context) -> None:
    center = ctx.jitter_point((-95.0, -38.0, -2.0), 40.0)
    semi = np.array([26.0, 55.0, 48.0]) * ctx.jitter_factor()
    field = _ellipsoid(ctx.grid, center, semi, rotation=_rotation(rz=0.6))
    if field is None:
        return
    box = field.box
    # Concave hilum facing the stomach and kidney: cut away a sphere on the antero-medial side.
    hilum = (box.x - (center[0] + 42.0)) ** 2 + (box.y - (center[1] + 22.0)) ** 2 + (box.z - center[2]) ** 2 > 32.0**2
    below = _below_diaphragm()
    _paint_solid(ctx, field, LABELS["spleen"], 50.0, 6.0, extra=lambda b: hilum & below(b) & ctx.in_cavity(b))


def _paint_kidneys(ctx: _Context) -> None:
    # (side: +1 right / -1 left, label, centre); the right kidney sits lower, under the liver.
    kidneys = (
        (1.0, LABELS["kidney_right"], (66.0, -32.0, -62.0)),
        (-1.0, LABELS["kidney_left"], (-64.0, -28.0, -48.0)),
    )
    for side, label, center in kidneys:
        center = ctx.jitter_point(center, 30.0)
        semi = np.array([26.0, 22.0, 52.0]) * ctx.jitter_factor()
        # Upper poles lean medially and the hilum turns antero-medially.
        rotation = _rotation(ry=-side * 0.25, rz=side * 0.45)
        field = _ellipsoid(ctx.grid, center, semi, rotation=rotation)
        if field is None:
            continue
        box = field.box
        notch_center = center + np.array([-side * 26.0, 8.0, 0.0])
        dx, dy, dz = box.x - notch_center[0], box.y - notch_center[1], (box.z - notch_center[2]) / 1.6
        notch = dx**2 + dy**2 + dz**2 > 13.0**2
        mask = _paint_solid(ctx, field, label, 155.0, 8.0, deform=0.08, extra=lambda b: notch & ctx.in_cavity(b))
        if mask is None:
            continue
        # Medulla (pyramids) enhances less than the cortex in the portal venous phase.
        medulla = mask & (field.value + 0.25 * ctx.noise.mix("medium", box, ctx.rng) < 0.45)
        ctx.canvas.paint(box, medulla, None, 100.0 + 6.0 * ctx.noise.mix("medium", box, ctx.rng))


def _paint_adrenals(ctx: _Context) -> None:
    adrenals = (
        (LABELS["adrenal_gland_right"], (38.0, -22.0, 4.0), 0.5),
        (LABELS["adrenal_gland_left"], (-38.0, -18.0, -4.0), -0.5),
    )
    for label, center, angle in adrenals:
        center = ctx.jitter_point(center, 10.0)
        semi = np.array([6.0, 16.0, 20.0]) * ctx.jitter_factor()
        field = _ellipsoid(ctx.grid, center, semi, rotation=_rotation(rz=angle))
        _paint_solid(ctx, field, label, 35.0, 5.0, deform=0.1, extra=ctx.in_cavity)


def _paint_pancreas(ctx: _Context) -> None:
    shift = ctx.rng.uniform(-6.0, 6.0, 3)
    # Head (in the duodenal C-loop) -> neck -> body -> tail (at the splenic hilum).
    path = [(32, 12, -90), (32, 14, -72), (10, 22, -52), (-30, 12, -40), (-62, -2, -30), (-85, -20, -20)]
    points = np.array(path, dtype=float) + shift
    tube = _tube(ctx.grid, points, np.array([13.0, 17.0, 12.0, 12.0, 11.0, 9.0]) * ctx.jitter_factor())
    if tube is None:
        return
    box = tube.box
    mask = tube.inside(0.15 * ctx.noise.mix("coarse", box, ctx.rng)) & ctx.in_cavity(box)
    # Lobulated parenchyma with fat between the lobules.
    lobules = ctx.noise.mix("fine", box, ctx.rng)
    values = np.where(lobules < -1.4, -40.0, 45.0 + 10.0 * lobules)
    ctx.canvas.paint(box, mask, LABELS["pancreas"], values)


def _paint_lungs(ctx: _Context) -> None:
    grid, rng = ctx.grid, ctx.rng
    apex = 228.0 * float(rng.uniform(0.97, 1.0))
    box = grid.box((-200.0, -200.0, -40.0), (200.0, 200.0, apex))
    if box is None:
        return
    dome = _diaphragm_z(box.x, box.y)
    cavity = ctx.in_cavity(box)
    fissure_shift = rng.uniform(-8.0, 8.0, 2)
    for side in (1.0, -1.0):
        cx, cy = side * 70.0 * ctx.jitter_factor(0.05), -5.0
        ax, ay = 72.0 * ctx.jitter_factor(0.05), 88.0 * ctx.jitter_factor(0.05)
        # The lung narrows toward the apex (a rounded cap above the level of the heart).
        taper = np.sqrt(np.clip(1.0 - np.clip((box.z - 60.0) / (apex - 60.0), 0.0, 1.0) ** 2, 1e-4, 1.0))
        shape = ((box.x - cx) / (ax * taper)) ** 2 + ((box.y - cy) / (ay * taper)) ** 2
        # Keep a mediastinum free in front of the spine (the spine itself is painted later).
        # It is wider in the upper chest, where the great vessels run.
        medial = np.where(box.y > _spine_y(box.z) + 8.0, np.where(box.z > 110.0, 22.0, 16.0), 6.0)
        lung = (shape + 0.08 * ctx.noise.mix("coarse", box, rng) <= 1.0) & cavity
        lung &= (box.z > dome + 4.0) & (box.z < apex)
        lung &= side * box.x > medial
        # Oblique fissure runs from high at the back to low at the front; horizontal fissure on the right.
        oblique = box.z > 95.0 + fissure_shift[0] - 0.85 * box.y
        if side > 0:
            upper = box.z > 95.0 + fissure_shift[1]
            upper_or_middle = np.where(upper, LABELS["lung_upper_lobe_right"], LABELS["lung_middle_lobe_right"])
            labels = np.where(oblique, upper_or_middle, LABELS["lung_lower_lobe_right"])
        else:
            labels = np.where(oblique, LABELS["lung_upper_lobe_left"], LABELS["lung_lower_lobe_left"])
        labels = np.broadcast_to(labels, box.shape)
        # Parenchyma with faint vessels (curves where two fine fields both cross zero), larger near the hilum,
        # and slightly denser dependent (posterior) lung.
        f1, f2 = ctx.noise.mix("fine", box, rng), ctx.noise.mix("fine", box, rng)
        hilum_distance = np.sqrt((box.x - side * 35.0) ** 2 + (box.y + 5.0) ** 2 + (box.z - 120.0) ** 2)
        vessel_gain = 250.0 + 450.0 * np.exp(-hilum_distance / 50.0)
        vessels = vessel_gain * np.exp(-(f1 * f1 + f2 * f2) / 0.02)
        dependent = 40.0 * np.clip((-box.y - 20.0) / 60.0, 0.0, 1.0)
        values = -860.0 + 12.0 * ctx.noise.mix("coarse", box, rng) + dependent + vessels
        for label in np.unique(labels[lung]):
            ctx.canvas.paint(box, lung & (labels == label), int(label), values)


def _paint_heart(ctx: _Context) -> None:
    center = ctx.jitter_point((-22.0, 24.0, 80.0), 30.0)
    # Long axis from the base (right, back, up) to the apex (left, front, down): the heart leans left.
    frame = _frame_along((-0.55, 0.5, -0.6))
    size = ctx.jitter_factor()
    outer = _ellipsoid(ctx.grid, center, np.array([68.0, 56.0, 50.0]) * size, rotation=frame)
    mask = _paint_solid(ctx, outer, LABELS["heart_myocardium"], 45.0, 5.0, deform=0.06, extra=_above_diaphragm())
    if outer is None or mask is None:
        return
    chambers = (
        (LABELS["heart_ventricle_left"], (-16.0, -6.0, -8.0), (46.0, 26.0, 26.0), frame, 160.0),
        (LABELS["heart_ventricle_right"], (12.0, 18.0, -10.0), (42.0, 20.0, 28.0), frame, 140.0),
        (LABELS["heart_atrium_left"], (-2.0, -24.0, 22.0), (28.0, 17.0, 20.0), None, 150.0),
        (LABELS["heart_atrium_right"], (32.0, 2.0, 8.0), (24.0, 23.0, 26.0), None, 145.0),
    )
    for label, offset, semi, rotation, hu in chambers:
        chamber = _ellipsoid(ctx.grid, center + np.asarray(offset) * size, np.asarray(semi) * size, rotation=rotation)
        if chamber is None:
            continue
        # Chambers stay inside the heart so the myocardium remains a closed shell around them.
        inside_heart = ctx.canvas.labels[chamber.box.sl] == LABELS["heart_myocardium"]
        _paint_solid(ctx, chamber, label, hu, 5.0, deform=0.05, extra=lambda b, keep=inside_heart: keep)


def _paint_mediastinal_tubes(ctx: _Context) -> None:
    """Esophagus, trachea and the great vessels (aorta, inferior vena cava, portal and splenic veins)."""

    def lumen_air(tube: _TubeField, lumen: np.ndarray) -> np.ndarray:
        return np.full(tube.box.shape, _HU_AIR, dtype=np.float32)

    def collapsed(tube: _TubeField, lumen: np.ndarray) -> np.ndarray:
        return np.full(tube.box.shape, 35.0, dtype=np.float32)

    esophagus = [(2, -24, 260), (2, -24, 150), (4, -22, 100), (2, -20, 50), (-10, -12, 20), (-30, -4, 8)]
    _paint_hollow_tube(ctx, esophagus, 8.0, LABELS["esophagus"], collapsed)
    trachea = [(0, -5, 260), (0, -3, 200), (0, 0, 165)]
    _paint_hollow_tube(ctx, trachea, 9.0, LABELS["trachea"], lumen_air)

    vessels = (
        (
            LABELS["aorta"],
            180.0,
            [(-6, 30, 100), (-4, 24, 130), (-8, 8, 150), (-20, -8, 152), (-24, -18, 135), (-24, -18, 90),
             (-22, -14, 40), (-16, -6, 0), (-12, -2, -50), (-10, 0, -112)],
            [14, 14, 13, 12, 12, 12, 11, 11, 10, 9],
        ),
        (
            LABELS["inferior_vena_cava"],
            140.0,
            [(20, -2, -118), (22, -2, -70), (26, 0, -30), (28, 4, 0), (22, 12, 25), (16, 18, 45)],
            [11, 11, 12, 12, 12, 12],
        ),
        (
            LABELS["portal_vein_and_splenic_vein"],
            140.0,
            [(-84, -26, -22), (-55, -10, -34), (-25, 4, -45), (5, 10, -56), (22, 16, -42), (40, 22, -28),
             (55, 25, -18)],
            [5, 5, 6, 7, 8, 7, 6],
        ),
    )  # fmt: skip
    for label, hu, points, radii in vessels:
        control = np.asarray(points, dtype=np.float64) + ctx.rng.uniform(-4.0, 4.0, 3)
        tube = _tube(ctx.grid, control, np.asarray(radii, dtype=np.float64) * ctx.jitter_factor())
        if tube is None:
            continue
        values = hu + 6.0 * ctx.noise.mix("medium", tube.box, ctx.rng)
        ctx.canvas.paint(tube.box, tube.inside() & ctx.in_cavity(tube.box), label, values)


def _vertebra_levels(pitch_factor: float) -> list[tuple[int, float, float, bool]]:
    """(label, top z, bottom z, is_lumbar) of T1..L5, stacked downward from the level of the lung apex."""
    top = 228.0
    levels = []
    thoracic_pitch, lumbar_pitch = 18.5 * pitch_factor, 27.0 * pitch_factor
    for k in range(12):  # T1..T12
        levels.append((LABELS[f"vertebrae_T{k + 1}"], top - k * thoracic_pitch, top - (k + 1) * thoracic_pitch, False))
    lumbar_top = top - 12 * thoracic_pitch
    for k in range(5):  # L1..L5
        label = LABELS[f"vertebrae_L{k + 1}"]
        levels.append((label, lumbar_top - k * lumbar_pitch, lumbar_top - (k + 1) * lumbar_pitch, True))
    return levels


def _paint_spine(ctx: _Context) -> None:
    """Vertebrae T1..L5: body, neural arch, spinous and transverse processes, one label per level.

    Bodies are separated by intervertebral discs where the slices are thin enough to show them; on thicker
    slices a disc would swallow whole slices of spine, so the bodies then fill their level. The posterior
    elements always span their level (neighbouring arches meet at the facet joints).
    """
    grid = ctx.grid
    for index, (label, top, bottom, lumbar) in enumerate(_vertebra_levels(ctx.patient.spine_pitch)):
        disc = 7.0 if lumbar else 3.0
        show_disc = float(grid.voxel[2]) <= disc
        center_z = 0.5 * (top + bottom)
        level_half = 0.5 * (top - bottom)
        body_half = level_half - 0.5 * disc if show_disc else level_half + float(grid.voxel[2])
        growth = index / 16.0  # vertebrae get larger toward the pelvis
        semi_x = 15.0 + 11.0 * growth
        semi_y = 12.0 + 6.0 * growth
        spine_y = float(_spine_y(np.float32(center_z)))
        canal_y = spine_y - semi_y - 10.0
        spinous_length = 13.0 if lumbar else 9.0
        parts = [
            # Vertebral body: a short elliptic cylinder.
            _ellipsoid(grid, (0.0, spine_y, center_z), (semi_x, semi_y, body_half), exponents=(2.0, 2.0, 8.0)),
            # Neural arch: a thick ring around the spinal canal (the canal is cut out below).
            _ellipsoid(grid, (0.0, canal_y - 4.0, center_z), (17.0, 14.0, level_half), exponents=(2.0, 2.0, 6.0)),
            # Spinous process, pointing back and down.
            _ellipsoid(
                grid,
                (0.0, canal_y - 14.0 - spinous_length, center_z - 3.0),
                (4.0, spinous_length, 0.6 * level_half),
            ),
            # Transverse processes.
            _ellipsoid(grid, (0.0, canal_y + 2.0, center_z), ((40.0 if lumbar else 34.0), 5.0, 0.5 * level_half)),
        ]
        for part in parts:
            if part is None:
                continue
            box = part.box
            not_canal = (box.x**2 + (box.y - canal_y) ** 2) > 8.5**2
            within_level = (box.z <= top) & (box.z > bottom)  # each label stays its own block
            mask = (part.value <= 1.0) & not_canal & within_level
            ctx.canvas.paint(box, mask, label, _HU_CANCELLOUS + 40.0 * ctx.noise.mix("medium", box, ctx.rng))


def _paint_sacrum(ctx: _Context) -> None:
    top, bottom = _vertebra_levels(ctx.patient.spine_pitch)[-1][2] - 4.0, -218.0
    box = ctx.grid.box((-70.0, -130.0, bottom), (70.0, 0.0, top))
    if box is None:
        return
    t = np.clip((top - box.z) / (top - bottom), 0.0, 1.0)
    # Curved backwards (concave to the front) and tapering from the wide alae to the tip.
    center_y = -45.0 - 40.0 * t + 22.0 * t * t
    semi_x = np.maximum(48.0 * (1.0 - 0.75 * t), ctx.grid.min_radius)
    semi_y = np.maximum(16.0 * (1.0 - 0.35 * t), ctx.grid.min_radius)
    mask = (box.x / semi_x) ** 2 + ((box.y - center_y) / semi_y) ** 2 <= 1.0
    mask &= (box.z <= top) & (box.z >= bottom)
    ctx.canvas.paint(box, mask, LABELS["sacrum"], _HU_CANCELLOUS + 40.0 * ctx.noise.mix("medium", box, ctx.rng))


def _paint_pelvis(ctx: _Context) -> None:
    """Hip bones (iliac wing, acetabulum, pubic and ischial rami) and the femoral heads and necks."""
    grid, rng = ctx.grid, ctx.rng
    width = ctx.jitter_factor(0.05)  # pelvic width, shared by both sides
    lift = float(rng.uniform(-6.0, 6.0))  # vertical position of the pelvis

    def place(side: float, x: float, y: float, z: float) -> tuple[float, float, float]:
        return (side * x * width, y, z + lift)

    def bone_hu(box: _Box) -> np.ndarray:
        return _HU_CANCELLOUS + 40.0 * ctx.noise.mix("medium", box, rng)

    sides = ((1.0, LABELS["hip_right"], LABELS["femur_right"]), (-1.0, LABELS["hip_left"], LABELS["femur_left"]))
    for side, hip_label, femur_label in sides:
        top, bottom = -85.0 + lift + float(rng.uniform(-5.0, 5.0)), -178.0 + lift
        box = grid.box((side * 40.0 - 130.0, -110.0, bottom), (side * 40.0 + 130.0, 80.0, top))
        if box is not None:
            # Iliac wing: a shallow arc of an elliptic shell from the sacroiliac joint forward and outward,
            # flaring toward the iliac crest (concave medially, like the iliac fossa).
            flare = np.clip((box.z - bottom) / (top - bottom), 0.0, 1.0)
            semi_x, semi_y = (70.0 + 25.0 * flare) * width, 95.0
            u, v = side * (box.x - side * 20.0 * width) / semi_x, (box.y - 20.0) / semi_y
            radial = np.sqrt(u * u + v * v)
            angle = np.arctan2(v, u)  # 0 lateral, -pi/2 posterior, +pi/2 anterior
            half_thickness = np.maximum(4.5 + 3.0 * (1.0 - flare), 0.6 * float(grid.voxel.max()))
            wing = (np.abs(radial - 1.0) * 0.5 * (semi_x + semi_y) <= half_thickness) & (angle > -1.3) & (angle < 0.05)
            ctx.canvas.paint(box, wing, hip_label, bone_hu(box))
        # Acetabulum: a block of bone with a spherical socket for the femoral head.
        socket = np.asarray(place(side, 95.0, 5.0, -205.0))
        acetabulum = _ellipsoid(grid, place(side, 88.0, 5.0, -200.0), (30.0, 32.0, 30.0))
        if acetabulum is not None:
            b = acetabulum.box
            outside_socket = (b.x - socket[0]) ** 2 + (b.y - socket[1]) ** 2 + (b.z - socket[2]) ** 2 > 22.0**2
            _paint_solid(ctx, acetabulum, hip_label, _HU_CANCELLOUS, 40.0, deform=0.05, extra=lambda _: outside_socket)
        rami = (
            ([place(side, 78, 22, -212), place(side, 40, 45, -220), place(side, 8, 55, -224)], 10.0),  # pubic
            ([place(side, 82, -12, -214), place(side, 70, -25, -232), place(side, 60, -30, -250)], 13.0),  # ischial
        )
        for points, radius in rami:
            tube = _tube(grid, points, radius)
            if tube is not None:
                ctx.canvas.paint(tube.box, tube.inside(), hip_label, bone_hu(tube.box))
        head = _ellipsoid(grid, socket, (21.0, 21.0, 21.0))
        _paint_solid(ctx, head, femur_label, _HU_CANCELLOUS, 40.0, deform=0.0)
        neck = _tube(grid, [tuple(socket), place(side, 125.0, 0.0, -240.0), place(side, 135.0, -5.0, -270.0)], 14.0)
        if neck is not None:
            ctx.canvas.paint(neck.box, neck.inside(), femur_label, bone_hu(neck.box))


def _paint_ribs(ctx: _Context) -> None:
    """Twelve rib pairs: arcs from the transverse processes around the chest wall, dropping anteriorly."""
    grid, patient = ctx.grid, ctx.patient
    # Upper ribs are short (narrow thoracic inlet); ribs 11 and 12 are floating and short.
    inlet = (0.55, 0.72, 0.84, 0.92, 0.97, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    end_angle = (2.8, 2.8, 2.8, 2.8, 2.8, 2.8, 2.75, 2.55, 2.35, 2.15, 1.75, 1.35)
    start_angle = 0.5
    drop_factor = ctx.jitter_factor(0.15)
    for number, (label, top, bottom, _) in enumerate(_vertebra_levels(ctx.patient.spine_pitch)[:12], start=1):
        z0 = 0.5 * (top + bottom)
        semi_x, semi_y = patient.body_semi_axes(np.float32(z0), patient.fat_mm + 0.5 * _MUSCLE_WALL_MM)
        semi_x, semi_y = float(semi_x) * inlet[number - 1], float(semi_y) * (0.5 + 0.5 * inlet[number - 1])
        drop = (30.0 + 3.0 * number) * drop_factor
        angles = np.linspace(start_angle, end_angle[number - 1], 12)
        progress = (angles - start_angle) / (math.pi - start_angle)
        for side, rib_label in ((1.0, LABELS[f"rib_right_{number}"]), (-1.0, LABELS[f"rib_left_{number}"])):
            spine_y = float(_spine_y(np.float32(z0)))
            origin = (side * 30.0, spine_y - 20.0, z0 + 2.0)
            arc = np.column_stack(
                [side * semi_x * np.sin(angles), -semi_y * np.cos(angles), z0 - drop * progress**1.3]
            )
            arc[:, 2] += ctx.rng.uniform(-3.0, 3.0)
            tube = _tube(grid, np.vstack([origin, arc]), 5.0 + 0.1 * number)
            if tube is not None:
                values = _HU_CANCELLOUS + 40.0 * ctx.noise.mix("medium", tube.box, ctx.rng)
                ctx.canvas.paint(tube.box, tube.inside(), rib_label, values)
    # Sternum (no label in TotalSegmentator v1, so background): a bony bar inside the front chest wall.
    sternum_points = []
    for z in (200.0, 150.0, 100.0, 50.0):
        _, semi_y = patient.body_semi_axes(np.float32(z), patient.fat_mm + 0.5 * _MUSCLE_WALL_MM)
        sternum_points.append((0.0, float(semi_y) - 2.0, z))
    sternum = _tube(grid, sternum_points, 8.0)
    if sternum is not None:
        values = 450.0 + 60.0 * ctx.noise.mix("medium", sternum.box, ctx.rng)
        ctx.canvas.paint(sternum.box, sternum.inside(), None, values)


_ORGAN_PAINTERS: tuple[Callable[[_Context], None], ...] = (
    _paint_small_bowel,
    _paint_colon,
    _paint_bladder,
    _paint_stomach,
    _paint_duodenum,
    _paint_liver,
    _paint_gallbladder,
    _paint_spleen,
    _paint_kidneys,
    _paint_adrenals,
    _paint_pancreas,
    _paint_lungs,
    _paint_heart,
    _paint_mediastinal_tubes,
    _paint_spine,
    _paint_sacrum,
    _paint_pelvis,
    _paint_ribs,
)


# --------------------------------------------------------------------------------------------------------
# Tumors
# --------------------------------------------------------------------------------------------------------


def _paint_tumors(ctx: _Context, request: _TumorRequest, spacing: np.ndarray) -> np.ndarray:
    """Place ``request.count`` irregular tumors inside the requested organ and return the tumor mask.

    Each tumor is a perturbed ellipsoid clipped to the organ, keeping only the part connected to its centre,
    so it never leaks outside the organ and always holds at least its centre voxel (sizes below a voxel
    are raised to one voxel). Centres lie deep enough inside the organ, apart from each other where the
    organ has room, and each tumor is confined to its own cell of an additively weighted Voronoi partition
    with a gap of one voxel diagonal, so separate tumors never touch and the requested count is kept.

    Args:
        ctx: the phantom being painted (its labels are final when this runs).
        request: organ, count and largest diameter.
        spacing: voxel size in world mm; tumor sizes are clinical, so they are in world mm.

    Returns:
        uint8 tumor mask on the full grid.

    Raises:
        ValueError: the organ has no voxel on this grid.
    """
    tumor = np.zeros(ctx.grid.shape, dtype=np.uint8)
    if request.organ is None or request.count == 0:
        return tumor
    rng = ctx.rng
    sides = TUMOR_ORGANS[request.organ]
    organ_labels = sides[int(rng.integers(len(sides)))]
    organ = np.isin(ctx.canvas.labels, organ_labels)
    if not organ.any():
        raise ValueError(
            f"tumor_organ {request.organ!r}: the organ has no voxels on this grid (shape {ctx.grid.shape}); "
            "use a finer grid"
        )
    # Work in the organ's bounding box, padded so the distance transform sees the outside.
    nonzero = np.nonzero(organ)
    sl = tuple(slice(max(int(a.min()) - 2, 0), min(int(a.max()) + 3, n)) for a, n in zip(nonzero, organ.shape))
    organ_box = organ[sl]
    depth = ndimage.distance_transform_edt(np.pad(organ_box, 1), sampling=spacing)[1:-1, 1:-1, 1:-1].ravel()
    voxel_index = np.indices(organ_box.shape).reshape(3, -1).T
    position = voxel_index * spacing  # world mm from the box corner
    organ_flat = organ_box.ravel()
    # Diameters: the largest as requested, the others 40-90 % of it; never below one voxel.
    diameters = [request.size_mm] + [request.size_mm * float(rng.uniform(0.4, 0.9)) for _ in range(request.count - 1)]
    radii = [max(d / 2.0, 0.5 * float(spacing.max())) for d in diameters]
    gap = 1.01 * float(np.linalg.norm(spacing))  # more than a voxel diagonal: no 26-connected contact

    centres: list[int] = []
    for radius in radii:
        centres.append(_pick_tumor_centre(rng, position, depth, organ_flat, centres, radii, radius, gap))
    distance = np.stack([np.linalg.norm(position - position[c], axis=1) for c in centres], axis=0)
    weighted = distance - np.asarray(radii[: len(centres)])[:, None]
    base_hu = _tumor_base_hu(request.organ, organ_labels)
    box = ctx.grid.from_slices(sl)  # type: ignore[arg-type]
    taken = np.zeros(organ_box.shape, dtype=bool)
    for i, (centre, radius) in enumerate(zip(centres, radii)):
        others = np.delete(weighted, i, axis=0).min(axis=0) if len(centres) > 1 else np.full(len(position), np.inf)
        own_cell = (others - weighted[i] >= gap).reshape(organ_box.shape)
        blob = _tumor_blob(ctx, organ_box.shape, spacing, position[centre], radius) & organ_box & own_cell
        centre_voxel = tuple(voxel_index[centre])
        blob[centre_voxel] = True
        # Face-connected, so the tumor counts as one component under any connectivity.
        components, _ = ndimage.label(blob)
        blob = components == components[centre_voxel]
        taken |= blob
        # Own texture: a heterogeneous, slightly mottled mass independent of the organ's texture.
        texture = 7.0 * ctx.noise.mix("fine", box, rng) + 4.0 * ctx.noise.mix("medium", box, rng)
        ctx.canvas.paint(box, blob, None, base_hu + texture)
    tumor[sl] = taken.astype(np.uint8)
    return tumor


def _pick_tumor_centre(
    rng: np.random.Generator,
    position: np.ndarray,
    depth: np.ndarray,
    organ: np.ndarray,
    centres: list[int],
    radii: Sequence[float],
    radius: float,
    gap: float,
) -> int:
    """Index of a tumor centre: deep inside the organ and clear of earlier tumors where possible.

    Preference order: a random deep voxel whose tumor cannot reach earlier ones; any such organ voxel; the
    organ voxel farthest from the earlier tumors (the organ is too small to keep them apart).
    """
    inside = np.flatnonzero(organ & np.isin(np.arange(organ.size), centres, invert=True))
    if inside.size == 0:  # fewer organ voxels than tumors: reuse one (the count cannot be kept)
        inside = np.flatnonzero(organ)
    margin = min(0.5 * radius, 0.8 * float(depth[inside].max()))
    deep = inside[depth[inside] >= margin]
    if not centres:
        return int(deep[int(rng.integers(deep.size))])
    for candidates in (deep, inside):
        reach = [np.linalg.norm(position[candidates] - position[c], axis=1) - radii[k] for k, c in enumerate(centres)]
        clearance = np.min(reach, axis=0) - radius
        clear = candidates[clearance >= gap]
        if clear.size:
            return int(clear[int(rng.integers(clear.size))])
    return int(candidates[int(np.argmax(clearance))])


def _tumor_base_hu(organ: str, organ_labels: tuple[int, ...]) -> float:
    if organ == "lung":
        return _TUMOR_HU_LUNG
    if organ in _HOLLOW_TUMOR_ORGANS:
        return _TUMOR_HU_HOLLOW
    return _ORGAN_BASE_HU[organ_labels[0]] - 40.0


def _tumor_blob(
    ctx: _Context, shape: tuple[int, ...], spacing: np.ndarray, centre: np.ndarray, radius: float
) -> np.ndarray:
    """Irregular ellipsoid (random axes and orientation, bumpy surface) in a box of ``shape`` voxels."""
    rng = ctx.rng
    semi = radius * rng.uniform(0.85, 1.15, 3)
    semi *= radius / float(np.cbrt(np.prod(semi)))  # keep the requested volume-equivalent radius
    rotation = _rotation(*rng.uniform(-math.pi, math.pi, 3))
    axes = [np.arange(n, dtype=np.float32) * np.float32(s) - np.float32(c) for n, s, c in zip(shape, spacing, centre)]
    d = (axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :])
    value = np.zeros(shape, dtype=np.float32)
    for k in range(3):
        local = rotation[0, k] * d[0] + rotation[1, k] * d[1] + rotation[2, k] * d[2]
        value = value + (local / np.float32(semi[k])) ** 2
    # Lumpy outline: a few random low-order bumps on the surface.
    radial = np.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2) + 1e-3
    bumps = np.zeros(shape, dtype=np.float32)
    for _ in range(3):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        cosine = (direction[0] * d[0] + direction[1] * d[1] + direction[2] * d[2]) / radial
        bumps += np.float32(rng.uniform(0.05, 0.15)) * cosine**2
    return value * (1.0 - bumps) <= 1.0


# --------------------------------------------------------------------------------------------------------
# Final touches
# --------------------------------------------------------------------------------------------------------


def _finish_bone(ctx: _Context) -> None:
    """Give every bone a dense cortical rim (its outermost in-plane voxel layer) around cancellous bone.

    The rim is found slice by slice: real cortex is ~1 mm thick, so on thick slices a full 3-D shell would
    turn whole vertebrae into cortex.
    """
    bone = np.isin(ctx.canvas.labels, _BONE_LABELS)
    if not bone.any():
        return
    in_plane = ndimage.generate_binary_structure(2, 1)[:, :, None]
    cortex = bone & ~ndimage.binary_erosion(bone, structure=in_plane)
    noise = ctx.noise.mix("fine", ctx.grid.full(), ctx.rng)
    ctx.canvas.hu[cortex] = np.clip(_HU_CORTEX + 80.0 * noise[cortex], 700.0, 1000.0)


def _finish_ct(ctx: _Context) -> np.ndarray:
    """Add scanner noise, clip to the valid HU range and convert to int16."""
    hu = ctx.canvas.hu + ctx.rng.normal(0.0, _WHITE_NOISE_HU, ctx.grid.shape).astype(np.float32)
    return np.clip(np.rint(hu), *_HU_RANGE).astype(np.int16)
