"""Tumor-organ loss for TCSS (beyond the paper): score where the predicted tumor mass lies, organ by organ.

Why: the prompt names the organ that holds the tumor, and at high noise levels the only way the network can know
that organ is to read the prompt. But the paper's per-voxel KL (Eq. 6) hardly depends on the x_0 prediction there
(q(x_{t-1} | x_t, x_0) is nearly uniform), and the tumor is a handful of voxels out of tens of thousands, so the
per-step signal on *where* the tumor lies is far below the layout's own noise (BENCHMARKS, issue 15: after 2160
steps at 32³ the U-Net's output under its own prompt and under a prompt naming another organ differ by 2e-4 per
voxel). This term asks one question per sample, independent of the tumor's voxel count: which share of the predicted
tumor probability falls inside the organ that holds the real tumor?

    host(b)   = the class (not background, not tumor) most frequent among the voxels touching sample b's tumor
                (26-neighbourhood)
    R_b       = voxels of class host(b) or of a tumor class in the true x_0
    share_b   = sum_{v in R_b} p_tumor(v) / sum_v p_tumor(v),  p_tumor = softmax(logits) summed over tumor classes
    L         = mean over samples with a tumor of  -log share_b

The share does not change when the tumor probability is scaled by the same factor everywhere, so this term teaches
the location, not the amount; how much tumor to draw stays with the KL. Samples without a tumor (or whose tumor touches only background) add nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from custom_components.errors import GuideGenInputError

__all__ = ["check_logits_match_labels", "tumor_host_regions", "tumor_organ_loss"]


def check_logits_match_labels(logits: Tensor, labels: Tensor) -> None:
    """Refuse x_0 logits that are not (B, N, *spatial) for class indices (B, *spatial) (GuideGenInputError)."""
    if logits.ndim != labels.ndim + 1 or logits.shape[0] != labels.shape[0] or logits.shape[2:] != labels.shape[1:]:
        raise GuideGenInputError(
            f"logits {tuple(logits.shape)} must be (B, N, *spatial) for labels (B, *spatial) {tuple(labels.shape)}"
        )


def tumor_host_regions(labels: Tensor, tumor_classes: Sequence[int], background: int = 0) -> tuple[Tensor, Tensor]:
    """The voxels of each sample's tumor-holding organ, tumor included (``R_b`` above).

    Args:
        labels: (B, *spatial) class indices of the true x_0.
        tumor_classes: indices of the tumor classes (the class map's ``tumor_index``).
        background: index of the background class, never a host.

    Returns:
        ``(regions, valid)``: (B, *spatial) bool ``R_b`` and (B,) bool, True for the samples that have a tumor
        touching some organ (the others' region is all False).

    Raises:
        GuideGenInputError: no tumor class, or labels not of shape (B, D, H, W).
    """
    if not tumor_classes:
        raise GuideGenInputError(
            "the tumor-organ loss needs a tumor class, but the class map names none (its 'tumor_class'); set "
            "tumor_organ_loss_weight to 0"
        )
    if labels.ndim != 4:
        raise GuideGenInputError(f"labels must have shape (batch, D, H, W), got {tuple(labels.shape)}")
    tumor_ids = torch.as_tensor(list(tumor_classes), device=labels.device)
    tumor = torch.isin(labels, tumor_ids)
    ring = (F.max_pool3d(tumor[:, None].float(), kernel_size=3, stride=1, padding=1)[:, 0] > 0) & ~tumor
    num_classes = int(max(int(labels.max()), int(tumor_ids.max()), background) + 1)
    regions = torch.zeros_like(tumor)
    valid = torch.zeros(labels.shape[0], dtype=torch.bool, device=labels.device)
    for b in range(labels.shape[0]):
        counts = torch.bincount(labels[b][ring[b]], minlength=num_classes)
        counts[background] = 0
        counts[tumor_ids] = 0
        if int(counts.sum()) == 0:
            continue
        host = int(counts.argmax())
        regions[b] = tumor[b] | (labels[b] == host)
        valid[b] = True
    return regions, valid


def tumor_organ_loss(logits: Tensor, labels: Tensor, tumor_classes: Sequence[int], background: int = 0) -> Tensor:
    """``-log`` of the share of predicted tumor probability inside the true tumor's organ, averaged over samples.

    Args:
        logits: (B, N, *spatial) predicted x_0 logits.
        labels: (B, *spatial) class indices of the true x_0.
        tumor_classes: indices of the tumor classes.
        background: index of the background class.

    Returns:
        a scalar; 0 (still in the graph) when no sample of the batch has a tumor next to an organ.

    Raises:
        GuideGenInputError: see :func:`tumor_host_regions`; logits and labels of different sizes.
    """
    check_logits_match_labels(logits, labels)
    regions, valid = tumor_host_regions(labels, tumor_classes, background)
    log_probs = torch.log_softmax(logits.float(), dim=1)
    log_tumor = torch.logsumexp(log_probs[:, list(tumor_classes)], dim=1).flatten(1)  # (B, V)
    inside = log_tumor.masked_fill(~regions.flatten(1), float("-inf")).logsumexp(dim=1)
    everywhere = log_tumor.logsumexp(dim=1)
    per_sample = everywhere - inside  # -log share, >= 0
    if not bool(valid.any()):
        return logits.sum() * 0.0
    return per_sample[valid].mean()
