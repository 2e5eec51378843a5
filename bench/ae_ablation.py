"""Stage II autoencoder against trivial baselines on a held-out real CT, with an ablation over seeds.

One run, side by side, on the same held-out case:

- ``pool4``: 4x average pooling + trilinear upsampling (64:1 compression, no learning, the floor to beat);
- ``constant``: the held-out CT's own mean everywhere;
- ``monai_aekl``: MONAI's stock ``AutoencoderKL`` (equal widths, x4, 4 latent channels, no attention), trained with
  the bundle's own training command, data, budget and seeds (only ``network_def`` differs);
- the variants of our autoencoder in :data:`VARIANTS`, each trained with the bundle's command
  (``train.yaml`` + ``train_cpu.yaml`` + the variant's overrides) for every seed.

Held-out data: ``ct_small.nii.gz`` of the shared TotalSegmentator example is slices 82-111 of the example CT
``ct.nii.gz``. Training uses the demo phantoms plus the example CT *cut to slices 0-81* (what ``guidegen demo-data``
ships), and ``ct_small`` (with its own TotalSegmentator v2 labels, prepared to 64x64x24) is the test case: same
patient, different anatomy (upper abdomen with the lung bases vs abdomen-pelvis), never trained on.
``--held_out_slices FIRST,STOP`` holds out another slab of the example CT instead (e.g. ``52,82``, the mid abdomen:
then the slices on both sides train, and the upper abdomen's organs, which lie only in slices 81-111, are seen in
training); its test case is those slices with the example CT's own TotalSegmentator v1 labels, prepared the same way.

``--shipped`` also scores the repository's demo autoencoder (``bundles/guidegen_autoencoder/models/model.pt``, made by
``scripts/train_demo.sh``, which holds ``ct_small`` out too) beside the baselines, without training it.

PSNR is computed per clinical window (lung, soft tissue, bone) with the window width as data range; MAE over the
volume. Per variant the JSON holds every seed, the median and the spread (max - min).

Usage (prints one JSON object; also written to <work_dir>/results.json; finished runs are reused):
    .venv/bin/python bench/ae_ablation.py --work_dir /tmp/ae_ablation --max_epochs 60 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from bundle_runs import train_bundle  # bench/ is on sys.path when a bench runs

REPO = Path(__file__).resolve().parents[1]
SHARED_EXAMPLE = REPO.parent / "shared" / "data" / "totalsegmentator_example"
TRAIN_CONFIGS = ["bundles/guidegen_autoencoder/configs/train.yaml", "bundles/guidegen_autoencoder/configs/train_cpu.yaml"]
# Overrides of the bundle's demo training config per variant; "default" is the config as shipped.
VARIANTS: dict[str, dict[str, object]] = {
    "default": {},
    "mask_pyramid": {"mask_input": True},
    "random_window": {"windows": "random", "full_range_weight": 0.0},
    "no_intensity_norm": {"architecture#intensity_shift": 0.0, "architecture#intensity_scale": 1.0},
    "paper": {
        "mask_input": True, "windows": "random", "full_range_weight": 0.0,
        "architecture#intensity_shift": 0.0, "architecture#intensity_scale": 1.0,
    },
    "monai_aekl": {},  # MONAI's AutoencoderKL in place of ours, see _aekl_config
}
BASELINES = ("pool4", "constant")
SHIPPED_MODEL = REPO / "bundles" / "guidegen_autoencoder" / "models" / "model.pt"
METRICS = ("psnr_lung", "psnr_soft_tissue", "psnr_bone", "mae_hu")


class HeldOut:
    """The held-out real case: the shared ``ct_small`` files (default), or a slab of the example CT (``--held_out_slices``).

    Attributes:
        ct, seg: its CT and TotalSegmentator segmentation files; ``ts_version``: that segmentation's class map.
        case_id: its name in datalists, results and previews.
        slices: ``(first, stop)`` of the example CT kept out of the training data.
    """

    def __init__(self, work_dir: Path, held_out_ct: Path, held_out_seg: Path, slices: tuple[int, int] | None) -> None:
        from custom_components.data.demo.example import HELD_OUT_SLICES, example_ct_files

        if slices is None:
            self.ct, self.seg, self.ts_version, self.case_id, self.slices = held_out_ct, held_out_seg, "v2", "ct_small", HELD_OUT_SLICES
            return
        first, stop = slices
        self.slices, self.ts_version, self.case_id = (first, stop), "v1", f"example_{first}_{stop - 1}"
        source = work_dir / "held_out_source"
        source.mkdir(parents=True, exist_ok=True)
        files = example_ct_files()
        self.ct, self.seg = source / f"{self.case_id}_ct.nii.gz", source / f"{self.case_id}_seg.nii.gz"
        for path, full in ((self.ct, files["image"]), (self.seg, files["segmentation"])):
            nib.save(nib.load(str(full)).slicer[:, :, first:stop], str(path))


def prepare_held_out_slab(work_dir: Path, held_out: HeldOut, output: Path, class_map: object = None) -> Path:
    """Prepare the held-out real CT at the demo's voxel size; returns its datalist.

    30 slices of 3 mm: z = 24 voxels gives about the example CT's z spacing in the demo data; x, y = 64 as in training.
    """
    from custom_components.data.prepare import PrepareSettings, prepare_dataset

    held_raw = work_dir / "held_out_raw"
    for kind, source in (("images", held_out.ct), ("segmentations", held_out.seg)):
        (held_raw / kind).mkdir(parents=True, exist_ok=True)
        for stale in (held_raw / kind).glob("*.nii.gz"):
            stale.unlink()
        shutil.copyfile(source, held_raw / kind / f"{held_out.case_id}.nii.gz")
    with open(held_raw / "records.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["case_id", "diagnosis", "tumor_count"], [held_out.case_id, "no abnormality", "0"]])
    settings = PrepareSettings(mask_size=(32, 32, 12), image_size=(64, 64, 24), val_fraction=0.0, ts_version=held_out.ts_version)
    report = prepare_dataset(
        held_raw / "images", held_raw / "segmentations", held_raw / "records.csv", output,
        class_map=class_map, settings=settings, progress=False,
    )  # fmt: skip
    if report.failed:
        raise SystemExit(f"held-out case failed to prepare: {report.failed}")
    return output / "datalist.json"


def build_data(work_dir: Path, held_out: HeldOut) -> tuple[Path, Path]:
    """The demo training data set (phantoms + the example CT without the held-out slices) and the held-out case."""
    from custom_components.data.demo.dataset import build_demo_dataset

    train_datalist = build_demo_dataset(work_dir / "train_data", val_fraction=0.0, progress=False, held_out_slices=held_out.slices)
    return Path(train_datalist), prepare_held_out_slab(work_dir, held_out, work_dir / "held_out_data")


def _aekl_config(work_dir: Path) -> Path:
    """A config override putting MONAI's AutoencoderKL (equal widths, no attention, no mask) in ``network_def``."""
    path = work_dir / "monai_aekl.yaml"
    path.write_text(
        "mask_input: false\n"
        "network_def:\n"
        "  _target_: monai.networks.nets.AutoencoderKL\n"
        "  spatial_dims: 3\n  in_channels: 1\n  out_channels: 1\n"
        "  channels: $@architecture['channels']\n"
        "  latent_channels: $@architecture['latent_channels']\n"
        "  num_res_blocks: $@architecture['num_res_blocks']\n"
        "  norm_num_groups: $@architecture['norm_num_groups']\n"
        "  attention_levels: [false, false, false]\n"
        "  with_encoder_nonlocal_attn: false\n  with_decoder_nonlocal_attn: false\n"
    )
    return path


def train(name: str, seed: int, args: argparse.Namespace, train_datalist: Path) -> tuple[Path, float]:
    """Train one variant with the bundle's command (skipped when an earlier run of this script finished it)."""
    configs = list(TRAIN_CONFIGS) + ([str(_aekl_config(args.work_dir))] if name == "monai_aekl" else [])
    return train_bundle(args.work_dir / name / f"seed{seed}", configs, train_datalist, args.max_epochs, seed, args.threads,
                        VARIANTS[name])


def reconstruct(name: str, model: Path, image_hu: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The held-out CT through one trained autoencoder (deterministic: the posterior mean), in HU."""
    import torch

    from custom_components.data.class_map import load_class_map
    from custom_components.data.intensity import hu_to_unit, unit_to_hu
    from custom_components.pipelines import AutoencoderPipeline, load_autoencoder

    if name != "monai_aekl":
        network = load_autoencoder(model, load_class_map())
        mask = labels if network.num_classes else None
        return AutoencoderPipeline(network, progress=False).reconstruct(image_hu, mask)
    from monai.networks.nets import AutoencoderKL

    from custom_components.networks.checkpoints import read_checkpoint_info, read_model_file

    architecture = read_checkpoint_info(model, stage="autoencoder")["architecture"]
    network = AutoencoderKL(
        spatial_dims=3, in_channels=1, out_channels=1, channels=architecture["channels"],
        latent_channels=architecture["latent_channels"], num_res_blocks=architecture["num_res_blocks"],
        norm_num_groups=architecture["norm_num_groups"], attention_levels=(False,) * len(architecture["channels"]),
        with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False,
    )  # fmt: skip
    network.load_state_dict(read_model_file(model)["model"])
    with torch.no_grad():
        image = hu_to_unit(torch.from_numpy(image_hu.astype(np.float32)))[None, None]
        return unit_to_hu(network.reconstruct(image).clamp(-1, 1))[0, 0].numpy()


def checkpoint_metrics(folder: Path, image_hu: np.ndarray, labels: np.ndarray) -> dict[int, dict[str, float]]:
    """Held-out metrics of every resumable checkpoint (``checkpoint_epoch=<n>.pt``) of one of our training runs.

    The trainer keeps the newest two, so run this while a long training proceeds to follow its course.
    """
    import re

    import torch

    from custom_components.data.class_map import load_class_map
    from custom_components.networks import network_from_info
    from custom_components.pipelines import AutoencoderPipeline, reconstruction_metrics

    found: dict[int, dict[str, float]] = {}
    for path in sorted(folder.glob("checkpoint_epoch=*.pt")):
        state = torch.load(path, map_location="cpu", weights_only=True)
        info = state["info"]
        network = network_from_info(info, load_class_map().num_classes)
        network.load_state_dict(state["network"])
        mask = labels if network.num_classes else None
        metrics = reconstruction_metrics(image_hu, AutoencoderPipeline(network.eval(), progress=False).reconstruct(image_hu, mask))
        epoch = int(re.search(r"epoch=(\d+)", path.name).group(1))
        found[epoch] = {metric: round(metrics[metric], 2) for metric in METRICS}
    return found


def baseline(name: str, image_hu: np.ndarray) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    if name == "constant":
        return np.full_like(image_hu, float(image_hu.mean()))
    volume = torch.from_numpy(image_hu.astype(np.float32))[None, None]
    pooled = F.avg_pool3d(volume, 4)
    return F.interpolate(pooled, size=image_hu.shape, mode="trilinear", align_corners=False)[0, 0].numpy()


def write_previews(folder: Path, image_hu: np.ndarray, spacing: tuple[float, float, float], rows: dict[str, np.ndarray]) -> list[Path]:
    """One PNG per window: a row per volume (the real CT first), axial / coronal / sagittal, the name on the left."""
    from custom_components.data.preview import render_preview
    from custom_components.data.writers import save_preview

    written = []
    for window_name, window in (("soft_tissue", (-160.0, 240.0)), ("lung", (-1000.0, 200.0))):
        panels = [render_preview(volume, None, 2, spacing=spacing, window=window, height=160) for volume in [image_hu, *rows.values()]]
        names = ["real CT (held out)", *rows]
        written.append(save_preview(labelled_rows(list(zip(names, panels)), label_width=150), folder / f"reconstruction_{window_name}.png"))
    return written


def labelled_rows(rows: list[tuple[str, "Image.Image"]], label_width: int) -> "Image.Image":
    """Preview panels stacked top to bottom on white, each with its name in a column on the left."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", (label_width + max(panel.width for _, panel in rows), sum(panel.height + 4 for _, panel in rows)), "white")
    draw = ImageDraw.Draw(canvas)
    top = 0
    for name, panel in rows:
        canvas.paste(panel, (label_width, top))
        draw.text((6, top + panel.height // 2 - 6), name, fill="black")
        top += panel.height + 4
    return canvas


def summarise(per_seed: dict[int, dict[str, float]]) -> dict[str, object]:
    summary: dict[str, object] = {"seeds": per_seed}
    for metric in METRICS:
        values = [run[metric] for run in per_seed.values()]
        summary[metric] = {
            "median": round(statistics.median(values), 2), "mean": round(statistics.mean(values), 2),
            "min": round(min(values), 2), "max": round(max(values), 2), "spread": round(max(values) - min(values), 2),
        }  # fmt: skip
    seconds = [run["train_seconds"] for run in per_seed.values() if "train_seconds" in run]
    if seconds:
        summary["train_seconds_median"] = round(statistics.median(seconds), 1)
    return summary


def markdown_table(output: dict[str, object]) -> str:
    """The results as a BENCHMARKS.md table: median [min, max] over seeds per window, and each model's margin over
    the pooling baseline in its worst window (medians)."""
    results = output["results"]
    pool = results["pool4"]
    rows = [
        "| model | PSNR lung (−1000…200) | PSNR soft tissue (−160…240) | PSNR bone (−200…1500) | MAE (HU) | worst window vs pool4 | training time (median) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, entry in results.items():
        if name in BASELINES or name == "shipped":  # one number each: no seeds
            cells = [f"{entry[m]:.2f}" for m in METRICS]
            margin, seconds = "—" if name == "pool4" else f"{min(entry[m] - pool[m] for m in METRICS[:3]):+.2f} dB", "—"
        else:
            cells = [f"{entry[m]['median']:.2f} [{entry[m]['min']:.2f}, {entry[m]['max']:.2f}]" for m in METRICS]
            margin = f"{min(entry[m]['median'] - pool[m] for m in METRICS[:3]):+.2f} dB"
            seconds = f"{entry.get('train_seconds_median', 0) / 60:.1f} min"
        rows.append(f"| `{name}` | " + " | ".join(cells) + f" | {margin} | {seconds} |")
    return "\n".join(rows)


def check_held_out_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--held_out_slices`` parsed to ``(first, stop)`` inside the example CT (as ``guidegen demo-data`` does), or the
    held-out files present; ``--shipped`` (the demo weights, trained without ``ct_small`` only) refuses another slab."""
    if getattr(args, "shipped", False) and args.held_out_slices is not None:
        parser.error("--shipped: the demo weights hold out ct_small (scripts/train_demo.sh), not --held_out_slices; drop one")
    if args.held_out_slices is not None:
        from custom_components.data.demo.example import parse_held_out_slices
        from custom_components.errors import GuideGenInputError

        try:
            args.held_out_slices = parse_held_out_slices(args.held_out_slices)
        except GuideGenInputError as err:
            parser.error(str(err))
        return
    for path in (args.held_out_ct, args.held_out_seg):
        if not path.is_file():
            parser.error(f"{path} not found: pass --held_out_ct/--held_out_seg")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", type=Path, default=Path("/tmp/ae_ablation"))
    parser.add_argument("--max_epochs", type=int, default=60, help="epochs per training run (budget, equal for all)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds; >= 3 for a result")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    parser.add_argument("--threads", type=int, default=2, help="threads per training run")
    parser.add_argument("--held_out_ct", type=Path, default=SHARED_EXAMPLE / "ct_small.nii.gz")
    parser.add_argument("--held_out_seg", type=Path, default=SHARED_EXAMPLE / "seg_small_total_v2.nii.gz")
    parser.add_argument("--held_out_slices", help="FIRST,STOP: hold out these slices of the example CT instead of ct_small (e.g. 52,82)")
    parser.add_argument("--previews", type=Path, help="also write PNGs of the held-out CT, pool4 and each variant's first seed here")
    parser.add_argument("--markdown", action="store_true", help="print <work_dir>/results.json as a table and exit")
    parser.add_argument("--shipped", action="store_true", help=f"also score the shipped demo autoencoder ({SHIPPED_MODEL.relative_to(REPO)})")
    parser.add_argument(
        "--checkpoints", action="store_true",
        help="evaluate the resumable checkpoints present for each variant and seed (a training in progress) and exit",
    )  # fmt: skip
    args = parser.parse_args()
    if args.markdown:
        print(markdown_table(json.loads((args.work_dir / "results.json").read_text())))
        return
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if unknown or not seeds or args.max_epochs < 1 or args.threads < 1:
        parser.error(f"unknown variants {unknown}" if unknown else "need >= 1 seed, --max_epochs >= 1, --threads >= 1")
    check_held_out_arguments(parser, args)
    args.work_dir = args.work_dir.resolve()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    held_out = HeldOut(args.work_dir, args.held_out_ct, args.held_out_seg, args.held_out_slices)

    from custom_components.data.datalist import load_datalist
    from custom_components.pipelines import reconstruction_metrics

    train_datalist, held_datalist = build_data(args.work_dir, held_out)
    case = load_datalist(held_datalist, splits=["training"])["training"][0]
    image_hu = nib.load(case["image"]).get_fdata().astype(np.float32)
    labels = np.asarray(nib.load(case["label"]).dataobj).astype(np.uint8)

    if args.checkpoints:
        by_run = {
            f"{name}/seed{seed}": checkpoint_metrics(args.work_dir / name / f"seed{seed}" / "models", image_hu, labels)
            for name in variants if name != "monai_aekl" for seed in seeds
        }  # fmt: skip
        print(json.dumps({"held_out": str(held_out.ct), "epochs": by_run}, indent=1))
        return
    results: dict[str, object] = {}
    previews: dict[str, np.ndarray] = {"pool4": baseline("pool4", image_hu)}
    for name in BASELINES:
        metrics = reconstruction_metrics(image_hu, baseline(name, image_hu))
        results[name] = {metric: round(metrics[metric], 2) for metric in METRICS}
    if args.shipped:
        reconstruction = reconstruct("default", SHIPPED_MODEL, image_hu, labels)
        previews["shipped demo weights"] = reconstruction
        metrics = reconstruction_metrics(image_hu, reconstruction)
        results["shipped"] = {metric: round(metrics[metric], 2) for metric in METRICS}
    for name in variants:
        per_seed: dict[int, dict[str, float]] = {}
        for seed in seeds:
            model, seconds = train(name, seed, args, train_datalist)
            reconstruction = reconstruct(name, model, image_hu, labels)
            if seed == seeds[0]:
                previews[f"{name} (seed {seed})"] = reconstruction
            metrics = reconstruction_metrics(image_hu, reconstruction)
            per_seed[seed] = {**{metric: round(metrics[metric], 2) for metric in METRICS}, "train_seconds": round(seconds, 1)}
            print(f"[ae_ablation] {name} seed {seed}: {per_seed[seed]}", file=sys.stderr, flush=True)
        results[name] = summarise(per_seed)
    output = {
        "max_epochs": args.max_epochs, "seeds": seeds, "held_out": str(held_out.ct), "held_out_slices": list(held_out.slices),
        "held_out_shape": list(image_hu.shape), "results": results,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }  # fmt: skip
    (args.work_dir / "results.json").write_text(json.dumps(output, indent=1))
    if args.previews is not None:
        spacing = tuple(float(v) for v in nib.load(case["image"]).header.get_zooms()[:3])
        for path in write_previews(args.previews, image_hu, spacing, previews):
            print(f"[ae_ablation] preview {path}", file=sys.stderr)
    print(json.dumps(output, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
