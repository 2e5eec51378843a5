"""Training-step time of GuideGen's CrossAttentionUNet3D against MONAI's stock DiffusionModelUNet of equal width.

One step = forward + backward (MSE to a random target), batch 1. Both networks get the same channels,
``num_res_blocks``, ``num_head_channels``, GroupNorm groups and attention levels (MONAI: ``with_conditioning=True``
so every attention level is a SpatialTransformer with self- + cross-attention; ours: cross-attention only, plus
self-attention at the lowest level and in the middle block). Contexts are 16 tokens per level. MONAI is timed
with its default attention (``use_flash_attention=False``, the explicit N x N matrix) and with
``use_flash_attention=True`` (torch's scaled_dot_product_attention).

Each (model, config) is measured in a fresh subprocess so that the reported peak RSS belongs to that model alone,
``--rounds`` times with the models in alternating order (so that load from other processes on a shared machine
hits all models alike); the reported time is the median over all rounds' timed steps. The 1-minute load average
before and after is recorded. Prints one JSON document on stdout.

    python bench/bench_unet_step.py                      # CPU, 2 threads, small sizes
    python bench/bench_unet_step.py --device cuda        # adds the paper size: 20 classes at 128^3
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

CPU_CONFIGS: list[dict[str, Any]] = [
    {"name": "tcss-20cls-c32-32^3", "classes": 20, "channels": [32, 64, 128], "size": [32, 32, 32]},
    {"name": "tcss-20cls-c64-32^3", "classes": 20, "channels": [64, 128, 256], "size": [32, 32, 32]},
    # MONAI's default attention would materialise 4 x 13824² floats (~3 GB, plus softmax and gradients) at
    # the 24³ level here; it is only timed with scaled_dot_product_attention.
    {"name": "tcss-20cls-c64-48^3", "classes": 20, "channels": [64, 128, 256], "size": [48, 48, 48],
     "skip_models": ["monai"]},
]
CUDA_CONFIGS: list[dict[str, Any]] = [
    {"name": "tcss-paper-128^3", "classes": 20, "channels": [64, 128, 256, 512], "size": [128, 128, 128]},
]
COMMON = {"num_res_blocks": 2, "num_head_channels": 32, "norm_num_groups": 32, "context_tokens": 16}
MODELS = ("ours", "monai", "monai_flash")


def _levels(n: int) -> tuple[list[bool], list[bool]]:
    """Cross-attention at every level but the first; self-attention at the last (our defaults)."""
    cross = [i > 0 for i in range(n)]
    self_attn = [i == n - 1 for i in range(n)]
    return cross, self_attn


def _build(model: str, cfg: dict[str, Any]):
    import torch
    from monai.networks.nets import DiffusionModelUNet

    from custom_components.networks.unet import CrossAttentionUNet3D

    n = len(cfg["channels"])
    cross, self_attn = _levels(n)
    ctx_dim = cfg["channels"][-1]  # MONAI takes one cross_attention_dim for all levels
    if model == "ours":
        net = CrossAttentionUNet3D(
            in_channels=cfg["classes"],
            out_channels=cfg["classes"],
            channels=cfg["channels"],
            num_res_blocks=COMMON["num_res_blocks"],
            cross_attention_levels=cross,
            self_attention_levels=self_attn,
            num_head_channels=COMMON["num_head_channels"],
            norm_num_groups=COMMON["norm_num_groups"],
            context_dims=[ctx_dim] * n,
        )
    else:
        net = DiffusionModelUNet(
            spatial_dims=3,
            in_channels=cfg["classes"],
            out_channels=cfg["classes"],
            channels=cfg["channels"],
            num_res_blocks=COMMON["num_res_blocks"],
            attention_levels=cross,
            norm_num_groups=COMMON["norm_num_groups"],
            num_head_channels=COMMON["num_head_channels"],
            with_conditioning=True,
            cross_attention_dim=ctx_dim,
            use_flash_attention=model == "monai_flash",
        )
    tokens = COMMON["context_tokens"]

    def step_inputs(device: torch.device):
        x = torch.randn(1, cfg["classes"], *cfg["size"], device=device)
        t = torch.randint(0, 1000, (1,), device=device)
        target = torch.randn_like(x)
        if model == "ours":
            ctx = [torch.randn(1, tokens, ctx_dim, device=device) for _ in range(n)]
        else:
            ctx = torch.randn(1, tokens, ctx_dim, device=device)
        return x, t, ctx, target

    return net, step_inputs


def worker(model: str, cfg: dict[str, Any], device_name: str, threads: int, warmup: int, repeats: int) -> dict:
    """Time ``repeats`` training steps of one model in this process; return the measurements."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = torch.device(device_name)
    net, step_inputs = _build(model, cfg)
    net = net.to(device).train()
    x, t, ctx, target = step_inputs(device)
    params = sum(p.numel() for p in net.parameters())

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step() -> None:
        net.zero_grad(set_to_none=True)
        out = net(x, t, ctx)
        torch.nn.functional.mse_loss(out, target).backward()

    result: dict[str, Any] = {"model": model, "params": params}
    try:
        for _ in range(warmup):
            step()
        sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - start)
        result.update(
            step_s_median=statistics.median(times),
            step_s_all=[round(s, 4) for s in times],
        )
    except torch.cuda.OutOfMemoryError as exc:  # the stock net's N x N attention does not fit at 128^3
        result["error"] = f"CUDA out of memory: {str(exc).splitlines()[0]}"
    except RuntimeError as exc:
        if "memory" not in str(exc).lower():
            raise
        result["error"] = f"out of memory: {str(exc).splitlines()[0]}"
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if device.type == "cuda":
        result["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


def machine_info(device_name: str, threads: int) -> dict[str, Any]:
    import monai
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "torch_threads": threads,
        "device": device_name,
    }
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        if names:
            info["cpu_model"] = names[0]
    except OSError:
        pass
    if device_name == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=2, help="fresh processes per model, in alternating order")
    parser.add_argument("--configs", nargs="*", help="names of configs to run (default: all for the device)")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: JSON of (model, config)
    args = parser.parse_args()

    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(worker(spec["model"], spec["config"], args.device, args.threads, args.warmup, args.repeats)))
        return

    configs = CPU_CONFIGS + (CUDA_CONFIGS if args.device == "cuda" else [])
    if args.configs:
        configs = [c for c in configs if c["name"] in args.configs]
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.setdefault("OMP_NUM_THREADS", str(args.threads))
    load_before = os.getloadavg()[0]
    runs = []
    for cfg in configs:
        cfg = dict(cfg)
        skip = cfg.pop("skip_models", [])
        models = [m for m in args.models if m not in skip]
        row: dict[str, Any] = {"config": {**cfg, **COMMON, "batch": 1}}
        cross, self_attn = _levels(len(cfg["channels"]))
        row["config"].update(cross_attention_levels=cross, ours_self_attention_levels=self_attn)
        measured: dict[str, list[dict[str, Any]]] = {m: [] for m in models}
        for rnd in range(args.rounds):
            for model in models if rnd % 2 == 0 else models[::-1]:
                cmd = [sys.executable, __file__, "--device", args.device, "--threads", str(args.threads)]
                cmd += ["--warmup", str(args.warmup), "--repeats", str(args.repeats)]
                cmd += ["--worker", json.dumps({"model": model, "config": cfg})]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
                if proc.returncode != 0:
                    lines = proc.stderr.strip().splitlines()
                    result = {"model": model, "error": lines[-1] if lines else f"exit code {proc.returncode}"}
                else:
                    result = json.loads(proc.stdout.strip().splitlines()[-1])
                measured[model].append(result)
                print(f"{cfg['name']} round {rnd} {model}: {result}", file=sys.stderr, flush=True)
        for model, results in measured.items():
            errors = [r["error"] for r in results if "error" in r]
            times = [t for r in results for t in r.get("step_s_all", [])]
            summary: dict[str, Any] = {"params": results[0].get("params")}
            if times:
                summary.update(
                    step_s_median=round(statistics.median(times), 4),
                    step_s_min=round(min(times), 4),
                    step_s_all=times,
                )
            summary["peak_rss_mib"] = max(r.get("peak_rss_mib", 0.0) for r in results)
            if any("peak_cuda_mib" in r for r in results):
                summary["peak_cuda_mib"] = max(r.get("peak_cuda_mib", 0.0) for r in results)
            if errors:
                summary["errors"] = errors
            row[model] = summary
        ours = row.get("ours", {}).get("step_s_median")
        for stock in ("monai", "monai_flash"):
            other = row.get(stock, {}).get("step_s_median")
            if ours and other:
                row[f"ratio_ours_over_{stock}"] = round(ours / other, 3)
        runs.append(row)

    report = {
        "benchmark": "CrossAttentionUNet3D vs monai DiffusionModelUNet, forward+backward step, batch 1",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(args.device, args.threads),
        "warmup": args.warmup,
        "repeats_per_round": args.repeats,
        "rounds": args.rounds,
        "load_average_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "runs": runs,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
