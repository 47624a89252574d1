"""The benchmarks' smoke modes keep working: they run, every response is 2xx, rows add up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_benchmark_smoke_mode_passes_its_correctness_check() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "correctness check: PASSED" in result.stdout, output[-3000:]
    assert "| ours-sync | sync |" in result.stdout, output[-3000:]


def test_inprocess_cpu_benchmark_smoke_mode_measures_every_cell() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "inprocess.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| sqlite |")]
    # ours and the tutorial pattern, sync and async, on three endpoints; bare on /ping only
    assert len(rows) == 4 * 3 + 1, output[-3000:]
    for row in rows:
        cpu = float(row.split("|")[5].replace(",", ""))
        assert cpu > 0, row
