"""Peak resident memory and time of one TCSS U-Net forward pass (paper widths, no gradients) on the CPU.

Isolates the network from the sampler: the input is a random 20-class probability volume of ``--size``³, the
timestep 500, the text 12 random tokens of width 384. Memory = peak resident set sampled every 5 ms during the call,
above the resident set just before it (network and input already allocated).

Usage (prints one JSON object):
    .venv/bin/python bench/bench_tcss_forward.py --size 96                 # slab-wise inference (the default)
    .venv/bin/python bench/bench_tcss_forward.py --size 96 --slab_rows 0   # the plain forward pass
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_text_to_pair import _PeakRSS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--slab_rows", type=int, default=4, help="rows per slab of the slab-wise inference; 0: plain forward")
    args = parser.parse_args()

    from custom_components.networks import build_text_conditioned_unet
    from custom_components.runs.untrained import PAPER_ARCHITECTURES

    torch.manual_seed(0)
    network = build_text_conditioned_unet(20, 20, 384, **PAPER_ARCHITECTURES["tcss"]).eval()
    network.unet.inference_slab_rows = args.slab_rows or None
    x = torch.softmax(torch.randn(1, 20, args.size, args.size, args.size), 1)
    features, mask = torch.randn(1, 12, 384), torch.ones(1, 12, dtype=torch.bool)
    with torch.no_grad(), _PeakRSS() as peak:
        start, begin = _PeakRSS._rss(), time.perf_counter()
        network(x, torch.tensor([500]), features, mask)
        seconds = time.perf_counter() - begin
    print(json.dumps({"size": args.size, "slab_rows": args.slab_rows, "threads": torch.get_num_threads(), "peak_above_start_gib": round((peak.peak - start) / 2**30, 3),
                      "seconds": round(seconds, 1)}))


if __name__ == "__main__":
    main()
