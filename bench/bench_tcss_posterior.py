"""Peak memory and time of one TCSS reverse-step posterior: closed form (ours) vs the dense N x N form.

"ours" is ``CategoricalDiffusionScheduler.model_posterior`` (exact, O(N V) memory). "dense" is the approach of the
paper's public code: build q(x_s | x_t, x_0 = i) for every candidate class i as a (B, N, N, V) tensor, normalise,
weight by f_theta(i) and sum over i. Both run under ``torch.no_grad()`` in float32, as in sampling.

Every (variant, size) runs in a fresh subprocess so that one measurement cannot inherit another's allocator state.
Peak memory is the increase of the process's peak resident set size over its resident set size just before the
call, with the inputs already allocated: on Linux the peak (VmHWM) is reset through /proc/self/clear_refs right
before the call, so temporaries freed earlier cannot hide the call's own peak; elsewhere the ru_maxrss high-water
mark is used (a lower bound when input creation peaked higher). tracemalloc cannot see torch's allocations.
Times are the median of ``--repeats`` calls after one warm-up call.

Usage (prints one JSON object on stdout)::

    .venv/bin/python bench/bench_tcss_posterior.py                      # N = 20, 64^3 and 128^3, 3 repeats
    .venv/bin/python bench/bench_tcss_posterior.py --sizes 32 64 --repeats 5 --threads 2
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

# Timesteps of the measured step: a strided jump from the middle of a 1000-step cosine schedule.
T_STEP, PREV_STEP = 500, 480


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return _status_kib("VmHWM") is not None
    except OSError:
        return False


def _maxrss_kib() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, KiB on Linux


def dense_posterior(x_t, f, abar_t: float, abar_s: float):
    """The paper's form: all N candidate posteriors q(x_s | x_t, x_0 = i) as (B, N_i, N_k, V), then sum_i f_i (.)."""
    import torch

    n = f.shape[1]
    a, b = abar_t / abar_s, abar_s
    lik = a * x_t + (1 - a) / n  # q(x_t | x_s = k), (B, N_k, *spatial)
    prior = b * torch.eye(n, dtype=f.dtype) + (1 - b) / n  # q(x_s = k | x_0 = i), (N_i, N_k)
    spatial = (1,) * (f.ndim - 2)
    post = lik.unsqueeze(1) * prior.reshape(1, n, n, *spatial)  # (B, N_i, N_k, *spatial)
    post /= post.sum(dim=2, keepdim=True)
    post *= f.unsqueeze(2)
    return post.sum(dim=1)


def _inputs(size: int, n: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    shape = (1, n, size, size, size)
    classes = torch.randint(0, n, (1, 1, size, size, size), generator=g)
    x_t = torch.zeros(shape).scatter_(1, classes, 1.0)
    f = torch.randn(shape, generator=g).softmax(dim=1)
    return x_t, f


def worker(variant: str, size: int, n: int, repeats: int, threads: int | None) -> dict:
    import torch

    from custom_components.schedulers import CategoricalDiffusionScheduler

    if threads:
        torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    scheduler = CategoricalDiffusionScheduler(num_train_timesteps=1000, num_classes=n)
    abar = scheduler.alphas_cumprod
    abar_t, abar_s = float(abar[T_STEP]), float(abar[PREV_STEP])
    x_t, f = _inputs(size, n)
    t, prev = torch.tensor([T_STEP]), torch.tensor([PREV_STEP])
    if variant == "ours":
        call = lambda: scheduler.model_posterior(x_t, f, t, prev)  # noqa: E731
    else:
        call = lambda: dense_posterior(x_t, f, abar_t, abar_s)  # noqa: E731

    rss_before = _status_kib("VmRSS")
    maxrss_before = _maxrss_kib()
    method = "VmHWM reset via /proc/self/clear_refs" if _reset_peak() and rss_before is not None else "ru_maxrss"
    start = time.perf_counter()
    out = call()
    first = time.perf_counter() - start
    if method == "ru_maxrss":
        peak_kib = _maxrss_kib() - maxrss_before
    else:
        peak_kib = _status_kib("VmHWM") - rss_before
    del out

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - start)
        del out
    return {
        "variant": variant,
        "size": size,
        "voxels": size**3,
        "peak_mem_increase_mib": round(peak_kib / 1024, 1),
        "memory_method": method,
        "input_mib": round(2 * x_t.numel() * x_t.element_size() / 2**20, 1),
        "time_first_call_s": round(first, 4),
        "time_median_s": round(statistics.median(times), 4),
        "times_s": [round(v, 4) for v in times],
        "threads": torch.get_num_threads(),
    }


def check_agreement(n: int, size: int = 24) -> float:
    """Max |ours - dense| on a small volume, so the bench compares two implementations of the same quantity."""
    import torch

    from custom_components.schedulers import CategoricalDiffusionScheduler

    scheduler = CategoricalDiffusionScheduler(num_train_timesteps=1000, num_classes=n)
    abar = scheduler.alphas_cumprod
    x_t, f = _inputs(size, n, seed=1)
    with torch.no_grad():
        ours = scheduler.model_posterior(x_t, f, torch.tensor([T_STEP]), torch.tensor([PREV_STEP]))
        dense = dense_posterior(x_t, f, float(abar[T_STEP]), float(abar[PREV_STEP]))
    return float((ours - dense).abs().max())


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_gib() -> float | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128], help="cube edge lengths (default 64 128)")
    parser.add_argument("--num-classes", type=int, default=20, help="N (default 20)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after the warm-up (default 3, >= 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--variants", nargs="+", default=["ours", "dense"], choices=["ours", "dense"])
    parser.add_argument("--worker", nargs=2, metavar=("VARIANT", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats < 3:
        parser.error("--repeats must be >= 3")

    repo_root = str(Path(__file__).resolve().parents[1])
    if repo_root not in sys.path:
        sys.path.insert(0, repo_root)

    if args.worker:
        variant, size = args.worker[0], int(args.worker[1])
        print(json.dumps(worker(variant, size, args.num_classes, args.repeats, args.threads)))
        return

    import torch

    results = []
    for size in args.sizes:
        for variant in args.variants:
            cmd = [sys.executable, __file__, "--worker", variant, str(size)]
            cmd += ["--num-classes", str(args.num_classes), "--repeats", str(args.repeats)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo_root, os.environ.get("PYTHONPATH")])))
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            if proc.returncode != 0:
                results.append({"variant": variant, "size": size, "error": proc.stderr.strip().splitlines()[-1:]})
                continue
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    ratios = {}
    for size in args.sizes:
        by_variant = {r["variant"]: r for r in results if r["size"] == size and "error" not in r}
        if {"ours", "dense"} <= by_variant.keys():
            ours, dense = by_variant["ours"], by_variant["dense"]
            ratios[str(size)] = {
                "memory_ours_over_dense": round(ours["peak_mem_increase_mib"] / dense["peak_mem_increase_mib"], 4),
                "speedup_dense_over_ours": round(dense["time_median_s"] / ours["time_median_s"], 2),
            }

    report = {
        "benchmark": "tcss_posterior_step",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": {
            "num_classes": args.num_classes,
            "batch": 1,
            "dtype": "float32",
            "t": T_STEP,
            "prev_t": PREV_STEP,
            "schedule": "cosine, T = 1000",
            "repeats": args.repeats,
            "grad": False,
        },
        "machine": {
            "cpu": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "mem_total_gib": _mem_total_gib(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": results[0].get("threads") if results else torch.get_num_threads(),
            # other processes on the machine inflate times (not memory); recorded so numbers can be judged
            "load_average_1_5_15": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        },
        "max_abs_diff_ours_vs_dense_24cube": check_agreement(args.num_classes),
        "results": results,
        "ratios": ratios,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
