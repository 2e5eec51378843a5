"""Losses of GuideGen's CT autoencoder (paper Eq. 7-9): the learnable HDR window, the frozen LPIPS perceptual
loss on slices, slice sampling and the KL term, their Eq. 8 sum, and the frame/volume adversarial terms; and TCSS's
tumor-organ and tumor-volume losses (beyond the paper; its Eq. 6 KL lives with the categorical scheduler)."""

from .adversarial import (
    AdversarialTerms,
    build_frame_discriminator,
    build_volume_discriminator,
    discriminator_min_size,
)
from .autoencoder import WINDOW_CHOICES, AutoencoderLoss, AutoencoderLossTerms
from .frames import kl_divergence, sample_frames
from .hdr_window import HDRWindow, clinical_window_l1
from .perceptual import SlicePerceptualLoss, default_vgg_weights_path
from .tumor_organ import tumor_host_regions, tumor_organ_loss
from .tumor_volume import tumor_volume_loss

__all__ = [
    "AutoencoderLoss",
    "AutoencoderLossTerms",
    "WINDOW_CHOICES",
    "AdversarialTerms",
    "build_frame_discriminator",
    "build_volume_discriminator",
    "discriminator_min_size",
    "kl_divergence",
    "sample_frames",
    "HDRWindow",
    "clinical_window_l1",
    "SlicePerceptualLoss",
    "default_vgg_weights_path",
    "tumor_host_regions",
    "tumor_organ_loss",
    "tumor_volume_loss",
]
