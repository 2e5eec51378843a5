"""PNG previews: three panels, radiological orientation, overlay colours."""

import numpy as np
from PIL import Image

from custom_components.data.preview import class_colors, render_preview
from custom_components.data.writers import save_preview


def test_preview_orientation_and_overlay(tmp_path):
    ct = np.full((40, 30, 50), 40, dtype=np.int16)
    labels = np.zeros((20, 15, 25), dtype=np.uint8)
    labels[15:19, 2:5, 18:22] = 3  # patient's right (high x), posterior (low y), superior (high z)
    image = render_preview(ct, labels, num_classes=5, spacing=(1.0, 1.0, 1.0), height=100)
    assert image.mode == "RGB" and image.height == 100
    pixels = np.asarray(image).astype(int)
    axial_width = round(100 * 40 / 30)
    axial = pixels[:, :axial_width]
    coloured = np.argwhere(np.abs(axial - axial[0, 0]).sum(axis=-1) > 30)
    assert len(coloured), "overlay missing in the axial panel"
    rows, cols = coloured[:, 0], coloured[:, 1]
    assert cols.mean() < axial_width / 2  # patient's right shown on the viewer's left
    assert rows.mean() > 50  # posterior at the bottom
    expected = 0.6 * np.clip((40 + 160) / 400, 0, 1) * 255 + 0.4 * class_colors(5)[3]
    np.testing.assert_allclose(axial[rows[0], cols[0]], expected, atol=2)
    path = save_preview(image, tmp_path / "p/preview.png")
    assert Image.open(path).size == image.size


def test_class_colors_are_distinct():
    colors = class_colors(20)
    assert (colors[0] == 0).all()
    assert len({tuple(c) for c in colors[1:]}) == 19


def test_preview_without_labels():
    image = render_preview(np.zeros((8, 8, 8)), None, num_classes=2, height=32)
    assert image.height == 32
