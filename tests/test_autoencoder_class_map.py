"""An image-only autoencoder (mask_input false) serves any class map; a mask-pyramid one only its own."""

import pytest
import torch

from custom_components.data.class_map import load_class_map
from custom_components.errors import GuideGenInputError
from custom_components.networks import MaskGuidedAutoencoder
from custom_components.pipelines import load_autoencoder

ARCHITECTURE = {"channels": [4, 8], "num_res_blocks": 1, "latent_channels": 2, "norm": "voxel", "norm_num_groups": 4}


def _model_file(tmp_path, mask_input: bool):
    default = load_class_map()
    network = MaskGuidedAutoencoder(num_classes=default.num_classes if mask_input else 0, **ARCHITECTURE)
    info = {"stage": "autoencoder", "num_classes": default.num_classes, "class_map_name": default.name,
            "architecture": ARCHITECTURE, "mask_input": mask_input}
    path = tmp_path / f"ae_{mask_input}.pt"
    torch.save({"model": network.state_dict(), "info": info}, path)  # the layout every earlier model file has
    return path, network


def test_image_only_autoencoder_loads_with_the_body_class_map(tmp_path):
    path, trained = _model_file(tmp_path, mask_input=False)
    loaded = load_autoencoder(path, load_class_map(body_class=True))
    assert loaded.num_classes == 0
    for name, value in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value)


def test_mask_pyramid_autoencoder_refuses_another_class_map(tmp_path):
    path, _ = _model_file(tmp_path, mask_input=True)
    assert load_autoencoder(path, load_class_map()).num_classes == load_class_map().num_classes
    with pytest.raises(GuideGenInputError, match="classes"):
        load_autoencoder(path, load_class_map(body_class=True))
