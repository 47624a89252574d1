"""The benchmarks' smoke modes keep working: they run, every response is 2xx, rows add up."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT, run_smoke


def test_throughput_benchmark_smoke_mode_passes_its_correctness_check() -> None:
    output = run_smoke("throughput.py")
    assert "correctness check: PASSED" in output, output[-3000:]
    assert "| ours-sync | sync |" in output, output[-3000:]
    # every ratio is taken against the best hand-written pattern; the tutorial's stands beside it
    cells = [line.split("|") for line in output.splitlines() if "| ours-sync | sync |" in line]
    ours = [row for row in cells if row[1].strip() == "main" and "(no database)" not in row[3]]
    assert len(ours) == 2, cells  # GET and POST
    for row in ours:
        ratio, vs, tutorial = (cell.strip() for cell in row[7:10])
        assert (vs, ratio != "-", tutorial != "-") == ("handwritten-sync", True, True), row


def test_inprocess_cpu_benchmark_smoke_mode_measures_every_cell() -> None:
    output = run_smoke("inprocess.py")
    rows = [line for line in output.splitlines() if line.startswith("| sqlite |")]
    # ours (a DBSession parameter, and @db.with_session), the hand-written and the tutorial
    # patterns, sync and async, on three endpoints; bare on /ping
    assert len(rows) == 8 * 3 + 1, output[-3000:]
    for row in rows:
        cpu = float(row.split("|")[5].replace(",", ""))
        assert cpu > 0, row


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="needs valgrind (Debian's valgrind)")
def test_inprocess_instruction_count_leaves_out_what_a_worker_thread_did_before() -> None:
    # The sync app's start-up check runs in a worker thread, importing the driver (psycopg): about
    # 340 million instructions. Counted from callgrind's --zero-before (the calling thread only),
    # they fell into the count: 12.5 million per request over these 30, where a read costs 2.6.
    options = ["--instructions", "--db", "postgresql", "--approach", "ours-sync", "--endpoints", "get"]
    options += ["--rounds", "1", "--requests", "30", "--warmup", "10"]
    output = run_smoke("inprocess.py", *options, smoke=False, timeout=180)
    rows = [line.split("|") for line in output.splitlines() if line.startswith("| postgresql |")]
    assert [row[3].strip() for row in rows] == ["ours-sync"], output[-3000:]
    thousands = float(rows[0][5].replace(",", ""))
    assert 1_000 < thousands < 5_000, rows


def test_inprocess_observability_rows_measure_ours_off_and_on() -> None:
    # Two of the --observability apps (both twins, both kinds) keep the smoke test short.
    options = ["--observability", "--endpoints", "get"]
    options += ["--approach", "ours-sync-traced", "--approach", "ours-async-observed"]
    output = run_smoke("inprocess.py", *options)
    rows = [line.split("|") for line in output.splitlines() if line.startswith("| sqlite |")]
    assert [row[3].strip() for row in rows] == ["ours-sync-traced", "ours-async-observed"], output[-3000:]
    assert all(float(row[5].replace(",", "")) > 0 for row in rows), output[-3000:]


def test_dependency_cost_benchmark_smoke_mode_measures_every_shape() -> None:
    output = run_smoke("dependency_cost.py")
    rows = [line for line in output.splitlines() if line.startswith("| ") and "µs" not in line]
    assert [row.split("|")[1].strip() for row in rows] == [
        "no dependency",
        "plain coroutine",
        "coroutine + exit callback (ours)",
        "async generator (tutorial)",
    ], output


def test_every_approach_names_an_app_that_exists_peers_included() -> None:
    # The peers are opt-in (their virtualenvs come from PyPI): without installing them, check that
    # every approach, theirs included, points at its app, and each peer at its own virtualenv.
    script = """
import sys
sys.path.insert(0, "benchmarks")
import harness, peers
harness.add_approaches(peers.APPROACHES)
for a in harness.APPROACHES:
    print(a.name, (a.app_dir / f"{a.module}.py").is_file(), a.peer is not None, harness.python_for(a))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True, cwd=ROOT
    )
    rows = [line.split() for line in result.stdout.splitlines()]
    assert [name for name, *_ in rows if name.startswith(("ours", "bare"))] == [
        "ours-sync",
        "ours-async",
        "ours-sync-declared",
        "ours-async-declared",
        "bare",
    ]
    assert sum(peer == "True" for _, _, peer, _ in rows) == 5, rows
    for name, found, peer, python in rows:
        assert found == "True", name
        assert ("/benchmarks/peers/.venvs/" in python) == (peer == "True"), (name, python)


def test_throughput_pin_puts_the_server_on_one_cpu_and_the_load_generator_on_the_others() -> None:
    script = """
import os, sys
sys.path.insert(0, "benchmarks")
import throughput
print(sorted(os.sched_getaffinity(0)), throughput.cpus(True), throughput.cpus(False))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True)
    allowed = sorted(os.sched_getaffinity(0))
    server, load = ({allowed[0]}, set(allowed[1:])) if len(allowed) > 1 else (None, None)
    assert out.stdout.split("] ", 1)[1].strip() == f"{(server, load)} (None, None)", out.stdout
