"""Tumors: reading a record's tumor fields, and placing that many separate tumors inside the organ."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from custom_components.data.demo.geometry import euler_rotation
from custom_components.data.demo.labels import (
    HOLLOW_TUMOR_ORGANS,
    ORGAN_BASE_HU,
    TUMOR_HU_HOLLOW,
    TUMOR_HU_LUNG,
    TUMOR_ORGANS,
)
from custom_components.data.demo.patient import Context

@dataclass(frozen=True)
class _TumorRequest:
    organ: str | None
    count: int
    size_mm: float


def read_tumor_request(record: Mapping[str, Any]) -> _TumorRequest:
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
# Tumors
# --------------------------------------------------------------------------------------------------------


def paint_tumors(ctx: Context, request: _TumorRequest, spacing: np.ndarray) -> np.ndarray:
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
        return TUMOR_HU_LUNG
    if organ in HOLLOW_TUMOR_ORGANS:
        return TUMOR_HU_HOLLOW
    return ORGAN_BASE_HU[organ_labels[0]] - 40.0


def _tumor_blob(
    ctx: Context, shape: tuple[int, ...], spacing: np.ndarray, centre: np.ndarray, radius: float
) -> np.ndarray:
    """Irregular ellipsoid (random axes and orientation, bumpy surface) in a box of ``shape`` voxels."""
    rng = ctx.rng
    semi = radius * rng.uniform(0.85, 1.15, 3)
    semi *= radius / float(np.cbrt(np.prod(semi)))  # keep the requested volume-equivalent radius
    rotation = euler_rotation(*rng.uniform(-math.pi, math.pi, 3))
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
