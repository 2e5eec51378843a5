"""Tumor-volume loss for TCSS (beyond the paper): score how much tumor the x_0 prediction holds, sample by sample.

Why: the tumor-organ loss (:mod:`custom_components.losses.tumor_organ`) teaches *where* the predicted tumor mass
lies and, by design, not how much of it there is; the per-voxel KL (Eq. 6) carries the amount, but at high noise it
hardly depends on the x_0 prediction and the tumor is a few voxels among tens of thousands. Measured (BENCHMARKS,
issue 15): with the organ loss the network reads the prompt's organ, yet the sampler draws no tumor at all, and with
tumor voxels up-weighted instead it draws tumors for every prompt, "no tumor" included. Whether there is a tumor and
how large it is are in the prompt (tumor count, size, "no tumor"), so this term asks the x_0 prediction to hold as
many tumor voxels as the true x_0, in expectation:

    V̂_b = sum_v p_tumor(v)          (p_tumor = softmax(logits) summed over the tumor classes)
    V_b  = number of tumor voxels in the true x_0 of sample b
    L    = mean over the batch of  (log(1 + V̂_b) - log(1 + V_b))²

Every sample counts, those without a tumor too (their V_b = 0 asks for no tumor mass). The log makes a 2-voxel and a
200-voxel tumor weigh alike, and keeps the term O(1) whatever the volume size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from custom_components.errors import GuideGenInputError
from custom_components.losses.tumor_organ import check_logits_match_labels

__all__ = ["tumor_volume_loss"]


def tumor_volume_loss(logits: Tensor, labels: Tensor, tumor_classes: Sequence[int]) -> Tensor:
    """Squared log-error between the predicted and the true number of tumor voxels, averaged over samples.

    Args:
        logits: (B, N, *spatial) predicted x_0 logits.
        labels: (B, *spatial) class indices of the true x_0.
        tumor_classes: indices of the tumor classes (the class map's ``tumor_index``).

    Returns:
        a scalar >= 0.

    Raises:
        GuideGenInputError: no tumor class; logits and labels of different sizes.
    """
    if not tumor_classes:
        raise GuideGenInputError(
            "the tumor-volume loss needs a tumor class, but the class map names none (its 'tumor_class'); set "
            "tumor_volume_loss_weight to 0"
        )
    check_logits_match_labels(logits, labels)
    tumor_ids = list(tumor_classes)
    predicted = torch.softmax(logits.float(), dim=1)[:, tumor_ids].sum(dim=1).flatten(1).sum(dim=1)
    true = torch.isin(labels, torch.as_tensor(tumor_ids, device=labels.device)).flatten(1).sum(dim=1).float()
    return (torch.log1p(predicted) - torch.log1p(true)).square().mean()
