"""health_router and pool_stats: every installed database checked with a timeout, pool reported."""

import socket
import time
from collections.abc import Callable, Iterator
from typing import Annotated, Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI

from fastapi_sessionmaker import FastAPISessionMaker, health_router, pool_stats
from tests.conftest import MakerFactory

Serve = Callable[..., httpx.Client]
SECRET = "s3cret-pw"


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections and never answers (a hung database)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield int(sock.getsockname()[1])


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port nothing listens on (a database that is down), held for the whole test: released, it
    could be the next ephemeral port, and the test's own server took it (the "database" then
    answered with HTTP, and asyncpg reported a ConnectionError)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, never listening: connections to it are refused
        yield int(sock.getsockname()[1])


def timeouts(twin: str, seconds: int) -> dict[str, Any]:
    return {"connect_args": {"connect_timeout" if twin == "sync" else "timeout": seconds}}


def test_health_reports_every_installed_database_with_its_pool(
    make_maker: MakerFactory, serve: Serve
) -> None:
    main = make_maker(name="main", engine_options={"pool_size": 3, "max_overflow": 2})
    other = make_maker(name="other")
    app = FastAPI()
    main.init_app(app)
    other.init_app(app)
    app.include_router(health_router())
    Db = Annotated[Any, main.dependency]

    @app.get("/ping")
    async def ping(session: Db) -> str:
        return "pong"

    client = serve(app)
    response = client.get("/healthz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert list(body["databases"]) == ["main", "other"]
    report = body["databases"]["main"]
    assert report["status"] == "ok"
    assert report["latency_ms"] >= 0
    assert report["pool"]["size"] == 3
    assert report["pool"]["checked_out"] == 0
    assert report["pool"]["overflow"] <= 0
    assert "/healthz" not in client.get("/openapi.json").json()["paths"]


def test_pool_stats_count_checked_out_connections(database_url: str) -> None:
    maker = FastAPISessionMaker(database_url, engine_options={"pool_size": 2, "max_overflow": 1})
    try:
        with maker.context_session() as session:
            session.execute(sa.text("SELECT 1"))
            stats = pool_stats(maker)
        assert stats["size"] == 2
        assert stats["checked_out"] == 1
        assert pool_stats(maker)["checked_out"] == 0
        assert pool_stats(maker)["checked_in"] == 1
    finally:
        maker.dispose()


def test_health_is_503_quickly_when_a_database_is_down(
    twin: str, make_maker: MakerFactory, closed_port: int, serve: Serve
) -> None:
    up = make_maker(name="up")
    down = make_maker(
        f"postgresql://postgres:{SECRET}@127.0.0.1:{closed_port}/down",
        name="down",
        engine_options=timeouts(twin, 3),
    )
    app = FastAPI()
    up.init_app(app)
    down.init_app(app, check_on_startup=False)
    app.include_router(health_router(up, down, path="/ready", timeout=2))
    client = serve(app)
    started = time.monotonic()
    response = client.get("/ready")
    assert time.monotonic() - started < 2
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["databases"]["up"]["status"] == "ok"
    assert body["databases"]["down"]["status"] == "unavailable"
    assert body["databases"]["down"]["error"] in {"OperationalError", "ConnectionRefusedError", "OSError"}
    assert SECRET not in response.text


def test_health_check_times_out_on_a_hung_database(
    twin: str, make_maker: MakerFactory, silent_port: int, serve: Serve
) -> None:
    hung = make_maker(
        f"postgresql://postgres@127.0.0.1:{silent_port}/hung", name="hung", engine_options=timeouts(twin, 3)
    )
    app = FastAPI()
    hung.init_app(app, check_on_startup=False)
    app.include_router(health_router(timeout=0.5))
    client = serve(app, check_pools=False)  # the abandoned probe keeps connecting until its timeout
    started = time.monotonic()
    response = client.get("/healthz")
    elapsed = time.monotonic() - started
    assert response.status_code == 503
    assert response.json()["databases"]["hung"]["error"] == "no answer within 0.5 s"
    assert elapsed < 2.5, f"the probe took {elapsed:.1f} s"
