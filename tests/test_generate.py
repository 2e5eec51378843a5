"""The text -> pair chain: `guidegen generate`, the meta-bundle, `guidegen synthesize`, and their bad-input paths.

The chain runs on tiny untrained model files (the format training writes; time and correctness of the plumbing do not
depend on the weights). The shipped demo weights are exercised by tests/test_readme.py and test_demo_weights.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from custom_components.data.nnunet import check_nnunet_raw_dataset
from custom_components.data.requests import load_requests
from custom_components.errors import GuideGenInputError
from custom_components.runs.generate import SAMPLE_FILES
from custom_components.runs.untrained import write_untrained_models

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The patient is a 63-year-old White male. In this imaging, the patient's condition is described as hepatocellular carcinoma."
TINY = {
    "tcss": {"channels": [8, 16], "num_res_blocks": 1, "cross_attention_levels": [False, True], "self_attention_levels": [False, False],
             "num_head_channels": 8, "norm_num_groups": 4, "num_queries": 4, "injection_dim": 16, "injection_layers": 1, "injection_heads": 2},
    "autoencoder": {"channels": [8, 8, 16], "num_res_blocks": 1, "latent_channels": 2, "norm_num_groups": 4},
    "ldm": {"channels": [8, 16], "num_res_blocks": 1, "cross_attention_levels": [False, True], "self_attention_levels": [False, False],
            "num_head_channels": 8, "norm_num_groups": 4, "num_queries": 4, "injection_dim": 16, "injection_layers": 1, "injection_heads": 2},
}
STEPS = ["--tcss_steps", "2", "--ldm_steps", "2"]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    return write_untrained_models(tmp_path_factory.mktemp("models"), mask_size=(16, 16, 16), image_size=(32, 32, 32),
                                  architectures=TINY, mask_spacing_mm=(6.0, 6.0, 6.0))


def _models(files: dict[str, Path]) -> list[str]:
    return ["--tcss_model", str(files["tcss"]), "--ldm_model", str(files["ldm"]), "--autoencoder_model", str(files["autoencoder"])]


def guidegen(*args: str, cwd: Path | None = None, check: bool = False, threads: int | None = None) -> subprocess.CompletedProcess:
    """Run the CLI in a subprocess; ``threads`` fixes torch's thread count (OMP_NUM_THREADS), which decides the
    order of floating-point sums and so the last bits of a CT."""
    env = None if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run([sys.executable, "-m", "custom_components.cli", *args], cwd=cwd or ROOT, capture_output=True,
                            text=True, timeout=600, stdin=subprocess.DEVNULL, env=env)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------ generate


def test_generate_writes_complete_pairs_and_same_seed_gives_identical_bytes(tiny_models, tmp_path):
    for run in ("a", "b"):
        guidegen("generate", "--prompt", PROMPT, "--num_samples", "2", "--output_dir", str(tmp_path / run), *STEPS,
                 *_models(tiny_models), cwd=tmp_path, check=True)
    first, second = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert first == second  # byte-identical, the manifest included
    for sample in ("sample_00000", "sample_00001"):
        folder = tmp_path / "a" / sample
        assert sorted(p.name for p in folder.iterdir()) == sorted(SAMPLE_FILES)
        ct, mask, native = (nib.load(str(folder / f)) for f in ("ct.nii.gz", "mask.nii.gz", "mask_native.nii.gz"))
        assert ct.get_data_dtype() == np.int16 and mask.get_data_dtype() == np.uint8
        assert ct.shape == mask.shape == (32, 32, 32) and native.shape == (16, 16, 16)
        np.testing.assert_allclose(ct.affine, mask.affine)
        np.testing.assert_allclose(nib.affines.voxel_sizes(ct.affine), [3.0, 3.0, 3.0])
        np.testing.assert_allclose(nib.affines.voxel_sizes(native.affine), [6.0, 6.0, 6.0])
        # the CT-grid mask is the native mask, each voxel repeated 2x2x2, over the same field of view
        native_labels = np.asarray(native.dataobj)
        np.testing.assert_array_equal(np.asarray(mask.dataobj), native_labels.repeat(2, 0).repeat(2, 1).repeat(2, 2))
        corner = lambda image: image.affine @ np.array([-0.5, -0.5, -0.5, 1.0])  # noqa: E731
        np.testing.assert_allclose(corner(ct), corner(native))
        record = json.loads((folder / "record.json").read_text())
        assert record["prompt"] == PROMPT and record["seed"] == int(sample[-1]) and record["mask_from"] == "stage 1 (TCSS)"
        assert (folder / "prompt.txt").read_text().strip() == PROMPT
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert set(manifest["models"]) == {"tcss", "ldm", "autoencoder"}
    assert all(len(m["sha256"]) == 64 for m in manifest["models"].values())
    assert [s["seed"] for s in manifest["samples"]] == [0, 1]
    assert {"torch", "monai", "transformers"} <= set(manifest["versions"])
    # different seeds give different samples (the test above could not fail if the seed were ignored)
    guidegen("generate", "--prompt", PROMPT, "--num_samples", "1", "--seed", "1", "--output_dir", str(tmp_path / "c"), *STEPS,
             *_models(tiny_models), cwd=tmp_path, check=True)
    assert (tmp_path / "c/sample_00000/ct.nii.gz").read_bytes() == first["sample_00001/ct.nii.gz"]
    assert (tmp_path / "c/sample_00000/ct.nii.gz").read_bytes() != first["sample_00000/ct.nii.gz"]


def test_tcss_guidance_scale_is_recorded(tiny_models, tmp_path):
    records = {}
    for name, scale in (("plain", None), ("unconditional", "0")):
        extra = [] if scale is None else ["--tcss_guidance_scale", scale]
        guidegen("generate", "--prompt", PROMPT, "--output_dir", str(tmp_path / name), *STEPS, *extra, *_models(tiny_models),
                 cwd=tmp_path, check=True)
        records[name] = json.loads((tmp_path / name / "sample_00000" / "record.json").read_text())
    assert records["plain"]["tcss_guidance_scale"] == 1.0 and records["unconditional"]["tcss_guidance_scale"] == 0.0


def test_text_to_pair_hands_the_tcss_guidance_scale_to_stage_one():
    from custom_components.pipelines.text_to_pair import TextToPairPipeline

    class _RecordingTCSS:
        def __init__(self) -> None:
            self.kwargs: dict = {}

        def __call__(self, prompts, **kwargs):
            self.kwargs = kwargs
            raise _Stop

    class _Stop(Exception):
        pass

    tcss = _RecordingTCSS()
    pipeline = TextToPairPipeline.__new__(TextToPairPipeline)
    pipeline.tcss, pipeline.residency = tcss, None
    pipeline.activate_stage = lambda name: None
    with pytest.raises(_Stop):
        pipeline(PROMPT, seed=3, tcss_steps=7, tcss_guidance_scale=2.5, progress=False)
    assert tcss.kwargs == {"num_inference_steps": 7, "seed": 3, "progress": False, "guidance_scale": 2.5}


def test_generate_with_mask_skips_stage_one(tiny_models, tmp_path):
    labels = np.zeros((16, 16, 16), np.uint8)
    labels[4:12, 4:12, 4:12] = 4
    labels[6:8, 6:8, 6:8] = 19
    affine = np.diag([5.0, 5.0, 5.0, 1.0])
    affine[:3, 3] = [10.0, -20.0, 30.0]
    nib.save(nib.Nifti1Image(labels, affine), str(tmp_path / "given.nii.gz"))
    broken_tcss = tmp_path / "missing_tcss.pt"  # stage 1 must not even be loaded
    result = guidegen("generate", "--prompt", PROMPT, "--mask", str(tmp_path / "given.nii.gz"), "--output_dir", str(tmp_path / "out"),
                      *STEPS, "--tcss_model", str(broken_tcss), "--ldm_model", str(tiny_models["ldm"]),
                      "--autoencoder_model", str(tiny_models["autoencoder"]), cwd=tmp_path, check=True)
    assert "TCSS sampling" not in result.stderr
    folder = tmp_path / "out" / "sample_00000"
    native = nib.load(str(folder / "mask_native.nii.gz"))
    np.testing.assert_array_equal(np.asarray(native.dataobj), labels)
    np.testing.assert_allclose(native.affine, affine)
    ct = nib.load(str(folder / "ct.nii.gz"))
    np.testing.assert_allclose(nib.affines.voxel_sizes(ct.affine), [2.5, 2.5, 2.5])
    record = json.loads((folder / "record.json").read_text())
    assert record["mask_from"] == str((tmp_path / "given.nii.gz").resolve()) and record["tcss_steps"] is None
    assert "tcss" not in json.loads((tmp_path / "out/manifest.json").read_text())["models"]


def test_interrupted_batch_resumes_without_redoing_finished_samples(tiny_models, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "custom_components.cli", "generate", "--prompt", PROMPT, "--num_samples", "4",
               "--output_dir", str(out), "--tcss_steps", "30", "--ldm_steps", "30", *_models(tiny_models)]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "sample_00000").is_dir() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = sorted(p.name for p in out.glob("sample_*"))
    assert finished and len(finished) < 4, finished  # killed mid-batch
    for name in finished:
        assert sorted(p.name for p in (out / name).iterdir()) == sorted(SAMPLE_FILES)  # never half-written
    before = {name: {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / name).iterdir()} for name in finished}
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"already there {len(finished)}" in result.stderr
    for name in finished:  # untouched
        assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / name).iterdir()} == before[name]
    assert sorted(p.name for p in out.glob("sample_*")) == [f"sample_{k:05d}" for k in range(4)]
    assert not (out / ".partial").exists()
    # the resumed run equals an uninterrupted one
    reference = tmp_path / "reference"
    subprocess.run([*command[:command.index("--output_dir") + 1], str(reference), *command[command.index("--output_dir") + 2:]],
                   cwd=tmp_path, capture_output=True, timeout=600, check=True)
    assert _files(out) == _files(reference)


def test_meta_bundle_runs_from_any_working_directory(tiny_models, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", str(ROOT / "bundles/guidegen_pipeline/configs/inference.yaml"),
         "--output_dir", str(tmp_path / "meta"), "--num_samples", "2", "--tcss_steps", "2", "--ldm_steps", "2",
         "--tcss_model_path", str(tiny_models["tcss"]), "--ldm_model_path", str(tiny_models["ldm"]),
         "--autoencoder_model_path", str(tiny_models["autoencoder"])],
        cwd=elsewhere, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    default_prompt = yaml.safe_load((ROOT / "bundles/guidegen_pipeline/configs/inference.yaml").read_text())["prompts"][0]
    guidegen("generate", "--prompt", default_prompt, "--num_samples", "2", "--output_dir", str(tmp_path / "cli"), *STEPS,
             *_models(tiny_models), cwd=elsewhere, check=True)
    # the meta-bundle and the CLI are one code path: same settings, same files
    assert _files(tmp_path / "meta") == _files(tmp_path / "cli")


# ------------------------------------------------------------------------------------------------ bad input


def test_prompt_file_with_a_broken_row_reports_it_and_runs_the_others(tiny_models, tmp_path):
    prompts = tmp_path / "records.csv"
    prompts.write_text("age,sex,diagnosis,tumor_organ,tumor_count\n63,male,hepatocellular carcinoma,liver,2\n"
                       "abc,female,renal cell carcinoma,kidney,1\n70,female,pancreatic cancer,pancreas,1\n")
    result = guidegen("generate", "--prompts", str(prompts), "--output_dir", str(tmp_path / "out"), *STEPS, *_models(tiny_models), cwd=tmp_path)
    assert result.returncode == 1
    assert f"{prompts} line 3" in result.stderr and "'age'" in result.stderr
    prompts_written = [(tmp_path / "out" / s / "prompt.txt").read_text() for s in ("sample_00000", "sample_00001")]
    assert "63-year-old" in prompts_written[0] and "pancreatic cancer" in prompts_written[1]
    assert not (tmp_path / "out" / "sample_00002").exists()


@pytest.mark.parametrize(
    "content, message",
    [("", "no prompt to generate from"), ("# only a comment\n\n", "no prompt to generate from")],
)
def test_empty_prompt_list_is_refused_before_anything_is_written(tiny_models, tmp_path, content, message):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(content)
    result = guidegen("generate", "--prompts", str(prompts), "--output_dir", str(tmp_path / "out"), *STEPS, *_models(tiny_models))
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_mask_with_labels_outside_the_class_map_is_refused(tiny_models, tmp_path):
    labels = np.zeros((16, 16, 16), np.uint8)
    labels[2:5, 2:5, 2:5] = 42
    nib.save(nib.Nifti1Image(labels, np.eye(4)), str(tmp_path / "bad.nii.gz"))
    result = guidegen("generate", "--prompt", PROMPT, "--mask", str(tmp_path / "bad.nii.gz"), "--output_dir", str(tmp_path / "out"),
                      *STEPS, *_models(tiny_models))
    assert result.returncode == 2 and "labels 0..42" in result.stderr and "20 classes" in result.stderr
    assert not (tmp_path / "out").exists()


def test_unwritable_output_dir_is_refused(tiny_models, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        result = guidegen("generate", "--prompt", PROMPT, "--output_dir", str(locked / "out"), *STEPS, *_models(tiny_models))
    finally:
        locked.chmod(0o700)
    assert result.returncode == 2 and "not writable" in result.stderr
    file_in_the_way = tmp_path / "file"
    file_in_the_way.write_text("x")
    result = guidegen("generate", "--prompt", PROMPT, "--output_dir", str(file_in_the_way / "out"), *STEPS, *_models(tiny_models))
    assert result.returncode == 2 and "is a file, not a folder" in result.stderr


def test_unwritable_output_dir_message(tiny_models, tmp_path, monkeypatch, capsys):
    """The same check in-process, for machines where the tests run as root (who may write anywhere)."""
    from custom_components import cli
    from custom_components.runs import generate

    monkeypatch.setattr(generate.os, "access", lambda path, mode: False)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "--prompt", PROMPT, "--output_dir", str(tmp_path / "out"), *STEPS, *_models(tiny_models)])
    assert exit_info.value.code == 2
    assert f"{tmp_path} is not writable" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("problem", ["missing", "corrupt", "other_stage"])
def test_missing_or_corrupt_checkpoint_is_refused_before_anything_is_written(tiny_models, tmp_path, problem):
    models = {k: str(v) for k, v in tiny_models.items()}
    if problem == "missing":
        models["ldm"] = str(tmp_path / "nope.pt")
        expected = "not found"
    elif problem == "corrupt":
        corrupt = tmp_path / "corrupt.pt"
        corrupt.write_bytes(Path(models["ldm"]).read_bytes()[:1000])
        models["ldm"] = str(corrupt)
        expected = "cannot be read"
    else:
        models["tcss"] = models["autoencoder"]
        expected = "belongs to the 'autoencoder' stage"
    result = guidegen("generate", "--prompt", PROMPT, "--output_dir", str(tmp_path / "out"), *STEPS,
                      "--tcss_model", models["tcss"], "--ldm_model", models["ldm"], "--autoencoder_model", models["autoencoder"])
    assert result.returncode == 2, result.stderr[-2000:]
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_different_run_in_the_same_folder_is_refused(tiny_models, tmp_path):
    out = str(tmp_path / "out")
    guidegen("generate", "--prompt", PROMPT, "--output_dir", out, *STEPS, *_models(tiny_models), check=True)
    result = guidegen("generate", "--prompt", PROMPT, "--output_dir", out, "--seed", "5", *STEPS, *_models(tiny_models))
    assert result.returncode == 2 and "--overwrite true" in result.stderr
    guidegen("generate", "--prompt", PROMPT, "--output_dir", out, "--seed", "5", "--overwrite", "true", *STEPS, *_models(tiny_models), check=True)
    assert json.loads((tmp_path / "out/sample_00000/record.json").read_text())["seed"] == 5


def test_request_sources():
    requests, problems = load_requests(record={"age": 63, "sex": "m", "diagnosis": "hepatocellular carcinoma", "tumor_organ": "liver", "tumor_count": 2})
    assert problems == [] and requests[0].prompt.startswith("The patient is a 63-year-old male.") and "two tumors in the liver" in requests[0].prompt
    with pytest.raises(GuideGenInputError, match="exactly one of"):
        load_requests(prompt="x", record={"age": 3})
    with pytest.raises(GuideGenInputError, match="exactly one of"):
        load_requests()


def test_prompt_files_in_every_format(tmp_path):
    (tmp_path / "p.txt").write_text("# header comment\nfirst prompt\n\nsecond prompt\n")
    (tmp_path / "p.json").write_text(json.dumps({"prompts": ["a prompt", {"age": 40, "sex": "female"}, {"prompt": ""}, 7]}))
    # the records' CSV rules: a row of empty fields is skipped, one with more or fewer fields than the header refused
    (tmp_path / "p.csv").write_text('prompt,age\n"with, comma",\n,50\n,\nx,1,extra\nshort\n')
    txt, txt_problems = load_requests(prompts_file=tmp_path / "p.txt")
    assert [r.prompt for r in txt] == ["first prompt", "second prompt"] and txt_problems == []
    assert txt[1].source.endswith("line 4")
    js, js_problems = load_requests(prompts_file=tmp_path / "p.json")
    assert [r.prompt for r in js] == ["a prompt", "The patient is a 40-year-old female."]
    assert [p.split(": ")[0] for p in js_problems] == [f"{tmp_path / 'p.json'} item 2", f"{tmp_path / 'p.json'} item 3"]
    csv_requests, csv_problems = load_requests(prompts_file=tmp_path / "p.csv")
    assert [r.prompt for r in csv_requests] == ["with, comma", "The patient is a 50-year-old person."]
    assert [p.split(": ")[0] for p in csv_problems] == [f"{tmp_path / 'p.csv'} line 5", f"{tmp_path / 'p.csv'} line 6"]
    assert "3 fields but the header has 2" in csv_problems[0] and "1 fields but the header has 2" in csv_problems[1]
    with pytest.raises(GuideGenInputError, match=r"\.txt, \.csv or \.json"):
        (tmp_path / "p.yaml").write_text("x")
        load_requests(prompts_file=tmp_path / "p.yaml")


# ------------------------------------------------------------------------------------------------ synthesize


def test_synthesize_nnunet_with_two_workers_passes_nnunets_rules(tiny_models, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\nThe patient is a 70-year-old female. In this imaging, the patient's condition is described as pancreatic cancer.\n")
    out = tmp_path / "synthetic"
    guidegen("synthesize", "--prompts", str(prompts), "--num_samples", "2", "--format", "nnunet", "--output_dir", str(out),
             "--num_workers", "2", *STEPS, *_models(tiny_models), cwd=tmp_path, check=True)
    dataset = out / "nnUNet_raw" / "Dataset501_GuideGen"
    assert check_nnunet_raw_dataset(dataset) == []
    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["numTraining"] == 4 and meta["labels"]["background"] == 0 and meta["labels"]["tumor"] == 19
    assert sorted(p.name for p in (dataset / "labelsTr").iterdir()) == [f"sample_{k:05d}.nii.gz" for k in range(4)]
    # two workers (one thread each on 2 cores) made the same data set one process with one thread makes: no sample
    # duplicated, missed or seeded differently
    guidegen("generate", "--prompts", str(prompts), "--num_samples", "2", "--output_dir", str(tmp_path / "single"), *STEPS,
             *_models(tiny_models), cwd=tmp_path, check=True, threads=max(1, (os.cpu_count() or 1) // 2))
    assert _files(out / "samples") == _files(tmp_path / "single")
    # check_nnunet_raw_dataset has teeth: a label value outside dataset.json's labels is caught
    label = dataset / "labelsTr" / "sample_00000.nii.gz"
    image = nib.load(str(label))
    data = np.asarray(image.dataobj).copy()
    data[0, 0, 0] = 77
    nib.save(nib.Nifti1Image(data, image.affine), str(label))
    assert any("77" in problem for problem in check_nnunet_raw_dataset(dataset))


def test_synthesize_monai_datalist(tiny_models, tmp_path):
    from monai.data import load_decathlon_datalist

    out = tmp_path / "synthetic"
    guidegen("synthesize", "--prompt", PROMPT, "--num_samples", "2", "--format", "monai", "--output_dir", str(out), *STEPS,
             *_models(tiny_models), cwd=tmp_path, check=True)
    items = load_decathlon_datalist(str(out / "datalist.json"), data_list_key="training", base_dir=str(out))
    assert len(items) == 2
    for item in items:
        assert Path(item["image"]).is_file() and Path(item["label"]).is_file() and item["text"] == PROMPT
    assert (out / "class_map.json").is_file()


def test_synthesize_refuses_an_unknown_format(tiny_models, tmp_path):
    result = guidegen("synthesize", "--prompt", PROMPT, "--format", "dicom", "--output_dir", str(tmp_path / "out"), *_models(tiny_models))
    assert result.returncode == 2 and "nnunet, monai" in result.stderr
    assert not (tmp_path / "out").exists()


def test_synthesize_under_torchrun_splits_the_samples_between_ranks(tiny_models, tmp_path):
    from helpers_bundles import TORCHRUN_2

    out = tmp_path / "synthetic"
    result = subprocess.run([*TORCHRUN_2, "-m", "custom_components.cli", "synthesize", "--prompt", PROMPT, "--num_samples", "3",
                             "--format", "monai", "--output_dir", str(out), "--device", "cpu", *STEPS, *_models(tiny_models)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "worker 0/2" in result.stderr and "worker 1/2" in result.stderr
    # torchrun runs each rank with one thread (OMP_NUM_THREADS=1): so does the single-process reference
    guidegen("generate", "--prompt", PROMPT, "--num_samples", "3", "--output_dir", str(tmp_path / "single"), *STEPS,
             *_models(tiny_models), cwd=tmp_path, check=True, threads=1)
    assert _files(out / "samples") == _files(tmp_path / "single")
    assert len(json.loads((out / "datalist.json").read_text())["training"]) == 3


def test_chain_sources_are_checked_once_and_travel_to_worker_processes(tmp_path):
    """What the chain is loaded from is one typed, checked object: the device is resolved when it is made (not again
    per stage), fire's text values become numbers and yes/no, a copy for another rank is checked again, and it pickles
    for --num_workers' spawned processes."""
    import pickle

    import torch

    from custom_components.pipelines.text_to_pair import ChainSources

    chain = ChainSources(decode_tile="2", keep_models_loaded="true")
    assert chain.device == torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    assert chain.decode_tile == 2 and chain.keep_models_loaded is True and chain.with_tcss is True
    assert pickle.loads(pickle.dumps(chain)) == chain
    assert chain.replace(with_tcss=False).with_tcss is False and chain.with_tcss is True
    with pytest.raises(GuideGenInputError, match="--decode_tile 0"):
        chain.replace(decode_tile=0)
    with pytest.raises(GuideGenInputError, match="--device 'gpu9'"):
        ChainSources(device="gpu9")
    with pytest.raises(GuideGenInputError, match="--text_encoder_path"):
        ChainSources(text_encoder_path=str(tmp_path / "no_encoder"))
