"""One patient's proportions: body outline, spine and diaphragm, and the context the painters share."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from custom_components.data.demo.geometry import Box, Canvas, Grid, NoiseBank
from custom_components.data.demo.labels import REFERENCE_FIELD_OF_VIEW_MM

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
MUSCLE_WALL_MM = 12.0


@dataclass(frozen=True)
class PatientModel:
    """Per-patient body proportions (reference frame) and the anatomy scale."""

    size_xy: float
    size_z: float
    width: float  # extra body-width factor (sex)
    fat_mm: float
    spine_pitch: float  # vertebral height factor

    @staticmethod
    def draw(record: Mapping[str, Any], rng: np.random.Generator) -> PatientModel:
        sex = str(record.get("sex") or "").strip().lower()
        female = sex in {"female", "f", "woman"}
        try:
            age = float(record.get("age"))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            age = math.nan
        age = age if math.isfinite(age) else 50.0
        # Older patients carry a little more subcutaneous fat; women a little more and a narrower torso.
        fat = 14.0 + 0.12 * float(np.clip(age - 40.0, -15.0, 40.0)) + (4.0 if female else 0.0)
        return PatientModel(
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


def spine_centre_y(z: np.ndarray) -> np.ndarray:
    return np.interp(z, _SPINE_Z, _SPINE_Y).astype(np.float32)


def diaphragm_z(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Height of the diaphragm: two domes, the right one higher (it sits on the liver)."""
    right = 30.0 - ((x - 65.0) ** 2 + (y - 10.0) ** 2) / 350.0
    left = 20.0 - ((x + 65.0) ** 2 + (y - 10.0) ** 2) / 350.0
    blend = 1.0 / (1.0 + np.exp(-x / 20.0))
    return np.maximum(blend * right + (1.0 - blend) * left, -25.0)


@dataclass
class Context:
    """Everything the painters share for one phantom."""

    grid: Grid
    canvas: Canvas
    noise: NoiseBank
    rng: np.random.Generator
    patient: PatientModel
    cavity: np.ndarray | None = None  # inside the muscle wall, minus the back muscles

    def jitter_point(self, point: Sequence[float], size: float, fraction: float = 0.1) -> np.ndarray:
        """Move a landmark by up to ``fraction`` of the structure size along each axis."""
        return np.asarray(point, dtype=np.float64) + self.rng.uniform(-fraction, fraction, 3) * size

    def jitter_factor(self, spread: float = 0.1) -> float:
        return float(self.rng.uniform(1.0 - spread, 1.0 + spread))

    def in_cavity(self, box: Box) -> np.ndarray:
        assert self.cavity is not None
        return self.cavity[box.sl]
