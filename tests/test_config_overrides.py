"""A bundle run with a setting that no config of the bundle defines (a typo such as --max_epoch for --max_epochs) is
refused in `initialize`, before any work, with the closest valid name (issue 16). Legitimate overrides still work."""

from __future__ import annotations

from pathlib import Path

import pytest
from monai.bundle import ConfigParser, ConfigWorkflow

from custom_components.errors import GuideGenInputError
from helpers_bundles import run_bundle

ROOT = Path(__file__).resolve().parents[1]
# @bundle_root: resolved first, it puts the bundle (and the custom_components shipped in it) on sys.path
CHECK = "$custom_components.bundles.refuse_unknown_overrides(@bundle_root)"


def _configs(bundle: str, *names: str) -> list[str]:
    return [str(ROOT / "bundles" / bundle / "configs" / name) for name in names]


# every way the README and the bundle docs compose each bundle's configs
COMPOSITIONS = {
    f"{bundle}:{'+'.join(names)}": _configs(bundle, *names)
    for bundle in ("guidegen_tcss", "guidegen_autoencoder", "guidegen_ldm")
    for names in (("train.yaml",), ("train.yaml", "train_cpu.yaml"), ("train.yaml", "train_cpu.yaml", "multi_gpu_train.yaml"),
                  ("inference.yaml",))
} | {"guidegen_pipeline:inference.yaml": _configs("guidegen_pipeline", "inference.yaml")}

# settings that scripts, benchmarks, tests and docs pass on the command line (each must stay accepted)
LEGITIMATE = {
    "train": {"datalist": "d.json", "ckpt_dir": "m", "output_dir": "o", "max_epochs": 1, "resume": False, "bundle_root": "b",
              "device": "$torch.device('cpu')", "run_name": "r", "experiment_name": "e", "tracking_uri": "file:///tmp/x",
              "save_execute_config": False},
    "inference": {"model_path": "m.pt", "output_dir": "o", "bundle_root": "b"},
}


def _workflow(config_file: list[str], **overrides) -> ConfigWorkflow:
    return ConfigWorkflow(config_file=config_file, logging_file=False, workflow_type=None, **overrides)


@pytest.mark.parametrize("composition", sorted(COMPOSITIONS))
def test_every_composition_checks_overrides_first(composition):
    parser = ConfigParser()
    parser.read_config(COMPOSITIONS[composition])
    assert parser["initialize"][0] == CHECK


@pytest.mark.parametrize("composition", sorted(COMPOSITIONS))
def test_a_misspelt_setting_is_refused_with_the_closest_name(composition):
    training = "train" in composition
    typo, meant = ("max_epoch", "max_epochs") if training else ("output_dri", "output_dir")
    with pytest.raises(Exception) as raised:  # MONAI wraps errors of config expressions in a RuntimeError
        _workflow(COMPOSITIONS[composition], **{typo: 1}).initialize()
    error = raised.value
    while error is not None and not isinstance(error, GuideGenInputError):
        error = error.__cause__
    assert error is not None, raised.value
    assert f"--{typo} (did you mean --{meant}?)" in str(error)


@pytest.mark.parametrize("composition", [c for c in sorted(COMPOSITIONS) if "multi_gpu" not in c])
def test_legitimate_settings_pass(composition):
    overrides = LEGITIMATE["train" if "train" in composition else "inference"]
    if composition.startswith("guidegen_pipeline"):
        overrides = {"output_dir": "o", "tcss_model_path": "t.pt", "num_samples": 2, "prompts": ["p"]}
    if "autoencoder" in composition and "train" in composition:
        overrides = {**overrides, "hdr": False, "mask_input": False}
    if "autoencoder:inference" in composition:
        overrides = {**overrides, "image_file": "i", "label_file": "l", "latent_file": "z", "output_file": "x"}
    _workflow(COMPOSITIONS[composition], **overrides).initialize()


def test_tracking_settings_are_accepted():
    """`--tracking mlflow` adds MONAI's own top-level settings (tracking_uri, save_execute_config, ...)."""
    workflow = _workflow(COMPOSITIONS["guidegen_tcss:train.yaml+train_cpu.yaml"], tracking="mlflow", is_not_rank0=False)
    workflow.initialize()


def test_the_command_line_typo_stops_before_training(tmp_path):
    """The issue's reproduction: `--max_epoch 1` trained the default number of epochs."""
    result = run_bundle("training", [Path(p) for p in COMPOSITIONS["guidegen_tcss:train.yaml+train_cpu.yaml"]],
                        "--max_epoch", "1", "--datalist", str(tmp_path / "missing.json"),
                        "--ckpt_dir", str(tmp_path / "models"), "--output_dir", str(tmp_path / "out"))
    assert result.returncode != 0
    assert "--max_epoch" in result.stderr and "did you mean --max_epochs?" in result.stderr
    assert not (tmp_path / "models").exists() and not (tmp_path / "out").exists()
