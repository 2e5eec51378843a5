"""Training runs of the benches: a stage bundle's own training command, resumable, timed, skipped once done.

The benches that train (``ae_ablation.py``, ``mask_to_ct.py``, ``tcss_text_control.py``) train every variant and seed
with the bundle's command (``python -m monai.bundle run training`` with ``--resume True``), one folder per run:
``models/`` (checkpoints, then ``model.pt``), ``outputs/``, ``train.log`` and ``train_seconds.txt``, written last,
which marks the run as finished. A killed bench is run again with the same command and continues where it stopped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_logged(command: Sequence[str], log: Path, threads: int, append: bool = False) -> None:
    """Run ``command`` from the repository root with ``threads`` CPU threads, its output into ``log``.

    Raises:
        SystemExit: the command failed; the message names the log.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a" if append else "w") as handle:
        result = subprocess.run(list(command), cwd=REPO, stdout=handle, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if result.returncode:
        raise SystemExit(f"{' '.join(map(str, command[:6]))} ... failed (exit {result.returncode}); see {log}")


def train_bundle(
    folder: Path,
    configs: Sequence[str],
    datalist: Path,
    max_epochs: int,
    seed: int,
    threads: int,
    overrides: Mapping[str, object] | None = None,
    append_log: bool = False,
) -> tuple[Path, float]:
    """Train one run with the bundle's command, resuming an interrupted one; a finished run is not trained again.

    Args:
        folder: the run's folder.
        configs: the bundle's training configs, merged in order.
        datalist: the training datalist.
        max_epochs: epochs of the whole run (a resumed run trains the rest).
        seed: the run's seed.
        threads: CPU threads of the training process.
        overrides: further ``--key value`` overrides of the configs.
        append_log: keep the log of earlier (interrupted) attempts.

    Returns:
        the model file and the seconds this run's training took (as recorded when it finished).
    """
    model, timing = folder / "models" / "model.pt", folder / "train_seconds.txt"
    if model.is_file() and timing.is_file():
        return model, float(timing.read_text())
    command = [
        sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(list(configs)),
        "--datalist", str(datalist), "--ckpt_dir", str(folder / "models"), "--output_dir", str(folder / "outputs"),
        "--max_epochs", str(max_epochs), "--seed", str(seed), "--resume", "True",
    ]  # fmt: skip
    for key, value in (overrides or {}).items():
        command += [f"--{key}", str(value)]
    start = time.perf_counter()
    run_logged(command, folder / "train.log", threads, append=append_log)
    seconds = time.perf_counter() - start
    timing.write_text(f"{seconds:.1f}\n")
    return model, seconds
