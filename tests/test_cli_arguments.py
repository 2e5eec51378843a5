"""Bad command-line input is refused before any model is loaded or any byte written (issue 16 items 2, 3, 4, 7, 9).

The table-driven suite at the end runs each bad command in-process (`cli.main`, a few milliseconds each after the
first import) and checks three things per case: exit status 2, a message that names the flag or file and the fix,
and an output folder that holds nothing new. A few bundle-config cases run `python -m monai.bundle` in a subprocess
(slower: MONAI starts up) and check that the user sees a message, not a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from custom_components import cli
from custom_components.runs.untrained import write_untrained_models

from helpers_bundles import run_bundle
from test_generate import PROMPT, STEPS, TINY, _models

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    return write_untrained_models(tmp_path_factory.mktemp("models"), mask_size=(16, 16, 16), image_size=(32, 32, 32),
                                  architectures=TINY, mask_spacing_mm=(6.0, 6.0, 6.0))


def _run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """``guidegen ARGV`` in-process: its exit status and stderr (0 when the command returned)."""
    capsys.readouterr()
    try:
        cli.main(argv)
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code if isinstance(exit_info.code, int) else 1
    return code, capsys.readouterr().err


def _listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _write_mask(path: Path, labels: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(labels, np.diag([6.0, 6.0, 6.0, 1.0])), str(path))
    return path


def _organ_mask(dtype=np.uint8) -> np.ndarray:
    labels = np.zeros((16, 16, 16), dtype)
    labels[4:12, 4:12, 4:12] = 4
    return labels


# ------------------------------------------------------------------------------------------------ the items


def test_item2_a_mistyped_flag_is_refused_before_the_run_with_the_closest_name(tiny_models, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = _run_cli(["generate", "--prompt", PROMPT, "--num_sample", "2", "--output_dir", str(out), *STEPS,
                          *_models(tiny_models)], capsys)
    assert code == 2
    assert "--num_sample (did you mean --num_samples?)" in err
    assert not out.exists()  # the job did not run with the defaults


@pytest.mark.parametrize("command", ["prepare", "demo-data", "generate", "synthesize", "evaluate", "package"])
def test_item2_every_subcommand_refuses_an_unknown_flag_before_running(command, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = _run_cli([command, "--output_dri", str(out)], capsys)
    assert code == 2 and "--output_dri (did you mean --output_dir?)" in err
    assert _listing(tmp_path) == set()


def test_item3_too_many_tcss_steps_are_refused_before_loading_and_leave_no_manifest(tiny_models, tmp_path, capsys, monkeypatch):
    from custom_components.pipelines import text_to_pair

    def no_loading(**kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(text_to_pair, "load_text_to_pair", no_loading)
    out = tmp_path / "out"
    code, err = _run_cli(["generate", "--prompt", PROMPT, "--tcss_steps", "2000", "--output_dir", str(out), *_models(tiny_models)], capsys)
    assert code == 2
    assert "--tcss_steps 2000" in err and "1..1000" in err and str(tiny_models["tcss"]) in err
    assert not out.exists()


def test_item3_a_non_finite_guidance_scale_is_refused_before_stage_one(tiny_models, tmp_path, capsys, monkeypatch):
    from custom_components.pipelines import text_to_pair

    monkeypatch.setattr(text_to_pair, "load_text_to_pair", lambda **kwargs: pytest.fail("models loaded before the check"))
    out = tmp_path / "out"
    code, err = _run_cli(["generate", "--prompt", PROMPT, "--guidance_scale", "nan", "--output_dir", str(out), *STEPS,
                          *_models(tiny_models)], capsys)
    assert code == 2 and "--guidance_scale nan" in err and "finite" in err
    assert not out.exists()


def test_item3_a_refused_run_does_not_lock_the_folder_for_the_next_one(tiny_models, tmp_path, capsys):
    out = tmp_path / "out"
    code, _ = _run_cli(["generate", "--prompt", PROMPT, "--tcss_steps", "2000", "--output_dir", str(out), *_models(tiny_models)], capsys)
    assert code == 2
    code, err = _run_cli(["generate", "--prompt", PROMPT, "--output_dir", str(out), *STEPS, *_models(tiny_models)], capsys)
    assert code == 0, err
    assert (out / "sample_00000" / "ct.nii.gz").is_file()


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--num_samples", "abc"], ["--num_samples 'abc'", "whole number"]),
        (["--num_samples", "2.7"], ["--num_samples 2.7", "whole number"]),
        (["--seed", "abc"], ["--seed 'abc'", "whole number"]),
        (["--prompt", "123"], ["--prompt '123'", "describe the patient"]),
    ],
    ids=["num_samples_abc", "num_samples_2.7", "seed_abc", "prompt_123"],
)
def test_item4_bad_generate_values_get_a_message_not_a_traceback_or_a_coercion(tiny_models, tmp_path, capsys, flags, expected):
    out = tmp_path / "out"
    argv = ["generate", "--prompt", PROMPT, "--output_dir", str(out), *STEPS, *_models(tiny_models)]
    if flags[0] == "--prompt":
        argv[1:3] = flags
    else:
        argv += flags
    code, err = _run_cli(argv, capsys)
    assert code == 2, err
    for fragment in expected:
        assert fragment in err
    assert not out.exists()


def test_item4_dataset_id_and_num_workers_are_checked(tiny_models, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["synthesize", "--prompt", PROMPT, "--output_dir", str(out), *STEPS, *_models(tiny_models)]
    code, err = _run_cli([*base, "--dataset_id", "abc"], capsys)
    assert code == 2 and "--dataset_id 'abc'" in err and "1..999" in err
    code, err = _run_cli([*base, "--num_workers", "-1"], capsys)
    assert code == 2 and "--num_workers -1" in err and "at least 1" in err
    assert not out.exists()


def test_item4_package_into_an_existing_file_is_refused(tmp_path, capsys):
    in_the_way = tmp_path / "dist"
    in_the_way.write_text("not a folder")
    code, err = _run_cli(["package", "--output_dir", str(in_the_way)], capsys)
    assert code == 2 and f"--output_dir {in_the_way}" in err and "is a file, not a folder" in err
    assert in_the_way.read_text() == "not a folder"


def test_item4_synthesize_help_shows_the_help(capsys):
    with pytest.raises(SystemExit) as exit_info:  # fire ends a help display with exit status 0
        cli.main(["synthesize", "--help"])
    captured = capsys.readouterr()
    assert exit_info.value.code == 0, captured.err
    assert "--num_workers" in captured.out + captured.err and "unknown option" not in captured.err


def test_item7_a_mask_with_fractional_labels_is_refused_like_prepare_does(tiny_models, tmp_path, capsys):
    labels = _organ_mask(np.float32)
    labels[6:8, 6:8, 6:8] = 4.5
    mask = _write_mask(tmp_path / "fractional.nii.gz", labels)
    out = tmp_path / "out"
    code, err = _run_cli(["generate", "--prompt", PROMPT, "--mask", str(mask), "--output_dir", str(out), *STEPS,
                          *_models(tiny_models)], capsys)
    assert code == 2 and str(mask) in err and "non-integer" in err and "whole numbers" in err
    assert not out.exists()


def test_item9_two_processes_into_one_folder_share_the_samples(tiny_models, tmp_path):
    out = tmp_path / "shared"
    command = [sys.executable, "-m", "custom_components.cli", "generate", "--prompt", PROMPT, "--num_samples", "4",
               "--output_dir", str(out), "--tcss_steps", "20", "--ldm_steps", "20", *_models(tiny_models)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = [subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  stdin=subprocess.DEVNULL, env=env) for _ in range(2)]
    results = [process.communicate(timeout=600) for process in processes]
    for process, (_, err) in zip(processes, results):
        assert process.returncode == 0, err[-3000:]
    made = [line for _, err in results for line in err.splitlines() if line.startswith("generated ")]
    assert len(made) == 2, made
    counts = [int(line.split()[1].rstrip(",")) for line in made]
    assert sum(counts) == 4, made  # each sample made by exactly one of the two processes
    assert sorted(p.name for p in out.glob("sample_*")) == [f"sample_{k:05d}" for k in range(4)]
    for k in range(4):
        assert json.loads((out / f"sample_{k:05d}" / "record.json").read_text())["seed"] == k
    assert not (out / ".partial").exists()


# ------------------------------------------------------------------------------------------------ the bad-input suite


@dataclass(frozen=True)
class BadInput:
    """One bad command: ``argv(paths)`` builds it; the message must hold every fragment of ``expected(paths)``."""

    name: str
    argv: Callable[[dict[str, Path]], list[str]]
    expected: Callable[[dict[str, Path]], list[str]]


def _filled(flags: tuple[str, ...], paths: dict[str, Path]) -> list[str]:
    return [flag.format(**{k: str(v) for k, v in paths.items()}) for flag in flags]


def _command(command: str, base: list[str], flags: list[str]) -> list[str]:
    """``command`` with the base flags and the case's flags; a case's flag replaces the base flag of the same name."""
    replaced = {flag for flag in flags if flag.startswith("--")}
    kept, position = [], 0
    while position < len(base):
        if base[position] in replaced:
            position += 2
        else:
            kept.append(base[position])
            position += 1
    return [command, *kept, *flags]


def _generate(*flags: str, prompt: bool = True, command: str = "generate") -> Callable[[dict[str, Path]], list[str]]:
    def build(p: dict[str, Path]) -> list[str]:
        base = [*(["--prompt", PROMPT] if prompt else []), "--output_dir", str(p["out"]), *STEPS, *_models(p)]
        return _command(command, base, _filled(flags, p))
    return build


def _synthesize(*flags: str) -> Callable[[dict[str, Path]], list[str]]:
    return _generate(*flags, command="synthesize")


def _evaluate(*flags: str, generated: bool = True) -> Callable[[dict[str, Path]], list[str]]:
    def build(p: dict[str, Path]) -> list[str]:
        base = [*(["--generated", str(p["generated"])] if generated else []), "--output_dir", str(p["out"]), "--mlflow", "false"]
        return _command("evaluate", base, _filled(flags, p))
    return build


def _prepare(*flags: str) -> Callable[[dict[str, Path]], list[str]]:
    def build(p: dict[str, Path]) -> list[str]:
        base = ["--images_dir", str(p["images"]), "--segmentations_dir", str(p["segmentations"]), "--records", str(p["records"]),
                "--output_dir", str(p["out"]), "--ts_version", "v1", "--mask_size", "8", "--image_size", "16"]
        return _command("prepare", base, _filled(flags, p))
    return build


def _fixed(*fragments: str) -> Callable[[dict[str, Path]], list[str]]:
    return lambda p: [fragment.format(**{k: str(v) for k, v in p.items()}) for fragment in fragments]


CASES = [
    # generate: names
    BadInput("generate-misspelt-num_samples", _generate("--num_sample", "2"), _fixed("--num_sample (did you mean --num_samples?)")),
    BadInput("generate-misspelt-output_dir", _generate("--ouput_dir", "x"), _fixed("--ouput_dir (did you mean --output_dir?)")),
    BadInput("generate-hyphenated-typo", _generate("--guidance-scal", "2"), _fixed("--guidance-scal (did you mean --guidance_scale?)")),
    BadInput("generate-stray-word", _generate("extra"), _fixed("'extra'", "--name value")),
    BadInput("generate-flag-twice", _generate("--seed", "1", "--seed", "2"), _fixed("--seed", "more than once")),
    BadInput("generate-flag-without-value", lambda p: ["generate", "--output_dir", str(p["out"]), *_models(p), "--prompt"],
             _fixed("--prompt needs a value")),
    # generate: values
    BadInput("generate-num_samples-text", _generate("--num_samples", "abc"), _fixed("--num_samples 'abc'", "whole number")),
    BadInput("generate-num_samples-fraction", _generate("--num_samples", "2.7"), _fixed("--num_samples 2.7", "whole number")),
    BadInput("generate-num_samples-zero", _generate("--num_samples", "0"), _fixed("--num_samples 0", "at least 1")),
    BadInput("generate-seed-text", _generate("--seed", "abc"), _fixed("--seed 'abc'", "whole number")),
    BadInput("generate-seed-negative", _generate("--seed", "-3"), _fixed("--seed -3", "at least 0")),
    BadInput("generate-tcss_steps-above-schedule", _generate("--tcss_steps", "2000"), _fixed("--tcss_steps 2000", "1..1000", "{tcss}")),
    BadInput("generate-ldm_steps-above-schedule", _generate("--ldm_steps", "1001"), _fixed("--ldm_steps 1001", "1..1000", "{ldm}")),
    BadInput("generate-ldm_steps-zero", _generate("--ldm_steps", "0"), _fixed("--ldm_steps 0", "at least 1")),
    BadInput("generate-guidance-nan", _generate("--guidance_scale", "nan"), _fixed("--guidance_scale nan", "finite")),
    BadInput("generate-guidance-inf", _generate("--guidance_scale", "inf"), _fixed("--guidance_scale inf", "finite")),
    BadInput("generate-guidance-text", _generate("--guidance_scale", "strong"), _fixed("--guidance_scale 'strong'", "a number")),
    BadInput("generate-tcss-guidance-negative", _generate("--tcss_guidance_scale", "-1"), _fixed("--tcss_guidance_scale -1", "at least 0")),
    BadInput("generate-prompt-number", _generate("--prompt", "123", prompt=False), _fixed("--prompt '123'", "describe the patient")),
    BadInput("generate-no-prompt", _generate(prompt=False), _fixed("exactly one of --prompt")),
    BadInput("generate-prompt-file-missing", _generate("--prompts", "{root}/none.txt", prompt=False), _fixed("{root}/none.txt", "not found")),
    BadInput("generate-mask-missing", _generate("--mask", "{root}/none.nii.gz"), _fixed("--mask {root}/none.nii.gz", "not found")),
    BadInput("generate-mask-fractional", _generate("--mask", "{fractional_mask}"), _fixed("{fractional_mask}", "non-integer")),
    BadInput("generate-mask-wrong-size", _generate("--mask", "{small_mask}"), _fixed("{small_mask}", "resample the mask")),
    BadInput("generate-device-unknown", _generate("--device", "gpu9"), _fixed("--device 'gpu9'", "cpu")),
    BadInput("generate-switch-typo", _generate("--overwrite", "ture"), _fixed("--overwrite 'ture'", "--overwrite true")),
    BadInput("generate-output-is-a-file", _generate("--output_dir", "{a_file}"), _fixed("--output_dir {a_file}", "is a file, not a folder")),
    BadInput("generate-model-missing", _generate("--ldm_model", "{root}/none.pt"), _fixed("{root}/none.pt", "not found")),
    BadInput("generate-model-of-another-stage", _generate("--tcss_model", "{autoencoder}"), _fixed("{autoencoder}", "'autoencoder' stage")),
    BadInput("generate-decode_tile-zero", _generate("--decode_tile", "0"), _fixed("--decode_tile 0", "at least 1")),
    BadInput("generate-text-encoder-missing", _generate("--text_encoder_path", "{root}/no_encoder"),
             _fixed("--text_encoder_path {root}/no_encoder", "not found")),
    # synthesize
    BadInput("synthesize-misspelt-format", _synthesize("--formt", "monai"), _fixed("--formt (did you mean --format?)")),
    BadInput("synthesize-format-unknown", _synthesize("--format", "dicom"), _fixed("--format 'dicom'", "nnunet, monai")),
    BadInput("synthesize-dataset_id-text", _synthesize("--dataset_id", "abc"), _fixed("--dataset_id 'abc'", "1..999")),
    BadInput("synthesize-dataset_id-too-large", _synthesize("--dataset_id", "1000"), _fixed("--dataset_id 1000", "1..999")),
    BadInput("synthesize-dataset_name-slash", _synthesize("--dataset_name", "my/set"), _fixed("--dataset_name 'my/set'", "letters, digits")),
    BadInput("synthesize-num_workers-negative", _synthesize("--num_workers", "-1"), _fixed("--num_workers -1", "at least 1")),
    BadInput("synthesize-num_workers-fraction", _synthesize("--num_workers", "1.5"), _fixed("--num_workers 1.5", "whole number")),
    BadInput("synthesize-tcss_steps-above-schedule", _synthesize("--tcss_steps", "5000"), _fixed("--tcss_steps 5000", "1..1000")),
    BadInput("synthesize-guidance-nan", _synthesize("--guidance_scale", "nan"), _fixed("--guidance_scale nan", "finite")),
    BadInput("synthesize-tcss-guidance-text", _synthesize("--tcss_guidance_scale", "strong"), _fixed("--tcss_guidance_scale 'strong'", "a number")),
    # evaluate
    BadInput("evaluate-misspelt-reference", _evaluate("--refrence", "x"), _fixed("--refrence (did you mean --reference?)")),
    BadInput("evaluate-generated-missing", _evaluate("--generated", "{root}/none", generated=False), _fixed("--generated {root}/none", "not found")),
    BadInput("evaluate-reference-missing", _evaluate("--reference", "{root}/none.json"), _fixed("--reference {root}/none.json", "not found")),
    BadInput("evaluate-segmentations-missing", _evaluate("--segmentations_dir", "{root}/none"),
             _fixed("--segmentations_dir {root}/none", "not found")),
    BadInput("evaluate-ts_version-unknown", _evaluate("--ts_version", "v3"), _fixed("--ts_version 'v3'", "auto, v1, v2, guidegen")),
    BadInput("evaluate-slices-zero", _evaluate("--slices_per_axis", "0"), _fixed("--slices_per_axis 0", "at least 1")),
    BadInput("evaluate-frame_size-small", _evaluate("--frame_size", "8"), _fixed("--frame_size 8", "at least 32")),
    BadInput("evaluate-frame_size-text", _evaluate("--frame_size", "big"), _fixed("--frame_size 'big'", "whole number")),
    BadInput("evaluate-output-is-a-file", _evaluate("--output_dir", "{a_file}"), _fixed("--output_dir {a_file}", "is a file, not a folder")),
    BadInput("evaluate-switch-typo", _evaluate("--mlflow", "maybe"), _fixed("--mlflow 'maybe'", "--mlflow true")),
    # prepare
    BadInput("prepare-misspelt-mask_size", _prepare("--masksize", "8"), _fixed("--masksize (did you mean --mask_size?)")),
    BadInput("prepare-images-missing", _prepare("--images_dir", "{root}/none"), _fixed("{root}/none", "--images_dir")),
    BadInput("prepare-segmentations-missing", _prepare("--segmentations_dir", "{root}/none"), _fixed("{root}/none", "--segmentations_dir")),
    BadInput("prepare-records-missing", _prepare("--records", "{root}/none.csv"), _fixed("{root}/none.csv", "--records")),
    BadInput("prepare-tumors-missing", _prepare("--tumors_dir", "{root}/none"), _fixed("{root}/none", "--tumors_dir")),
    BadInput("prepare-output-is-a-file", _prepare("--output_dir", "{a_file}"), _fixed("--output_dir {a_file}", "is a file, not a folder")),
    BadInput("prepare-mask_size-text", _prepare("--mask_size", "big"), _fixed("--mask_size", "128,128,96")),
    BadInput("prepare-image_size-two-numbers", _prepare("--image_size", "16,16"), _fixed("--image_size", "three")),
    BadInput("prepare-val_fraction-above-one", _prepare("--val_fraction", "1.5"), _fixed("--val_fraction 1.5", "0..1")),
    BadInput("prepare-seed-text", _prepare("--seed", "x"), _fixed("--seed 'x'", "whole number")),
    BadInput("prepare-margin-negative", _prepare("--margin_mm", "-5"), _fixed("--margin_mm -5", "at least 0")),
    BadInput("prepare-ts_version-unknown", _prepare("--ts_version", "v9"), _fixed("--ts_version 'v9'", "auto, v1, v2")),
    # the command itself, package and demo-data
    BadInput("command-misspelt", lambda p: ["genrate", "--prompt", PROMPT, "--output_dir", str(p["out"])],
             _fixed("unknown command 'genrate' (did you mean generate?)")),
    BadInput("package-unknown-bundle", lambda p: ["package", "--output_dir", str(p["out"]), "--bundles", "guidegen_tcs"],
             _fixed("guidegen_tcs", "guidegen_tcss")),
    BadInput("demo-data-num_phantoms-negative", lambda p: ["demo-data", "--output_dir", str(p["out"]), "--num_phantoms", "-2"],
             _fixed("--num_phantoms -2", "at least 0")),
    BadInput("demo-data-held_out_slices-past-the-ct", lambda p: ["demo-data", "--output_dir", str(p["out"]), "--held_out_slices", "100,130"],
             _fixed("--held_out_slices 100,130", "112 slices")),
    BadInput("demo-data-held_out_slices-one-number", lambda p: ["demo-data", "--output_dir", str(p["out"]), "--held_out_slices", "52"],
             _fixed("--held_out_slices", "FIRST,STOP")),
]


@pytest.fixture(scope="module")
def bad_input_paths(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """Inputs the cases point at; cases write (or rather must not write) under ``out`` inside ``root``."""
    from conftest import synthetic_case, write_nifti

    root = tmp_path_factory.mktemp("bad_input")
    paths: dict[str, Path] = {**tiny_models, "root": root, "out": root / "out", "a_file": root / "a_file.txt"}
    paths["a_file"].write_text("in the way\n")
    fractional = _organ_mask(np.float32)
    fractional[6:8, 6:8, 6:8] = 2.5
    paths["fractional_mask"] = _write_mask(root / "fractional.nii.gz", fractional)
    paths["small_mask"] = _write_mask(root / "small.nii.gz", np.zeros((8, 8, 8), np.uint8))
    ct, seg = synthetic_case()
    paths["images"] = write_nifti(root / "raw/images/a.nii.gz", ct).parent
    paths["segmentations"] = write_nifti(root / "raw/segmentations/a.nii.gz", seg, dtype=np.uint8).parent
    paths["records"] = root / "raw/records.csv"
    paths["records"].write_text("case_id,age,sex\na,50,F\n")
    sample = root / "generated" / "sample_00000"
    sample.mkdir(parents=True)
    write_nifti(sample / "ct.nii.gz", np.zeros((8, 8, 8)))
    write_nifti(sample / "mask.nii.gz", np.zeros((8, 8, 8)), dtype=np.uint8)
    paths["generated"] = root / "generated"
    return paths


def test_the_suite_is_large_enough():
    assert len(CASES) >= 40 and len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_is_refused_before_anything_is_written(case, bad_input_paths, capsys, monkeypatch):
    from custom_components.pipelines import text_to_pair

    monkeypatch.setattr(text_to_pair, "load_text_to_pair", lambda **kwargs: pytest.fail("a model was loaded before the arguments were checked"))
    root = bad_input_paths["root"]
    before = _listing(root)
    code, err = _run_cli(case.argv(bad_input_paths), capsys)
    assert code == 2, err[-2000:]
    assert err.startswith("guidegen: error: "), err[-2000:]
    for fragment in case.expected(bad_input_paths):
        assert fragment in err, f"{fragment!r} not in {err!r}"
    assert _listing(root) == before


BUNDLE_CASES = [
    ("guidegen_pipeline", ["--output_dri", "{out}"], ["--output_dri (did you mean --output_dir?)"]),
    ("guidegen_pipeline", ["--output_dir", "{out}", "--tcss_steps", "2000", "--tcss_model_path", "{tcss}", "--ldm_model_path", "{ldm}",
                           "--autoencoder_model_path", "{autoencoder}"], ["--tcss_steps 2000", "1..1000"]),
    ("guidegen_pipeline", ["--output_dir", "{out}", "--guidance_scale", "nan", "--tcss_model_path", "{tcss}", "--ldm_model_path", "{ldm}",
                           "--autoencoder_model_path", "{autoencoder}"], ["--guidance_scale nan", "finite"]),
    ("guidegen_tcss", ["--output_dir", "{out}", "--num_inference_step", "5"], ["--num_inference_step (did you mean --num_inference_steps?)"]),
]


@pytest.mark.parametrize("bundle, flags, expected", BUNDLE_CASES, ids=["pipeline-typo", "pipeline-steps", "pipeline-guidance", "tcss-typo"])
def test_bad_bundle_settings_are_refused_with_a_message_not_a_traceback(bundle, flags, expected, bad_input_paths):
    paths = {k: str(v) for k, v in bad_input_paths.items()}
    before = _listing(bad_input_paths["root"])
    result = run_bundle("inference", [ROOT / "bundles" / bundle / "configs" / "inference.yaml"], *[f.format(**paths) for f in flags])
    assert result.returncode != 0
    for fragment in expected:
        assert fragment in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert _listing(bad_input_paths["root"]) == before
