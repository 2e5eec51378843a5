"""Bundle archives in the model zoo's layout, and MONAI's own download command unpacking them."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest

from custom_components.errors import GuideGenInputError
from custom_components.packaging import ALL_BUNDLES, BUNDLE_NAMES, package_bundle, package_bundles

ROOT = Path(__file__).resolve().parents[1]


def test_every_bundle_zips_to_name_and_version_with_one_top_folder(tmp_path):
    archives = package_bundles(tmp_path)
    assert [a.name for a in archives] == [
        f"{name}_v{json.loads((ROOT / 'bundles' / name / 'configs/metadata.json').read_text())['version']}.zip"
        for name in ALL_BUNDLES
    ]
    for name, archive in zip(ALL_BUNDLES, archives):
        names = zipfile.ZipFile(archive).namelist()
        assert {n.split("/")[0] for n in names} == {name}
        for required in ("configs/metadata.json", "configs/inference.yaml", "configs/logging.conf", "docs/README.md", "LICENSE"):
            assert f"{name}/{required}" in names, required
        if name in BUNDLE_NAMES:  # stage bundles: training configs and the shipped demo weights with their md5
            for required in ("configs/train.yaml", "configs/train_cpu.yaml", "configs/multi_gpu_train.yaml", "models/model.pt", "large_files.yml"):
                assert f"{name}/{required}" in names, required


def test_checkpoints_and_run_outputs_stay_out_but_the_model_goes_in(tmp_path):
    bundle = tmp_path / "guidegen_tcss"
    shutil.copytree(ROOT / "bundles/guidegen_tcss", bundle, ignore=shutil.ignore_patterns("models", "outputs", "eval"))
    for relative in ("models/checkpoint_epoch=5.pt", "models/checkpoint_final.pt", "outputs/mlruns.db", "eval/x/mask.nii.gz"):
        (bundle / relative).parent.mkdir(parents=True, exist_ok=True)
        (bundle / relative).write_bytes(b"x")
    shutil.copy(ROOT / "bundles/guidegen_tcss/models/model.pt", bundle / "models/model.pt")  # packaging verifies it
    names = zipfile.ZipFile(package_bundle(bundle, tmp_path / "dist")).namelist()
    assert "guidegen_tcss/models/model.pt" in names
    assert not any(n.startswith("guidegen_tcss/models/checkpoint") or "/outputs/" in n or "/eval/" in n for n in names)


def test_monai_download_unpacks_the_archive(tmp_path):
    from monai.bundle import download

    archive = package_bundle(ROOT / "bundles/guidegen_ldm", tmp_path / "dist")
    download(name="guidegen_ldm", url=archive.resolve().as_uri(), bundle_dir=str(tmp_path / "installed"))
    installed = tmp_path / "installed" / "guidegen_ldm"
    assert json.loads((installed / "configs/metadata.json").read_text())["name"].startswith("GuideGen")
    assert (installed / "configs/inference.yaml").read_text() == (ROOT / "bundles/guidegen_ldm/configs/inference.yaml").read_text()


def test_bad_bundles_are_refused(tmp_path):
    with pytest.raises(GuideGenInputError, match="metadata.json is missing"):
        package_bundle(tmp_path, tmp_path / "dist")
    with pytest.raises(GuideGenInputError, match="unknown bundle"):
        package_bundles(tmp_path, ["guidegen_nope"])


def test_cli_package_command(tmp_path, capsys):
    from custom_components.cli import main

    main(["package", "--output_dir", str(tmp_path), "--bundles", "guidegen_tcss,guidegen_autoencoder"])
    assert sorted(p.name.split("_v")[0] for p in tmp_path.glob("*.zip")) == ["guidegen_autoencoder", "guidegen_tcss"]
    assert "wrote" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["package", "--output_dir", str(tmp_path), "--bundles", "nope"])
    assert exit_info.value.code == 2 and "unknown bundle" in capsys.readouterr().err
