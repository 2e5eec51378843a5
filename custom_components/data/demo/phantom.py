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

Labels use the TotalSegmentator v1 indices (:data:`custom_components.data.demo.labels.LABELS`); the body outside organs (fat, muscle,
mediastinal and mesenteric fat, the sternum) is background (0). Tumors are a separate mask: tumor voxels keep
the label of the organ that holds them.

Everything random is drawn from ``np.random.default_rng(seed)``, so a given (record, shape, spacing, seed)
reproduces the same arrays byte for byte.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from custom_components.data.demo.geometry import Canvas, Grid, NoiseBank
from custom_components.data.demo.organs import ORGAN_PAINTERS, finish_bone, finish_ct, paint_body_wall
from custom_components.data.demo.patient import Context, PatientModel
from custom_components.data.demo.tumors import paint_tumors, read_tumor_request
from custom_components.data.io import centred_affine

__all__ = ["Phantom", "generate_phantom"]


@dataclass
class Phantom:
    """One generated case.

    Attributes:
        ct: int16 Hounsfield units, shape ``shape``, RAS voxel order.
        segmentation: uint8 TotalSegmentator v1 labels (see :data:`~custom_components.data.demo.labels.LABELS`), same shape.
        tumor: uint8 mask, 1 inside tumors and 0 elsewhere, same shape.
        affine: 4x4 float64 voxel -> RAS+ world (mm) matrix, ``diag(spacing)`` with the volume centred at 0.
    """

    ct: np.ndarray
    segmentation: np.ndarray
    tumor: np.ndarray
    affine: np.ndarray

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
    tumor_request = read_tumor_request(record)
    rng = np.random.default_rng(seed)
    affine = centred_affine(shape_t, spacing_t)
    patient = PatientModel.draw(record, rng)
    grid = Grid.create(shape_t, spacing_t, patient.scale_for(shape_t, spacing_t))
    ctx = Context(grid=grid, canvas=Canvas.empty(shape_t), noise=NoiseBank.draw(grid, rng), rng=rng, patient=patient)

    paint_body_wall(ctx)
    for painter in ORGAN_PAINTERS:
        painter(ctx)
    tumor = paint_tumors(ctx, tumor_request, np.asarray(spacing_t))
    finish_bone(ctx)
    ct = finish_ct(ctx)
    return Phantom(ct=ct, segmentation=ctx.canvas.labels, tumor=tumor, affine=affine)


# --------------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------------


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
