"""Shared fixtures: real databases (SQLite, PostgreSQL, MariaDB), both twins, a real uvicorn.

Every test run gets its own PostgreSQL and MariaDB database (``fsm_<pid>``), created on first use
and dropped at the end, so parallel runs and xdist workers never share tables. Under ``CI=true`` an
unreachable server fails the tests; elsewhere they are skipped with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import uvicorn
from fastapi import FastAPI
from sqlalchemy.orm import SessionTransaction

from fastapi_sessionmaker import AsyncFastAPISessionMaker, FastAPISessionMaker

BACKENDS = ("sqlite", "postgresql", "mariadb")
TWINS = ("sync", "async")
SERVERS = {
    "postgresql": "postgresql+psycopg://postgres@127.0.0.1:5432/test",
    "mariadb": "mysql+pymysql://root@127.0.0.1:3306/test",
}
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

Maker = FastAPISessionMaker | AsyncFastAPISessionMaker


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover
        return True
    return True


def drop_database(backend: str, name: str) -> None:
    """Drop the database ``name`` on the ``backend`` server (its sessions ended first); best effort."""
    admin = sa.create_engine(SERVERS[backend], isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    try:
        with admin.connect() as connection:
            if backend == "postgresql":
                connection.execute(
                    sa.text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = :name AND pid <> pg_backend_pid()"
                    ),
                    {"name": name},
                )
            connection.execute(sa.text(f"DROP DATABASE IF EXISTS {name}"))
    except sa.exc.DBAPIError:  # pragma: no cover - best effort at exit
        pass
    finally:
        admin.dispose()


class Databases:
    """Creates one database per backend for this process, lazily; drops them at the end."""

    def __init__(self, tmp_dir: str) -> None:
        self.tmp_dir = tmp_dir
        self.name = f"fsm_{os.getpid()}"
        self.urls: dict[str, str] = {}
        self.errors: dict[str, str] = {}

    def url(self, backend: str) -> str:
        """A driverless URL (``postgresql://``, ``mysql://``, ``sqlite:///``) for ``backend``."""
        if backend in self.urls:
            return self.urls[backend]
        if backend in self.errors:
            self._unreachable(backend, self.errors[backend])
        if backend == "sqlite":
            self.urls[backend] = f"sqlite:///{self.tmp_dir}/{self.name}.db"
            return self.urls[backend]
        admin = sa.create_engine(SERVERS[backend], isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
        try:
            with admin.connect() as connection:
                self._drop_stale(connection, backend)
                connection.execute(sa.text(f"DROP DATABASE IF EXISTS {self.name}"))
                connection.execute(sa.text(f"CREATE DATABASE {self.name}"))
        except sa.exc.OperationalError as exc:
            self.errors[backend] = str(exc).splitlines()[0]
            self._unreachable(backend, self.errors[backend])
        finally:
            admin.dispose()
        scheme = "postgresql" if backend == "postgresql" else "mysql"
        host = "127.0.0.1:5432" if backend == "postgresql" else "127.0.0.1:3306"
        user = "postgres" if backend == "postgresql" else "root"
        self.urls[backend] = f"{scheme}://{user}@{host}/{self.name}"
        return self.urls[backend]

    @staticmethod
    def _drop_stale(connection: sa.Connection, backend: str) -> None:
        query = (
            "SELECT datname FROM pg_database WHERE datname LIKE 'fsm\\_%'"
            if backend == "postgresql"
            else "SELECT schema_name FROM information_schema.schemata WHERE schema_name LIKE 'fsm\\_%'"
        )
        for (name,) in connection.execute(sa.text(query)):
            pid = name.removeprefix("fsm_").split("_")[0]  # fsm_<pid>, fsm_<pid>_reports, ...
            if pid.isdigit() and not _pid_alive(int(pid)):
                with contextlib.suppress(sa.exc.DBAPIError):
                    connection.execute(sa.text(f"DROP DATABASE IF EXISTS {name}"))

    @staticmethod
    def _unreachable(backend: str, reason: str) -> None:
        message = f"{backend} server unreachable: {reason}"
        if IN_CI:
            pytest.fail(message + " (CI=true: a missing server is a failure)")
        pytest.skip(message)

    def drop_all(self) -> None:
        for backend in self.urls:
            if backend != "sqlite":
                drop_database(backend, self.name)


@pytest.fixture(scope="session")
def databases(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Databases]:
    dbs = Databases(str(tmp_path_factory.mktemp("sqlite")))
    yield dbs
    dbs.drop_all()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Each database backend: sqlite (file), postgresql, mariadb."""
    return str(request.param)


@pytest.fixture(params=TWINS)
def twin(request: pytest.FixtureRequest) -> str:
    """Each twin: ``sync`` (Session) and ``async`` (AsyncSession)."""
    return str(request.param)


@pytest.fixture
def database_url(backend: str, databases: Databases) -> str:
    """The driverless URL of this test's database; each twin fills in its own driver."""
    return databases.url(backend)


@pytest.fixture
def sync_engine(database_url: str) -> Iterator[sa.Engine]:
    """A plain sync engine on the test database, to set up tables and read what was stored."""
    engine = FastAPISessionMaker(database_url).get_new_engine()
    yield engine
    engine.dispose()


MakerFactory = Callable[..., Maker]


ROOT = Path(__file__).resolve().parent.parent


def run_smoke(script: str, *options: str, smoke: bool = True, timeout: float = 120) -> str:
    """Run ``benchmarks/<script> --smoke`` (without ``--smoke`` when ``smoke`` is False; bounded by
    ``timeout`` seconds); its standard output (it must exit 0)."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *(["--smoke"] if smoke else []), *options],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result.stdout


def wait_until(condition: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    """Poll ``condition`` (bounded by ``timeout`` seconds); fail naming ``what`` if it never holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def checked_out(pool: sa.Pool) -> int:
    """Connections of ``pool`` that are checked out now (0 for pools that do not count)."""
    count = getattr(pool, "checkedout", None)
    return int(count()) if callable(count) else 0


def pool_of(maker: Maker) -> sa.Pool:
    """The pool of ``maker``'s cached engine (sync or async)."""
    engine = maker.cached_engine
    return engine.pool if isinstance(engine, sa.Engine) else engine.sync_engine.pool


@pytest.fixture
def make_maker(database_url: str, twin: str) -> Iterator[MakerFactory]:
    """Build makers of this test's twin on its database; each must end with nothing checked out."""
    made: list[Maker] = []

    def make(url: str | None = None, **kwargs: Any) -> Maker:
        cls = FastAPISessionMaker if twin == "sync" else AsyncFastAPISessionMaker
        maker = cls(url or database_url, **kwargs)
        made.append(maker)
        return maker

    yield make
    leaks = []
    for maker in made:
        engine = maker._engine
        if engine is None:  # never used, or disposed by the app's lifespan
            continue
        pool = engine.pool if isinstance(engine, sa.Engine) else engine.sync_engine.pool
        if checked_out(pool):
            leaks.append(f"{maker!r} left connections checked out: {pool.status()}")
        if isinstance(maker, FastAPISessionMaker):
            maker.dispose()
        else:
            asyncio.run(maker.dispose())
    assert not leaks, leaks


@pytest.fixture
def maker(make_maker: MakerFactory) -> Maker:
    """A maker of this test's twin on its database."""
    return make_maker()


class Server:
    """A real uvicorn serving an app on 127.0.0.1 in a background thread.

    The plain asyncio loop and h11 unless ``loop=`` / ``http=`` say otherwise (the benchmarks
    serve with uvloop and httptools, the ``bench`` extra): installing them changes no test.
    """

    def __init__(self, app: FastAPI, **config: Any) -> None:
        config = {"loop": "asyncio", "http": "h11", **config}
        self.config = uvicorn.Config(
            app, host="127.0.0.1", port=0, log_level="warning", lifespan="on", **config
        )
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout: float = 10.0) -> str:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("uvicorn exited during start-up (see the log above)")
            if time.monotonic() > deadline:  # pragma: no cover
                raise TimeoutError("uvicorn did not start in time")
            time.sleep(0.005)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "uvicorn did not stop in time"


def pool_leaks(app: FastAPI, timeout: float = 5.0) -> list[str]:
    """Pools of the makers installed on ``app`` that still have connections out after ``timeout``.

    The guard gives connections back when the response body is complete, which the client may see
    a moment before the server finishes: wait (bounded) before calling it a leak.
    """
    registry = getattr(app.state, "fastapi_sessionmaker", None)
    makers = list(getattr(registry, "makers", {}).values())
    deadline = time.monotonic() + timeout
    leaks = []
    for maker in makers:
        engine = maker._engine
        if engine is None:
            continue
        pool = engine.pool if isinstance(engine, sa.Engine) else engine.sync_engine.pool
        while checked_out(pool) and time.monotonic() < deadline:
            time.sleep(0.01)
        if checked_out(pool):
            leaks.append(f"{maker!r} left connections checked out: {pool.status()}")
    return leaks


@pytest.fixture
def serve() -> Iterator[Callable[..., httpx.Client]]:
    """``serve(app)`` runs ``app`` under a real uvicorn and returns an httpx client for it.

    At the end of the test, every pool of the makers installed on the app must have all its
    connections back (pass ``check_pools=False`` for a test that abandons one on purpose).
    """
    running: list[tuple[Server, httpx.Client, FastAPI, bool]] = []

    def start(app: FastAPI, *, check_pools: bool = True, **config: Any) -> httpx.Client:
        server = Server(app, **config)
        base_url = server.start()
        client = httpx.Client(base_url=base_url, timeout=30.0)
        running.append((server, client, app, check_pools))
        return client

    yield start
    leaks: list[str] = []
    for server, client, app, check_pools in reversed(running):
        client.close()
        if check_pools:
            leaks.extend(pool_leaks(app))
        server.stop()
    assert not leaks, leaks


@pytest.fixture
def orm_prepares(monkeypatch: pytest.MonkeyPatch) -> list[SessionTransaction]:
    """The transactions whose prepare step ran from here on: ``Session.commit()``'s own steps,
    which ``_compat.commit``'s short way skips."""
    prepared: list[SessionTransaction] = []
    original = SessionTransaction._prepare_impl

    def prepare(transaction: SessionTransaction) -> None:
        prepared.append(transaction)
        original(transaction)

    monkeypatch.setattr(SessionTransaction, "_prepare_impl", prepare)
    return prepared
