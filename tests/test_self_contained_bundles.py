"""Issue 17, deliverable 1: bundles that run where `monai.bundle download` puts them.

The bundles are packaged (`guidegen package`), downloaded with MONAI's own `download` from the local zips (`--url
file://...`) into a temporary folder, and run with `python -m monai.bundle run` from another working directory in a
Python that cannot import this repository: `python -I -S` (no PYTHONPATH, no working directory on the path, no site
initialisation) given a view of the virtual environment's site-packages that holds only the distributions the
bundle's card (`configs/metadata.json`: monai, torch, numpy and `required_packages_version`) brings in with their own
requirements — so neither the editable install's finder nor the `guidegen` dist-info, nor anything else. Which
`custom_components` the run imports and which model files it opens are recorded; the downloaded weights' digests
must be in the run's manifest.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

from custom_components.packaging import ALL_BUNDLES, REQUIRED_PACKAGES, package_bundles

# monai.bundle download has no hash argument for a --url download; the archives are checked here instead
pytestmark = pytest.mark.filterwarnings("ignore:No hash value provided")

ROOT = Path(__file__).resolve().parents[1]
PROMPT = ("The patient is a 63-year-old White male. In this imaging, the patient's condition is described as "
          "hepatocellular carcinoma, with a tumor in the liver, measuring 30 mm, stage II.")

# Runs in the isolated interpreter: the site-packages view, an audit of the model files opened, then
# `python -m monai.bundle <args>`; writes what it saw to the report file at exit.
BOOT = r"""
import atexit, json, runpy, site, sys
view, report_file = sys.argv[1:3]
args = sys.argv[3:]
site.addsitedir(view)
opened = set()

def audit(event, arguments):
    if event == 'open' and isinstance(arguments[0], str) and arguments[0].endswith('.pt'):
        opened.add(arguments[0])

sys.addaudithook(audit)

@atexit.register
def report():
    code = sys.modules.get('custom_components')
    with open(report_file, 'w') as handle:
        json.dump({'custom_components': getattr(code, '__file__', None), 'opened': sorted(opened), 'sys_path': sys.path},
                  handle)

sys.argv = ['monai.bundle', *args]
runpy.run_module('monai.bundle', run_name='__main__', alter_sys=True)
"""


def _closure(names: set[str]) -> set[str]:
    """The distributions ``names`` need when installed: themselves and their unconditional requirements, recursively."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requirements = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for text in requirements:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return seen


def _card_view(bundle: Path, view: Path) -> Path:
    """A site-packages folder holding only what the bundle's card brings in (links to the real entries)."""
    from packaging.utils import canonicalize_name

    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    allowed = _closure({"monai", "torch", "numpy", *meta["required_packages_version"]})
    site_packages = Path(sysconfig.get_paths()["purelib"])
    owners: dict[str, set[str]] = {}
    for dist in importlib.metadata.distributions(path=[str(site_packages)]):
        name = canonicalize_name(dist.metadata["Name"])
        for file in dist.files or []:
            if file.parts and file.parts[0] != "..":
                owners.setdefault(file.parts[0], set()).add(name)
    view.mkdir(parents=True)
    for entry in site_packages.iterdir():
        if owners.get(entry.name, set()) & allowed and not entry.name.endswith(".pth"):
            (view / entry.name).symlink_to(entry)
    return view


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory):
    """The four bundles packaged and downloaded with ``monai.bundle download`` into one folder."""
    from monai.bundle import download

    work = tmp_path_factory.mktemp("zoo")
    archives = package_bundles(work / "dist")
    for name, archive in zip(ALL_BUNDLES, archives):
        download(name=name, url=archive.resolve().as_uri(), bundle_dir=str(work / "bundles"))
    elsewhere = work / "elsewhere"
    elsewhere.mkdir()
    return {"bundles": work / "bundles", "cwd": elsewhere, "archives": archives, "work": work}


def _isolated(downloaded: dict, bundle: str, *args: str, tag: str) -> tuple[subprocess.CompletedProcess, dict]:
    """``python -m monai.bundle ARGS`` in the isolated interpreter, with only ``bundle``'s card installed."""
    view = downloaded["work"] / f"site-packages-{bundle}"
    if not view.exists():
        _card_view(downloaded["bundles"] / bundle, view)
    report = downloaded["work"] / f"report_{tag}.json"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(downloaded["work"]), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": ""}
    result = subprocess.run([sys.executable, "-I", "-S", "-c", BOOT, str(view), str(report), *args],
                            cwd=downloaded["cwd"], env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert report.is_file(), result.stderr[-4000:]
    return result, json.loads(report.read_text())


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_archives_carry_the_code_and_the_card(downloaded):
    for name, archive in zip(ALL_BUNDLES, downloaded["archives"]):
        names = set(zipfile.ZipFile(archive).namelist())
        for module in ("__init__.py", "bundles.py", "networks/checkpoints.py", "runs/generate.py", "data/writers.py",
                       "data/resources/class_map_default.json"):
            assert f"{name}/custom_components/{module}" in names, (name, module)
        assert not any("__pycache__" in n or n.endswith(".pyc") or "/resources/example/" in n for n in names), name
        meta = json.loads(zipfile.ZipFile(archive).read(f"{name}/configs/metadata.json"))
        assert list(meta["required_packages_version"]) == list(REQUIRED_PACKAGES[name])
        for package, version in meta["required_packages_version"].items():
            assert version == importlib.metadata.version(package).split("+")[0], (name, package)
        if name != "guidegen_pipeline":  # the shipped model's md5 is the one large_files.yml lists
            entry = yaml.safe_load(zipfile.ZipFile(archive).read(f"{name}/large_files.yml"))["large_files"][0]
            assert entry["hash_val"] == hashlib.md5(zipfile.ZipFile(archive).read(f"{name}/models/model.pt")).hexdigest()


def test_the_isolated_interpreter_cannot_import_the_repository(downloaded):
    view = _card_view(downloaded["bundles"] / "guidegen_pipeline", downloaded["work"] / "site-packages-check")
    assert not list(view.glob("__editable__*")) and not list(view.glob("guidegen-*")) and (view / "monai").is_dir()
    result = subprocess.run([sys.executable, "-I", "-S", "-c",
                             f"import site; site.addsitedir({str(view)!r}); import custom_components"],
                            cwd=downloaded["cwd"], capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode != 0 and "No module named 'custom_components'" in result.stderr, result.stderr[-2000:]


def test_downloaded_tcss_bundle_runs_from_anywhere_on_its_own_weights(downloaded):
    """Also with `--tracking mlflow`, which makes MONAI evaluate `output_dir` (so `bundle_root`) before `initialize`."""
    bundle = downloaded["bundles"] / "guidegen_tcss"
    result, report = _isolated(downloaded, "guidegen_tcss", "run", "inference", "--config_file",
                               str(bundle / "configs" / "inference.yaml"), "--num_inference_steps", "2",
                               "--prompts", json.dumps([PROMPT]), "--tracking", "mlflow", tag="tcss")
    assert result.returncode == 0, result.stderr[-6000:]
    assert report["custom_components"] == str(bundle / "custom_components" / "__init__.py")
    assert str(bundle / "models" / "model.pt") in report["opened"], report["opened"]
    assert not any(p.startswith(str(ROOT)) for p in report["opened"]), report["opened"]
    # the default output folder is inside the downloaded bundle
    masks = sorted((bundle / "eval").rglob("mask.nii.gz"))
    assert len(masks) == 1, sorted((bundle / "eval").rglob("*"))
    assert len(list((bundle / "eval").glob("config_*.json"))) == 1  # the executed config MONAI's tracking saves
    listed = yaml.safe_load((bundle / "large_files.yml").read_text())["large_files"][0]["hash_val"]
    assert _md5(bundle / "models" / "model.pt") == listed


def test_downloaded_meta_bundle_finds_its_sibling_stages(downloaded):
    bundles = downloaded["bundles"]
    pipeline = bundles / "guidegen_pipeline"
    result, report = _isolated(downloaded, "guidegen_pipeline", "run", "inference", "--config_file",
                               str(pipeline / "configs" / "inference.yaml"), "--tcss_steps", "2", "--ldm_steps", "2",
                               "--prompts", json.dumps([PROMPT]), tag="pipeline")
    assert result.returncode == 0, result.stderr[-6000:]
    assert report["custom_components"] == str(pipeline / "custom_components" / "__init__.py")
    manifest = json.loads((pipeline / "eval" / "manifest.json").read_text())
    for stage, name in (("tcss", "guidegen_tcss"), ("ldm", "guidegen_ldm"), ("autoencoder", "guidegen_autoencoder")):
        model = bundles / name / "models" / "model.pt"
        assert Path(manifest["models"][stage]["path"]).resolve() == model, manifest["models"]
        assert manifest["models"][stage]["sha256"] == _sha256(model)
        assert str(model) in report["opened"], report["opened"]
    assert not any(p.startswith(str(ROOT)) for p in report["opened"]), report["opened"]
    assert (pipeline / "eval" / "sample_00000" / "ct.nii.gz").is_file()


def test_bundles_are_found_next_to_each_other_never_silently_in_this_repository(tmp_path):
    from custom_components.bundles import bundle_config, bundle_dir
    from custom_components.errors import GuideGenInputError

    lone = tmp_path / "zoo" / "guidegen_ldm"
    (lone / "configs").mkdir(parents=True)
    (lone / "configs" / "metadata.json").write_text("{}")
    assert bundle_dir("guidegen_ldm", near=str(lone)) == str(lone)
    with pytest.raises(GuideGenInputError, match=r"guidegen_autoencoder.*monai\.bundle download --name guidegen_autoencoder"):
        bundle_dir("guidegen_autoencoder", near=str(lone))  # not the repository's bundles/guidegen_autoencoder
    # outside any bundle (a source checkout used from Python): this tree's bundles, and a sibling's config gets its root
    assert bundle_dir("guidegen_tcss") == str(ROOT / "bundles" / "guidegen_tcss")
    assert bundle_config("guidegen_tcss")["bundle_root"] == str(ROOT / "bundles" / "guidegen_tcss")


def test_every_config_takes_its_root_from_its_own_location():
    from custom_components.bundles import BUNDLE_ROOT_EXPRESSION

    for config in sorted((ROOT / "bundles").glob("*/configs/*.yaml")):
        content = yaml.safe_load(config.read_text())
        text = config.read_text()
        assert "'..', '..'" not in text and "../.." not in text, config  # nothing outside the bundle
        if "bundle_root" in content:
            assert content["bundle_root"] == BUNDLE_ROOT_EXPRESSION.format(name=config.parents[1].name), config
        if "initialize" in content:  # resolving @bundle_root first puts the bundle on sys.path
            assert content["initialize"][0] == "$custom_components.bundles.refuse_unknown_overrides(@bundle_root)", config
