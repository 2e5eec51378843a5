"""Clinical records for phantom cases: demographics, and a diagnosis with a tumor the phantom can draw."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import numpy as np

__all__ = ["make_phantom_record"]

# Record generation vocabulary.
_RACES = ("White", "Black or African American", "Asian", "Hispanic or Latino")
_DIAGNOSES = MappingProxyType(
    {
        "liver": "hepatocellular carcinoma",
        "pancreas": "pancreatic ductal adenocarcinoma",
        "kidney": "renal cell carcinoma",
        "spleen": "splenic lymphoma",
        "lung": "lung adenocarcinoma",
        "colon": "colorectal carcinoma",
        "urinary_bladder": "urothelial carcinoma of the bladder",
    }
)
_STAGES = ("I", "II", "III", "IV")
_REMARKS = (None, "follow-up scan", "post-contrast portal venous phase", "baseline staging scan", "no prior imaging")
_HEALTHY_FRACTION = 0.25


def make_phantom_record(case_id: str, rng: np.random.Generator) -> dict[str, Any]:
    """Draw a plausible clinical record for a phantom case.

    About a quarter of the records are healthy ("no abnormality", no tumor); the others carry one to three
    tumors in an organ the phantom can draw, with a matching diagnosis, size and stage.

    Args:
        case_id: identifier stored in the record.
        rng: source of randomness; the same generator state gives the same record.

    Returns:
        a dict with exactly the keys ``case_id, age, sex, race, diagnosis, tumor_organ, tumor_count,
        tumor_size_mm, stage, remarks`` holding plain Python values.
    """
    age = int(rng.integers(25, 86))
    sex = "male" if rng.random() < 0.5 else "female"
    race = _RACES[int(rng.integers(len(_RACES)))]
    remarks = _REMARKS[int(rng.integers(len(_REMARKS)))]
    if rng.random() < _HEALTHY_FRACTION:
        return {
            "case_id": str(case_id),
            "age": age,
            "sex": sex,
            "race": race,
            "diagnosis": "no abnormality",
            "tumor_organ": None,
            "tumor_count": 0,
            "tumor_size_mm": None,
            "stage": None,
            "remarks": remarks,
        }
    organs = tuple(_DIAGNOSES)
    organ = organs[int(rng.integers(len(organs)))]
    return {
        "case_id": str(case_id),
        "age": age,
        "sex": sex,
        "race": race,
        "diagnosis": _DIAGNOSES[organ],
        "tumor_organ": organ,
        "tumor_count": int(rng.integers(1, 4)),
        "tumor_size_mm": round(float(rng.uniform(10.0, 45.0)), 1),
        "stage": _STAGES[int(rng.integers(len(_STAGES)))],
        "remarks": remarks,
    }
