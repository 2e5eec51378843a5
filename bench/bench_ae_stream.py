"""Streaming vs untiled encode/decode with the stage II autoencoder: time per voxel and peak memory.

For each direction (decode: latent -> CT; encode: CT -> latent) and mode (``untiled``: ``network.decode`` /
``network.encode`` in one pass; ``stream``: :func:`~custom_components.networks.streaming.stream_decode` /
``stream_encode``, fed ``--decode_slab`` latent rows / ``--encode_slab`` image rows per step: the pipeline's
``decode_tile`` / ``encode_tile`` defaults), one fresh process builds the ``MaskGuidedAutoencoder``
(random weights: the cost does not depend on them; 20-class mask at half the CT resolution, as in the paper), runs
``--repeats`` passes and reports the median time, the time per CT voxel and the process's peak resident set (CPU) or
peak allocated memory (CUDA), in total and above the state before the first pass. The untiled reference can run at
a smaller size than the streaming one (``--untiled_size``; at 256³ and paper widths an untiled decode needs
≈ 52 GiB): the ratio compares time *per voxel*, so ``stream / untiled`` is the streaming overhead per unit of work.
On CPU an untiled case is capped at ``--memory_limit_gb`` of address space and reported as failed instead of swapping.

Usage (prints one JSON object per case, then one summary object with the ratios):
    .venv/bin/python bench/bench_ae_stream.py --size 64 --threads 1 --repeats 3
    .venv/bin/python bench/bench_ae_stream.py --size 128 --channels 32,64,128 --threads 1 --repeats 3
    # paper size (hours on one CPU thread): streaming at 256^3, the untiled reference at 128^3
    .venv/bin/python bench/bench_ae_stream.py --size 256 --untiled_size 128 --threads 1 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


from bench_ae_decode import _rss_bytes  # one resident-set reader for the decode benches (bench/ is on sys.path)


def run_case(args: argparse.Namespace) -> dict:
    import torch

    from custom_components.networks import MaskGuidedAutoencoder
    from custom_components.networks.streaming import stream_decode, stream_encode

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    channels = tuple(int(c) for c in args.channels.split(","))
    network = MaskGuidedAutoencoder(num_classes=args.num_classes, channels=channels, num_res_blocks=args.num_res_blocks,
                                    latent_channels=args.latent_channels).to(args.device).eval()
    f = network.downsample_factor
    size = args.case_size
    mask = None
    if args.num_classes:
        mask = torch.randint(0, args.num_classes, (1, 1, size // 2, size // 2, size // 2), dtype=torch.uint8, device=args.device)
    if args.direction == "decode":
        source = torch.randn(1, args.latent_channels, size // f, size // f, size // f, device=args.device)
    else:
        source = torch.rand(1, 1, size, size, size, device=args.device) * 2 - 1
    if args.device == "cpu" and args.mode == "untiled" and args.memory_limit_gb > 0:
        limit = int(args.memory_limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_bytes()
    times: list[float] = []
    try:
        for _ in range(args.repeats):
            start = time.perf_counter()
            with torch.no_grad():
                if args.direction == "decode":
                    out = network.decode(source, mask) if args.mode == "untiled" else stream_decode(network, source, mask, slab_rows=args.decode_slab)
                else:
                    out = network.encode(source, mask) if args.mode == "untiled" else stream_encode(network, source, mask, slab_rows=args.encode_slab)
            if args.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            del out
    except (RuntimeError, MemoryError) as err:
        return {"direction": args.direction, "mode": args.mode, "size": size, "failed": f"{type(err).__name__}: {str(err)[:200]}"}
    peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    median = statistics.median(times)
    return {
        "direction": args.direction, "mode": args.mode, "size": size, "channels": list(channels),
        "num_res_blocks": args.num_res_blocks, "num_classes": args.num_classes,
        "slab_rows": (args.decode_slab if args.direction == "decode" else args.encode_slab) if args.mode == "stream" else None,
        "slab_unit": ("latent rows" if args.direction == "decode" else "image rows") if args.mode == "stream" else None, "device": args.device, "threads": args.threads,
        "repeats": args.repeats, "median_seconds": round(median, 3), "seconds_per_repeat": [round(t, 3) for t in sorted(times)],
        "ns_per_voxel": round(median / size**3 * 1e9, 2),
        "peak_gib": round(peak / 2**30, 3), "peak_above_start_gib": round((peak - before) / 2**30, 3),
        "parameters_m": round(sum(p.numel() for p in network.parameters()) / 1e6, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64, help="CT edge in voxels for the streaming cases (a multiple of f)")
    parser.add_argument("--untiled_size", type=int, default=None, help="CT edge for the untiled cases (default: --size)")
    parser.add_argument("--channels", default="96,192,384", help="widths per level (paper: 96,192,384)")
    parser.add_argument("--num_res_blocks", type=int, default=2)
    parser.add_argument("--latent_channels", type=int, default=4)
    parser.add_argument("--num_classes", type=int, default=20, help="mask classes (0: no mask pyramid)")
    parser.add_argument("--directions", default="decode,encode")
    parser.add_argument("--modes", default="untiled,stream")
    parser.add_argument("--decode_slab", type=int, default=1, help="streaming decode: latent rows per step (pipeline default 1)")
    parser.add_argument("--encode_slab", type=int, default=4, help="streaming encode: image rows per step (pipeline default 4)")
    parser.add_argument("--slab_rows", type=int, default=None, help=argparse.SUPPRESS)  # old spelling: both slabs
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory_limit_gb", type=float, default=20.0, help="CPU address-space cap for untiled runs (0: none)")
    parser.add_argument("--case", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--direction", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--case_size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.slab_rows is not None:
        args.decode_slab = args.encode_slab = args.slab_rows
    if args.case:
        print(json.dumps(run_case(args)))
        return
    results = []
    for direction in args.directions.split(","):
        for mode in args.modes.split(","):
            size = args.untiled_size or args.size if mode == "untiled" else args.size
            command = [sys.executable, __file__, "--case", "--direction", direction, "--mode", mode, "--case_size", str(size)]
            for name in ("channels", "num_res_blocks", "latent_channels", "num_classes", "decode_slab", "encode_slab", "device", "threads",
                         "repeats", "memory_limit_gb"):
                command += [f"--{name}", str(getattr(args, name))]
            result = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
            case = json.loads(lines[-1]) if lines else {"direction": direction, "mode": mode, "size": size,
                                                         "failed": f"exit {result.returncode}: {result.stderr[-300:]}"}
            results.append(case)
            print(json.dumps(case), flush=True)
    summary: dict = {"summary": True}
    for direction in args.directions.split(","):
        by_mode = {r["mode"]: r for r in results if r["direction"] == direction and "failed" not in r}
        if "untiled" in by_mode and "stream" in by_mode:
            summary[f"{direction}_stream_over_untiled_time_per_voxel"] = round(
                by_mode["stream"]["ns_per_voxel"] / by_mode["untiled"]["ns_per_voxel"], 3)
            summary[f"{direction}_stream_peak_gib"] = by_mode["stream"]["peak_gib"]
            summary[f"{direction}_untiled_peak_gib"] = by_mode["untiled"]["peak_gib"]
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
