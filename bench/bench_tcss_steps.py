"""TCSS sampling with few strided steps vs all 1000 steps, on the shipped demo model: quality side by side, speed-up.

The categorical sampler jumps exactly from t to s < t (the posterior q(x_s | x_t, x_0) of the forward process, paper
Eq. 6, for any gap), so fewer steps change the sampling distribution only through the model. For each step count the
same prompts (the datalist's records that name a tumor, training and validation lists, the first
``--max_records`` of them, each ``--samples`` times) are sampled and compared on

- class-volume fractions: the mean share of the mask each class takes (and the L1 distance between the two runs'
  fraction vectors);
- tumor count and tumor location accuracy against the records (paper Fig. 3b; location over samples with a tumor);
- wall time per sample (all prompts sampled as one batch).

``--repeats R`` samples everything R times with seeds ``seed .. seed + R - 1``: times are the median over the
repeats, fractions and accuracies are over all R runs' samples.

Usage (prints one JSON object; needs the demo data set for the records: `guidegen demo-data --output_dir demo`):
    .venv/bin/python bench/bench_tcss_steps.py --steps 50,1000 --samples 1 --max_records 1 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="50,1000")
    parser.add_argument("--samples", type=int, default=2, help="samples per record")
    parser.add_argument("--datalist", default=str(ROOT / "demo" / "datalist.json"))
    parser.add_argument("--model", default=None, help="TCSS model file (default: the bundle's demo weights)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_records", type=int, default=0, help="use only the first N records (0: all)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per step count, seeds seed .. seed + repeats - 1")
    args = parser.parse_args()

    from custom_components.bundles import bundle_config
    from custom_components.data.datalist import load_datalist
    from custom_components.metrics.alignment import tumor_alignment

    config = bundle_config("guidegen_tcss", overrides={"device": torch.device("cpu"), "model_path": args.model})
    pipeline = config.get_parsed_content("pipeline")
    class_map = config.get_parsed_content("class_map")
    content = load_datalist(args.datalist, splits=["training", "validation"])
    records = [item["record"] for split in ("training", "validation") for item in content[split] if item.get("record")]
    records = [r for r in records if r.get("tumor_count")] or records
    records = records[: args.max_records] if args.max_records else records
    prompts = [item["text"] for split in ("training", "validation") for item in content[split] if item.get("record") in records]
    prompts, records = prompts * args.samples, records * args.samples
    results = {"model": str(config.get_parsed_content("model_path")), "prompts": len(prompts), "threads": torch.get_num_threads(),
               "mask_size": list(pipeline.spatial_size), "repeats": args.repeats, "runs": {}}
    fractions_by_steps = {}
    for steps in [int(s) for s in args.steps.split(",")]:
        times, batches = [], []
        for repeat in range(args.repeats):
            start = time.perf_counter()
            batches.append(pipeline(prompts, num_inference_steps=steps, seed=args.seed + repeat, progress=True).numpy())
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        masks = np.concatenate(batches)
        fractions = np.stack([np.bincount(m.ravel(), minlength=class_map.num_classes) / m.size for m in masks]).mean(0)
        alignments = [tumor_alignment(m, r, class_map) for m, r in zip(masks, records * args.repeats)]
        located = [a.location_correct for a in alignments if a.location_correct is not None]
        fractions_by_steps[steps] = fractions
        results["runs"][str(steps)] = {
            "seconds_per_sample": round(seconds / len(prompts), 2),
            "seconds_per_run": [round(t, 1) for t in times],
            "class_fractions": {name: round(float(f), 4) for name, f in zip(class_map.class_names, fractions)},
            "tumor_count_accuracy": round(float(np.mean([a.count_correct for a in alignments])), 3),
            "tumor_location_accuracy": round(float(np.mean(located)), 3) if located else None,
            "samples_with_a_tumor": len(located),
        }
    counts = sorted(fractions_by_steps)
    if len(counts) >= 2:
        few, many = counts[0], counts[-1]
        results["speedup"] = round(results["runs"][str(many)]["seconds_per_sample"] / results["runs"][str(few)]["seconds_per_sample"], 1)
        results["fraction_l1_distance"] = round(float(np.abs(fractions_by_steps[few] - fractions_by_steps[many]).sum()), 4)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
