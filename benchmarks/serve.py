"""Serve one benchmark app with the test suite's uvicorn helper, until standard input closes.

``python benchmarks/serve.py MODULE`` (with ``PYTHONPATH`` naming the app's folder and
``benchmarks/apps``) imports ``MODULE.app``, starts it with ``tests.conftest.Server`` (uvicorn,
127.0.0.1, a free port, lifespan on, no access log, uvloop and httptools), prints
``LISTENING <url>`` and serves until its standard input is closed: the runner closes it to stop
the server, and a runner that dies stops it too. Run by ``throughput.py`` with each approach's
own interpreter.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project root, for ``tests``

from tests.conftest import Server


def main(module: str) -> int:
    # uvloop and httptools (the ``bench`` extra), as production deployments of uvicorn run it.
    server = Server(importlib.import_module(module).app, access_log=False, loop="uvloop", http="httptools")
    print(f"LISTENING {server.start(timeout=60.0)}", flush=True)
    sys.stdin.read()  # until the runner closes it
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
