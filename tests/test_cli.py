"""The guidegen command line: help texts and exit codes."""

import inspect
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from custom_components import cli


def guidegen(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    executable = shutil.which("guidegen", path=str(Path(sys.executable).parent)) or shutil.which("guidegen")
    assert executable, "the guidegen console script is not installed (pip install -e .)"
    env = {**os.environ, "PAGER": "cat", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([executable, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_top_level_help_lists_commands():
    result = guidegen("--help")
    assert result.returncode == 0, result.stderr
    text = result.stdout + result.stderr
    for command in cli.COMMANDS:
        assert re.search(rf"^\s+{re.escape(command)}\b", text, flags=re.M), f"{command} missing from `guidegen --help`"
    assert "Turn CTs + TotalSegmentator labels" in text


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_command_help_explains_every_option(command):
    """Every subcommand's --help exits 0 and shows each option with its own description (from the docstring's Args)."""
    function = cli.COMMANDS[command]
    result = guidegen(command, "--help")
    assert result.returncode == 0, result.stderr
    text = result.stdout + result.stderr
    for name in inspect.signature(function).parameters:
        assert f"--{name}" in text, f"--{name} missing from `guidegen {command} --help`"
        assert re.search(rf"^\s+{name}: \S", inspect.getdoc(function), flags=re.M), f"{name} is not described in the docstring"
        # fire prints the description under the flag's Type/Default lines; a flag without one is followed by the next flag
        described = re.search(rf"--{name}=\S+(?: \(required\))?\n(?:[ \t]+(?:Type|Default): .*\n)*[ \t]+(?!-|Type: |Default: )\S", text)
        assert described, f"--{name} has no description in `guidegen {command} --help`"


def test_prepare_bad_option_exits_2_with_a_message(tmp_path):
    result = guidegen("prepare", "--images_dir", str(tmp_path / "none"), "--segmentations_dir", str(tmp_path),
                      "--records", str(tmp_path / "r.csv"), "--output_dir", str(tmp_path / "o"))
    assert result.returncode == 2
    assert "guidegen: error: images folder" in result.stderr and "Traceback" not in result.stderr


def test_prepare_with_a_failing_case_exits_1_and_keeps_the_good_one(make_dataset):
    paths = make_dataset(("a", "b"))
    (paths["segmentations"] / "b.nii.gz").unlink()
    result = guidegen("prepare", "--images_dir", str(paths["images"]), "--segmentations_dir", str(paths["segmentations"]),
                      "--records", str(paths["records"]), "--output_dir", str(paths["output"]),
                      "--ts_version", "v1", "--mask_size", "8", "--image_size", "16,16,12")
    assert result.returncode == 1, result.stderr
    assert "FAILED b: no segmentation" in result.stderr
    assert (paths["output"] / "labels/a.nii.gz").is_file()


def test_prepare_success_prints_the_datalist(make_dataset):
    paths = make_dataset(("a",))
    result = guidegen("prepare", "--images_dir", str(paths["images"]), "--segmentations_dir", str(paths["segmentations"]),
                      "--records", str(paths["records"]), "--output_dir", str(paths["output"]),
                      "--ts_version", "v1", "--mask_size", "8", "--image_size", "16")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(paths["output"] / "datalist.json")


@pytest.mark.parametrize("word, expected", [("true", True), ("false", False), ("False", False), ("no", False), ("1", True), (0, False), (True, True)])
def test_switch_reads_yes_and_no_words(word, expected):
    assert cli._switch(word, "overwrite") is expected


def test_a_typo_in_a_yes_no_flag_is_refused_with_the_fix(tmp_path):
    result = guidegen("evaluate", "--generated", str(tmp_path / "none"), "--reference", str(tmp_path / "d.json"), "--resample", "ture")
    assert result.returncode == 2
    assert "--resample 'ture' is not a yes/no value" in result.stderr and "Traceback" not in result.stderr
