"""PNG previews: axial, coronal and sagittal slices of a CT with its label map laid over it.

A researcher checks a prepared or generated case faster by looking than by reading voxel counts. The
preview shows the three orthogonal slices through the centre of the labelled region, CT in a soft-tissue
window, each class in its own colour.
"""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image

__all__ = ["class_colors", "render_preview"]

SOFT_TISSUE_WINDOW_HU = (-160.0, 240.0)


def class_colors(num_classes: int) -> np.ndarray:
    """Distinct RGB colours for classes 1..N-1 (row 0, background, is black and never drawn).

    Returns:
        (N, 3) uint8 array.
    """
    colors = np.zeros((num_classes, 3), dtype=np.uint8)
    for index in range(1, num_classes):
        hue = (index * 0.618033988749895) % 1.0  # golden-ratio steps keep neighbours' hues apart
        colors[index] = np.round(np.array(colorsys.hsv_to_rgb(hue, 0.85, 1.0)) * 255)
    return colors


def _to_grid(labels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour resampling of a label volume onto another grid with the same field of view."""
    index = [np.minimum((np.arange(n) + 0.5) * s / n, s - 1).astype(int) for n, s in zip(shape, labels.shape)]
    return labels[np.ix_(*index)]


def _slices(volume: np.ndarray, centre: tuple[int, int, int]) -> list[np.ndarray]:
    """Axial, coronal, sagittal slices of an (X, Y, Z) RAS volume, turned so that anterior/superior is up
    and the patient's right is on the viewer's left (radiological convention)."""
    x, y, z = centre
    # rot90 puts the highest y (anterior) or z (superior) in the top row; fliplr puts the highest x
    # (patient's right) on the viewer's left, and anterior on the left of the sagittal view.
    return [np.fliplr(np.rot90(view)) for view in (volume[:, :, z], volume[:, y, :], volume[x, :, :])]


def render_preview(
    ct: np.ndarray,
    labels: np.ndarray | None,
    num_classes: int,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    window: tuple[float, float] = SOFT_TISSUE_WINDOW_HU,
    alpha: float = 0.4,
    height: int = 256,
) -> Image.Image:
    """Draw the three-view preview.

    Args:
        ct: (X, Y, Z) HU volume in RAS order.
        labels: (X', Y', Z') class volume over the same field of view (any resolution), or None.
        num_classes: N, for the colour table.
        spacing: CT voxel size in mm, so that slices are shown with true proportions.
        window: HU window (low, high).
        alpha: overlay opacity.
        height: height of each panel in pixels.

    Returns:
        an RGB image with the axial, coronal and sagittal panels side by side.
    """
    grey = np.clip((ct.astype(np.float32) - window[0]) / (window[1] - window[0]), 0, 1)
    rgb = np.repeat((grey * 255)[..., None], 3, axis=-1)
    if labels is not None:
        on_grid = _to_grid(np.asarray(labels), ct.shape)
        colors = class_colors(num_classes)[np.clip(on_grid, 0, num_classes - 1)]
        drawn = (on_grid > 0)[..., None]
        rgb = np.where(drawn, (1 - alpha) * rgb + alpha * colors, rgb)
        centre = tuple(int(np.mean(np.nonzero(on_grid)[axis])) if on_grid.any() else n // 2 for axis, n in enumerate(ct.shape))
    else:
        centre = tuple(n // 2 for n in ct.shape)
    extents = [(spacing[0], spacing[1]), (spacing[0], spacing[2]), (spacing[1], spacing[2])]
    panels = []
    for view, (width_mm, height_mm) in zip(_slices(rgb, centre), extents):  # type: ignore[arg-type]
        aspect = (view.shape[1] * width_mm) / (view.shape[0] * height_mm)
        image = Image.fromarray(view.astype(np.uint8))
        panels.append(image.resize((max(1, round(height * aspect)), height), Image.NEAREST))
    canvas = Image.new("RGB", (sum(p.width for p in panels) + 4 * (len(panels) - 1), height))
    offset = 0
    for panel in panels:
        canvas.paste(panel, (offset, 0))
        offset += panel.width + 4
    return canvas
