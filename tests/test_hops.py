"""The sync path takes fewer worker-thread hops than a ``get_db`` generator (the tutorial's, and the
best hand-written pattern's: the same dependency) (README, DESIGN §6)."""

import threading
from collections.abc import Iterator
from typing import Any

import anyio.to_thread
import pytest
import sqlalchemy as sa
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel
from sqlalchemy.orm import Session, sessionmaker

from fastapi_sessionmaker import DBSession, FastAPISessionMaker


class Answer(BaseModel):
    value: int


@pytest.fixture
def hops(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every ``anyio.to_thread.run_sync`` call made while the test runs (FastAPI's and ours)."""
    calls: list[str] = []
    original = anyio.to_thread.run_sync

    async def counting(func: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(getattr(func, "__name__", repr(func)))
        return await original(func, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counting)
    return calls


def ours(url: str) -> tuple[FastAPI, FastAPISessionMaker]:
    db = FastAPISessionMaker(url)
    app = FastAPI()
    db.init_app(app, check_on_startup=False)

    @app.get("/plain", response_model=None)
    def plain(session: DBSession) -> int:
        return int(session.execute(sa.text("SELECT 1")).scalar_one())

    @app.get("/model", response_model=Answer)
    def model(session: DBSession) -> dict[str, int]:
        return {"value": int(session.execute(sa.text("SELECT 1")).scalar_one())}

    return app, db


def tutorial(url: str | sa.URL) -> tuple[FastAPI, sa.Engine]:
    engine = sa.create_engine(url)
    session_local = sessionmaker(bind=engine)

    def get_db() -> Iterator[Session]:
        db = session_local()
        try:
            yield db
        finally:
            db.close()

    app = FastAPI()

    @app.get("/plain", response_model=None)
    def plain(db: Session = Depends(get_db)) -> int:
        return int(db.execute(sa.text("SELECT 1")).scalar_one())

    @app.get("/model", response_model=Answer)
    def model(db: Session = Depends(get_db)) -> dict[str, int]:
        return {"value": int(db.execute(sa.text("SELECT 1")).scalar_one())}

    return app, engine


def count_hops(app: FastAPI, path: str, hops: list[str]) -> int:
    with TestClient(app) as client:
        client.get(path)  # warm up: the first request creates the engine and pool
        hops.clear()
        assert client.get(path).status_code == 200
        return len(hops)  # counted before the client's exit runs the lifespan's shutdown


@pytest.mark.parametrize(("path", "model_hop"), [("/plain", 0), ("/model", 1)])
def test_fewer_thread_hops_than_the_tutorial(
    database_url: str, backend: str, hops: list[str], path: str, model_hop: int
) -> None:
    app, db = ours(database_url)
    tut, engine = tutorial(db.url)
    # The commit of a SQLite read does no I/O (pysqlite opens a transaction only for a write), so
    # it ends on the event loop; the other databases need a worker thread for it.
    commit_hop = 0 if backend == "sqlite" else 1
    try:
        # ours: the endpoint (+ FastAPI's response-model hop) + the commit
        assert count_hops(app, path, hops) == 1 + model_hop + commit_hop
        # the tutorial: + opening and closing the session, each in a thread of its own
        assert count_hops(tut, path, hops) == 3 + model_hop
    finally:
        db.dispose()
        engine.dispose()


def test_a_sqlite_write_is_committed_in_a_worker_thread(tmp_path: Any, hops: list[str]) -> None:
    db = FastAPISessionMaker(f"sqlite:///{tmp_path}/hops.db")
    with db.cached_engine.begin() as connection:
        connection.execute(sa.text("CREATE TABLE notes (body TEXT)"))
    app = FastAPI()
    db.init_app(app, check_on_startup=False)

    @app.get("/write", response_model=None)
    def write(session: DBSession) -> int:
        session.execute(sa.text("INSERT INTO notes VALUES ('x')"))
        return 1

    try:
        assert count_hops(app, "/write", hops) == 2  # the endpoint + the commit
        with db.cached_engine.connect() as connection:
            assert connection.execute(sa.text("SELECT count(*) FROM notes")).scalar_one() == 2
    finally:
        db.dispose()


def test_a_commit_listener_keeps_the_commit_in_a_worker_thread(tmp_path: Any, hops: list[str]) -> None:
    # User code in session events may block: it never runs on the event loop.
    app, db = ours(f"sqlite:///{tmp_path}/hops.db")
    threads: list[str] = []

    def after_commit(session: Session) -> None:
        threads.append(threading.current_thread().name)

    sa.event.listen(db.cached_sessionmaker, "after_commit", after_commit)
    try:
        assert count_hops(app, "/plain", hops) == 2  # the endpoint + the commit
        assert threads
        assert all(name.startswith("AnyIO worker thread") for name in threads), threads
    finally:
        db.dispose()


def test_endpoints_without_a_session_take_no_hop(tmp_path: Any, hops: list[str]) -> None:
    db = FastAPISessionMaker(f"sqlite:///{tmp_path}/hops.db")
    app = FastAPI()
    db.init_app(app, check_on_startup=False)

    @app.get("/ping")
    async def ping() -> str:
        return "pong"

    try:
        assert count_hops(app, "/ping", hops) == 0
    finally:
        db.dispose()
