"""bench/gpu_figures.py: the one-command GPU figures, tested by its CPU dry run at tiny sizes."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_figures  # noqa: E402


def _section(text: str) -> str:
    return text[text.index(gpu_figures.BEGIN):text.index(gpu_figures.END)]


def test_the_committed_rows_are_the_unmeasured_ones_until_a_gpu_run_replaces_them() -> None:
    text = (ROOT / "BENCHMARKS.md").read_text()
    section = _section(text)
    rows = gpu_figures.table_rows(None)
    assert len(rows) == 7 and all(gpu_figures.NOT_MEASURED in row for row in rows)
    if "not measured yet" in section:  # still no GPU figure: the section holds exactly these rows
        assert all(row in section for row in rows)


def test_dry_run_measures_every_part_and_writes_the_json_and_the_rows(tmp_path: Path) -> None:
    benchmarks = tmp_path / "BENCHMARKS.md"
    shutil.copy(ROOT / "BENCHMARKS.md", benchmarks)
    before = benchmarks.read_text()
    output = tmp_path / "figures.json"
    report = gpu_figures.main(["--dry-run", "--output", str(output), "--benchmarks", str(benchmarks)])

    written = json.loads(output.read_text())
    assert written == json.loads(json.dumps(report))
    assert written["dry_run"] and written["within_budget"] and written["machine"]["torch"]
    assert set(written["parts"]) == set(gpu_figures.PARTS)
    for part, entry in written["parts"].items():
        assert "result" in entry, (part, entry)
    parts = written["parts"]
    for stage in ("tcss", "autoencoder", "ldm"):
        result = parts[f"train_{stage}"]["result"]
        assert result["stage"] == stage and result["size"] == 24 and result["median_step_seconds"] > 0
    pair = parts["text_to_pair"]["result"]
    assert pair["mask_shape"] == [16, 16, 16] and pair["ct_shape"] == [32, 32, 32]
    # 3 steps per stage: the first holds the text encoding and the network's loading, so 2 are timed
    assert pair["tcss_steps_timed"] == pair["ldm_steps_timed"] == 2 and pair["tcss_step_seconds_median"] > 0
    assert parts["decode"]["result"]["size"] == 32 and parts["decode"]["result"]["mode"] == "stream"

    rows = written["rows"]
    assert len(rows) == 7 and not any("not measured" in row or "failed" in row for row in rows)
    assert output.with_suffix(".md").read_text().splitlines() == rows
    after = benchmarks.read_text()
    assert all(row in _section(after) for row in rows)
    # only the marked section changed
    assert after[:after.index(gpu_figures.BEGIN)] == before[:before.index(gpu_figures.BEGIN)]
    assert after[after.index(gpu_figures.END):] == before[before.index(gpu_figures.END):]


def test_parts_past_the_budget_are_skipped_not_run(tmp_path: Path) -> None:
    output = tmp_path / "figures.json"
    report = gpu_figures.main(["--dry-run", "--budget_s", "0", "--output", str(output), "--benchmarks", ""])
    assert all("skipped" in entry for entry in report["parts"].values())
    assert all("skipped" in row for row in report["rows"])


def test_unknown_parts_are_refused() -> None:
    with pytest.raises(SystemExit):
        gpu_figures.main(["--dry-run", "--parts", "train_tcss,everything"])
