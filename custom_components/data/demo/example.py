"""The real CT shipped with the package: an abdominal scan (3 mm) with its TotalSegmentator v1 labels.

It comes from TotalSegmentator's example data (Apache-2.0, license text beside the files). The demo data
set uses it next to the phantoms so that every stage also sees real anatomy and real HU statistics -- all but one
slab of axial slices, held out so that models can be judged on real CT they never saw. By default
(:data:`HELD_OUT_SLICES`) that slab is the last 30 slices, TotalSegmentator's ``ct_small`` example (the upper abdomen
with the lung bases). That slab also holds every slice of the spleen, gallbladder, pancreas, portal vein, adrenals,
stomach and lung, so a model trained on the rest never sees those organs in real CT; a mid-abdomen slab (e.g. slices
52-81) keeps them in training (:func:`example_parts`).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from custom_components.arguments import whole_number
from custom_components.errors import GuideGenInputError

__all__ = ["EXAMPLE_CASE_ID", "EXAMPLE_RECORD", "HELD_OUT_SLICES", "example_ct_files", "example_parts", "parse_held_out_slices"]

# [first, stop) axial slices held out of every training set: 82-111 are TotalSegmentator's ct_small example
HELD_OUT_SLICES = (82, 112)

EXAMPLE_CASE_ID = "totalsegmentator_example"
EXAMPLE_RECORD: dict[str, Any] = {
    "case_id": EXAMPLE_CASE_ID,
    "remarks": "abdominal CT from the TotalSegmentator example data, no clinical record available",
}


def example_ct_files() -> dict[str, Path]:
    """Paths of the example CT files.

    Returns:
        ``{"image": ct, "segmentation": TotalSegmentator v1 multi-label file, "license": license text}``.
    """
    folder = Path(str(resources.files("custom_components.data.resources").joinpath("example")))
    return {
        "image": folder / "ct.nii.gz",
        "segmentation": folder / "seg_total_v1.nii.gz",
        "license": folder / "LICENSE-TotalSegmentator.txt",
    }


def example_parts(num_slices: int, held_out: tuple[int, int] = HELD_OUT_SLICES) -> dict[str, tuple[int, int]]:
    """The training parts of the example CT around a held-out slab, as ``{case_id: (first, stop)}`` slice ranges.

    The part below the slab keeps :data:`EXAMPLE_CASE_ID`; a part above it (a slab in the middle) becomes its own case,
    ``<EXAMPLE_CASE_ID>_above``, so that no training volume jumps across the gap.

    Args:
        num_slices: the example CT's axial slice count.
        held_out: ``(first, stop)`` of the held-out slab, ``0 <= first < stop <= num_slices``.

    Returns:
        the non-empty parts, lowest first.

    Raises:
        ValueError: a range outside the CT or empty.
    """
    first, stop = (int(v) for v in held_out)
    if not 0 <= first < stop <= num_slices:
        raise ValueError(f"held-out slices [{first}, {stop}) do not lie inside the example CT's {num_slices} slices")
    parts = {EXAMPLE_CASE_ID: (0, first), f"{EXAMPLE_CASE_ID}_above": (stop, num_slices)}
    return {case_id: (a, b) for case_id, (a, b) in parts.items() if b > a}


def parse_held_out_slices(value: Any) -> tuple[int, int]:
    """``--held_out_slices`` (``"FIRST,STOP"`` or two numbers) as ``(first, stop)``, checked against the example CT.

    Raises:
        GuideGenInputError: not two whole numbers, or a range outside the example CT (the message names the fix).
    """
    import nibabel as nib

    parts = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else [value]
    if len(parts) != 2:
        raise GuideGenInputError(f"--held_out_slices {value!r}: give two slice numbers FIRST,STOP, e.g. 52,82")
    first, stop = (whole_number(v, "held_out_slices", minimum=0) for v in parts)
    try:
        example_parts(nib.load(str(example_ct_files()["image"])).shape[2], (first, stop))
    except ValueError as err:
        raise GuideGenInputError(f"--held_out_slices {first},{stop}: {err}") from None
    return first, stop
