"""The demo weights shipped in the stage bundles: listed with their md5, small, mutually consistent, and useful enough
to show the chain working (a torso-shaped mask with organs; a CT whose organs have their tissue's HU)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from custom_components.data.io import file_digest
from custom_components.networks import read_checkpoint_info
from custom_components.packaging import BUNDLE_NAMES

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", BUNDLE_NAMES)
def test_weights_are_small_and_listed_with_their_md5(name):
    bundle = ROOT / "bundles" / name
    model = bundle / "models" / "model.pt"
    assert model.is_file(), "demo weights missing: run scripts/train_demo.sh"
    assert model.stat().st_size < 25 * 2**20
    entries = yaml.safe_load((bundle / "large_files.yml").read_text())["large_files"]
    assert entries == [{"path": "models/model.pt", "url": "models/model.pt", "hash_val": hashlib.md5(model.read_bytes()).hexdigest(),
                        "hash_type": "md5"}]
    # MONAI's own tool accepts them in place (it would try to download a file that is missing or has another hash)
    result = subprocess.run([sys.executable, "-m", "monai.bundle", "download_large_files", "--bundle_path", str(bundle)],
                            capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "skipped downloading" in result.stdout + result.stderr


def test_the_latent_generator_was_trained_on_the_shipped_autoencoder():
    info = read_checkpoint_info(ROOT / "bundles/guidegen_ldm/models/model.pt")
    assert info["autoencoder_sha256"] == file_digest(ROOT / "bundles/guidegen_autoencoder/models/model.pt")
    tcss = read_checkpoint_info(ROOT / "bundles/guidegen_tcss/models/model.pt")
    assert tcss["mask_size"] == info["mask_size"]


def test_demo_chain_makes_a_torso_not_noise():
    from custom_components.pipelines.text_to_pair import load_text_to_pair

    pipeline, _ = load_text_to_pair(device="cpu")
    prompt = ("The patient is a 63-year-old White male. In this imaging, the patient's condition is described as "
              "hepatocellular carcinoma, with a tumor in the liver, measuring 30 mm, stage II.")
    pair = pipeline(prompt, seed=0, tcss_steps=50, ldm_steps=50, progress=False)
    classes, counts = np.unique(pair.mask, return_counts=True)
    fractions = dict(zip(classes.tolist(), (counts / pair.mask.size).tolist()))
    assert 0.1 < 1.0 - fractions.get(0, 0.0) < 0.9, fractions  # a body inside a background border
    assert len([c for c in classes if c != 0]) >= 5, fractions  # several organs, not one blob
    # the CT follows the mask: air-filled lungs, soft-tissue liver, denser bone (HU of the mask's organs)
    from custom_components.data.class_map import load_class_map

    labels, class_map = pair.mask_on_ct_grid(), load_class_map(None)
    hu = {name: float(pair.ct[labels == class_map.index_of(name)].mean()) for name in ("lung", "liver", "bone")}
    assert hu["lung"] < -500 < -100 < hu["liver"] < 300 and hu["bone"] > hu["liver"], hu


def test_compacted_model_files_load_into_float32_networks(tmp_path):
    from custom_components.engines import compact_model_file
    from custom_components.networks import CheckpointInfo, load_network, read_checkpoint_info

    network = torch.nn.Sequential(torch.nn.Conv3d(2, 32, 3), torch.nn.GroupNorm(2, 32), torch.nn.Conv3d(32, 2, 1))
    path = tmp_path / "model.pt"
    torch.save({"model": network.state_dict(), "info": {"stage": "tcss", "num_classes": 20}}, path)
    full_size = path.stat().st_size
    compact_model_file(path)
    assert path.stat().st_size < 0.75 * full_size
    assert read_checkpoint_info(path)["weights_dtype"] == "float16"
    loaded = load_network(path, torch.nn.Sequential(torch.nn.Conv3d(2, 32, 3), torch.nn.GroupNorm(2, 32), torch.nn.Conv3d(32, 2, 1)),
                          CheckpointInfo("tcss", 20))
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    x = torch.randn(1, 2, 6, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), network.eval()(x), atol=2e-3, rtol=2e-3)
        assert not torch.equal(loaded(x), network(x))  # the rounding happened
