"""PNG figures of an evaluation: per-organ Dice bars, the tumor-location confusion matrix, slice montages."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from custom_components.data.writers import atomic_write

__all__ = ["plot_dice_bars", "plot_confusion", "plot_montage"]


def _figure():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: str | os.PathLike) -> Path:
    def write(temporary: Path) -> None:
        figure.savefig(str(temporary), dpi=100, bbox_inches="tight", metadata={"Software": None})

    try:
        return atomic_write(path, write)
    finally:
        _figure().close(figure)


def plot_dice_bars(dice: Mapping[str, float], path: str | os.PathLike, title: str = "image-mask Dice per organ") -> Path:
    """Horizontal bars of the mean Dice of each organ (NaN organs, absent everywhere, are left out)."""
    plt = _figure()
    names = [n for n, v in dice.items() if v == v]
    values = [dice[n] for n in names]
    figure, axis = plt.subplots(figsize=(6, 0.3 * len(names) + 1))
    axis.barh(names[::-1], values[::-1], color="#4477aa")
    axis.set_xlim(0, 1)
    axis.set_xlabel("Dice")
    axis.set_title(title)
    return _save(figure, path)


def plot_confusion(matrix: np.ndarray, rows: Sequence[str], columns: Sequence[str], path: str | os.PathLike,
                   title: str = "tumor location: organ named in the prompt vs organ the tumor lies in") -> Path:
    """A count matrix with its numbers written in the cells."""
    plt = _figure()
    figure, axis = plt.subplots(figsize=(0.55 * len(columns) + 2.5, 0.45 * len(rows) + 2))
    axis.imshow(matrix, cmap="Blues")
    axis.set_xticks(range(len(columns)), columns, rotation=60, ha="right")
    axis.set_yticks(range(len(rows)), rows)
    axis.set_xlabel("found in")
    axis.set_ylabel("prompt names")
    for (i, j), count in np.ndenumerate(matrix):
        if count:
            axis.text(j, i, str(int(count)), ha="center", va="center", color="black")
    axis.set_title(title, fontsize=9)
    return _save(figure, path)


def plot_montage(rows: Sequence[tuple[str, Sequence[np.ndarray]]], path: str | os.PathLike, window: tuple[float, float] = (-160, 240)) -> Path:
    """A grid of 2D slices (one row per set, e.g. generated / reference), shown in a CT window."""
    plt = _figure()
    columns = max(len(images) for _, images in rows)
    figure, axes = plt.subplots(len(rows), columns, figsize=(1.6 * columns, 1.8 * len(rows)), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(columns):
            axis = axes[r][c]
            axis.axis("off")
            if c < len(images):
                axis.imshow(np.rot90(images[c]), cmap="gray", vmin=window[0], vmax=window[1])
        axes[r][0].set_title(label, fontsize=8, loc="left")
    return _save(figure, path)
