"""Shared fixtures: small synthetic cases written as NIfTI files, and the packaged example CT."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

# TotalSegmentator v1 label values used by the synthetic cases.
V1_LIVER, V1_SPLEEN, V1_KIDNEY_LEFT, V1_FACE = 5, 1, 3, 93


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None, dtype: Any = np.int16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([2.0, 2.0, 3.0, 1.0]) if affine is None else affine
    nib.save(nib.Nifti1Image(np.asarray(array).astype(dtype), affine), str(path))
    return path


def synthetic_case(shape: tuple[int, int, int] = (24, 20, 16)) -> tuple[np.ndarray, np.ndarray]:
    """A body block of soft tissue in air, with a liver, a spleen and a left kidney (v1 labels)."""
    ct = np.full(shape, -1000, dtype=np.int16)
    ct[3:-3, 3:-3, :] = 40
    seg = np.zeros(shape, dtype=np.uint8)
    seg[5:11, 5:12, 4:10] = V1_LIVER
    seg[14:18, 6:10, 5:9] = V1_SPLEEN
    seg[12:16, 12:15, 3:7] = V1_KIDNEY_LEFT
    seg[8:10, 14:16, 10:12] = V1_FACE  # unmapped structure -> background
    return ct, seg


@pytest.fixture
def make_dataset(tmp_path: Path) -> Callable[..., dict[str, Path]]:
    """Write raw data: images/, segmentations/, records.csv, for the given case ids (all valid)."""

    def _make(case_ids: tuple[str, ...] = ("case_a", "case_b"), records: list[dict] | None = None) -> dict[str, Path]:
        raw = tmp_path / "raw"
        for case_id in case_ids:
            ct, seg = synthetic_case()
            write_nifti(raw / "images" / f"{case_id}.nii.gz", ct)
            write_nifti(raw / "segmentations" / f"{case_id}.nii.gz", seg, dtype=np.uint8)
        rows = records if records is not None else [{"case_id": c, "age": 50, "sex": "F"} for c in case_ids]
        fields = sorted({key for row in rows for key in row}, key=lambda k: (k != "case_id", k))
        (raw / "records.csv").parent.mkdir(parents=True, exist_ok=True)
        with (raw / "records.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        return {
            "images": raw / "images",
            "segmentations": raw / "segmentations",
            "records": raw / "records.csv",
            "output": tmp_path / "prepared",
            "raw": raw,
        }

    return _make


@pytest.fixture(scope="session")
def example_files() -> dict[str, Path]:
    from custom_components.data.demo.example import example_ct_files

    files = example_ct_files()
    assert all(path.is_file() for path in files.values()), files
    return files


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to download weights, or to open any network connection, fails loudly."""
    import socket

    import torch
    import torchvision.models._api

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("tried to reach the network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    # torchvision imported its own reference to the downloader.
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
