"""Several worker processes (real ones, on 127.0.0.1, against PostgreSQL): ``uvicorn --workers 2``
and ``gunicorn --preload`` with uvicorn workers, both twins. Each worker has its own pool; an engine
used before the fork is not shared with the children; shutdown leaves no connection behind.

``tests/worker_app.py`` names every connection after the process that opened it, so
``pg_stat_activity`` tells whose socket each backend serves.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from fastapi_sessionmaker import FastAPISessionMaker
from tests.conftest import Databases, wait_until

ROOT = Path(__file__).resolve().parent.parent
WORKERS = 2
TWINS = ("sync", "async")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def command(server: str, port: int) -> list[str]:
    if server == "uvicorn":  # spawns its workers: each imports the app itself
        return [sys.executable, "-m", "uvicorn", "tests.worker_app:app", "--workers", str(WORKERS)]
    return [  # imports the app once, then forks the workers
        sys.executable,
        "-m",
        "gunicorn",
        "--preload",
        "--workers",
        str(WORKERS),
        "--worker-class",
        "uvicorn_worker.UvicornWorker",
        "--bind",
        f"127.0.0.1:{port}",
        "--graceful-timeout",
        "10",
        "--no-control-socket",  # gunicorn 23+: else one socket path shared by parallel runs
        "--log-level",
        "warning",
        "tests.worker_app:app",
    ]


@pytest.fixture(scope="module")
def direct(databases: Databases) -> Iterator[sa.Engine]:
    """The test database, directly; the app's table made here (workers only check it)."""
    engine = FastAPISessionMaker(databases.url("postgresql")).get_new_engine()
    with engine.begin() as connection:
        connection.execute(
            sa.text("CREATE TABLE IF NOT EXISTS worker_hits (id SERIAL PRIMARY KEY, worker INTEGER NOT NULL)")
        )
    yield engine
    engine.dispose()


def connections(engine: sa.Engine, tag: str) -> dict[int, str]:
    """Backend pid -> application_name of the connections whose name starts with ``tag``."""
    with engine.connect() as connection:
        rows = connection.execute(
            sa.text("SELECT pid, application_name FROM pg_stat_activity WHERE application_name LIKE :tag"),
            {"tag": f"{tag}%"},
        )
        return {int(pid): str(name) for pid, name in rows}


def post_until_every_worker_answered(base_url: str, path: str, deadline: float) -> list[dict[str, Any]]:
    """Batches of concurrent requests until ``WORKERS`` processes have answered (bounded).

    A new connection per request: a kept-alive one stays with the worker that accepted it.
    """
    answers: list[dict[str, Any]] = []
    no_keepalive = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(base_url=base_url, timeout=30, limits=no_keepalive) as http:

        def one(_: int) -> dict[str, Any]:
            response = http.post(path)
            assert response.status_code == 200, response.text
            return dict(response.json())

        with ThreadPoolExecutor(16) as pool:
            while len({answer["pid"] for answer in answers}) < WORKERS:
                assert time.monotonic() < deadline, f"only {answers[0]['pid']} answered {len(answers)}"
                answers.extend(pool.map(one, range(32)))
    return answers


@pytest.mark.parametrize("server", ["uvicorn", "gunicorn"])
def test_each_worker_has_its_own_pool_and_shutdown_leaves_none(
    server: str, direct: sa.Engine, databases: Databases
) -> None:
    with direct.begin() as connection:
        connection.execute(sa.text("DELETE FROM worker_hits"))
    port = free_port()
    tag = f"fsmw{os.getpid()}{server[0]}"
    env = {
        **os.environ,
        "FSM_WORKER_URL": databases.url("postgresql"),
        "FSM_WORKER_TAG": tag,
        "UVICORN_HOST": "127.0.0.1",
        "UVICORN_PORT": str(port),
        "UVICORN_LOG_LEVEL": "warning",
    }
    process = subprocess.Popen(
        command(server, port), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    base_url = f"http://127.0.0.1:{port}"
    answers: dict[str, list[dict[str, Any]]] = {}
    try:

        def up() -> bool:
            assert process.poll() is None, f"{server} exited: {process.communicate()[0][-3000:]}"
            try:
                return httpx.get(f"{base_url}/docs", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(up, f"{server} answering on {base_url}", timeout=60)
        for twin in TWINS:
            answers[twin] = post_until_every_worker_answered(base_url, f"/hits/{twin}", time.monotonic() + 30)
        named = connections(direct, tag)
    finally:
        process.send_signal(signal.SIGTERM)  # graceful: each worker's lifespan disposes its pools
        try:
            output = process.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:  # pragma: no cover - a hung server fails the test
            process.kill()
            output = process.communicate()[0]
            pytest.fail(f"{server} did not stop within 30 s: {output[-3000:]}")
    assert process.returncode == 0, output[-3000:]

    for twin in TWINS:
        check_twin(server, twin, answers[twin], named, f"{tag}{twin[0]}", process.pid)
    with direct.connect() as connection:
        stored = connection.execute(
            sa.text("SELECT count(*) FROM worker_hits WHERE worker <> :master"), {"master": process.pid}
        ).scalar_one()
    assert stored == sum(len(found) for found in answers.values())
    # Shut down: every worker's pools (and the master's) are gone from the server.
    wait_until(lambda: connections(direct, tag) == {}, "the workers' connections to close", timeout=10)


def check_twin(
    server: str, twin: str, answers: list[dict[str, Any]], named: dict[int, str], tag: str, main_pid: int
) -> None:
    """What the answers of one twin's endpoint say about the pools of the processes."""
    workers = {answer["pid"] for answer in answers}
    assert len(workers) == WORKERS, (twin, answers)
    assert main_pid not in workers, (twin, answers)
    # Every backend a worker used was opened by that worker (named after its pid), and served it
    # alone: no pooled socket came from another process.
    for answer in answers:
        assert named.get(answer["backend"]) == f"{tag}-{answer['pid']}", (twin, answer, named)
    owners: dict[int, set[int]] = {}
    for answer in answers:
        owners.setdefault(answer["backend"], set()).add(answer["pid"])
    assert all(len(pids) == 1 for pids in owners.values()), (twin, owners)
    import_pids = {answer["import_pid"] for answer in answers}
    if server == "gunicorn":  # imported (and used the engine) once, in the master, before the fork
        (master_backend,) = {answer["import_backend"] for answer in answers}
        assert import_pids == {main_pid}, twin
        assert master_backend not in owners, twin  # no worker used the master's pooled connection...
        assert named.get(master_backend) == f"{tag}-{main_pid}", (twin, named)  # ...nor closed it
    else:  # spawned: each worker imported the app itself
        assert import_pids == workers, twin


# -- docs/scaling.md, "Several worker processes" -------------------------------------------------
PAGE = ROOT / "docs" / "scaling.md"
FORK_CHECK = """
import os, sys
import sqlalchemy as sa
from fastapi.testclient import TestClient
sys.path.insert(0, sys.argv[1])
import shop  # the page's example: create_all at import

BACKEND = sa.text("SELECT pg_backend_pid()")
engine = shop.db.cached_engine
inherited = engine.pool
assert inherited.checkedin() == 1, inherited.status()  # the connection create_all used
with engine.connect() as connection:
    parent_backend = connection.execute(BACKEND).scalar_one()
child = os.fork()
if child == 0:  # a worker forked after the import, as gunicorn --preload does
    code = 0
    try:
        assert engine.pool is not inherited and engine.pool.checkedin() == 0, engine.pool.status()
        with TestClient(shop.app) as client:
            assert client.post("/hits").status_code == 201
            with shop.db.context_session() as session:
                child_backend = session.execute(BACKEND).scalar_one()
        assert child_backend != parent_backend, (child_backend, parent_backend)
    except BaseException as exc:
        print(f"child: {exc!r}", flush=True)
        code = 1
    os._exit(code)
_, status = os.waitpid(child, 0)
assert os.waitstatus_to_exitcode(status) == 0, "the forked child failed"
with engine.connect() as connection:  # the parent's connection survived the child
    assert connection.execute(BACKEND).scalar_one() == parent_backend
with TestClient(shop.app) as client:
    assert client.post("/hits").status_code == 201
print("fork check: PASSED")
"""


def test_the_scaling_page_example_gets_a_fresh_pool_in_a_forked_worker(
    tmp_path: Path, databases: Databases
) -> None:
    blocks = re.findall(
        r"<!-- test: tests/test_workers.py -->\n```python\n(.*?)```", PAGE.read_text(), flags=re.DOTALL
    )
    assert len(blocks) == 1
    (tmp_path / "shop.py").write_text(blocks[0])
    env = {**os.environ, "DATABASE_URI": databases.url("postgresql")}
    result = subprocess.run(
        [sys.executable, "-c", FORK_CHECK, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "fork check: PASSED" in result.stdout
    direct = FastAPISessionMaker(databases.url("postgresql")).get_new_engine()
    try:
        with direct.connect() as connection:
            stored = connection.execute(sa.text("SELECT count(*) FROM docs_hits")).scalar_one()
    finally:
        direct.dispose()
    assert stored == 2  # the child's request and the parent's
