"""The stage bundles pass the model zoo's CI (issue 17, deliverable 2), CI-speed part.

What Project-MONAI/model-zoo's ``ci/verify_bundle.py`` would reject and these tests keep out: a file over the zoo's
25 MB limit, and a ``models/model.pt`` that ``ckpt_export`` cannot load (the zoo calls it without ``key_in_ckpt``, so
the file must be the network's plain state dict). MONAI's own ``ckpt_export`` runs on each shipped model file with the
zoo's arguments; only its TorchScript conversion is replaced by a recorder, because the networks do not script (the
bundles are on the zoo's ``exclude_verify_torchscript_list``, like its generative bundles; the last test fails when
that stops being true). The full run of the zoo's scripts is ``scripts/verify_zoo.py --zoo <model-zoo>`` (minutes;
here only when ``GUIDEGEN_MODEL_ZOO`` names a model-zoo checkout or bare git dir).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from custom_components.engines import InferenceWeights, convert_model_file
from custom_components.networks import MODEL_INFO_KEY, CheckpointInfo, load_network, read_checkpoint_info, read_model_file
from custom_components.errors import GuideGenInputError

ROOT = Path(__file__).resolve().parents[1]
STAGE_BUNDLES = ("guidegen_tcss", "guidegen_autoencoder", "guidegen_ldm")
ZOO_FILE_LIMIT = 25 * 1024 * 1024


def _verify_zoo():
    spec = importlib.util.spec_from_file_location("verify_zoo", ROOT / "scripts" / "verify_zoo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", STAGE_BUNDLES)
def test_every_shipped_file_is_under_the_zoo_limit(name):
    bundle = ROOT / "bundles" / name
    shipped = [p for entry in _verify_zoo().BUNDLE_CONTENT for p in ([bundle / entry] if (bundle / entry).is_file()
                                                                      else (bundle / entry).rglob("*")) if p.is_file()]
    assert bundle / "models/model.pt" in shipped
    too_large = {str(p.relative_to(bundle)): p.stat().st_size for p in shipped if p.stat().st_size >= ZOO_FILE_LIMIT}
    assert not too_large, f"files the model zoo refuses (limit 25 MB): {too_large}"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """MONAI's ckpt_export on each shipped bundle, called as the zoo's verify_torchscript calls it."""
    import monai.bundle.scripts as scripts

    networks, saved = {}, {}
    real_convert, real_save = scripts.convert_to_torchscript, scripts.save_net_with_metadata
    scripts.convert_to_torchscript = lambda model, **kwargs: model  # the TorchScript step the zoo skips for these bundles
    scripts.save_net_with_metadata = lambda net, filename, **kwargs: saved.__setitem__(filename, net)
    try:
        for name in STAGE_BUNDLES:
            bundle = ROOT / "bundles" / name
            filepath = tmp_path_factory.mktemp(name) / "verify_model.ts"
            scripts.ckpt_export(net_id="network_def", filepath=str(filepath), ckpt_file=str(bundle / "models/model.pt"),
                                meta_file=str(bundle / "configs/metadata.json"),
                                config_file=str(bundle / "configs/inference.yaml"), bundle_root=str(bundle))
            networks[name] = saved.pop(str(filepath))
    finally:
        scripts.convert_to_torchscript, scripts.save_net_with_metadata = real_convert, real_save
    return networks


@pytest.mark.parametrize("name", STAGE_BUNDLES)
def test_ckpt_export_loads_the_shipped_model_file(exported, name):
    """ckpt_export (key_in_ckpt "", as the zoo calls it) loads every weight strictly, bit for bit our loader's."""
    path = ROOT / "bundles" / name / "models/model.pt"
    ours = read_model_file(path)
    assert ours["info"]["stage"] == name.split("_", 1)[1]
    raw = torch.load(path, weights_only=True)
    assert "model" not in raw and "info" not in raw and raw._metadata[MODEL_INFO_KEY] == ours["info"]
    loaded = exported[name].state_dict()
    assert list(loaded) == list(ours["model"])
    for key, value in ours["model"].items():
        assert torch.equal(loaded[key], value.to(loaded[key].dtype)), key


def test_old_layout_files_still_load_and_convert(tmp_path):
    from ignite.handlers import Checkpoint

    network = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3), torch.nn.GroupNorm(2, 4))
    info = {"stage": "tcss", "num_classes": 20, "class_map_name": "guidegen_default", "mask_size": [8, 8, 8]}
    old = tmp_path / "old.pt"
    torch.save({"model": network.state_dict(), "info": info}, old)  # the layout written before issue 17
    assert read_checkpoint_info(old, stage="tcss") == info
    fresh = lambda: torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3), torch.nn.GroupNorm(2, 4))  # noqa: E731
    from_old = load_network(old, fresh(), CheckpointInfo("tcss", 20))
    with pytest.raises(RuntimeError, match="Unexpected key"):  # ckpt_export without key_in_ckpt cannot read it ...
        Checkpoint.load_objects(to_load={"": fresh()}, checkpoint=str(old))
    Checkpoint.load_objects(to_load={"model": fresh()}, checkpoint=str(old))  # ... with --key_in_ckpt model it can

    new = convert_model_file(old, tmp_path / "new.pt")
    assert read_checkpoint_info(new, stage="tcss") == info
    exported = fresh()
    Checkpoint.load_objects(to_load={"": exported}, checkpoint=str(new))
    for a, b, c in zip(from_old.state_dict().values(), exported.state_dict().values(), network.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(b, c)


def test_the_training_configs_final_saver_writes_what_ckpt_export_reads(tmp_path):
    """The CheckpointSaver of each train.yaml (one InferenceWeights entry) writes the state dict with the info in it."""
    from ignite.engine import Engine
    from monai.handlers import CheckpointSaver

    network = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3), torch.nn.GroupNorm(2, 4))
    info = CheckpointInfo("ldm", 20, "guidegen_default", {"latent_shape": [2, 8, 8, 8]})
    engine = Engine(lambda engine, batch: None)
    CheckpointSaver(save_dir=str(tmp_path), save_dict={"model": InferenceWeights(network, info)}, save_final=True,
                    final_filename="model.pt").attach(engine)
    engine.run([0], max_epochs=1)
    raw = torch.load(tmp_path / "model.pt", weights_only=True)
    assert list(raw) == list(network.state_dict()) and raw._metadata[MODEL_INFO_KEY] == info.state_dict()
    torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3), torch.nn.GroupNorm(2, 4)).load_state_dict(raw)  # strict
    assert read_checkpoint_info(tmp_path / "model.pt", stage="ldm")["latent_shape"] == [2, 8, 8, 8]
    with pytest.raises(GuideGenInputError, match="belongs to the 'ldm' stage"):
        load_network(tmp_path / "model.pt", network, CheckpointInfo("tcss", 20))
    with pytest.raises(GuideGenInputError, match="20 classes"):
        InferenceWeights(network, CheckpointInfo("ldm", 25)).load_state_dict(raw)


@pytest.mark.parametrize("name", STAGE_BUNDLES)
def test_networks_still_do_not_script(exported, name):
    """Why the bundles are on the zoo's exclude_verify_torchscript_list: torch.jit.script refuses network_def.

    When this fails, the network scripts: take the bundle off ZOO_EXCLUSIONS in scripts/verify_zoo.py and its docs.
    """
    with pytest.raises(Exception, match="Callable|Cannot emit|redefine|not supported|Unknown type"):
        torch.jit.script(exported[name])


@pytest.mark.skipif(not os.environ.get("GUIDEGEN_MODEL_ZOO"), reason="set GUIDEGEN_MODEL_ZOO to a model-zoo checkout")
def test_the_zoo_scripts_pass(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "scripts/verify_zoo.py"), "--zoo", os.environ["GUIDEGEN_MODEL_ZOO"],
                             "--work_dir", str(tmp_path / "zoo")], capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "3/3 bundles pass" in result.stdout
