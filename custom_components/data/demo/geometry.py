"""Where a phantom is drawn: the grid in reference mm, the canvas being painted, smooth noise fields, shape primitives."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from custom_components.data.demo.labels import HU_AIR

# --------------------------------------------------------------------------------------------------------
# Grid, canvas and noise
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Box:
    """An axis-aligned sub-grid: the slices into the volume and broadcastable reference coordinates."""

    sl: tuple[slice, slice, slice]
    x: np.ndarray  # (nx, 1, 1)
    y: np.ndarray  # (1, ny, 1)
    z: np.ndarray  # (1, 1, nz)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.x.shape[0], self.y.shape[1], self.z.shape[2])


@dataclass(frozen=True)
class Grid:
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
    def create(shape: tuple[int, int, int], spacing: tuple[float, float, float], scale: np.ndarray) -> Grid:
        axes = [
            ((np.arange(n, dtype=np.float64) - (n - 1) / 2.0) * s / k).astype(np.float32)
            for n, s, k in zip(shape, spacing, scale)
        ]
        voxel = np.asarray(spacing) / scale
        return Grid(x=axes[0], y=axes[1], z=axes[2], voxel=voxel, half_extent=np.asarray(shape) * voxel / 2.0)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.x.size, self.y.size, self.z.size)

    @property
    def min_radius(self) -> float:
        """Smallest radius (reference mm) a structure needs to contain a voxel centre wherever it lies."""
        return 0.9 * float(self.voxel.max())

    def box(self, low: Sequence[float], high: Sequence[float]) -> Box | None:
        """The sub-grid of voxel centres inside [low, high], or None when it holds no voxel."""
        slices = []
        for axis, lo, hi in zip((self.x, self.y, self.z), low, high):
            start = int(np.searchsorted(axis, lo, side="left"))
            stop = int(np.searchsorted(axis, hi, side="right"))
            if stop <= start:
                return None
            slices.append(slice(start, stop))
        return self.from_slices((slices[0], slices[1], slices[2]))

    def full(self) -> Box:
        return self.from_slices((slice(0, self.x.size), slice(0, self.y.size), slice(0, self.z.size)))

    def from_slices(self, sl: tuple[slice, slice, slice]) -> Box:
        x, y, z = self.x[sl[0]], self.y[sl[1]], self.z[sl[2]]
        return Box(sl=sl, x=x[:, None, None], y=y[None, :, None], z=z[None, None, :])


@dataclass
class Canvas:
    """The label and HU volumes being painted; later paint overwrites earlier paint."""

    labels: np.ndarray
    hu: np.ndarray

    @staticmethod
    def empty(shape: tuple[int, int, int]) -> Canvas:
        return Canvas(labels=np.zeros(shape, dtype=np.uint8), hu=np.full(shape, HU_AIR, dtype=np.float32))

    def paint(self, box: Box, mask: np.ndarray, label: int | None, hu: float | np.ndarray) -> None:
        """Write ``label`` (None: keep the label, change only HU) and ``hu`` where ``mask`` is set."""
        mask = np.broadcast_to(mask, box.shape)
        if label is not None:
            self.labels[box.sl][mask] = label
        hu_view = self.hu[box.sl]
        hu_view[mask] = np.broadcast_to(np.asarray(hu, dtype=np.float32), box.shape)[mask]


def _smooth_noise(rng: np.random.Generator, grid: Grid, correlation_mm: float) -> np.ndarray:
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
class NoiseBank:
    """A few shared smooth noise fields; each organ mixes them with its own random weights.

    Mixing unit-variance fields with a random unit vector gives every organ an independent-looking,
    unit-variance texture or surface deformation at the cost of only a handful of full-volume fields.
    """

    coarse: tuple[np.ndarray, ...]  # ~45 mm: organ deformations and slow intensity drifts
    medium: tuple[np.ndarray, ...]  # ~16 mm: bowel loops, lobulation
    fine: tuple[np.ndarray, ...]  # ~7 mm: mottling, gas pockets, vessels

    @staticmethod
    def draw(grid: Grid, rng: np.random.Generator) -> NoiseBank:
        return NoiseBank(
            coarse=tuple(_smooth_noise(rng, grid, 45.0) for _ in range(3)),
            medium=tuple(_smooth_noise(rng, grid, 16.0) for _ in range(2)),
            fine=tuple(_smooth_noise(rng, grid, 7.0) for _ in range(2)),
        )

    def mix(self, scale: str, box: Box, rng: np.random.Generator) -> np.ndarray:
        fields = getattr(self, scale)
        weights = rng.standard_normal(len(fields))
        weights /= max(float(np.linalg.norm(weights)), 1e-6)
        out = np.zeros(box.shape, dtype=np.float32)
        for weight, field in zip(weights, fields):
            out += np.float32(weight) * field[box.sl]
        return out


# --------------------------------------------------------------------------------------------------------
# Shape primitives (all in reference mm)
# --------------------------------------------------------------------------------------------------------


def euler_rotation(rx: float = 0.0, ry: float = 0.0, rz: float = 0.0) -> np.ndarray:
    """Rotation matrix (columns: the local axes in world coordinates) from x, y, z Euler angles (radians)."""
    cx, sx, cy, sy, cz, sz = math.cos(rx), math.sin(rx), math.cos(ry), math.sin(ry), math.cos(rz), math.sin(rz)
    rot_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rot_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rot_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rot_z @ rot_y @ rot_x


def frame_along(direction: Sequence[float]) -> np.ndarray:
    """Rotation whose first local axis points along ``direction``."""
    u = np.asarray(direction, dtype=np.float64)
    u /= np.linalg.norm(u)
    helper = np.array([0.0, 0.0, 1.0]) if abs(u[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    v = np.cross(helper, u)
    v /= np.linalg.norm(v)
    return np.stack([u, v, np.cross(u, v)], axis=1)


@dataclass(frozen=True)
class Field:
    """A scalar shape field on a box: ``value <= 1`` inside the shape."""

    box: Box
    value: np.ndarray


def ellipsoid(
    grid: Grid,
    center: Sequence[float],
    semi: Sequence[float],
    rotation: np.ndarray | None = None,
    exponents: Sequence[float] = (2.0, 2.0, 2.0),
    margin: float = 1.25,
) -> Field | None:
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
    return Field(box, value)


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
class TubeField:
    """Distance to a tube's centre line and the tube radius at the nearest centre-line point."""

    box: Box
    distance: np.ndarray
    radius: np.ndarray

    def inside(self, wobble: np.ndarray | float = 0.0) -> np.ndarray:
        return self.distance <= self.radius * (1.0 + wobble)


def tube_along(grid: Grid, points: Sequence[Sequence[float]], radii: Sequence[float] | float) -> TubeField | None:
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
    return TubeField(
        box=box,
        distance=distance,
        radius=radius[index].astype(np.float32).reshape(box.shape),
    )
