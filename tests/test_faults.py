"""Database faults against a private PostgreSQL: killed backends, a stopped and restarted server.

The server is this module's own (``initdb`` in a temporary directory, a free port on 127.0.0.1),
never the shared one; it is stopped and removed at the end. Each scenario also runs on a
tutorial-style app (no ``pool_pre_ping``, no error mapping) to show what goes wrong there.
"""

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import anyio
import httpx
import pytest
import sqlalchemy as sa
from fastapi import Depends, FastAPI
from sqlalchemy.orm import Session, sessionmaker

from fastapi_sessionmaker import AsyncFastAPISessionMaker, FastAPISessionMaker, health_router
from tests.conftest import Maker, checked_out, pool_of

pytestmark = pytest.mark.faults

Serve = Callable[..., httpx.Client]
PG_BIN = Path("/usr/lib/postgresql/15/bin")
POOL = {"pool_size": 2, "max_overflow": 0, "pool_timeout": 5}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivatePostgres:
    """A throw-away PostgreSQL cluster owned by the ``postgres`` user, on a free local port."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="fsm-faults-pg-"))
        shutil.chown(self.directory, "postgres", "postgres")
        self.port = _free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 60) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *args],
            check=True,
            timeout=timeout,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def init(self) -> None:
        self._run(str(PG_BIN / "initdb"), "-D", str(self.directory / "data"), "-A", "trust", "-U", "postgres")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = str(self.directory / "server.log")
        pg_ctl = str(PG_BIN / "pg_ctl")
        self._run(
            pg_ctl, "-D", str(self.directory / "data"), "-o", options, "-l", log, "-w", "-t", "30", "start"
        )

    def stop(self) -> None:
        self._run(
            str(PG_BIN / "pg_ctl"), "-D", str(self.directory / "data"), "-m", "fast", "-w", "-t", "30", "stop"
        )

    def running(self) -> bool:
        return (self.directory / "data" / "postmaster.pid").exists()

    def terminate_backends(self) -> int:
        """Kill every other backend of this private server; how many were killed.

        The timeout makes ``pg_terminate_backend`` wait until each backend has exited (and so has
        sent its goodbye to the client): a kill still in flight could not be seen by any check.
        """
        admin = sa.create_engine(
            self.url.replace("postgresql://", "postgresql+psycopg://"),
            poolclass=sa.NullPool,
            isolation_level="AUTOCOMMIT",
        )
        try:
            with admin.connect() as connection:
                killed = connection.execute(
                    sa.text(
                        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000)) "
                        "FROM pg_stat_activity "
                        "WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'"
                    )
                ).scalar_one()
        finally:
            admin.dispose()
        return int(killed)

    def terminate(self, pid: int) -> None:
        admin = sa.create_engine(
            self.url.replace("postgresql://", "postgresql+psycopg://"),
            poolclass=sa.NullPool,
            isolation_level="AUTOCOMMIT",
        )
        try:
            with admin.connect() as connection:
                kill = sa.text("SELECT pg_terminate_backend(:pid, 5000)")
                assert connection.execute(kill, {"pid": pid}).scalar()
        finally:
            admin.dispose()

    def remove(self) -> None:
        if self.running():
            try:
                self.stop()
            except (subprocess.SubprocessError, OSError):  # pragma: no cover - last resort
                pid = int((self.directory / "data" / "postmaster.pid").read_text().split()[0])
                os.kill(pid, 9)
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture(scope="module")
def private_pg() -> Iterator[PrivatePostgres]:
    if not (PG_BIN / "initdb").exists() or os.geteuid() != 0:
        pytest.skip("needs PostgreSQL 15 binaries and root (to run them as the postgres user)")
    server = PrivatePostgres()
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.remove()


@pytest.fixture
def pg(private_pg: PrivatePostgres) -> PrivatePostgres:
    """The private server, running (a test that stopped it without restarting is repaired)."""
    if not private_pg.running():
        private_pg.start()
    return private_pg


def fault_maker(twin: str, url: str) -> Maker:
    """A maker with short connect timeouts, so an outage is a quick 503, never a hang."""
    if twin == "sync":
        return FastAPISessionMaker(
            url, engine_options={**POOL, "connect_args": {"connect_timeout": 3}}, name="faulty"
        )
    return AsyncFastAPISessionMaker(
        url, engine_options={**POOL, "connect_args": {"timeout": 3}}, name="faulty"
    )


def fault_app(maker: Maker, gate: threading.Event | None = None, pids: list[int] | None = None) -> FastAPI:
    """``/one`` reads; ``/slow`` reads, waits for ``gate`` (backend pid in ``pids``), reads again."""
    app = FastAPI()
    maker.init_app(app)
    app.include_router(health_router(timeout=3))
    Db = Annotated[Any, maker.dependency]

    if maker.is_async:

        @app.get("/one")
        async def one_async(session: Db) -> int:
            return int((await session.execute(sa.text("SELECT 1"))).scalar_one())

        @app.get("/slow")
        async def slow_async(session: Db) -> int:
            assert gate is not None
            assert pids is not None
            pids.append((await session.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one())
            assert await anyio.to_thread.run_sync(gate.wait, 10)
            return int((await session.execute(sa.text("SELECT 2"))).scalar_one())

    else:

        @app.get("/one")
        def one_sync(session: Db) -> int:
            return int(session.execute(sa.text("SELECT 1")).scalar_one())

        @app.get("/slow")
        def slow_sync(session: Db) -> int:
            assert gate is not None
            assert pids is not None
            pids.append(session.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())
            assert gate.wait(10)
            return int(session.execute(sa.text("SELECT 2")).scalar_one())

    return app


def tutorial_app(url: str) -> tuple[FastAPI, sa.Engine]:
    """The FastAPI tutorial: a plain engine (no pre-ping) and ``get_db`` closing the session."""
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"), **POOL)
    session_local = sessionmaker(bind=engine)

    def get_db() -> Iterator[Session]:
        db = session_local()
        try:
            yield db
        finally:
            db.close()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.dispose()  # at server shutdown, once every request has ended

    app = FastAPI(lifespan=lifespan)

    @app.get("/one")
    def one(db: Session = Depends(get_db)) -> int:
        return int(db.execute(sa.text("SELECT 1")).scalar_one())

    return app, engine


def status(client: httpx.Client, path: str = "/one") -> int:
    """The status of one request on a fresh connection; -1 when the server reset it."""
    try:
        return client.get(path, headers={"Connection": "close"}).status_code
    except httpx.TransportError:
        return -1


def warm(client: httpx.Client, count: int = 4) -> None:
    """Open connections in the pool (concurrent requests make the pool grow to its size)."""
    threads = [threading.Thread(target=client.get, args=("/one",)) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert client.get("/one").status_code == 200


def test_tutorial_loses_a_request_after_backends_are_killed(pg: PrivatePostgres, serve: Serve) -> None:
    app, _ = tutorial_app(pg.url)
    client = serve(app)
    warm(client)
    assert pg.terminate_backends() >= 1
    statuses = [status(client) for _ in range(3)]
    assert statuses[0] in (500, -1)  # the bad outcome: a request that started after the fault fails
    assert statuses[1:] == [200, 200]


def test_backends_killed_between_requests_cost_no_request(
    twin: str, pg: PrivatePostgres, serve: Serve
) -> None:
    maker = fault_maker(twin, pg.url)
    client = serve(fault_app(maker))
    warm(client)
    assert pg.terminate_backends() >= 1
    assert [client.get("/one").status_code for _ in range(5)] == [200] * 5
    assert checked_out(pool_of(maker)) == 0


def test_backend_killed_during_a_request_is_a_503_and_the_next_requests_succeed(
    twin: str, pg: PrivatePostgres, serve: Serve
) -> None:
    gate = threading.Event()
    pids: list[int] = []
    maker = fault_maker(twin, pg.url)
    client = serve(fault_app(maker, gate, pids))
    result: list[httpx.Response] = []
    request = threading.Thread(target=lambda: result.append(client.get("/slow")))
    request.start()
    try:
        deadline = time.monotonic() + 10
        while not pids and time.monotonic() < deadline and request.is_alive():
            time.sleep(0.01)  # polling for the endpoint to report its backend (bounded)
        assert pids, "the endpoint did not start"
        pg.terminate(pids[0])
    finally:
        gate.set()
        request.join(20)
    assert not request.is_alive()
    response = result[0]
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["retry-after"] == "1"
    assert [client.get("/one").status_code for _ in range(3)] == [200] * 3
    assert checked_out(pool_of(maker)) == 0


def test_tutorial_outage_is_a_500(pg: PrivatePostgres, serve: Serve) -> None:
    app, _ = tutorial_app(pg.url)
    client = serve(app)
    try:
        assert client.get("/one").status_code == 200
        pg.stop()
        outage = status(client)
    finally:
        pg.start()
    assert outage in (500, -1)  # the bad outcome: no 503, no Retry-After; the client cannot tell


def test_server_stopped_is_a_quick_503_and_the_app_recovers_without_restart(
    twin: str, pg: PrivatePostgres, serve: Serve
) -> None:
    maker = fault_maker(twin, pg.url)
    client = serve(fault_app(maker))
    warm(client)
    health = client.get("/healthz")
    assert health.status_code == 200
    assert health.json()["databases"]["faulty"]["status"] == "ok"
    pg.stop()
    try:
        for _ in range(3):
            started = time.monotonic()
            response = client.get("/one")
            elapsed = time.monotonic() - started
            assert response.status_code == 503
            assert response.headers["retry-after"] == "1"
            assert elapsed < POOL["pool_timeout"], f"a request during the outage took {elapsed:.1f} s"
        health = client.get("/healthz")
        assert health.status_code == 503
        report = health.json()["databases"]["faulty"]
        assert report["status"] == "unavailable"
        assert report["pool"]["checked_out"] == 0
    finally:
        pg.start()
    assert [client.get("/one").status_code for _ in range(5)] == [200] * 5
    assert client.get("/healthz").status_code == 200
    assert checked_out(pool_of(maker)) == 0
