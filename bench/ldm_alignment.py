"""Image-mask alignment of the latent generator on the demo phantoms (paper Tab. 3 analog, without a segmenter).

For every case of a datalist split, the latent generator + autoencoder turn the case's mask and prompt into a CT
(the bundle's own inference command). Organs are then recovered from the generated CT by the HU band each class has
in the phantoms (interquartile range of the training CTs' voxels of that class), and compared with the input mask by
Dice. The phantoms' organs overlap in HU (liver 60, spleen 50, pancreas 45, muscle 50 HU), so HU bands cannot
separate every organ even on the real phantom CT: the same recovery applied to the real CT of the case is reported
beside it as the ceiling of the method.

Usage (prints JSON; writes <output_dir>/alignment.json and alignment.md):
    .venv/bin/python bench/ldm_alignment.py --model_path bundles/guidegen_ldm/models/model.pt \
        --autoencoder_path bundles/guidegen_autoencoder/models/model.pt --datalist demo/datalist.json --output_dir /tmp/align
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]


def on_grid(labels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour resampling of a label volume to another grid over the same field of view."""
    tensor = torch.as_tensor(labels.astype(np.float32))[None, None]
    return F.interpolate(tensor, size=shape, mode="nearest")[0, 0].numpy().astype(np.int64)


def hu_bands(items: list[dict], num_classes: int) -> dict[int, tuple[float, float]]:
    """Per class, the interquartile HU range of its voxels in the given (real) CTs."""
    values: dict[int, list[np.ndarray]] = {c: [] for c in range(1, num_classes)}
    for item in items:
        ct = np.asarray(nib.load(item["image"]).dataobj, dtype=np.float32)
        labels = on_grid(np.asarray(nib.load(item["label"]).dataobj), ct.shape)
        for c in values:
            values[c].append(ct[labels == c])
    bands = {}
    for c, chunks in values.items():
        data = np.concatenate(chunks) if chunks else np.empty(0)
        if data.size >= 20:
            bands[c] = (float(np.percentile(data, 25)), float(np.percentile(data, 75)))
    return bands


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float(2.0 * np.logical_and(a, b).sum() / total) if total else float("nan")


def case_dice(ct: np.ndarray, labels: np.ndarray, bands: dict[int, tuple[float, float]]) -> dict[int, float]:
    body = labels > 0
    return {c: dice(labels == c, body & (ct >= lo) & (ct <= hi)) for c, (lo, hi) in bands.items() if (labels == c).any()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", required=True)
    parser.add_argument("--autoencoder_path", required=True)
    parser.add_argument("--datalist", default=str(REPO / "demo" / "datalist.json"))
    parser.add_argument("--split", default="validation")
    parser.add_argument("--output_dir", type=Path, default=Path("/tmp/ldm_alignment"))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance_scale", type=float, default=1.0)
    parser.add_argument("--skip_generation", action="store_true", help="reuse CTs already in output_dir")
    args = parser.parse_args()

    from custom_components.data.datalist import load_datalist

    data = load_datalist(args.datalist, splits=["training", args.split])
    class_names = data["class_map"].class_names
    if not args.skip_generation:
        command = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file",
                   str(REPO / "bundles/guidegen_ldm/configs/inference.yaml"), "--model_path", args.model_path,
                   "--autoencoder_path", args.autoencoder_path, "--datalist", args.datalist, "--split", args.split,
                   "--output_dir", str(args.output_dir), "--num_inference_steps", str(args.steps),
                   "--guidance_scale", str(args.guidance_scale)]
        subprocess.run(command, check=True)
    phantoms = [item for item in data["training"] if str(item["case_id"]).startswith("phantom")]
    bands = hu_bands(phantoms, len(class_names))
    per_case = {}
    for item in data[args.split]:
        folder = args.output_dir / str(item["case_id"])
        generated = np.asarray(nib.load(str(folder / "ct.nii.gz")).dataobj, dtype=np.float32)
        real = np.asarray(nib.load(item["image"]).dataobj, dtype=np.float32)
        labels = on_grid(np.asarray(nib.load(item["label"]).dataobj), generated.shape)
        per_case[item["case_id"]] = {
            "generated": case_dice(generated, labels, bands),
            "real_ct_ceiling": case_dice(on_grid(real, generated.shape) if real.shape != generated.shape else real, labels, bands),
        }
    classes = sorted({c for case in per_case.values() for c in case["generated"]})
    summary = {}
    for c in classes:
        gen = [case["generated"][c] for case in per_case.values() if c in case["generated"]]
        ceiling = [case["real_ct_ceiling"][c] for case in per_case.values() if c in case["real_ct_ceiling"]]
        summary[class_names[c]] = {"hu_band": [round(v, 1) for v in bands[c]], "dice_generated": round(float(np.nanmean(gen)), 3),
                                   "dice_real_ct": round(float(np.nanmean(ceiling)), 3)}
    result = {"split": args.split, "cases": list(per_case), "steps": args.steps, "guidance_scale": args.guidance_scale,
              "organs": summary,
              "mean_dice_generated": round(float(np.nanmean([v["dice_generated"] for v in summary.values()])), 3),
              "mean_dice_real_ct": round(float(np.nanmean([v["dice_real_ct"] for v in summary.values()])), 3)}
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "alignment.json").write_text(json.dumps(result, indent=1))
    lines = ["| organ | HU band | Dice, generated CT | Dice, real CT (ceiling) |", "| --- | --- | --- | --- |"]
    lines += [f"| {name} | {v['hu_band'][0]:.0f}..{v['hu_band'][1]:.0f} | {v['dice_generated']:.3f} | {v['dice_real_ct']:.3f} |"
              for name, v in summary.items()]
    lines.append(f"| **mean** | | {result['mean_dice_generated']:.3f} | {result['mean_dice_real_ct']:.3f} |")
    (args.output_dir / "alignment.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
