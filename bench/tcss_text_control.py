"""Text control of stage 1 (TCSS) on records it never saw: does the prompt place the tumors? (issue 15)

Trains TCSS variants with the bundle's own command (``train.yaml`` + ``train_cpu.yaml`` + the variant's overrides) on a
text-control data set -- many phantoms whose tumors follow their records, e.g.
``guidegen demo-data --output_dir /tmp/tc300 --num_phantoms 300 --include_example_ct false`` (240 training, 60
validation records) -- then samples every trained model, side by side in one run, at each ``--guidance`` scale
(1 = the paper's sampler; 0 = the model's unconditional branch, i.e. the same network not reading the prompt: the
baseline every score is read against):

- **steering prompts**: one patient description with the tumor organ swapped through every organ the training
  records hold (same count, size and stage), plus the same patient with no tumor; ``--samples`` seeds each;
- **held-out records**: the data set's validation records (never trained on), the first ``--max_records``, one
  sample each.

Scores (:func:`custom_components.metrics.alignment.tumor_alignment`, paper Fig. 3b; components by 26-connectivity,
a component's organ is the organ it borders most):

- ``location_accuracy``: share of samples with a tumor whose every component lies in the named organ;
- ``count_accuracy``: share of tumor-naming samples with as many components as the prompt states;
- ``tumor_drawn``: share of tumor-naming samples with at least one tumor component;
- ``no_tumor_rate``: share of healthy prompts' samples without any tumor voxel;
- ``steering_ratio``: mean L1 distance between the tumor-location histograms (organ shares of the tumor
  components) of samples of *different* steering prompts over that of samples of the *same* prompt (samples without
  a tumor count as an all-"none" histogram); ~1 when the prompt does not matter;
- ``held_out_labels``: the same scores for the held-out cases' own labels (the ceiling at this mask size: tumors
  smaller than a voxel vanish and touching ones merge when the phantoms are resampled);
- ``healthy_layout_l1``: L1 distance between the mean class-fraction vector of healthy prompts' samples and the
  training masks' mean (the class layout must not drift).

``--ceiling`` prints the same scores for every case's own label (what a perfect model could reach at the data set's
mask size) and exits.

Writes ``<work_dir>/results.json`` and, with ``--previews DIR``, one confusion matrix PNG per variant (prompted organ
vs organ found, first seed, guidance 1 and the largest scale).

Usage (prints one JSON object; finished trainings are reused, unfinished ones resumed):
    .venv/bin/python bench/tcss_text_control.py --datalist /tmp/tc300/datalist.json --work_dir /tmp/tc_runs \\
        --variants tumor10 --seeds 0 --max_epochs 9 --guidance 0,1,3
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from bundle_runs import train_bundle  # bench/ is on sys.path when a bench runs

REPO = Path(__file__).resolve().parents[1]
TRAIN_CONFIGS = ("bundles/guidegen_tcss/configs/train.yaml", "bundles/guidegen_tcss/configs/train_cpu.yaml")

VARIANTS: Mapping[str, Mapping[str, Any]] = {
    "default": {},  # train_cpu.yaml as shipped
    "paper": {"text_dropout": 0.0, "tumor_loss_weight": 1.0, "aux_ce_weight": 0.0},
    "tumor10": {"tumor_loss_weight": 10.0},
    "tumor10_organ1": {"tumor_loss_weight": 10.0, "tumor_organ_loss_weight": 1.0},
    "tumor10_organ03": {"tumor_loss_weight": 10.0, "tumor_organ_loss_weight": 0.3},
    "organ1_volume1": {"tumor_organ_loss_weight": 1.0, "tumor_volume_loss_weight": 1.0},
    "tumor10_organ1_volume1": {"tumor_loss_weight": 10.0, "tumor_organ_loss_weight": 1.0, "tumor_volume_loss_weight": 1.0},
    "tumor10_organ10_volume1": {"tumor_loss_weight": 10.0, "tumor_organ_loss_weight": 10.0, "tumor_volume_loss_weight": 1.0},
    "tumor10_organ1_volume01": {"tumor_loss_weight": 10.0, "tumor_organ_loss_weight": 1.0, "tumor_volume_loss_weight": 0.1},
}
"""Overrides of ``train.yaml`` + ``train_cpu.yaml`` per variant."""

STEERING_PATIENT = {"age": 60, "sex": "female", "race": "White", "tumor_count": 2, "tumor_size_mm": 35.0, "stage": "II"}


def train(name: str, seed: int, args: argparse.Namespace) -> Path:
    """Train (or resume, or reuse) one variant with the bundle's command; returns its model file."""
    # the data set's own mask size (train_cpu.yaml would resize to 32^3); a checkpoint every epoch
    overrides = {"save_interval": 1, "mask_size": list(args.mask_size), **VARIANTS[name]}
    model, _ = train_bundle(args.work_dir / name / f"seed{seed}", TRAIN_CONFIGS, args.datalist, args.max_epochs, seed,
                            args.threads, overrides, append_log=True)
    return model


def diagnosis_wording(training: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Tumor organ -> the diagnosis of the first training record with a tumor there (the data set's own wording)."""
    diagnosis_of: dict[str, str] = {}
    for item in training:
        record = item.get("record") or {}
        if record.get("tumor_organ"):
            diagnosis_of.setdefault(record["tumor_organ"], record["diagnosis"])
    return diagnosis_of


def steering_prompts(training: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """One patient, the tumor organ swapped through the training records' organs (their own diagnosis wording),
    and the same patient without a tumor (last)."""
    from custom_components.data.prompts import record_to_prompt

    diagnosis_of = diagnosis_wording(training)
    records = [dict(STEERING_PATIENT, tumor_organ=organ, diagnosis=diagnosis) for organ, diagnosis in sorted(diagnosis_of.items())]
    records.append({**STEERING_PATIENT, "tumor_count": 0, "tumor_size_mm": None, "stage": None,
                    "tumor_organ": None, "diagnosis": "no abnormality"})
    return [record_to_prompt(r) for r in records], records


def class_fractions(masks: np.ndarray, num_classes: int) -> np.ndarray:
    """(B, num_classes) share of each class per mask."""
    return np.stack([np.bincount(m.ravel(), minlength=num_classes) / m.size for m in masks])


def location_histogram(alignment: Any, organs: Sequence[str]) -> np.ndarray:
    """Shares of a sample's tumor components per organ (index len(organs): elsewhere; last: no tumor at all)."""
    histogram = np.zeros(len(organs) + 2)
    if not alignment.component_organs:
        histogram[-1] = 1.0
        return histogram
    for organ in alignment.component_organs:
        histogram[organs.index(organ) if organ in organs else len(organs)] += 1
    return histogram / histogram.sum()


def steering_ratio(histograms: np.ndarray) -> float | None:
    """Mean L1 distance between samples of different prompts over that within prompts; histograms (P, S, H).

    None when every sample of every prompt has the same histogram (nothing to compare, e.g. no tumor anywhere);
    the within-prompt distance is floored at 0.05 (one sample in 40 differing) so that identical seeds do not
    turn a small between-prompt difference into an unbounded ratio.
    """
    prompts, seeds = histograms.shape[:2]
    within = [np.abs(histograms[p, a] - histograms[p, b]).sum() for p in range(prompts) for a, b in itertools.combinations(range(seeds), 2)]
    between = [np.abs(histograms[p, a] - histograms[q, b]).sum()
               for p, q in itertools.combinations(range(prompts), 2) for a in range(seeds) for b in range(seeds)]
    if max(within) == 0 and max(between) == 0:
        return None
    return float(np.mean(between) / max(np.mean(within), 0.05))


def align(masks: Sequence[np.ndarray], records: Sequence[Mapping[str, Any]], class_map: Any) -> list[Any]:
    """Each mask's :class:`~custom_components.metrics.alignment.TumorAlignment` with its record."""
    from custom_components.metrics.alignment import tumor_alignment

    return [tumor_alignment(m, r, class_map) for m, r in zip(masks, records)]


def score(alignments: Sequence[Any], records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Alignment scores of masks against their records (see the module docstring), from their alignments."""
    named = [a for a, r in zip(alignments, records) if r.get("tumor_organ")]
    healthy = [a for a, r in zip(alignments, records) if not r.get("tumor_organ") and not r.get("tumor_count")]
    located = [a.location_correct for a in named if a.location_correct is not None]

    def share(values: Sequence[bool]) -> float | None:
        return round(float(np.mean(values)), 3) if values else None

    return {
        "samples": len(records),
        "location_accuracy": share(located),
        "count_accuracy": share([a.count_correct for a in named]),
        "tumor_drawn": share([a.found_count > 0 for a in named]),
        "no_tumor_rate": share([a.found_count == 0 for a in healthy]),
        "mean_components": round(float(np.mean([a.found_count for a in alignments])), 2),
    }


def data_ceiling(datalist: Path) -> dict[str, Any]:
    """What a perfect model could score at this mask size: every case's own label against its record, overall and
    per tumor organ (location: components in the named organ / cases naming it)."""
    import nibabel as nib

    from custom_components.data.datalist import load_datalist

    content = load_datalist(str(datalist), splits=["training", "validation"])
    items = [item for split in ("training", "validation") for item in content[split] if item.get("record")]
    records = [item["record"] for item in items]
    alignments = align([np.asarray(nib.load(str(item["label"])).dataobj) for item in items], records, content["class_map"])
    by_organ: dict[str, list[bool]] = {}
    for alignment, record in zip(alignments, records):
        if record.get("tumor_organ"):
            by_organ.setdefault(record["tumor_organ"], []).append(bool(alignment.location_correct))
    return {"datalist": str(datalist), "mask_size": content["mask_size"], "labels": score(alignments, records),
            "located_by_organ": {organ: f"{sum(v)}/{len(v)}" for organ, v in sorted(by_organ.items())}}


def evaluate(model: Path, args: argparse.Namespace, content: Mapping[str, Any], previews: Path | None, label: str) -> dict[str, Any]:
    """Sample the steering prompts and held-out records at every guidance scale and score them."""
    import torch

    from custom_components.bundles import bundle_config
    from custom_components.metrics.plots import plot_confusion

    config = bundle_config("guidegen_tcss", overrides={"device": torch.device("cpu"), "model_path": str(model),
                                                        "class_map_path": content["class_map_path"]})
    pipeline, class_map = config.get_parsed_content("pipeline"), config.get_parsed_content("class_map")
    prompts, records = steering_prompts(content["training"])
    organs = [r["tumor_organ"] for r in records if r["tumor_organ"]]
    held_out = [item for item in content["validation"] if item.get("record")][: args.max_records]
    training_mean = class_fractions(content["training_masks"], class_map.num_classes).mean(0)
    results: dict[str, Any] = {}
    for scale in args.guidance:
        start = time.perf_counter()
        steering = np.stack([
            pipeline(prompts, num_inference_steps=args.steps, seed=seed, progress=False, guidance_scale=scale).numpy()
            for seed in range(args.samples)
        ], axis=1)  # (prompts, seeds, X, Y, Z)
        held = pipeline([item["text"] for item in held_out], num_inference_steps=args.steps, seed=0, progress=False,
                        guidance_scale=scale).numpy() if held_out else None
        seconds = time.perf_counter() - start
        steering_records = [r for r in records for _ in range(args.samples)]
        held_records = [item["record"] for item in held_out]
        alignments = align(steering.reshape(-1, *steering.shape[2:]), steering_records, class_map)
        histograms = np.stack([location_histogram(a, organs) for a in alignments]).reshape(len(prompts), args.samples, -1)
        ratio = steering_ratio(histograms)
        healthy_fractions = class_fractions(steering[-1], class_map.num_classes).mean(0)
        confusion = np.zeros((len(organs), len(organs) + 1), dtype=int)
        for p, organ in enumerate(organs):
            for alignment in alignments[p * args.samples:(p + 1) * args.samples]:
                for found in alignment.component_organs:
                    confusion[p, organs.index(found) if found in organs else len(organs)] += 1
        results[f"guidance_{scale:g}"] = {
            "steering": score(alignments, steering_records),
            "held_out": score(align(held, held_records, class_map), held_records) if held_out else None,
            "steering_ratio": None if ratio is None else round(ratio, 2),
            "healthy_layout_l1": round(float(np.abs(healthy_fractions - training_mean).sum()), 4),
            "confusion": {"rows": organs, "columns": [*organs, "elsewhere"], "counts": confusion.tolist()},
            "seconds": round(seconds, 1),
        }
        if previews is not None and scale in (1.0, max(args.guidance)):
            plot_confusion(confusion, organs, [*organs, "elsewhere"], previews / f"tcss_location_{label}_guidance{scale:g}.png",
                           title=f"{label}, guidance {scale:g}: organ named in the prompt vs organ the tumor lies in")
        print(json.dumps({label: {f"guidance_{scale:g}": results[f"guidance_{scale:g}"]}}), file=sys.stderr)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datalist", type=Path, required=True, help="text-control data set (guidegen demo-data, many phantoms)")
    parser.add_argument("--work_dir", type=Path, default=Path("/tmp/tcss_text_control"))
    parser.add_argument("--variants", default="default", help=f"comma-separated subset of: {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds")
    parser.add_argument("--max_epochs", type=int, default=9, help="training epochs (budget, equal for all)")
    parser.add_argument("--threads", type=int, default=1, help="threads per training run")
    parser.add_argument("--guidance", default="0,1,3", help="comma-separated guidance scales (0: unconditional baseline)")
    parser.add_argument("--samples", type=int, default=3, help="samples (seeds) per steering prompt")
    parser.add_argument("--max_records", type=int, default=16, help="held-out records sampled (one sample each)")
    parser.add_argument("--steps", type=int, default=50, help="TCSS sampling steps")
    parser.add_argument("--previews", type=Path, default=None, help="write confusion matrix PNGs here")
    parser.add_argument("--train_only", action="store_true", help="train (or resume) and exit")
    parser.add_argument("--ceiling", action="store_true",
                        help="score every case's own label (training and validation) against its record, per tumor organ, and exit")
    args = parser.parse_args()
    args.guidance = [float(s) for s in args.guidance.split(",")]
    variants, seeds = args.variants.split(","), [int(s) for s in args.seeds.split(",")]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if not args.datalist.is_file():
        parser.error(f"--datalist {args.datalist}: no such file; build one with guidegen demo-data --num_phantoms 300")
    if min(args.guidance) < 0 or args.samples < 2 or args.steps < 1:
        parser.error("--guidance scales must be >= 0, --samples >= 2 (the steering ratio compares seeds), --steps >= 1")
    args.mask_size = [int(n) for n in json.loads(args.datalist.read_text())["mask_size"]]
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if args.previews is not None:
        args.previews.mkdir(parents=True, exist_ok=True)

    if args.ceiling:
        print(json.dumps(data_ceiling(args.datalist)))
        return
    models = {(name, seed): train(name, seed, args) for name in variants for seed in seeds}
    if args.train_only:
        return

    import nibabel as nib
    import torch

    from custom_components.data.datalist import load_datalist

    torch.set_num_threads(args.threads)
    content = dict(load_datalist(str(args.datalist), splits=["training", "validation"]))
    content["class_map_path"] = str(args.datalist.parent / "class_map.json")
    content["training_masks"] = np.stack([np.asarray(nib.load(str(item["label"])).dataobj) for item in content["training"]])
    results_path = args.work_dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results["settings"] = {"datalist": str(args.datalist), "max_epochs": args.max_epochs, "guidance": args.guidance,
                           "samples": args.samples, "max_records": args.max_records, "steps": args.steps,
                           "training_cases": len(content["training"]), "held_out_cases": len(content["validation"])}
    # the ceiling at this mask size: the held-out cases' own labels against their records (tumors smaller than a voxel
    # vanish and touching ones merge when the phantoms are resampled, so even the data misses some counts)
    held_out_records = [item["record"] for item in content["validation"] if item.get("record")]
    held_out_labels = [np.asarray(nib.load(str(item["label"])).dataobj) for item in content["validation"] if item.get("record")]
    results["held_out_labels"] = score(align(held_out_labels, held_out_records, content["class_map"]), held_out_records)
    for (name, seed), model in models.items():
        label = f"{name}_seed{seed}"
        results[label] = evaluate(model, args, content, args.previews if seed == seeds[0] else None, label)
        results_path.write_text(json.dumps(results, indent=1))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
