"""README holds exactly two set-up commands, and .ci/run runs the test one verbatim."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set-up on a fresh machine", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_readme_has_exactly_two_setup_commands():
    commands = _setup_commands()
    assert len(commands) == 2, commands
    assert all("\n" not in command for command in commands)
    assert "guidegen" in commands[0] and "pytest" in commands[1]


def test_ci_runs_the_readme_test_command():
    ci_lines = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()]
    assert _setup_commands()[1] in ci_lines


def test_main_command_generates_a_pair_with_the_shipped_weights(tmp_path):
    """The main command's `guidegen generate ...` part, run as written in a fresh folder: one mask + CT pair on one grid."""
    import json
    import shlex
    import subprocess
    import sys

    import nibabel as nib
    import numpy as np

    main = _setup_commands()[0]
    assert main.startswith("python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/guidegen generate ")
    arguments = shlex.split(main.split(".venv/bin/guidegen ", 1)[1])
    result = subprocess.run([sys.executable, "-m", "custom_components.cli", *arguments], cwd=tmp_path, capture_output=True,
                            text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    output = tmp_path / arguments[arguments.index("--output_dir") + 1]
    samples = sorted(output.glob("sample_*"))
    assert samples, result.stderr[-2000:]
    ct, mask = nib.load(str(samples[0] / "ct.nii.gz")), nib.load(str(samples[0] / "mask.nii.gz"))
    assert ct.shape == mask.shape
    np.testing.assert_allclose(ct.affine, mask.affine)
    manifest = json.loads((output / "manifest.json").read_text())
    assert {Path(m["path"]).parent.parent.name for m in manifest["models"].values()} == {"guidegen_tcss", "guidegen_ldm", "guidegen_autoencoder"}
