"""Mask–prompt alignment (paper Fig. 3b): does a generated mask hold the tumors its record asks for, where it
asks for them?

Each connected tumor component is assigned the organ it borders most (the commonest class in a one-voxel shell
around it that is not background, tumor or the class map's derived "body" class: a tumor lies in an organ, and
unlabelled body tissue, like background, names none). Count accuracy compares the number of components with the number
of tumors the record's prompt states (:func:`~custom_components.data.prompts.stated_tumor_count`: ``tumor_count``;
"multiple" = at least two; an organ or a size without a count = one tumor, as the prompt says "a tumor"); location
accuracy compares each component's organ with ``tumor_organ``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from custom_components.data.class_map import ClassMap
from custom_components.data.prompts import stated_tumor_count
from custom_components.errors import GuideGenInputError

__all__ = ["TumorAlignment", "tumor_alignment"]


@dataclass
class TumorAlignment:
    """Alignment of one mask with its record.

    Attributes:
        expected_count: the number of tumors the record states (0 when it states none); the least number when
            ``expected_at_least``.
        expected_at_least: the record says "multiple" tumors rather than a number.
        found_count: connected tumor components in the mask.
        component_organs: organ each component borders most ("background" when it touches no organ).
        count_correct: found_count == expected_count (>= when ``expected_at_least``).
        location_correct: every component lies in the record's organ (None when no organ is named or no
            component exists).
    """

    expected_count: int
    expected_at_least: bool
    found_count: int
    component_organs: list[str]
    count_correct: bool
    location_correct: bool | None


def tumor_alignment(mask: np.ndarray, record: Mapping[str, Any], class_map: ClassMap) -> TumorAlignment:
    """Compare a label volume's tumors with a clinical record.

    Args:
        mask: (X, Y, Z) class indices of ``class_map``.
        record: normalised record (``tumor_count``, ``tumor_count_min``, ``tumor_organ``, ``tumor_size_mm``).
        class_map: must define a tumor class.

    Raises:
        GuideGenInputError: the class map has no tumor class, the mask is not 3D, or ``tumor_organ`` is not a
            class name.
    """
    if class_map.tumor_index is None:
        raise GuideGenInputError(f"class map '{class_map.name}' has no tumor_class: tumor alignment needs one")
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise GuideGenInputError(f"mask must be a 3D label volume, got shape {mask.shape}")
    organ = record.get("tumor_organ")
    expected_organ = None if organ is None else class_map.index_of(str(organ))
    tumor = mask == class_map.tumor_index
    components, count = ndimage.label(tumor, structure=np.ones((3, 3, 3)))
    organs = []
    for label in range(1, count + 1):
        component = components == label
        shell = ndimage.binary_dilation(component, structure=np.ones((3, 3, 3))) & ~tumor
        neighbours = np.bincount(mask[shell].ravel(), minlength=class_map.num_classes)
        neighbours[0] = 0
        if class_map.body_index is not None:
            neighbours[class_map.body_index] = 0
        organs.append(int(np.argmax(neighbours)) if neighbours.any() else 0)
    expected_count, at_least = stated_tumor_count(record) or (0, False)
    location = None if expected_organ is None or not organs else all(o == expected_organ for o in organs)
    return TumorAlignment(
        expected_count=expected_count,
        expected_at_least=at_least,
        found_count=count,
        component_organs=[class_map.class_names[o] for o in organs],
        count_correct=count >= expected_count if at_least else count == expected_count,
        location_correct=location,
    )
