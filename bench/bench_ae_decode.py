"""Decode a CT from its latent with the stage II autoencoder at paper widths: tiled vs untiled.

Paper widths: channels (96, 192, 384), 2 residual blocks per level, 4 latent channels, x4 downsampling, 20-class
mask pyramid (random weights: the cost does not depend on them). Each case runs in a fresh process; memory is
the process's peak resident set (CPU) or peak allocated CUDA memory (GPU), in total and above the state before
decoding (network + latent + mask). An untiled case that needs more than ``--memory_limit_gb`` of address space
on CPU is stopped by the limit and reported as such, instead of swapping the machine.
Times are medians over ``--repeats`` decodes; with ``--max_tiles`` each repeat stops after that many tiles and
its total is extrapolated.

Usage (prints one JSON object per case):
    .venv/bin/python bench/bench_ae_decode.py --size 256 --modes tiled,untiled
    .venv/bin/python bench/bench_ae_decode.py --size 128 --modes tiled,untiled --repeats 3
    .venv/bin/python bench/bench_ae_decode.py --size 256 --modes tiled --tile 8 --max_tiles 2   # CPU: peak + extrapolated time
    .venv/bin/python bench/bench_ae_decode.py --size 256 --device cuda
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

PAPER = {"channels": (96, 192, 384), "num_res_blocks": 2, "latent_channels": 4, "num_classes": 20}


def _rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class _EnoughTiles(Exception):
    """Raised from the decoder's tail after ``max_tiles`` tiles (see ``--max_tiles``)."""


def run_case(size: int, mode: str, tile: int, device: str, threads: int, repeats: int, memory_limit_gb: float, max_tiles: int = 0) -> dict:
    import torch

    from custom_components.networks import MaskGuidedAutoencoder, tiled_decode

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    network = MaskGuidedAutoencoder(**PAPER).to(device).eval()
    f = network.downsample_factor
    latent = torch.randn(1, PAPER["latent_channels"], size // f, size // f, size // f, device=device)
    # masks are kept at half the CT resolution (paper: 128^3 masks, 256^3 CTs)
    mask = torch.randint(0, PAPER["num_classes"], (1, 1, size // 2, size // 2, size // 2), dtype=torch.uint8, device=device)
    if device == "cpu" and mode == "untiled" and memory_limit_gb > 0:
        limit = int(memory_limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_bytes()
    tile_times: list[float] = []
    if mode == "tiled" and max_tiles:
        # The largest (interior) tiles go first, so the peak over the first tiles is the run's peak; the time of
        # the rest is extrapolated from the per-tile median of those largest tiles, an overestimate (reported as such).
        from custom_components.networks import tiling

        windows = tiling._windows

        def largest_first(size, tile_, halo):
            volume = lambda w: np.prod([s.stop - s.start for s in w[1]])  # noqa: E731
            return sorted(windows(size, tile_, halo), key=volume, reverse=True)

        tiling._windows = largest_first
        tail = network.decoder.tail

        def counted_tail(*args, **kwargs):
            if len(tile_times) >= max_tiles:
                raise _EnoughTiles
            start = time.perf_counter()
            out = tail(*args, **kwargs)
            tile_times.append(time.perf_counter() - start)
            return out

        network.decoder.tail = counted_tail
    times: list[float] = []
    partial_runs: list[tuple[float, float]] = []  # --max_tiles: (latent pass seconds, median tile seconds) per repeat
    try:
        for _ in range(repeats):
            tile_times.clear()
            start = time.perf_counter()
            try:
                with torch.no_grad():
                    if mode == "tiled":
                        image = tiled_decode(network, latent, mask, tile_size=tile)
                    else:
                        image = network.decode(latent, mask)
            except _EnoughTiles:
                elapsed = time.perf_counter() - start
                partial_runs.append((elapsed - sum(tile_times), sorted(tile_times)[len(tile_times) // 2]))
                continue
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            del image
    except (RuntimeError, MemoryError) as err:
        return {"size": size, "mode": mode, "device": device, "failed": f"{type(err).__name__}: {str(err)[:200]}",
                "memory_limit_gb": memory_limit_gb}
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if partial_runs:
        num_tiles = len(windows([size // f] * 3, [tile] * 3, network.decoder_tail_receptive_radius))
        estimates = sorted(head + per_tile * num_tiles for head, per_tile in partial_runs)
        return {
            "size": size, "mode": mode, "tile_latent": tile, "halo_latent": network.decoder_tail_receptive_radius,
            "device": device, "threads": threads, "repeats": repeats, "measured_tiles": max_tiles, "num_tiles": num_tiles,
            "latent_pass_seconds": round(statistics.median(head for head, _ in partial_runs), 1),
            "median_tile_seconds": round(statistics.median(per_tile for _, per_tile in partial_runs), 2),
            "estimated_total_seconds": round(statistics.median(estimates), 1),
            "estimated_total_seconds_per_repeat": [round(e, 1) for e in estimates],
            "peak_gib": round(peak / 2**30, 3), "peak_above_start_gib": round((peak - before) / 2**30, 3),
            "parameters_m": round(sum(p.numel() for p in network.parameters()) / 1e6, 1),
        }
    return {
        "size": size,
        "mode": mode,
        "tile_latent": tile if mode == "tiled" else None,
        "halo_latent": network.decoder_tail_receptive_radius if mode == "tiled" else None,
        "device": device,
        "threads": threads,
        "repeats": repeats,
        "median_seconds": round(statistics.median(times), 2),
        "seconds_per_repeat": [round(t, 2) for t in sorted(times)],
        "peak_gib": round(peak / 2**30, 3),
        "peak_above_start_gib": round((peak - before) / 2**30, 3),
        "parameters_m": round(sum(p.numel() for p in network.parameters()) / 1e6, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="CT edge in voxels (latent edge = size / 4)")
    parser.add_argument("--modes", default="tiled,untiled")
    parser.add_argument("--tile", type=int, default=16, help="tile edge in latent voxels")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--memory_limit_gb", type=float, default=20.0, help="CPU address-space cap for untiled runs (0: none)")
    parser.add_argument("--max_tiles", type=int, default=0,
                        help="tiled: stop after this many full-resolution tiles and extrapolate the time (0: run all)")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.size, args.case, args.tile, args.device, args.threads, args.repeats, args.memory_limit_gb, args.max_tiles)))
        return
    for mode in args.modes.split(","):
        command = [sys.executable, __file__, "--case", mode, "--size", str(args.size), "--tile", str(args.tile),
                   "--device", args.device, "--threads", str(args.threads), "--repeats", str(args.repeats),
                   "--memory_limit_gb", str(args.memory_limit_gb), "--max_tiles", str(args.max_tiles)]
        result = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        print(lines[-1] if lines else json.dumps({"size": args.size, "mode": mode, "failed": f"exit {result.returncode}: {result.stderr[-300:]}"}), flush=True)


if __name__ == "__main__":
    main()
