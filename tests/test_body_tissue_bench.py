"""bench/body_tissue.py: the figures BENCHMARKS quotes about the body class and the latent grid."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import body_tissue  # noqa: E402

BODY = 9


def test_latent_grid_counts_mixed_minority_and_tied_blocks() -> None:
    mask = np.zeros((4, 2, 2), dtype=np.int64)
    mask[0:2] = 3  # block 0: one class -> not mixed
    mask[2:4] = 5  # block 1: the first voxel a minority (1 of 8), class 5 the majority (7 of 8)
    mask[2, 0, 0] = 7
    result = body_tissue.latent_grid_mixing(mask, 2)
    assert result == {"latent_voxels": 2, "mixed": 0.5, "subsample_minority": 0.5, "subsample_tied": 0.0}

    tied = np.zeros((2, 2, 2), dtype=np.int64)
    tied[0] = 4  # 4 voxels of class 4 (the first voxel's), 4 of background: a tie
    assert body_tissue.latent_grid_mixing(tied, 2) == {"latent_voxels": 1, "mixed": 1.0, "subsample_minority": 0.0,
                                                       "subsample_tied": 1.0}


def test_latent_grid_skips_background_blocks_and_refuses_indivisible_shapes() -> None:
    mask = np.zeros((4, 4, 4), dtype=np.int64)
    assert body_tissue.latent_grid_mixing(mask, 2)["latent_voxels"] == 0
    with pytest.raises(ValueError, match="not divisible"):
        body_tissue.latent_grid_mixing(np.zeros((3, 4, 4), dtype=np.int64), 2)


def test_distance_bins_split_the_body_by_distance_to_air_and_organs() -> None:
    labels = np.zeros((1, 40, 1), dtype=np.int64)
    labels[0, 1:39] = BODY  # body from y = 1 to 38, air at 0 and 39
    labels[0, 20] = 2  # an organ voxel in the middle
    near_air, near_organ, organ_2_4, organ_4_8, every = body_tissue.distance_bins(labels, BODY)
    ys = lambda m: set(np.flatnonzero(m[0, :, 0]).tolist())  # noqa: E731
    assert ys(every) == set(range(1, 39)) - {20}
    assert ys(near_air) == {1, 2, 37, 38}
    assert ys(near_organ) == {18, 19, 21, 22}
    assert ys(organ_2_4) == {16, 17, 23, 24}
    assert ys(organ_4_8) == set(range(12, 16)) | set(range(25, 29))
