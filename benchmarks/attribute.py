"""Where the instructions of a request go, per Python function: two approaches side by side.

Usage::

    .venv/bin/python benchmarks/attribute.py --python .venv-3.12/bin/python \\
        --db postgresql --endpoint get ours-async handwritten-async

Each approach's app is driven in-process by ``inprocess.py``'s child (the same requests, after
the same warm-up) under valgrind's callgrind, with Python 3.12's ``-X perf``: every Python
function then runs through a trampoline of its own, which callgrind counts like a C function
(``???:0x...``), and the interpreter writes the trampolines' addresses to
``/tmp/perf-<pid>.map``. ``callgrind_annotate --inclusive=yes``, with each address looked up in
that map, gives an inclusive instruction count per Python function and request. The trampolines
add about 8 % to every count, so compare the approaches with each other, not with
``inprocess.py --instructions``; counts across a greenlet switch or a task's later steps land
where the switch happened, so read differences of a few thousand as indications.

Prints, per function, thousands of instructions per request for each approach and the
difference (the first approach minus the second), the largest differences first.
"""

from __future__ import annotations

import argparse
import bisect
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package

from harness import BY_NAME, app_path, drop_database, prepare_database, python_for

INPROCESS = Path(__file__).resolve().parent / "inprocess.py"
_SITE_PACKAGES = re.compile(r"(?<=:)[^:]*/site-packages/")
_COST = re.compile(r"\s*([\d,]+)\s+\([^)]*\)\s+\?\?\?:0x([0-9a-f]+)")


def perf_map(path: Path) -> tuple[list[int], list[tuple[int, int, str]]]:
    """The trampolines of one run: sorted start addresses, and (start, size, name) entries."""
    entries = []
    for line in path.read_text().splitlines():
        start, size, name = line.split(" ", 2)
        # "qualname:path": the path from site-packages on, so that two virtualenvs' names match
        name = _SITE_PACKAGES.sub("", name.removeprefix("py::"))
        entries.append((int(start, 16), int(size, 16), name))
    entries.sort()
    return [entry[0] for entry in entries], entries


def inclusive(out_file: Path, map_file: Path, requests: int) -> dict[str, float]:
    """Per Python function, inclusive instructions per request (the largest of its entries:
    a recursive function's outermost call)."""
    starts, entries = perf_map(map_file)
    annotated = subprocess.run(
        ["callgrind_annotate", "--inclusive=yes", "--threshold=100", str(out_file)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    costs: dict[str, float] = {}
    for line in annotated.splitlines():
        match = _COST.match(line)
        if match is None:
            continue
        address = int(match.group(2), 16)
        at = bisect.bisect_right(starts, address) - 1
        if at < 0 or address >= entries[at][0] + entries[at][1]:
            continue
        name = entries[at][2]
        cost = int(match.group(1).replace(",", "")) / requests
        costs[name] = max(costs.get(name, 0.0), cost)
    return costs


def measure(approach: str, endpoint: str, env: dict[str, str], args: argparse.Namespace) -> dict[str, float]:
    spec = BY_NAME[approach]
    python = str(python_for(spec)) if args.peers else args.python
    env = {**env, "PYTHONPATH": app_path(spec)}
    with tempfile.TemporaryDirectory() as tmp:
        out_file = Path(tmp) / "callgrind.out"
        command = [
            # A dump starts the count (as in inprocess.py): every thread's earlier work is left out.
            *("valgrind", "--tool=callgrind", "--dump-before=getppid", "--dump-before=getpgrp"),
            f"--callgrind-out-file={out_file}",
            *(python, "-X", "perf", str(INPROCESS), "--child", spec.module, "--endpoint", endpoint),
            *("--warmup", str(args.warmup), "--requests", str(args.requests), "--concurrency", "1"),
        ]
        child = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        _, stderr = child.communicate(timeout=3600)
        map_file = Path(f"/tmp/perf-{child.pid}.map")  # valgrind runs Python in its own process
        try:
            if child.returncode != 0:
                raise SystemExit(f"{approach}: {stderr.strip()[-1500:]}")
            return inclusive(Path(f"{out_file}.2"), map_file, args.requests)
        finally:
            map_file.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("approaches", nargs=2, help="two approach names as in throughput.py")
    parser.add_argument("--python", default=sys.executable, help="a Python >= 3.12 (-X perf)")
    parser.add_argument("--db", default="postgresql", choices=["sqlite", "postgresql"])
    parser.add_argument("--endpoint", default="get", choices=["get", "post", "ping"])
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--top", type=int, default=40, help="rows to print")
    parser.add_argument(
        "--peers",
        action="store_true",
        help="allow the peers' approaches; every approach then runs on its virtualenv's Python",
    )
    args = parser.parse_args(argv)
    if args.peers:
        import peers  # opt-in: the virtualenvs of ``throughput.py --peers`` (Python 3.12)

        skipped, _ = peers.enable([a.name for a in peers.APPROACHES if a.name in args.approaches])
        if skipped:
            parser.error(f"peer not available: {skipped}")
    unknown = [name for name in args.approaches if name not in BY_NAME]
    if unknown:
        parser.error(f"unknown approach {', '.join(unknown)}: choose from {', '.join(BY_NAME)}")
    db = prepare_database(args.db)
    env = {**os.environ, **db.env(), "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        first, second = (measure(name, args.endpoint, env, args) for name in args.approaches)
    finally:
        drop_database(args.db)
    rows = sorted(set(first) | set(second), key=lambda name: -abs(first.get(name, 0) - second.get(name, 0)))
    first_name, second_name = args.approaches
    print(f"{'difference':>11} {first_name:>20} {second_name:>20}  function (k instructions/request)")
    for name in rows[: args.top]:
        a, b = first.get(name, 0.0), second.get(name, 0.0)
        print(f"{(a - b) / 1000:11.1f} {a / 1000:20.1f} {b / 1000:20.1f}  {name[:110]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
