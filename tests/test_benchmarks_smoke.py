"""The benchmarks' smoke modes keep working: they run, every response is 2xx, rows add up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_smoke(script: str) -> str:
    """Run ``benchmarks/<script> --smoke``; its standard output (it must exit 0)."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--smoke"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result.stdout


def test_benchmark_smoke_mode_passes_its_correctness_check() -> None:
    output = run_smoke("run.py")
    assert "correctness check: PASSED" in output, output[-3000:]
    assert "| ours-sync | sync |" in output, output[-3000:]


def test_inprocess_cpu_benchmark_smoke_mode_measures_every_cell() -> None:
    output = run_smoke("inprocess.py")
    rows = [line for line in output.splitlines() if line.startswith("| sqlite |")]
    # ours and the tutorial pattern, sync and async, on three endpoints; bare on /ping only
    assert len(rows) == 4 * 3 + 1, output[-3000:]
    for row in rows:
        cpu = float(row.split("|")[5].replace(",", ""))
        assert cpu > 0, row


def test_dependency_cost_benchmark_smoke_mode_measures_every_shape() -> None:
    output = run_smoke("dependency_cost.py")
    rows = [line for line in output.splitlines() if line.startswith("| ") and "µs" not in line]
    assert [row.split("|")[1].strip() for row in rows] == [
        "no dependency",
        "plain coroutine",
        "coroutine + exit callback (ours)",
        "async generator (tutorial)",
    ], output
