"""The real CT shipped with the package: an abdominal scan (3 mm) with its TotalSegmentator v1 labels.

It comes from TotalSegmentator's example data (Apache-2.0, license text beside the files). The demo data
set uses it next to the phantoms so that every stage also sees real anatomy and real HU statistics -- all but its
last 30 axial slices (:data:`HELD_OUT_FIRST_SLICE`), which are TotalSegmentator's ``ct_small`` example (the upper
abdomen with the lung bases) and stay unseen, so that the demo weights can be judged on real CT they never saw.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["EXAMPLE_CASE_ID", "EXAMPLE_RECORD", "HELD_OUT_FIRST_SLICE", "example_ct_files"]

# Slices 82-111 of the example CT are TotalSegmentator's ct_small example: held out of every training set.
HELD_OUT_FIRST_SLICE = 82

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
