"""The painters of the body wall, the organs (in painting order) and the bones' cortex, and the final CT."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage

from custom_components.data.demo.geometry import (
    Box,
    Field,
    TubeField,
    ellipsoid,
    euler_rotation,
    frame_along,
    tube_along,
)
from custom_components.data.demo.labels import (
    BONE_LABELS,
    HU_AIR,
    HU_CANCELLOUS,
    HU_CORTEX,
    HU_FAT,
    HU_MUSCLE,
    HU_RANGE,
    HU_VISCERAL_FAT,
    LABELS,
    WHITE_NOISE_HU,
)
from custom_components.data.demo.patient import Context, MUSCLE_WALL_MM, diaphragm_z, spine_centre_y

# --------------------------------------------------------------------------------------------------------
# Body wall
# --------------------------------------------------------------------------------------------------------


def _superellipse_inside(
    box: Box, semi_x: np.ndarray, semi_y: np.ndarray, wobble: np.ndarray | float = 0.0
) -> np.ndarray:
    """Inside a body-like cross-section: flatter at the back (larger exponent) than at the front."""
    exponent = np.where(box.y >= 0, np.float32(2.3), np.float32(3.0))
    radius = (np.abs(box.x) / semi_x) ** exponent + (np.abs(box.y) / semi_y) ** exponent
    return radius <= 1.0 + wobble


def paint_body_wall(ctx: Context) -> None:
    """Skin-fat-muscle layers, the back and psoas muscles, the diaphragm; defines the body cavity."""
    grid, rng = ctx.grid, ctx.rng
    box = grid.full()
    wobble = 0.04 * ctx.noise.mix("coarse", box, rng)
    fat_mm = ctx.patient.fat_mm
    skin = _superellipse_inside(box, *ctx.patient.body_semi_axes(box.z), wobble)
    fascia = _superellipse_inside(box, *ctx.patient.body_semi_axes(box.z, fat_mm), wobble)
    peritoneum = _superellipse_inside(box, *ctx.patient.body_semi_axes(box.z, fat_mm + MUSCLE_WALL_MM), wobble)
    ctx.canvas.paint(box, skin, None, HU_FAT + 10.0 * ctx.noise.mix("medium", box, rng))
    ctx.canvas.paint(box, fascia, None, HU_MUSCLE + 8.0 * ctx.noise.mix("medium", box, rng))
    ctx.canvas.paint(box, peritoneum, None, HU_VISCERAL_FAT + 15.0 * ctx.noise.mix("medium", box, rng))

    # Back (erector spinae) muscles either side of the spine, and the psoas muscles along the lumbar spine.
    spine_y = spine_centre_y(box.z)
    back_muscles = np.zeros(box.shape, dtype=bool)
    for side in (1.0, -1.0):
        lumbar = np.clip((-box.z - 0.0) / 120.0, 0.0, 1.0)
        semi_x = 24.0 + 8.0 * lumbar
        across = (box.x - side * (30.0 + 4.0 * lumbar)) / semi_x
        front_back = (box.y - (spine_y - 44.0)) / 26.0
        back_muscles |= (across**2 + front_back**2 <= 1.0) & fascia & (box.z > -200.0)
    ctx.canvas.paint(box, back_muscles, None, HU_MUSCLE + 8.0 * ctx.noise.mix("medium", box, rng))
    ctx.cavity = peritoneum & ~back_muscles

    for side in (1.0, -1.0):
        psoas_path = [(side * 28, -28, 5), (side * 40, -22, -70), (side * 55, -5, -150), (side * 60, 10, -215)]
        psoas = tube_along(grid, psoas_path, [9, 17, 22, 16])
        if psoas is not None:
            ctx.canvas.paint(psoas.box, psoas.inside() & ctx.in_cavity(psoas.box), None, HU_MUSCLE)
        gluteal = ellipsoid(grid, (side * 80, -70, -215), (55, 30, 50))
        if gluteal is not None:
            sl = gluteal.box.sl
            ctx.canvas.paint(gluteal.box, (gluteal.value <= 1.0) & skin[sl] & ~peritoneum[sl], None, HU_MUSCLE)

    # The diaphragm: a thin muscle sheet on the dome surface, inside the cavity.
    dome = diaphragm_z(box.x, box.y)
    sheet = (np.abs(box.z - dome) <= 4.0 + 0.5 * float(grid.voxel[2])) & ctx.cavity
    ctx.canvas.paint(box, sheet, None, HU_MUSCLE - 10.0)

    # Spinal canal (cord and CSF) along the whole column; the vertebral arches are painted around it later.
    canal_path = [(0.0, float(spine_centre_y(np.float32(z))) - 26.0, z) for z in (-160, -100, -40, 20, 90, 160, 250)]
    canal = tube_along(grid, canal_path, 8.0)
    if canal is not None:
        ctx.canvas.paint(canal.box, canal.inside(), None, 25.0)


# --------------------------------------------------------------------------------------------------------
# Organ painters (called in this order; later ones overwrite earlier ones)
# --------------------------------------------------------------------------------------------------------


def _paint_solid(
    ctx: Context,
    field: Field | None,
    label: int,
    hu: float,
    texture_hu: float,
    deform: float = 0.12,
    extra: Callable[[Box], np.ndarray] | None = None,
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


def _paint_small_bowel(ctx: Context) -> None:
    center = ctx.jitter_point((0.0, 25.0, -122.0), 50.0)
    region = ellipsoid(ctx.grid, center, np.array([82.0, 50.0, 58.0]) * ctx.jitter_factor())
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
    ctx: Context,
    points: Sequence[Sequence[float]],
    radii: Sequence[float] | float,
    label: int,
    content: Callable[[TubeField, np.ndarray], np.ndarray],
    region: Callable[[Box], np.ndarray] | None = None,
    wall_hu: float = 40.0,
) -> None:
    """Paint a gut segment: a wall of ``wall_hu`` around a lumen whose HU comes from ``content``."""
    shift = ctx.rng.uniform(-6.0, 6.0, 3)
    control = np.asarray(points, dtype=np.float64) + shift + ctx.rng.uniform(-3.0, 3.0, (len(points), 3))
    tube = tube_along(ctx.grid, control, np.asarray(radii, dtype=np.float64) * ctx.jitter_factor())
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


def _paint_colon(ctx: Context) -> None:
    points = [
        (88, 22, -150), (98, 4, -122), (102, -4, -92), (96, 10, -78), (80, 32, -90), (45, 52, -100), (0, 56, -110),
        (-45, 52, -95), (-80, 30, -50), (-96, 8, -28), (-104, -12, -60), (-104, -14, -110), (-88, 0, -150),
        (-55, 10, -165), (-25, -10, -172), (-5, -30, -188), (0, -32, -215), (0, -30, -250),
    ]  # fmt: skip
    radii = [26, 24, 22, 22, 22, 21, 21, 21, 21, 21, 20, 19, 18, 17, 17, 18, 18, 16]

    def stool(tube: TubeField, lumen: np.ndarray) -> np.ndarray:
        box = tube.box
        mottling = ctx.noise.mix("fine", box, ctx.rng)
        # Gas rises to the front of the supine patient: more gas pockets anteriorly.
        gas = ctx.noise.mix("medium", box, ctx.rng) + 0.02 * (box.y - 10.0) > 0.4
        return np.where(gas, -950.0, -30.0 + 70.0 * mottling)

    _paint_hollow_tube(ctx, points, radii, LABELS["colon"], stool)


def _paint_bladder(ctx: Context) -> None:
    center = ctx.jitter_point((0.0, 28.0, -192.0), 30.0)
    field = ellipsoid(ctx.grid, center, np.array([44.0, 36.0, 32.0]) * float(ctx.rng.uniform(0.75, 1.15)))
    mask = _paint_solid(ctx, field, LABELS["urinary_bladder"], 10.0, 3.0, deform=0.08, extra=ctx.in_cavity)
    if field is not None and mask is not None:
        ctx.canvas.paint(field.box, mask & (field.value > 0.8), None, 35.0)  # enhancing wall


def _below_diaphragm(gap_mm: float = 4.0) -> Callable[[Box], np.ndarray]:
    return lambda box: box.z < diaphragm_z(box.x, box.y) - gap_mm


def _above_diaphragm(gap_mm: float = 2.0) -> Callable[[Box], np.ndarray]:
    return lambda box: box.z > diaphragm_z(box.x, box.y) + gap_mm


def _paint_stomach(ctx: Context) -> None:
    points = [(-58, -2, 14), (-64, 18, -8), (-48, 40, -30), (-22, 52, -45), (2, 50, -50), (20, 42, -46)]
    radii = [36, 34, 30, 24, 17, 11]

    def gastric_content(tube: TubeField, lumen: np.ndarray) -> np.ndarray:
        box = tube.box
        ys = np.broadcast_to(box.y, box.shape)[lumen]
        # Supine patient: the gas bubble floats on the fluid at the front of the stomach.
        level = float(np.quantile(ys, 0.65)) if ys.size else np.inf
        fluid = 15.0 + 6.0 * ctx.noise.mix("medium", box, ctx.rng)
        return np.where(box.y > level, HU_AIR, fluid)

    below = _below_diaphragm()
    _paint_hollow_tube(ctx, points, radii, LABELS["stomach"], gastric_content, region=below)


def _paint_duodenum(ctx: Context) -> None:
    points = [
        (20, 42, -46), (40, 34, -48), (55, 16, -58), (58, 10, -80), (52, 12, -100), (30, 22, -110), (0, 26, -112),
        (-24, 22, -102), (-32, 16, -82),
    ]  # fmt: skip

    def fluid(tube: TubeField, lumen: np.ndarray) -> np.ndarray:
        return 18.0 + 5.0 * ctx.noise.mix("medium", tube.box, ctx.rng)

    _paint_hollow_tube(ctx, points, 12.0, LABELS["duodenum"], fluid)


def _paint_liver(ctx: Context) -> None:
    center = ctx.jitter_point((55.0, 20.0, -20.0), 60.0)
    size = ctx.jitter_factor()
    semi = np.array([105.0, 80.0, 65.0]) * size
    field = ellipsoid(ctx.grid, center, semi)
    if field is None:
        return
    box = field.box
    # The left lobe is thin: shrink the vertical semi-axis toward the patient's left (-x).
    thickness = np.clip(0.35 + 0.65 * (box.x - (center[0] - semi[0])) / (1.4 * semi[0]), 0.35, 1.0)
    dz = (box.z - center[2]) / (semi[2] * thickness)
    base = ((box.x - center[0]) / semi[0]) ** 2 + ((box.y - center[1]) / semi[1]) ** 2
    field = Field(box, (base + dz * dz).astype(np.float32))
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


def _paint_gallbladder(ctx: Context) -> None:
    center = ctx.jitter_point((50.0, 58.0, -62.0), 20.0)
    semi = np.array([17.0, 16.0, 34.0]) * ctx.jitter_factor()
    field = ellipsoid(ctx.grid, center, semi, rotation=euler_rotation(rx=-0.5, ry=0.2))
    _paint_solid(ctx, field, LABELS["gallbladder"], 10.0, 3.0, deform=0.06, extra=ctx.in_cavity)


def _paint_spleen(ctx: Context) -> None:
    center = ctx.jitter_point((-95.0, -38.0, -2.0), 40.0)
    semi = np.array([26.0, 55.0, 48.0]) * ctx.jitter_factor()
    field = ellipsoid(ctx.grid, center, semi, rotation=euler_rotation(rz=0.6))
    if field is None:
        return
    box = field.box
    # Concave hilum facing the stomach and kidney: cut away a sphere on the antero-medial side.
    hilum = (box.x - (center[0] + 42.0)) ** 2 + (box.y - (center[1] + 22.0)) ** 2 + (box.z - center[2]) ** 2 > 32.0**2
    below = _below_diaphragm()
    _paint_solid(ctx, field, LABELS["spleen"], 50.0, 6.0, extra=lambda b: hilum & below(b) & ctx.in_cavity(b))


def _paint_kidneys(ctx: Context) -> None:
    # (side: +1 right / -1 left, label, centre); the right kidney sits lower, under the liver.
    kidneys = (
        (1.0, LABELS["kidney_right"], (66.0, -32.0, -62.0)),
        (-1.0, LABELS["kidney_left"], (-64.0, -28.0, -48.0)),
    )
    for side, label, center in kidneys:
        center = ctx.jitter_point(center, 30.0)
        semi = np.array([26.0, 22.0, 52.0]) * ctx.jitter_factor()
        # Upper poles lean medially and the hilum turns antero-medially.
        rotation = euler_rotation(ry=-side * 0.25, rz=side * 0.45)
        field = ellipsoid(ctx.grid, center, semi, rotation=rotation)
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


def _paint_adrenals(ctx: Context) -> None:
    adrenals = (
        (LABELS["adrenal_gland_right"], (38.0, -22.0, 4.0), 0.5),
        (LABELS["adrenal_gland_left"], (-38.0, -18.0, -4.0), -0.5),
    )
    for label, center, angle in adrenals:
        center = ctx.jitter_point(center, 10.0)
        semi = np.array([6.0, 16.0, 20.0]) * ctx.jitter_factor()
        field = ellipsoid(ctx.grid, center, semi, rotation=euler_rotation(rz=angle))
        _paint_solid(ctx, field, label, 35.0, 5.0, deform=0.1, extra=ctx.in_cavity)


def _paint_pancreas(ctx: Context) -> None:
    shift = ctx.rng.uniform(-6.0, 6.0, 3)
    # Head (in the duodenal C-loop) -> neck -> body -> tail (at the splenic hilum).
    path = [(32, 12, -90), (32, 14, -72), (10, 22, -52), (-30, 12, -40), (-62, -2, -30), (-85, -20, -20)]
    points = np.array(path, dtype=float) + shift
    tube = tube_along(ctx.grid, points, np.array([13.0, 17.0, 12.0, 12.0, 11.0, 9.0]) * ctx.jitter_factor())
    if tube is None:
        return
    box = tube.box
    mask = tube.inside(0.15 * ctx.noise.mix("coarse", box, ctx.rng)) & ctx.in_cavity(box)
    # Lobulated parenchyma with fat between the lobules.
    lobules = ctx.noise.mix("fine", box, ctx.rng)
    values = np.where(lobules < -1.4, -40.0, 45.0 + 10.0 * lobules)
    ctx.canvas.paint(box, mask, LABELS["pancreas"], values)


def _paint_lungs(ctx: Context) -> None:
    grid, rng = ctx.grid, ctx.rng
    apex = 228.0 * float(rng.uniform(0.97, 1.0))
    box = grid.box((-200.0, -200.0, -40.0), (200.0, 200.0, apex))
    if box is None:
        return
    dome = diaphragm_z(box.x, box.y)
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
        medial = np.where(box.y > spine_centre_y(box.z) + 8.0, np.where(box.z > 110.0, 22.0, 16.0), 6.0)
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


def _paint_heart(ctx: Context) -> None:
    center = ctx.jitter_point((-22.0, 24.0, 80.0), 30.0)
    # Long axis from the base (right, back, up) to the apex (left, front, down): the heart leans left.
    frame = frame_along((-0.55, 0.5, -0.6))
    size = ctx.jitter_factor()
    outer = ellipsoid(ctx.grid, center, np.array([68.0, 56.0, 50.0]) * size, rotation=frame)
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
        chamber = ellipsoid(ctx.grid, center + np.asarray(offset) * size, np.asarray(semi) * size, rotation=rotation)
        if chamber is None:
            continue
        # Chambers stay inside the heart so the myocardium remains a closed shell around them.
        inside_heart = ctx.canvas.labels[chamber.box.sl] == LABELS["heart_myocardium"]
        _paint_solid(ctx, chamber, label, hu, 5.0, deform=0.05, extra=lambda b, keep=inside_heart: keep)


def _paint_mediastinal_tubes(ctx: Context) -> None:
    """Esophagus, trachea and the great vessels (aorta, inferior vena cava, portal and splenic veins)."""

    def lumen_air(tube: TubeField, lumen: np.ndarray) -> np.ndarray:
        return np.full(tube.box.shape, HU_AIR, dtype=np.float32)

    def collapsed(tube: TubeField, lumen: np.ndarray) -> np.ndarray:
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
        tube = tube_along(ctx.grid, control, np.asarray(radii, dtype=np.float64) * ctx.jitter_factor())
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


def _paint_spine(ctx: Context) -> None:
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
        spine_y = float(spine_centre_y(np.float32(center_z)))
        canal_y = spine_y - semi_y - 10.0
        spinous_length = 13.0 if lumbar else 9.0
        parts = [
            # Vertebral body: a short elliptic cylinder.
            ellipsoid(grid, (0.0, spine_y, center_z), (semi_x, semi_y, body_half), exponents=(2.0, 2.0, 8.0)),
            # Neural arch: a thick ring around the spinal canal (the canal is cut out below).
            ellipsoid(grid, (0.0, canal_y - 4.0, center_z), (17.0, 14.0, level_half), exponents=(2.0, 2.0, 6.0)),
            # Spinous process, pointing back and down.
            ellipsoid(
                grid,
                (0.0, canal_y - 14.0 - spinous_length, center_z - 3.0),
                (4.0, spinous_length, 0.6 * level_half),
            ),
            # Transverse processes.
            ellipsoid(grid, (0.0, canal_y + 2.0, center_z), ((40.0 if lumbar else 34.0), 5.0, 0.5 * level_half)),
        ]
        for part in parts:
            if part is None:
                continue
            box = part.box
            not_canal = (box.x**2 + (box.y - canal_y) ** 2) > 8.5**2
            within_level = (box.z <= top) & (box.z > bottom)  # each label stays its own block
            mask = (part.value <= 1.0) & not_canal & within_level
            ctx.canvas.paint(box, mask, label, HU_CANCELLOUS + 40.0 * ctx.noise.mix("medium", box, ctx.rng))


def _paint_sacrum(ctx: Context) -> None:
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
    ctx.canvas.paint(box, mask, LABELS["sacrum"], HU_CANCELLOUS + 40.0 * ctx.noise.mix("medium", box, ctx.rng))


def _paint_pelvis(ctx: Context) -> None:
    """Hip bones (iliac wing, acetabulum, pubic and ischial rami) and the femoral heads and necks."""
    grid, rng = ctx.grid, ctx.rng
    width = ctx.jitter_factor(0.05)  # pelvic width, shared by both sides
    lift = float(rng.uniform(-6.0, 6.0))  # vertical position of the pelvis

    def place(side: float, x: float, y: float, z: float) -> tuple[float, float, float]:
        return (side * x * width, y, z + lift)

    def bone_hu(box: Box) -> np.ndarray:
        return HU_CANCELLOUS + 40.0 * ctx.noise.mix("medium", box, rng)

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
        acetabulum = ellipsoid(grid, place(side, 88.0, 5.0, -200.0), (30.0, 32.0, 30.0))
        if acetabulum is not None:
            b = acetabulum.box
            outside_socket = (b.x - socket[0]) ** 2 + (b.y - socket[1]) ** 2 + (b.z - socket[2]) ** 2 > 22.0**2
            _paint_solid(ctx, acetabulum, hip_label, HU_CANCELLOUS, 40.0, deform=0.05, extra=lambda _: outside_socket)
        rami = (
            ([place(side, 78, 22, -212), place(side, 40, 45, -220), place(side, 8, 55, -224)], 10.0),  # pubic
            ([place(side, 82, -12, -214), place(side, 70, -25, -232), place(side, 60, -30, -250)], 13.0),  # ischial
        )
        for points, radius in rami:
            tube = tube_along(grid, points, radius)
            if tube is not None:
                ctx.canvas.paint(tube.box, tube.inside(), hip_label, bone_hu(tube.box))
        head = ellipsoid(grid, socket, (21.0, 21.0, 21.0))
        _paint_solid(ctx, head, femur_label, HU_CANCELLOUS, 40.0, deform=0.0)
        neck_line = [tuple(socket), place(side, 125.0, 0.0, -240.0), place(side, 135.0, -5.0, -270.0)]
        neck = tube_along(grid, neck_line, 14.0)
        if neck is not None:
            ctx.canvas.paint(neck.box, neck.inside(), femur_label, bone_hu(neck.box))


def _paint_ribs(ctx: Context) -> None:
    """Twelve rib pairs: arcs from the transverse processes around the chest wall, dropping anteriorly."""
    grid, patient = ctx.grid, ctx.patient
    # Upper ribs are short (narrow thoracic inlet); ribs 11 and 12 are floating and short.
    inlet = (0.55, 0.72, 0.84, 0.92, 0.97, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    end_angle = (2.8, 2.8, 2.8, 2.8, 2.8, 2.8, 2.75, 2.55, 2.35, 2.15, 1.75, 1.35)
    start_angle = 0.5
    drop_factor = ctx.jitter_factor(0.15)
    for number, (label, top, bottom, _) in enumerate(_vertebra_levels(ctx.patient.spine_pitch)[:12], start=1):
        z0 = 0.5 * (top + bottom)
        semi_x, semi_y = patient.body_semi_axes(np.float32(z0), patient.fat_mm + 0.5 * MUSCLE_WALL_MM)
        semi_x, semi_y = float(semi_x) * inlet[number - 1], float(semi_y) * (0.5 + 0.5 * inlet[number - 1])
        drop = (30.0 + 3.0 * number) * drop_factor
        angles = np.linspace(start_angle, end_angle[number - 1], 12)
        progress = (angles - start_angle) / (math.pi - start_angle)
        for side, rib_label in ((1.0, LABELS[f"rib_right_{number}"]), (-1.0, LABELS[f"rib_left_{number}"])):
            spine_y = float(spine_centre_y(np.float32(z0)))
            origin = (side * 30.0, spine_y - 20.0, z0 + 2.0)
            arc = np.column_stack(
                [side * semi_x * np.sin(angles), -semi_y * np.cos(angles), z0 - drop * progress**1.3]
            )
            arc[:, 2] += ctx.rng.uniform(-3.0, 3.0)
            tube = tube_along(grid, np.vstack([origin, arc]), 5.0 + 0.1 * number)
            if tube is not None:
                values = HU_CANCELLOUS + 40.0 * ctx.noise.mix("medium", tube.box, ctx.rng)
                ctx.canvas.paint(tube.box, tube.inside(), rib_label, values)
    # Sternum (no label in TotalSegmentator v1, so background): a bony bar inside the front chest wall.
    sternum_points = []
    for z in (200.0, 150.0, 100.0, 50.0):
        _, semi_y = patient.body_semi_axes(np.float32(z), patient.fat_mm + 0.5 * MUSCLE_WALL_MM)
        sternum_points.append((0.0, float(semi_y) - 2.0, z))
    sternum = tube_along(grid, sternum_points, 8.0)
    if sternum is not None:
        values = 450.0 + 60.0 * ctx.noise.mix("medium", sternum.box, ctx.rng)
        ctx.canvas.paint(sternum.box, sternum.inside(), None, values)


ORGAN_PAINTERS: tuple[Callable[[Context], None], ...] = (
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
# Final touches
# --------------------------------------------------------------------------------------------------------


def finish_bone(ctx: Context) -> None:
    """Give every bone a dense cortical rim (its outermost in-plane voxel layer) around cancellous bone.

    The rim is found slice by slice: real cortex is ~1 mm thick, so on thick slices a full 3-D shell would
    turn whole vertebrae into cortex.
    """
    bone = np.isin(ctx.canvas.labels, BONE_LABELS)
    if not bone.any():
        return
    in_plane = ndimage.generate_binary_structure(2, 1)[:, :, None]
    cortex = bone & ~ndimage.binary_erosion(bone, structure=in_plane)
    noise = ctx.noise.mix("fine", ctx.grid.full(), ctx.rng)
    ctx.canvas.hu[cortex] = np.clip(HU_CORTEX + 80.0 * noise[cortex], 700.0, 1000.0)


def finish_ct(ctx: Context) -> np.ndarray:
    """Add scanner noise, clip to the valid HU range and convert to int16."""
    hu = ctx.canvas.hu + ctx.rng.normal(0.0, WHITE_NOISE_HU, ctx.grid.shape).astype(np.float32)
    return np.clip(np.rint(hu), *HU_RANGE).astype(np.int16)
