"""What a training forward pass keeps for the backward pass, per network and module (issue 19).

Builds a stage's network at paper widths (``custom_components.runs.untrained.PAPER_ARCHITECTURES``, random weights,
gradient checkpointing on, train mode), runs one forward pass at ``--size`` under
``torch.autograd.graph.saved_tensors_hooks`` and sums the storage of every tensor autograd saves (each storage once,
parameters and storages under 64 KiB left out), by the innermost module that was running when it was saved. The
total scales with the voxels: ``× (128 / size)³`` estimates the paper size (128³ TCSS masks and autoencoder
patches). Unlike ``bench_training_memory.py`` (the process's resident peak over whole optimiser steps) it shows
*which* tensors are kept, so a change of checkpoint boundaries can be checked at a small size in seconds.

Stages: ``tcss`` (the text-conditioned U-Net on a 20-class softmax input, 8 text tokens) and ``autoencoder`` (the
mask-guided autoencoder on a CT patch with its mask at half the resolution; the generator's forward only, without
losses or discriminators).

Usage:
    .venv/bin/python bench/saved_for_backward.py --size 32 --stages tcss,autoencoder --top 15
"""

from __future__ import annotations

import argparse
import collections
import json

import torch

STAGES = ("tcss", "autoencoder")
PAPER_SIZE = 128
MIN_BYTES = 1 << 16


def saved_bytes(stage: str, size: int) -> tuple[int, collections.Counter]:
    """Bytes autograd keeps after one training forward of ``stage`` at ``size``³, in total and by module.

    Args:
        stage: ``"tcss"`` or ``"autoencoder"``.
        size: input edge (TCSS mask or autoencoder CT patch), even.

    Returns:
        The total, and a counter keyed by ``"<module> <shape> <dtype>"``.
    """
    from custom_components.data.class_map import load_class_map
    from custom_components.networks import MaskGuidedAutoencoder, build_text_conditioned_unet
    from custom_components.runs.untrained import PAPER_ARCHITECTURES

    num_classes = load_class_map(None).num_classes
    torch.manual_seed(0)
    if stage == "tcss":
        text_dim = 384
        net = build_text_conditioned_unet(num_classes, num_classes, text_dim, **PAPER_ARCHITECTURES["tcss"],
                                          use_checkpointing=True).train()
        inputs = (torch.softmax(torch.randn(1, num_classes, size, size, size), 1), torch.tensor([500]),
                  torch.randn(1, 8, text_dim), torch.ones(1, 8, dtype=torch.bool))
    else:
        net = MaskGuidedAutoencoder(num_classes=num_classes, **PAPER_ARCHITECTURES["autoencoder"],
                                    use_checkpointing=True).train()
        half = size // 2
        inputs = (torch.rand(1, 1, size, size, size) * 2 - 1, torch.randint(0, num_classes, (1, 1, half, half, half)))

    running: list[str] = []
    for name, module in net.named_modules():
        module.register_forward_pre_hook(lambda m, a, name=name: running.append(name or "<network>"))
        module.register_forward_hook(lambda m, a, o: running.pop() and None)  # None: a hook's return replaces the output
    parameters = {p.untyped_storage().data_ptr() for p in net.parameters()}
    seen: set[int] = set()
    by_module: collections.Counter = collections.Counter()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if key not in seen and key not in parameters and nbytes >= MIN_BYTES:
            seen.add(key)
            by_module[f"{running[-1] if running else '<outside modules>'} {tuple(tensor.shape)} {tensor.dtype}"] += nbytes
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        net(*inputs)
    return sum(by_module.values()), by_module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=32, help="input edge in voxels (even)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of: {', '.join(STAGES)}")
    parser.add_argument("--top", type=int, default=15, help="largest module entries to print per stage")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown or not stages:
        parser.error(f"--stages: unknown {unknown}; choose from {', '.join(STAGES)}")
    if args.size < 8 or args.size % 8:
        parser.error("--size must be a multiple of 8 (the networks downsample it), at least 8")
    if args.top < 0 or args.threads < 1:
        parser.error("--top must be >= 0 and --threads >= 1")
    torch.set_num_threads(args.threads)
    for stage in stages:
        total, by_module = saved_bytes(stage, args.size)
        scale = (PAPER_SIZE / args.size) ** 3
        print(json.dumps({"stage": stage, "size": args.size, "saved_mib": round(total / 2**20, 1),
                          "paper_size_estimate_gib": round(total * scale / 2**30, 2)}))
        for entry, nbytes in by_module.most_common(args.top):
            print(f"  {nbytes / 2**20:9.1f} MiB  {entry}")


if __name__ == "__main__":
    main()
