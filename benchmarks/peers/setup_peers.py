"""Create one virtual environment per peer under ``benchmarks/peers/.venvs/``, installed from PyPI.

Usage: ``.venv/bin/python benchmarks/peers/setup_peers.py [--force] [peer ...]`` (the runners'
``--peers`` does it for the virtualenvs that are missing).

Every virtualenv, the peers' and ``project`` (this library, editable, which also serves ours,
the baselines and bare), is made with one interpreter, Python 3.12 when it is found (FastSQLA
and fastapi-async-sqlalchemy need it), and the same uvicorn as the project's own virtualenv, so
that only the session layer differs between approaches. Each also gets this project's
``[testing]`` extra: the servers are started by the test suite's helper (``benchmarks/serve.py``
imports ``tests.conftest``), the same harness in every process. Without 3.12, everything runs on
this interpreter and a peer that needs a newer one is skipped with a note (the table prints it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
VENVS = HERE / ".venvs"
BENCH_PYTHON = (3, 12)
"""The interpreter every benchmark virtualenv is made with, when it is installed."""
UVICORN = f"uvicorn=={metadata.version('uvicorn')}"
SERVER = [UVICORN, f"uvloop=={metadata.version('uvloop')}", f"httptools=={metadata.version('httptools')}"]
"""uvicorn as every benchmark serves it (uvloop, httptools), the versions of the project's virtualenv."""
DRIVERS_SYNC = ["psycopg[binary]>=3.1"]
DRIVERS_ASYNC = ["asyncpg>=0.29", "aiosqlite>=0.19"]
HARNESS = ["-e", f"{ROOT}[testing]"]
"""What ``benchmarks/serve.py`` imports besides the app (``tests.conftest``: pytest, httpx, this library)."""


@dataclass(frozen=True)
class Peer:
    """A peer library: its venv name, the oldest Python it runs on and what to install."""

    name: str
    requirements: list[str]
    python: tuple[int, int] = (3, 10)
    module: str = ""
    notes: list[str] = field(default_factory=list)
    dist: str = ""  # the distribution whose version is reported (default: ``name``)


PEERS: dict[str, Peer] = {
    "project": Peer(
        "project",
        ["-e", f"{ROOT}[postgres,asyncpg,aiosqlite,testing]", *SERVER],
        module="fastapi_sessionmaker",
        dist="fastapi-sessionmaker",
    ),
    "fastapi-utils": Peer(
        "fastapi-utils",
        # The [session] extra imports typing_inspect without depending on it (DESIGN §7).
        ["fastapi-utils[session]", "typing_inspect", "sqlalchemy>=2", *SERVER, *DRIVERS_SYNC, *HARNESS],
        module="fastapi_utils",
        notes=["typing_inspect installed by hand: fastapi-utils[session] fails to import without it"],
    ),
    "fastapi-sqla": Peer(
        "fastapi-sqla",
        ["fastapi-sqla", "fastapi<0.142", *SERVER, *DRIVERS_SYNC, *HARNESS],
        module="fastapi_sqla",
        notes=["fastapi-sqla pins FastAPI < 0.142: measured on the FastAPI it accepts"],
    ),
    "fastsqla": Peer(
        "fastsqla",
        ["FastSQLA", *SERVER, *DRIVERS_ASYNC, *HARNESS],
        python=(3, 12),
        module="fastsqla",
    ),
    "fastapi-async-sqlalchemy": Peer(
        "fastapi-async-sqlalchemy",
        [
            "fastapi-async-sqlalchemy",
            "fastapi",
            "sqlalchemy[asyncio]>=2",
            *SERVER,
            *DRIVERS_ASYNC,
            *HARNESS,
        ],
        python=(3, 12),
        module="fastapi_async_sqlalchemy",
    ),
    "advanced-alchemy": Peer(
        "advanced-alchemy",
        ["advanced-alchemy", "fastapi", *SERVER, *DRIVERS_ASYNC, *HARNESS],
        module="advanced_alchemy",
    ),
}


def find_python(version: tuple[int, int]) -> str | None:
    """An interpreter of exactly ``version``: this one, ``pythonX.Y`` on PATH, or pyenv's."""
    if sys.version_info[:2] == version:
        return sys.executable
    name = f"python{version[0]}.{version[1]}"
    found = shutil.which(name)
    candidates = [found] if found else []
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    if pyenv.is_dir():
        candidates += [
            str(p / "bin" / "python") for p in sorted(pyenv.iterdir()) if p.name.startswith(f"{name[6:]}.")
        ]
    for candidate in candidates:
        try:
            out = subprocess.run(
                [candidate, "-c", f"import sys; print(sys.version_info[:2] == {version!r})"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
        except OSError:
            continue
        if out.stdout.strip() == "True":
            return candidate
    return None


def venv_python(peer: str) -> Path:
    """The interpreter of ``peer``'s virtualenv."""
    return VENVS / peer / "bin" / "python"


def status_file(peer: str) -> Path:
    return VENVS / f"{peer}.json"


def peer_status(peer: str) -> dict[str, object]:
    """What setup recorded for ``peer``: ``{"ok": bool, "note": str, "versions": {...}}``."""
    path = status_file(peer)
    if not path.exists():
        return {"ok": False, "note": "not installed: run benchmarks/peers/setup_peers.py"}
    data: dict[str, object] = json.loads(path.read_text())
    return data


def setup_peer(peer: Peer, *, force: bool) -> dict[str, object]:
    """Create (or reuse) the peer's venv; returns and records its status."""
    target = VENVS / peer.name
    if force and target.exists():
        shutil.rmtree(target)
    python = find_python(BENCH_PYTHON) or sys.executable
    found = subprocess.run(
        [python, "-c", "import sys; print(*sys.version_info[:2])"], capture_output=True, text=True, check=True
    ).stdout.split()
    if (int(found[0]), int(found[1])) < peer.python:
        status: dict[str, object] = {
            "ok": False,
            "note": f"skipped: needs Python {peer.python[0]}.{peer.python[1]}, none found",
        }
        status_file(peer.name).write_text(json.dumps(status, indent=2))
        return status
    if not venv_python(peer.name).exists():
        subprocess.run([python, "-m", "venv", str(target)], check=True, timeout=300)
        subprocess.run(
            [str(venv_python(peer.name)), "-m", "pip", "install", "-q", "--upgrade", "pip"],
            check=True,
            timeout=600,
        )
    result = subprocess.run(
        [str(venv_python(peer.name)), "-m", "pip", "install", "-q", *peer.requirements],
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    if result.returncode != 0:
        status = {"ok": False, "note": "pip install failed: " + result.stderr.strip().splitlines()[-1]}
    else:
        probe = subprocess.run(
            [
                str(venv_python(peer.name)),
                "-c",
                "import json, sys; from importlib import metadata as m; "
                f"import {peer.module}; "
                "names = ['fastapi', 'starlette', 'sqlalchemy', 'pydantic', 'uvicorn', sys.argv[1]]; "
                "print(json.dumps({'python': sys.version.split()[0], "
                "**{n: m.version(n) for n in names}}))",
                peer.dist or peer.name,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if probe.returncode != 0:
            last = (probe.stderr.strip().splitlines() or ["?"])[-1]
            status = {"ok": False, "note": f"import failed: {last}"}
        else:
            status = {"ok": True, "note": "; ".join(peer.notes), "versions": json.loads(probe.stdout)}
    status_file(peer.name).write_text(json.dumps(status, indent=2))
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("peers", nargs="*", help="peers to set up (default: all)")
    parser.add_argument("--force", action="store_true", help="recreate the virtualenvs")
    args = parser.parse_args(argv)
    VENVS.mkdir(parents=True, exist_ok=True)
    names = args.peers or list(PEERS)
    failed = 0
    for name in names:
        status = setup_peer(PEERS[name], force=args.force)
        print(f"{name}: {'ok' if status['ok'] else 'NOT AVAILABLE'} {status.get('note', '')}".rstrip())
        failed += not status["ok"]
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
