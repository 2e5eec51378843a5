"""`guidegen evaluate` on the output of `guidegen synthesize` / `generate`, at tiny size, with known answers.

The reference set is the generated set itself (a MONAI datalist written by `synthesize --format monai`), so realism
metrics must be ~0 and, with the generated masks as "segmentations", image–mask Dice must be 1.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from custom_components.metrics.evaluate import evaluate_run
from custom_components.errors import GuideGenInputError
from custom_components.runs.untrained import write_untrained_models

from test_feature_metrics import _variance_preserving
from test_generate import STEPS, TINY, _models, guidegen

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ("age,sex,diagnosis,tumor_organ,tumor_count\n63,male,hepatocellular carcinoma,liver,1\n"
           "70,female,pancreatic cancer,pancreas,2\n")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return write_untrained_models(tmp_path_factory.mktemp("models"), mask_size=(16, 16, 16), image_size=(32, 32, 32),
                                  architectures=TINY, mask_spacing_mm=(6.0, 6.0, 6.0))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory, models) -> Path:
    root = tmp_path_factory.mktemp("evaluate")
    (root / "records.csv").write_text(RECORDS)
    result = subprocess.run([sys.executable, "-m", "custom_components.cli", "synthesize", "--prompts", str(root / "records.csv"),
                             "--num_samples", "2", "--format", "monai", "--output_dir", str(root / "synthetic"),
                             "--tcss_steps", "2", "--ldm_steps", "2", *_models(models)],
                            cwd=root, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "synthetic"


@pytest.fixture(scope="module")
def feature_weights(tmp_path_factory) -> dict[str, str]:
    from torchvision.models import inception_v3

    from custom_components.networks.i3d import InceptionI3d

    root = tmp_path_factory.mktemp("weights")
    torch.save(_variance_preserving(inception_v3(weights=None, aux_logits=False, init_weights=False)).state_dict(), root / "inception.pth")
    torch.save(_variance_preserving(InceptionI3d()).state_dict(), root / "i3d.pt")
    return {"inception": str(root / "inception.pth"), "i3d": str(root / "i3d.pt"), "vgg": str(root / "missing_vgg.pth")}


def test_missing_weights_report_unavailable_instead_of_a_number(synthetic, tmp_path):
    missing = {"inception": str(tmp_path / "no_inception.pth"), "i3d": str(tmp_path / "no_i3d.pt"), "vgg": None}
    metrics = evaluate_run(synthetic, synthetic / "datalist.json", tmp_path / "eval", split="training", weights=missing,
                           slices_per_axis=3, frame_size=64, log_to_mlflow=False)
    for key in ("fid", "fvd"):
        assert isinstance(metrics["realism"][key], str) and "unavailable" in metrics["realism"][key] and "put" in metrics["realism"][key]
    assert "unavailable" in (tmp_path / "eval/metrics.md").read_text()


def test_segmentations_of_the_generated_cts_give_dice_per_organ(synthetic, tmp_path):
    segmentations = tmp_path / "seg"
    segmentations.mkdir()
    generated = tmp_path / "generated"
    shutil.copytree(synthetic / "samples", generated)
    samples = sorted(generated.glob("sample_*"))
    for sample in samples:  # untrained models draw near-constant masks: give each sample organs, then segment perfectly
        image = nib.load(str(sample / "mask.nii.gz"))
        labels = np.zeros(image.shape, np.uint8)
        labels[4:20, 4:20, 4:20], labels[8:14, 8:14, 8:14], labels[20:28, 4:12, 4:28] = 4, 9, 18
        nib.save(nib.Nifti1Image(labels, image.affine), str(sample / "mask.nii.gz"))
        shutil.copy(sample / "mask.nii.gz", segmentations / f"{sample.name}.nii.gz")
    metrics = evaluate_run(generated, synthetic / "datalist.json", tmp_path / "eval", split="training", segmentations_dir=str(segmentations),
                           ts_version="guidegen", weights={"inception": str(tmp_path / "x"), "i3d": str(tmp_path / "y")},
                           log_to_mlflow=False)
    assert metrics["image_mask"]["mean_dice"] == pytest.approx(1.0)
    assert metrics["image_mask"]["mean_hd95_mm"] == pytest.approx(0.0)
    assert set(k for k, v in metrics["image_mask"]["per_organ"].items() if v["dice"] is not None) == {"liver", "pancreas", "bone"}
    assert (tmp_path / "eval/dice_per_organ.png").is_file()
    # a segmenter that misses every organ scores 0 (the known answer above is not a constant)
    for sample in samples:
        image = nib.load(str(segmentations / f"{sample.name}.nii.gz"))
        nib.save(nib.Nifti1Image(np.zeros(image.shape, np.uint8), image.affine), str(segmentations / f"{sample.name}.nii.gz"))
    metrics = evaluate_run(generated, synthetic / "datalist.json", tmp_path / "eval2", split="training", segmentations_dir=str(segmentations),
                           ts_version="guidegen", weights={"inception": str(tmp_path / "x"), "i3d": str(tmp_path / "y")},
                           log_to_mlflow=False)
    assert metrics["image_mask"]["mean_dice"] == pytest.approx(0.0)


def test_tumor_location_confusion_is_drawn(synthetic, tmp_path):
    sample = synthetic / "samples" / "sample_00000"
    native = nib.load(str(sample / "mask_native.nii.gz"))
    labels = np.zeros(native.shape, np.uint8)
    labels[2:10, 2:10, 2:10] = 9  # pancreas
    labels[4:6, 4:6, 4:6] = 19  # a tumor inside it, while the record names the liver
    copy = tmp_path / "generated"
    shutil.copytree(synthetic / "samples", copy)
    nib.save(nib.Nifti1Image(labels, native.affine), str(copy / "sample_00000" / "mask_native.nii.gz"))
    metrics = evaluate_run(copy, synthetic / "datalist.json", tmp_path / "eval", split="training",
                           weights={"inception": str(tmp_path / "x"), "i3d": str(tmp_path / "y")}, log_to_mlflow=False)
    confusion = {(e["named"], e["found"]): e["count"] for e in metrics["mask_prompt"]["confusion"]}
    assert confusion[("liver", "pancreas")] >= 1
    assert (tmp_path / "eval/tumor_location_confusion.png").is_file()


def test_bad_input(synthetic, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(GuideGenInputError, match="no generated samples"):
        evaluate_run(tmp_path / "empty", synthetic / "datalist.json", tmp_path / "eval", split="training")
    # generated CTs at another spacing: refused with the fix, or resampled when asked
    copy = tmp_path / "coarse"
    shutil.copytree(synthetic / "samples", copy)
    for ct_path in copy.glob("sample_*/ct.nii.gz"):
        image = nib.load(str(ct_path))
        affine = image.affine.copy()
        affine[:3, :3] *= 2
        nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[::2, ::2, ::2], affine), str(ct_path))
    with pytest.raises(GuideGenInputError, match="--resample true"):
        evaluate_run(copy, synthetic / "datalist.json", tmp_path / "eval", split="training", log_to_mlflow=False)
    metrics = evaluate_run(copy, synthetic / "datalist.json", tmp_path / "eval", split="training", resample=True, log_to_mlflow=False,
                           weights={"inception": str(tmp_path / "x"), "i3d": str(tmp_path / "y")})
    assert metrics["num_generated"] == 4


def test_wrong_architecture_weights_are_refused(synthetic, feature_weights, tmp_path):
    wrong = {"inception": feature_weights["i3d"], "i3d": feature_weights["i3d"], "vgg": None}
    with pytest.raises(GuideGenInputError, match="not Inception-v3"):
        evaluate_run(synthetic, synthetic / "datalist.json", tmp_path / "eval", split="training", weights=wrong, log_to_mlflow=False)


def test_cli_evaluate_on_synthesize_output_scores_identical_sets_zero(synthetic, feature_weights, tmp_path):
    """`guidegen evaluate` end to end: the reference is the generated set itself, so FID and FVD are ~0."""
    result = subprocess.run([sys.executable, "-m", "custom_components.cli", "evaluate", "--generated", str(synthetic),
                             "--reference", str(synthetic / "datalist.json"), "--split", "training", "--output_dir", str(tmp_path / "eval"),
                             "--inception_weights", feature_weights["inception"], "--i3d_weights", feature_weights["i3d"],
                             "--slices_per_axis", "2", "--frame_size", "32"],
                            capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| FID (slices, mean of 3 axes) |" in result.stderr
    metrics = json.loads((tmp_path / "eval/metrics.json").read_text())
    assert metrics["num_generated"] == metrics["num_reference"] == 4
    assert abs(metrics["realism"]["fid"]["mean"]) < 1e-2 and abs(metrics["realism"]["fvd"]) < 1e-2
    assert metrics["realism"]["lpips"].startswith("unavailable: LPIPS compares paired volumes")
    assert metrics["image_mask"]["unavailable"].startswith("segment the generated CTs")
    assert metrics["mask_prompt"]["cases"] == 4 and 0.0 <= metrics["mask_prompt"]["tumor_count_accuracy"] <= 1.0
    for name in ("metrics.md", "montage_axial.png"):
        assert (tmp_path / "eval" / name).is_file(), name
    with sqlite3.connect(tmp_path / "eval/mlruns.db") as db:
        logged = {row[0] for row in db.execute("select key from metrics")}
    assert "realism.fid.mean" in logged and "mask_prompt.tumor_count_accuracy" in logged


def test_cli_evaluate_on_generate_output(synthetic, models, feature_weights, tmp_path):
    """`guidegen evaluate` on a `guidegen generate` run folder (sample_* directly under it, no datalist of its own)."""
    prompt = ("The patient is a 63-year-old White male. In this imaging, the patient's condition is described as "
              "hepatocellular carcinoma, with a tumor in the liver.")
    guidegen("generate", "--prompt", prompt, "--num_samples", "2", "--output_dir", str(tmp_path / "generated"), *STEPS,
             *_models(models), cwd=tmp_path, check=True)
    assert not (tmp_path / "generated" / "samples").exists()
    result = subprocess.run([sys.executable, "-m", "custom_components.cli", "evaluate", "--generated", str(tmp_path / "generated"),
                             "--reference", str(synthetic / "datalist.json"), "--split", "training", "--output_dir", str(tmp_path / "eval"),
                             "--inception_weights", feature_weights["inception"], "--i3d_weights", feature_weights["i3d"],
                             "--slices_per_axis", "2", "--frame_size", "32", "--mlflow", "false"],
                            capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval/metrics.json").read_text())
    assert metrics["num_generated"] == 2 and metrics["num_reference"] == 4
    assert np.isfinite(metrics["realism"]["fid"]["mean"]) and metrics["realism"]["fid"]["mean"] >= 0.0
    assert np.isfinite(metrics["realism"]["fvd"]) and metrics["realism"]["fvd"] >= 0.0
    # the prompt's fields ("a tumor in the liver") were read at generation, so the tumor accuracies are computed
    assert metrics["mask_prompt"]["cases"] == 2 and 0.0 <= metrics["mask_prompt"]["tumor_count_accuracy"] <= 1.0
    assert (tmp_path / "eval/metrics.md").is_file() and (tmp_path / "eval/montage_axial.png").is_file()
    assert not (tmp_path / "eval/mlruns.db").exists()  # --mlflow false is honoured (fire passes it as the string "false")


def test_evaluate_without_a_reference_scores_alignment_and_reads_prompts_without_records(synthetic, tmp_path):
    """No --reference: realism metrics say why they are missing; tumor accuracies come from records or prompts."""
    copy = tmp_path / "generated"
    shutil.copytree(synthetic / "samples", copy)
    # a sample of an older run made from free text: no record stored, only the prompt as given
    record_file = copy / "sample_00000" / "record.json"
    sample_record = json.loads(record_file.read_text())
    sample_record.update(record={}, prompt="70 yo woman, 2 tumours in the pancreas, pancreatic ca")
    sample_record.pop("given_prompt", None)
    record_file.write_text(json.dumps(sample_record))
    native = nib.load(str(copy / "sample_00000" / "mask_native.nii.gz"))
    labels = np.zeros(native.shape, np.uint8)
    labels[2:12, 2:12, 2:12] = 9  # pancreas holding two separate tumors: count and location right
    labels[3:5, 3:5, 3:5] = labels[8:10, 8:10, 8:10] = 19
    nib.save(nib.Nifti1Image(labels, native.affine), str(copy / "sample_00000" / "mask_native.nii.gz"))
    metrics = evaluate_run(copy, None, tmp_path / "eval", log_to_mlflow=False)
    assert metrics["reference"] is None and metrics["num_reference"] == 0
    for name in ("fid", "fvd", "lpips"):
        assert metrics["realism"][name].startswith("unavailable") and "--reference" in metrics["realism"][name]
    assert metrics["mask_prompt"]["cases"] == 4 and metrics["mask_prompt"]["records_read_from_prompts"] == 1
    confusion = {(e["named"], e["found"]): e["count"] for e in metrics["mask_prompt"]["confusion"]}
    assert confusion[("pancreas", "pancreas")] == 2
    assert "none (realism metrics need --reference)" in (tmp_path / "eval/metrics.md").read_text()
    assert (tmp_path / "eval/montage_axial.png").is_file()


def test_cli_evaluate_without_reference(synthetic, tmp_path):
    result = subprocess.run([sys.executable, "-m", "custom_components.cli", "evaluate", "--generated", str(synthetic),
                             "--output_dir", str(tmp_path / "eval"), "--mlflow", "false"],
                            capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| tumor count accuracy |" in result.stderr
    metrics = json.loads((tmp_path / "eval/metrics.json").read_text())
    assert metrics["mask_prompt"]["cases"] == 4 and metrics["realism"]["fid"].startswith("unavailable")
