"""The phantom's label space (TotalSegmentator v1), the organs a tumor may be drawn in, and tissue intensities (HU)."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

# --------------------------------------------------------------------------------------------------------
# Label space (TotalSegmentator v1)
# --------------------------------------------------------------------------------------------------------

_VERTEBRA_NAMES = ("L5", "L4", "L3", "L2", "L1") + tuple(f"T{k}" for k in range(12, 0, -1))

LABELS: Mapping[str, int] = MappingProxyType(
    {
        "spleen": 1,
        "kidney_right": 2,
        "kidney_left": 3,
        "gallbladder": 4,
        "liver": 5,
        "stomach": 6,
        "aorta": 7,
        "inferior_vena_cava": 8,
        "portal_vein_and_splenic_vein": 9,
        "pancreas": 10,
        "adrenal_gland_right": 11,
        "adrenal_gland_left": 12,
        "lung_upper_lobe_left": 13,
        "lung_lower_lobe_left": 14,
        "lung_upper_lobe_right": 15,
        "lung_middle_lobe_right": 16,
        "lung_lower_lobe_right": 17,
        **{f"vertebrae_{name}": 18 + k for k, name in enumerate(_VERTEBRA_NAMES)},
        "esophagus": 42,
        "trachea": 43,
        "heart_myocardium": 44,
        "heart_atrium_left": 45,
        "heart_ventricle_left": 46,
        "heart_atrium_right": 47,
        "heart_ventricle_right": 48,
        "small_bowel": 55,
        "duodenum": 56,
        "colon": 57,
        **{f"rib_left_{k}": 57 + k for k in range(1, 13)},
        **{f"rib_right_{k}": 69 + k for k in range(1, 13)},
        "femur_left": 88,
        "femur_right": 89,
        "hip_left": 90,
        "hip_right": 91,
        "sacrum": 92,
        "urinary_bladder": 104,
    }
)
"""TotalSegmentator v1 name -> label index of every structure the phantom draws."""

# GuideGen tumor organ (class name) -> candidate sides, each a tuple of v1 labels. Paired organs list one
# entry per side and a side is drawn at random.
TUMOR_ORGANS: Mapping[str, tuple[tuple[int, ...], ...]] = MappingProxyType(
    {
        "liver": ((LABELS["liver"],),),
        "spleen": ((LABELS["spleen"],),),
        "pancreas": ((LABELS["pancreas"],),),
        "kidney": ((LABELS["kidney_right"],), (LABELS["kidney_left"],)),
        "adrenal_gland": ((LABELS["adrenal_gland_right"],), (LABELS["adrenal_gland_left"],)),
        "gallbladder": ((LABELS["gallbladder"],),),
        "stomach": ((LABELS["stomach"],),),
        "duodenum": ((LABELS["duodenum"],),),
        "small_bowel": ((LABELS["small_bowel"],),),
        "colon": ((LABELS["colon"],),),
        "esophagus": ((LABELS["esophagus"],),),
        "urinary_bladder": ((LABELS["urinary_bladder"],),),
        "lung": (
            (LABELS["lung_upper_lobe_right"], LABELS["lung_middle_lobe_right"], LABELS["lung_lower_lobe_right"]),
            (LABELS["lung_upper_lobe_left"], LABELS["lung_lower_lobe_left"]),
        ),
    }
)
"""Accepted ``record["tumor_organ"]`` values -> the label sets a tumor may be placed in."""

# Parenchymal organs show hypodense tumors (organ HU - 40); in hollow, fluid-filled or air-filled organs a
# tumor is an enhancing soft-tissue mass, and in the lung a solid nodule.
TUMOR_HU_HOLLOW = 45.0
TUMOR_HU_LUNG = 30.0
HOLLOW_TUMOR_ORGANS = frozenset(
    {"gallbladder", "stomach", "duodenum", "small_bowel", "colon", "esophagus", "urinary_bladder"}
)

REFERENCE_FIELD_OF_VIEW_MM = (384.0, 288.0, 480.0)
"""Field of view (x, y, z in mm) the anatomy is designed for; other fields of view scale it uniformly."""

# Base HU (before texture) of the parenchymal organs, used for hypodense tumors.
ORGAN_BASE_HU: Mapping[int, float] = MappingProxyType(
    {
        LABELS["liver"]: 60.0,
        LABELS["spleen"]: 50.0,
        LABELS["pancreas"]: 45.0,
        LABELS["kidney_right"]: 150.0,
        LABELS["kidney_left"]: 150.0,
        LABELS["adrenal_gland_right"]: 35.0,
        LABELS["adrenal_gland_left"]: 35.0,
    }
)

BONE_LABELS = (
    tuple(range(LABELS["vertebrae_L5"], LABELS["vertebrae_T1"] + 1))
    + tuple(range(LABELS["rib_left_1"], LABELS["rib_right_12"] + 1))
    + (LABELS["femur_left"], LABELS["femur_right"], LABELS["hip_left"], LABELS["hip_right"], LABELS["sacrum"])
)

HU_AIR = -1000.0
HU_FAT = -100.0
HU_VISCERAL_FAT = -90.0
HU_MUSCLE = 50.0
HU_CANCELLOUS = 250.0
HU_CORTEX = 850.0
WHITE_NOISE_HU = 12.0
HU_RANGE = (-1024.0, 3071.0)
