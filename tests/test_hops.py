"""The sync path takes fewer worker-thread hops than the tutorial pattern (README, DESIGN §6)."""

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


def tutorial(url: str) -> tuple[FastAPI, sa.Engine]:
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


@pytest.mark.parametrize(("path", "ours_hops", "tutorial_hops"), [("/plain", 2, 3), ("/model", 3, 4)])
def test_fewer_thread_hops_than_the_tutorial(
    tmp_path: Any, hops: list[str], path: str, ours_hops: int, tutorial_hops: int
) -> None:
    url = f"sqlite:///{tmp_path}/hops.db"
    app, db = ours(url)
    tut, engine = tutorial(url)
    try:
        assert count_hops(app, path, hops) == ours_hops  # endpoint (+ response model) + commit
        assert count_hops(tut, path, hops) == tutorial_hops  # + opening and closing the session
    finally:
        db.dispose()
        engine.dispose()


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
