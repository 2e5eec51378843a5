"""Autoencoder ablation on CPU (paper Tab. 7 analog): PSNR of a held-out real CT in three windows.

Four variants of the stage II autoencoder are trained with the bundle's own command on the same data --
with/without the random HDR window in the loss (``hdr``) and with/without the mask pyramid (``mask_input``) --
and each reconstructs a real CT that none of them saw.

Held-out data: ``ct_small.nii.gz`` of the shared TotalSegmentator example is slices 82-111 of the example CT
``ct.nii.gz``, which the demo data set uses for training. So the training set here is the demo phantoms plus
the example CT *cut to slices 0-81*, and ``ct_small`` (with its own TotalSegmentator v2 labels) is the test
case: same patient, different anatomy (upper abdomen vs pelvis), never trained on.

Usage (prints one JSON object; results also in <work_dir>/results.json):
    .venv/bin/python bench/ae_ablation.py --work_dir /tmp/ae_ablation --max_epochs 40
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED_EXAMPLE = REPO.parent / "shared" / "data" / "totalsegmentator_example"
VARIANTS = {
    "hdr_mask": {"hdr": True, "mask_input": True},
    "hdr_nomask": {"hdr": True, "mask_input": False},
    "nohdr_mask": {"hdr": False, "mask_input": True},
    "nohdr_nomask": {"hdr": False, "mask_input": False},
}
HELD_OUT_FIRST_SLICE = 82


def build_data(work_dir: Path, held_out_ct: Path, held_out_seg: Path) -> tuple[Path, Path]:
    """Training data set (phantoms + example CT without the held-out slices) and the held-out data set."""
    from custom_components.data.demo import build_demo_dataset
    from custom_components.data.example import example_ct_files
    from custom_components.data.prepare import PrepareSettings, prepare_dataset

    phantoms = work_dir / "phantoms"
    build_demo_dataset(phantoms, include_example_ct=False)
    raw = phantoms / "raw"
    example = example_ct_files()
    for kind, source in (("images", example["image"]), ("segmentations", example["segmentation"])):
        image = nib.load(str(source))
        cut = image.slicer[:, :, :HELD_OUT_FIRST_SLICE]
        nib.save(cut, str(raw / kind / "example_top.nii.gz"))
    with open(raw / "records.csv") as handle:
        rows = list(csv.DictReader(handle))
    rows = [r for r in rows if r["case_id"] != "example_top"] + [{"case_id": "example_top", "diagnosis": "no abnormality", "tumor_count": "0"}]
    with open(raw / "records.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)
    train = work_dir / "train_data"
    settings = PrepareSettings(mask_size=32, image_size=64, val_fraction=0.0, seed=0, ts_version="v1")
    report = prepare_dataset(raw / "images", raw / "segmentations", raw / "records.csv", train, raw / "tumors", None, settings, progress=False)
    if report.failed:
        raise SystemExit(f"training data failed to prepare: {report.failed}")

    held_raw = work_dir / "held_out_raw"
    for kind, source in (("images", held_out_ct), ("segmentations", held_out_seg)):
        (held_raw / kind).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, held_raw / kind / "ct_small.nii.gz")
    (held_raw / "records.csv").write_text("case_id,diagnosis,tumor_count\nct_small,no abnormality,0\n")
    held = work_dir / "held_out_data"
    # 30 slices of 3 mm: z = 24 voxels gives about the training data's z spacing (3.8 mm); x, y = 64 as in training.
    settings = PrepareSettings(mask_size=(32, 32, 12), image_size=(64, 64, 24), val_fraction=0.0, ts_version="v2")
    report = prepare_dataset(held_raw / "images", held_raw / "segmentations", held_raw / "records.csv", held, None, None, settings, progress=False)
    if report.failed:
        raise SystemExit(f"held-out case failed to prepare: {report.failed}")
    return train / "datalist.json", held / "datalist.json"


def run_bundle(args: list[str], log: Path) -> float:
    start = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle:
        result = subprocess.run([sys.executable, "-m", "monai.bundle", "run", *args], cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode:
        raise SystemExit(f"bundle command failed (exit {result.returncode}); see {log}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", type=Path, default=Path("/tmp/ae_ablation"))
    parser.add_argument("--max_epochs", type=int, default=40)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    parser.add_argument("--held_out_ct", type=Path, default=SHARED_EXAMPLE / "ct_small.nii.gz")
    parser.add_argument("--held_out_seg", type=Path, default=SHARED_EXAMPLE / "seg_small_total_v2.nii.gz")
    args = parser.parse_args()
    work_dir = args.work_dir.resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    train_datalist, held_datalist = build_data(work_dir, args.held_out_ct, args.held_out_seg)
    configs = "['bundles/guidegen_autoencoder/configs/train.yaml','bundles/guidegen_autoencoder/configs/train_cpu.yaml']"
    results: dict[str, dict] = {}
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        flags = VARIANTS[name]
        folder = work_dir / name
        timing = folder / "train_seconds.txt"
        if (folder / "models" / "model.pt").is_file() and timing.is_file():
            seconds = float(timing.read_text())  # finished in an earlier run of this script
        else:
            train_args = [
                "training", "--config_file", configs, "--datalist", str(train_datalist),
                "--ckpt_dir", str(folder / "models"), "--output_dir", str(folder / "outputs"),
                "--max_epochs", str(args.max_epochs), "--hdr", str(flags["hdr"]), "--mask_input", str(flags["mask_input"]),
            ]
            seconds = run_bundle(train_args, folder / "train.log")
            timing.write_text(f"{seconds:.1f}\n")
        run_bundle(
            [
                "inference", "--config_file", "bundles/guidegen_autoencoder/configs/inference.yaml",
                "--model_path", str(folder / "models" / "model.pt"), "--datalist", str(held_datalist),
                "--split", "training", "--output_dir", str(folder / "held_out"), "--progress", "False",
            ],
            folder / "inference.log",
        )
        summary = json.loads((folder / "held_out" / "metrics.json").read_text())
        results[name] = {**flags, "train_seconds": round(seconds, 1), **{k: round(v, 2) for k, v in summary["mean"].items()}}
    output = {"max_epochs": args.max_epochs, "held_out": str(args.held_out_ct), "variants": results}
    (work_dir / "results.json").write_text(json.dumps(output, indent=1))
    print(json.dumps(output, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
