"""Per-sample cost of batched sampling: TCSS masks and latent DDIM at batch 1, 8, ... with the demo models.

The chain is the product's (``load_text_to_pair`` over the bundles' inference configs, all networks kept loaded; by
default the shipped demo weights: TCSS 32³ masks with U-Net widths 32/64/128, latent generator 4 × 16³ latents with
32³ masks). For each repeat and batch size B (the order of the batch sizes alternates between repeats, so that load
from other processes hits all alike), B different prompts are sampled in one call with ``--steps`` steps per stage:
TCSS first, then the latent sampler on the masks it drew. Reported per stage and B:

- ``per_sample_step_seconds``: the median sampling step time (end of one scheduler step to the end of the next, as
  ``bench_text_to_pair`` measures it; the first step, which also encodes the prompts, left out) divided by B;
- ``per_sample_call_seconds``: the whole call (text encoding included) divided by B;
- ``over_batch_1``: both divided by batch 1's (target ≤ 1.0: a batch must not cost more per sample than one prompt).

Medians over ``--repeats``; every value is listed too. Prints one JSON object.

Usage:
    .venv/bin/python bench/bench_batched_sampling.py --batches 1,8 --steps 4 --repeats 3 --threads 2
    python bench/bench_batched_sampling.py --device cuda --batches 1,8,32
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_text_to_pair import PROMPT, _time_steps  # noqa: E402  (one step timer for the sampling benches)


def prompts(count: int) -> list[str]:
    """``count`` different prompts of the demo's form (ages differ, so token counts and padding vary a little)."""
    return [PROMPT.replace("63-year-old", f"{40 + 3 * i}-year-old") for i in range(count)]


def run(args: argparse.Namespace) -> dict:
    from custom_components.pipelines.text_to_pair import load_text_to_pair

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    pipeline, files = load_text_to_pair(args.tcss_model, args.ldm_model, args.autoencoder_model, device=device, keep_models_loaded=True)
    if args.inference_slab_min_mib is not None:  # e.g. 0: the slab-wise pass at any size (what batches >= 16 got at 32³ before)
        for network in (pipeline.tcss.network, pipeline.mask_to_ct.sampler.network):
            for module in network.modules():
                if hasattr(module, "inference_slab_min_mib"):
                    module.inference_slab_min_mib = float(args.inference_slab_min_mib)
    step_ends = {"tcss": _time_steps(pipeline.tcss.scheduler, device), "ldm": _time_steps(pipeline.mask_to_ct.sampler.scheduler, device)}
    batches = [int(b) for b in args.batches.split(",")]
    measured: dict[str, dict[int, dict[str, list[float]]]] = {
        stage: {b: {"step": [], "call": []} for b in batches} for stage in ("tcss", "ldm")}
    # warm-up: one small call per stage (first-call allocations, lazy initialisation)
    mask = pipeline.tcss(prompts(1), num_inference_steps=2, seed=0, progress=False)
    pipeline.mask_to_ct.sampler(mask[:, None], prompts(1), num_inference_steps=2, seed=0, progress=False)
    for repeat in range(args.repeats):
        for batch in batches if repeat % 2 == 0 else batches[::-1]:
            text = prompts(batch)
            for stage in ("tcss", "ldm"):
                step_ends[stage].clear()
                start = time.perf_counter()
                if stage == "tcss":
                    masks = pipeline.tcss(text, num_inference_steps=args.steps, seed=repeat, progress=False)
                else:
                    pipeline.mask_to_ct.sampler(masks[:, None], text, num_inference_steps=args.steps, seed=repeat, progress=False)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                call = time.perf_counter() - start
                ends = step_ends[stage]
                steps = [b - a for a, b in zip(ends, ends[1:])]
                measured[stage][batch]["step"].append(statistics.median(steps) / batch)
                measured[stage][batch]["call"].append(call / batch)
            print(f"repeat {repeat} batch {batch}: " + ", ".join(
                f"{stage} {measured[stage][batch]['step'][-1]:.3f} s per sample-step" for stage in measured), file=sys.stderr, flush=True)
    result: dict = {
        "benchmark": "batched sampling, per-sample cost", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__, "load_average_1min": round(os.getloadavg()[0], 2), "models": files,
        "tcss_mask_size": list(pipeline.tcss.spatial_size), "inference_slab_min_mib": args.inference_slab_min_mib, "steps_per_call": args.steps, "repeats": args.repeats, "stages": {},
    }
    for stage, by_batch in measured.items():
        rows = {}
        for batch, values in by_batch.items():
            rows[batch] = {"per_sample_step_seconds": round(statistics.median(values["step"]), 4),
                           "per_sample_call_seconds": round(statistics.median(values["call"]), 4),
                           "per_sample_step_all": [round(v, 4) for v in values["step"]]}
        base = rows.get(1)
        if base:
            for row in rows.values():
                row["step_over_batch_1"] = round(row["per_sample_step_seconds"] / base["per_sample_step_seconds"], 3)
                row["call_over_batch_1"] = round(row["per_sample_call_seconds"] / base["per_sample_call_seconds"], 3)
        result["stages"][stage] = {str(b): row for b, row in rows.items()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps per call and stage (the first is not timed)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--inference_slab_min_mib", type=float, default=None,
                        help="the U-Nets' slab-wise threshold per sample (default: the networks' 64 MiB; 0: always slab-wise)")
    parser.add_argument("--tcss_model", default=None, help="default: the TCSS bundle's models/model.pt (demo weights)")
    parser.add_argument("--ldm_model", default=None)
    parser.add_argument("--autoencoder_model", default=None)
    print(json.dumps(run(parser.parse_args()), indent=2))


if __name__ == "__main__":
    main()
