#!/usr/bin/env python
"""Run Project-MONAI/model-zoo's own bundle checks on the GuideGen stage bundles, offline, as a zoo PR would.

What a model-zoo pull request adding ``models/<bundle>/`` runs (``ci/run_premerge_cpu.sh`` and
``ci/run_premerge_gpu.sh``):

1. ``ci/prepare_schema.py``: fetch the metadata schema named in ``configs/metadata.json`` into ``<bundle>/eval/schema.json``
   (offline here: the verbatim copy in ``tests/resources``, checked against its pinned sha256);
2. ``ci/get_bundle_requirements.py``: the packages to ``pip install`` (printed and compared with the installed versions;
   nothing is installed);
3. ``ci/verify_bundle.py -b <bundle> -m min`` (CPU premerge) and ``ci/verify_bundle.py -b <bundle>`` (GPU premerge,
   "full": also bundle properties, network input/output shapes and TorchScript export, each unless the bundle is in
   the zoo's exclusion lists);
4. ``ci/unit_tests/runner.py --b <bundle>`` (bundle-specific unit tests of the zoo; none exist for a new bundle).

The zoo's ``ci/`` is used unchanged except for the entries a GuideGen PR adds to ``ci/bundle_custom_data.py``
(:data:`ZOO_EXCLUSIONS`): like the zoo's generative bundles (``maisi_ct_generative``,
``brats_mri_generative_diffusion``), the stage bundles are excluded from the shape check and the TorchScript export,
for the reasons printed with them. The bundle goes in as ``guidegen package`` would put it in the zip (configs, docs,
LICENSE, large_files.yml, models/model.pt). Beyond the zoo: every file must be under the zoo's 25 MB limit
(CONTRIBUTING.md), and the model file must load the way ``ckpt_export`` loads it (``ignite.handlers.Checkpoint.load_objects``
with ``key_in_ckpt=""``, the zoo's call), into ``network_def`` of the inference config, bit for bit what the bundle's own
loader loads.

Usage (``fetch`` gives a bare git dir of the zoo; a checkout works too)::

    python scripts/verify_zoo.py --zoo /path/to/model-zoo [--bundles guidegen_tcss guidegen_ldm] [--work_dir DIR]

Exit status 0 when every check passes on every bundle. Network access is blocked for the zoo's scripts (a dead proxy),
so a check that would download anything fails instead.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGE_BUNDLES = ("guidegen_tcss", "guidegen_autoencoder", "guidegen_ldm")
MAX_FILE_BYTES = 25 * 1024 * 1024  # model-zoo CONTRIBUTING.md: no single file larger than 25MB
# offline copies of the schemas the bundles' metadata names, with the sha256 of the published files
SCHEMAS = {
    "meta_schema_20240725.json": "cd64aa8a5904426f6fc6855dabe46af8c742d5bad644b4e9cfb78ebad09ad678",
}
# what a GuideGen PR adds to the zoo's ci/bundle_custom_data.py: list name -> (reason, bundles)
ZOO_EXCLUSIONS = {
    "exclude_verify_shape_list": (
        "generative: network_def is a conditional denoiser (TCSS, latent generator: noisy sample + timestep + text "
        "features, + mask) or a mask-guided autoencoder (CT + label mask in, (reconstruction, mean, log-variance) out); "
        "verify_net_in_out feeds one image tensor and expects one output of the metadata's shape, as for "
        "maisi_ct_generative and brats_mri_generative_diffusion",
        STAGE_BUNDLES,
    ),
    "exclude_verify_torchscript_list": (
        "networks do not script (torch.jit.script, which torch 2.14 deprecates): their blocks take a Python callable "
        "that applies gradient checkpointing and the U-Nets' inference runs slab-wise through closures, which "
        "torch.jit.script cannot compile; the zoo excludes its generative bundles (maisi_ct_generative, "
        "brats_mri_generative_diffusion) the same way",
        STAGE_BUNDLES,
    ),
}
BUNDLE_CONTENT = ("configs", "docs", "LICENSE", "large_files.yml", "models/model.pt")
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    # a download attempt would hit this dead loopback proxy and fail instead of reaching the network
    "http_proxy": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9",
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "no_proxy": "",
    "NO_PROXY": "",
}


def materialize_zoo(zoo: Path, target: Path) -> Path:
    """The zoo's ``ci/`` and ``models/model_info.json`` under ``target`` (from a checkout or a bare git dir)."""
    target.mkdir(parents=True, exist_ok=True)
    if (zoo / "ci" / "verify_bundle.py").is_file():
        shutil.copytree(zoo / "ci", target / "ci")
        (target / "models").mkdir()
        shutil.copy(zoo / "models" / "model_info.json", target / "models" / "model_info.json")
    else:  # a bare repository (e.g. what `fetch github:Project-MONAI/model-zoo` returns)
        archive = subprocess.run(["git", f"--git-dir={zoo}", "archive", "HEAD", "ci", "models/model_info.json"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def zoo_commit(zoo: Path) -> str:
    args = ["git", f"--git-dir={zoo}"] if not (zoo / ".git").exists() and (zoo / "HEAD").is_file() else ["git", "-C", str(zoo)]
    result = subprocess.run([*args, "log", "-1", "--format=%H %cs"], capture_output=True, text=True)
    return result.stdout.strip() or "unknown commit"


def add_exclusions(zoo_root: Path, bundles: list[str], enabled: bool = True) -> str:
    """Append the PR's entries to the zoo's ``ci/bundle_custom_data.py``; returns the lines added."""
    if not enabled:
        return " none (--without_exclusions: every check runs)\n"
    lines = ["", "# GuideGen stage bundles (added by the GuideGen PR)"]
    for list_name, (reason, names) in ZOO_EXCLUSIONS.items():
        chosen = [n for n in names if n in bundles]
        if chosen:
            lines.append(f"# {reason}")
            lines.append(f"{list_name} += {chosen!r}")
    text = "\n".join(lines) + "\n"
    with open(zoo_root / "ci" / "bundle_custom_data.py", "a") as handle:
        handle.write(text)
    return text


def copy_bundle(name: str, models: Path) -> Path:
    source, target = REPO / "bundles" / name, models / name
    for relative in BUNDLE_CONTENT:
        path = source / relative
        if path.is_dir():
            shutil.copytree(path, target / relative)
        elif path.is_file():
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target / relative)
    return target


def prepare_schema(bundle: Path) -> None:
    """``ci/prepare_schema.py`` without the download: the pinned local copy of the schema the metadata names."""
    url = json.loads((bundle / "configs" / "metadata.json").read_text())["schema"]
    name = url.rsplit("/", 1)[-1]
    local = REPO / "tests" / "resources" / name
    if name not in SCHEMAS or not local.is_file():
        raise SystemExit(f"no offline copy of the schema {url}; put it in tests/resources and pin its sha256 in SCHEMAS")
    digest = hashlib.sha256(local.read_bytes()).hexdigest()
    if digest != SCHEMAS[name]:
        raise SystemExit(f"{local} has sha256 {digest}, not the published file's {SCHEMAS[name]}")
    (bundle / "eval").mkdir(exist_ok=True)
    shutil.copy(local, bundle / "eval" / "schema.json")


def check_file_sizes(bundle: Path) -> list[str]:
    """Files of the bundle over the zoo's 25 MB limit (none may be)."""
    return [f"{p.relative_to(bundle)}: {p.stat().st_size / 2**20:.1f} MiB" for p in sorted(bundle.rglob("*"))
            if p.is_file() and p.stat().st_size > MAX_FILE_BYTES]


def check_requirements(zoo_root: Path, name: str, env: dict) -> list[str]:
    """What the zoo would ``pip install`` for the bundle, against what is installed (nothing is installed here)."""
    result = subprocess.run([sys.executable, "ci/get_bundle_requirements.py", "--b", name], cwd=zoo_root, env=env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        return [f"get_bundle_requirements.py failed: {result.stderr[-2000:]}"]
    problems = []
    requirements = Path(zoo_root, result.stdout.strip()) if result.stdout.strip() else None
    lines = requirements.read_text().split() if requirements and requirements.is_file() else []
    print(f"  requirements the zoo installs: {' '.join(lines) or '(none)'}")
    for line in lines:
        package, _, pin = line.partition("==")
        if package == "monai" and not pin:  # ALLOW_MONAI_RC range (monai>=X rc1,<Y)
            continue
        try:
            installed = importlib.metadata.version(package).split("+")[0]
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{package} is not installed (pinned {pin})")
            continue
        if pin and installed != pin:
            problems.append(f"{package}: pinned {pin}, installed {installed}")
    return problems


CKPT_EXPORT_LOAD = r"""
import sys, torch
from ignite.handlers import Checkpoint
from monai.bundle import ConfigParser
from custom_components.networks import read_model_file
bundle = sys.argv[1]
parser = ConfigParser()
parser.read_config(f"{bundle}/configs/inference.yaml")
parser.read_meta(f"{bundle}/configs/metadata.json")
parser["bundle_root"] = bundle  # ckpt_export's bundle_root argument overrides the config's value
net = parser.get_parsed_content("network_def")
Checkpoint.load_objects(to_load={"": net}, checkpoint=f"{bundle}/models/model.pt")  # ckpt_export, key_in_ckpt=""
ours = read_model_file(f"{bundle}/models/model.pt")["model"]
loaded = net.state_dict()
assert list(loaded) == list(ours), "different parameter names"
bad = [k for k in ours if not torch.equal(loaded[k], ours[k].to(loaded[k].dtype))]
assert not bad, f"differs from the bundle's own loader: {bad[:5]}"
print(f"  ckpt_export's loading: {len(loaded)} tensors of {type(net).__name__} loaded strictly, equal to the bundle's loader")
"""


def check_ckpt_export_loading(bundle: Path, env: dict) -> list[str]:
    result = subprocess.run([sys.executable, "-c", CKPT_EXPORT_LOAD, str(bundle)], env=env, capture_output=True, text=True)
    print(result.stdout, end="")
    return [] if result.returncode == 0 else [f"ckpt_export's loading failed:\n{result.stderr[-3000:]}"]


def run_zoo(zoo_root: Path, args: list[str], env: dict, label: str) -> list[str]:
    print(f"  $ python {' '.join(args)}")
    result = subprocess.run([sys.executable, *args], cwd=zoo_root, env=env, capture_output=True, text=True)
    tail = (result.stdout + result.stderr).strip().splitlines()
    for line in [line for line in tail if not line.startswith(("  warnings.warn", "/"))][-8:]:
        print(f"    {line}")
    return [] if result.returncode == 0 else [f"{label} failed (exit {result.returncode}):\n{result.stderr[-3000:]}"]


def verify(zoo: Path, bundles: list[str], work_dir: Path, exclusions: bool = True) -> dict[str, list[str]]:
    zoo_root = materialize_zoo(zoo, work_dir / "model-zoo")
    print(f"model-zoo {zoo_commit(zoo)} -> {zoo_root}")
    print("entries added to ci/bundle_custom_data.py:" + add_exclusions(zoo_root, bundles, exclusions).replace("\n", "\n  "))
    env = {**os.environ, **OFFLINE_ENV, "PYTHONPATH": str(zoo_root)}  # the GPU premerge exports PYTHONPATH=$PWD
    failures: dict[str, list[str]] = {}
    for name in bundles:
        print(f"== {name}")
        bundle = copy_bundle(name, zoo_root / "models")
        prepare_schema(bundle)
        problems = [f"file over the zoo's 25 MB limit: {p}" for p in check_file_sizes(bundle)]
        print(f"  files: largest {max(p.stat().st_size for p in bundle.rglob('*') if p.is_file()) / 2**20:.1f} MiB "
              f"(limit 25 MB)")
        problems += check_requirements(zoo_root, name, env)
        problems += run_zoo(zoo_root, ["ci/verify_bundle.py", "-b", name, "-m", "min"], env, "verify_bundle.py -m min")
        problems += run_zoo(zoo_root, ["ci/verify_bundle.py", "--b", name], env, "verify_bundle.py (full)")
        problems += run_zoo(zoo_root, ["ci/unit_tests/runner.py", "--b", name], env, "unit_tests/runner.py")
        problems += check_ckpt_export_loading(bundle, env)
        failures[name] = problems
        print(f"  {'PASS' if not problems else 'FAIL'}")
        for problem in problems:
            print("  - " + problem.replace("\n", "\n    "))
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", required=True, type=Path, help="Project-MONAI/model-zoo: a checkout or a bare git dir")
    parser.add_argument("--bundles", nargs="+", default=list(STAGE_BUNDLES), choices=STAGE_BUNDLES)
    parser.add_argument("--work_dir", type=Path, default=None, help="where the zoo copy is built (default: a temp dir)")
    parser.add_argument("--without_exclusions", action="store_true",
                        help="add no entries to ci/bundle_custom_data.py (shows what the exclusions skip, and why)")
    args = parser.parse_args(argv)
    if args.work_dir is None:
        with tempfile.TemporaryDirectory(prefix="verify_zoo_") as tmp:
            failures = verify(args.zoo.resolve(), args.bundles, Path(tmp), not args.without_exclusions)
    else:
        if args.work_dir.exists():
            shutil.rmtree(args.work_dir)
        failures = verify(args.zoo.resolve(), args.bundles, args.work_dir.resolve(), not args.without_exclusions)
    failed = [name for name, problems in failures.items() if problems]
    print(f"model-zoo checks: {len(failures) - len(failed)}/{len(failures)} bundles pass" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
