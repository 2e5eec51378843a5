"""Training peak memory of one optimiser step per stage, at paper widths, measured at 64³ and scaled to paper size.

Each stage runs in a fresh process: the paper-width network (train.yaml's architecture, gradient checkpointing as
configured there) and its AdamW optimiser are built, then ``--steps`` training steps run through the product's own
iteration classes after one warm-up step (TCSSIteration: KL of Eq. 6; AutoencoderGANIteration: HDR-window L1 + KL + frame and volume GAN
terms with the discriminator step, LPIPS off because its VGG weights cannot be downloaded here — the LPIPS trunk adds
a frozen VGG-16 over 3 slices per axis; LDMIteration: ε-MSE of Eq. 11). Batch 1. The random text encoder has
all-MiniLM-L6-v2's architecture.

Sizes (``--size S``): TCSS masks S³; autoencoder CT patches S³ with S/2³ masks; latent generator latents (S/2)³ with
S³ masks (before 2026-11-30: (S/4)³ latents with (S/2)³ masks, 1/64 of the paper's voxels at S = 64 while the estimate
scaled by 8) — at S = 64 each stage sees 1/8 of the paper's voxels per axis-cube (paper: 128³ masks, 128³ CT patches of
256³ CTs, 64³ latents with 128³ masks). Activation memory grows ~linearly with voxels, weights and optimiser state do
not, so the paper-size estimate is ``static + 8 · (peak − static)`` (static = memory after the warm-up step: weights,
gradients and AdamW's moments), reported as ``estimated_paper_peak_gib``; a GPU run at paper size measures it directly.

Memory: CPU peak resident set above the interpreter's baseline (sampled every 5 ms), or CUDA peak allocated memory.

Usage (one JSON line per stage):
    .venv/bin/python bench/bench_training_memory.py --size 64 --stages tcss,autoencoder,ldm
    python bench/bench_training_memory.py --size 128 --device cuda --amp   # paper size measured directly, AMP on
    python bench/bench_training_memory.py --size 128 --device cuda --random_text_encoder --text_encoder_config DIR
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096


class _Peak:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def stop(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        self._stop.set()
        self._thread.join()
        return max(self.peak, _rss())


def _current(device: torch.device) -> int:
    return torch.cuda.memory_allocated() if device.type == "cuda" else _rss()


def _engine(network: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, amp: bool = False) -> SimpleNamespace:
    """The parts of MONAI's trainer the iterations read; ``amp`` (CUDA only, as the bundles' trainer) adds its GradScaler."""
    state = SimpleNamespace(iteration=0, device=device, output=None)
    amp = bool(amp) and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if amp else None
    return SimpleNamespace(network=network, optimizer=optimizer, state=state, amp=amp, scaler=scaler, fire_event=lambda *_: None)


def _text_encoder(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    from custom_components.networks import TextEncoder

    path = None
    if args.random_text_encoder:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_text_to_pair import random_text_encoder

        path = str(random_text_encoder(Path(tempfile.mkdtemp()) / "te", args.text_encoder_config))
    return TextEncoder(model_path=path).to(device)


def _optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=2e-5, betas=(0.9, 0.99), weight_decay=1e-5)  # the paper's optimiser


def run_stage(stage: str, args: argparse.Namespace) -> dict:
    from custom_components.data.class_map import load_class_map
    from custom_components.runs.untrained import PAPER_ARCHITECTURES

    device = torch.device(args.device)
    torch.manual_seed(0)
    n = load_class_map(None).num_classes
    overrides = getattr(args, "architectures", None) or {}
    if isinstance(overrides, str):
        overrides = json.loads(overrides)
    arch = {name: {**PAPER_ARCHITECTURES[name], **overrides.get(name, {})} for name in PAPER_ARCHITECTURES}
    size = args.size
    baseline = _current(device)
    text = _text_encoder(args, device) if stage != "autoencoder" else None
    if stage == "tcss":
        from custom_components.engines import TCSSIteration
        from custom_components.networks import build_text_conditioned_unet
        from custom_components.schedulers import CategoricalDiffusionScheduler

        network = build_text_conditioned_unet(n, n, text.hidden_size, **arch["tcss"], use_checkpointing=True).to(device)
        iteration = TCSSIteration(CategoricalDiffusionScheduler(num_train_timesteps=1000, num_classes=n), text)
        batch = {"label": torch.randint(0, n, (1, 1, size, size, size)), "text": ["The patient is a 63-year-old male."]}
    elif stage == "ldm":
        from monai.networks.schedulers import DDPMScheduler

        from custom_components.engines import LDMIteration
        from custom_components.networks import build_latent_denoiser

        network = build_latent_denoiser(4, n, text.hidden_size, mask_factor=2, **arch["ldm"], use_checkpointing=True).to(device)
        iteration = LDMIteration(DDPMScheduler(num_train_timesteps=1000, schedule="cosine", clip_sample=False), text, scale_factor=1.0)
        batch = {"latent": torch.randn(1, 4, size // 2, size // 2, size // 2), "label": torch.randint(0, n, (1, 1, size, size, size)),
                 "text": ["The patient is a 63-year-old male."]}
    else:
        from custom_components.engines import AutoencoderGANIteration
        from custom_components.losses import AdversarialTerms, HDRWindow, build_frame_discriminator, build_volume_discriminator
        from custom_components.networks import MaskGuidedAutoencoder

        network = MaskGuidedAutoencoder(num_classes=n, **arch["autoencoder"], use_checkpointing=True).to(device)
        frame, volume = build_frame_discriminator(channels=64, num_layers_d=3).to(device), build_volume_discriminator(channels=64, num_layers_d=3).to(device)
        window = HDRWindow().to(device)
        iteration = AutoencoderGANIteration(window, frame, volume, _optimizer([*frame.parameters(), *volume.parameters()]), AdversarialTerms(),
                                            perceptual_loss=None, perceptual_weight=0.0, adversarial_start=0)
        batch = {"image": torch.rand(1, 1, size, size, size) * 2 - 1, "label": torch.randint(0, n, (1, 1, size // 2, size // 2, size // 2))}
    optimizer = _optimizer([*network.parameters(), *(window.parameters() if stage == "autoencoder" else [])])
    engine = _engine(network, optimizer, device, amp=getattr(args, "amp", False))
    # The first step creates the gradients and AdamW's two moment buffers (3x the weights): they are static too.
    engine.state.iteration = 1
    start = time.perf_counter()
    iteration(engine, batch)
    first_step = time.perf_counter() - start
    static = _current(device)
    peak_meter = _Peak(device)
    peak_meter.start()
    times = []
    for step in range(1, args.steps + 1):
        engine.state.iteration = step + 1
        start = time.perf_counter()
        iteration(engine, batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = peak_meter.stop()
    gib = lambda b: round(b / 2**30, 3)  # noqa: E731
    return {
        "stage": stage, "size": size, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "steps": args.steps, "amp": engine.amp, "first_step_seconds": round(first_step, 2), "median_step_seconds": round(sorted(times)[len(times) // 2], 2),
        "parameters_m": round(sum(p.numel() for p in network.parameters()) / 1e6, 1),
        "static_gib": gib(static - baseline), "peak_gib": gib(peak - baseline),
        "estimated_paper_peak_gib": gib((static - baseline) + (128 / size) ** 3 * (peak - static)) if size != 128 else gib(peak - baseline),
        "memory": "CUDA peak allocated" if device.type == "cuda" else "peak resident set above the interpreter's baseline",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--stages", default="tcss,autoencoder,ldm")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--random_text_encoder", action="store_true")
    parser.add_argument("--text_encoder_config", default=None)
    parser.add_argument("--amp", action="store_true", help="mixed precision with a GradScaler (CUDA only, as the trainer's amp)")
    parser.add_argument("--architectures", default=None, help="JSON stage -> architecture overrides of the paper widths")
    parser.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # the per-stage child process
    args = parser.parse_args()
    if args.stage:
        print(json.dumps(run_stage(args.stage, args)))
        return
    for stage in args.stages.split(","):
        child = [arg for arg in sys.argv[1:]]
        result = subprocess.run([sys.executable, __file__, *child, "--stage", stage], capture_output=True, text=True)
        lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        print(lines[-1] if lines else json.dumps({"stage": stage, "failed": result.stderr[-800:]}), flush=True)


if __name__ == "__main__":
    main()
