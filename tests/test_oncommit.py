"""Side effects after the commit: ``on_commit`` / ``on_rollback`` on request sessions and on sessions
outside requests, both twins, SQLite, PostgreSQL and MariaDB (real uvicorn where the response's
timing matters)."""

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Annotated, Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import BackgroundTasks, FastAPI, HTTPException
from fastapi.responses import JSONResponse

from fastapi_sessionmaker import (
    AsyncFastAPISessionMaker,
    FastAPISessionMaker,
    SessionClosedError,
    on_commit,
    on_rollback,
)
from fastapi_sessionmaker.testing import capture_on_commit
from tests.conftest import Maker, wait_until
from tests.models import User, reset_tables, stored_emails

Serve = Callable[..., httpx.Client]
DEADLINE = 10.0


def callbacks_app(maker: Maker, log: list[str], gate: threading.Event | None = None) -> FastAPI:
    """``POST /users/{email}?outcome=...``: registers callbacks, then ends the way it is told."""
    app = FastAPI()
    maker.init_app(app)
    Db = Annotated[Any, maker.dependency]

    def side_effects(session: Any, email: str) -> None:
        def committed() -> None:
            if gate is not None:
                assert gate.wait(DEADLINE)  # the client has its response by now
            log.append(f"commit {email} in {threading.current_thread().name}")

        async def committed_async() -> None:
            log.append(f"async commit {email}")

        on_commit(session, committed)
        on_rollback(session, lambda: log.append(f"rollback {email}"))
        on_commit(session, committed_async)

    def end(outcome: str) -> Any:
        if outcome == "raise":
            raise HTTPException(400)
        if outcome == "return-4xx":
            return JSONResponse({"no": "thanks"}, status_code=422)
        return {"ok": True}

    if maker.is_async:

        @app.post("/users/{email}")
        async def create_async(email: str, outcome: str, session: Db, tasks: BackgroundTasks) -> Any:
            if outcome == "ok-with-task":
                tasks.add_task(log.append, f"task {email}")
            side_effects(session, email)
            session.add(User(email=email))
            await session.flush()
            return end(outcome)
    else:

        @app.post("/users/{email}")
        def create_sync(email: str, outcome: str, session: Db, tasks: BackgroundTasks) -> Any:
            if outcome == "ok-with-task":
                tasks.add_task(log.append, f"task {email}")
            side_effects(session, email)
            session.add(User(email=email))
            session.flush()
            return end(outcome)

    return app


def test_on_commit_runs_after_the_response_was_sent_in_order(
    maker: Maker, sync_engine: sa.Engine, serve: Serve
) -> None:
    reset_tables(sync_engine)
    log: list[str] = []
    gate = threading.Event()
    client = serve(callbacks_app(maker, log, gate))
    try:
        # The first callback waits for ``gate``: had it run before the response, this would hang.
        assert client.post("/users/a@x", params={"outcome": "ok-with-task"}).status_code == 200
        assert log == []
    finally:
        gate.set()
    wait_until(lambda: len(log) == 3, "the callbacks and the background task")
    assert log[0].startswith("commit a@x in ")
    assert "worker thread" in log[0].lower() or "anyio" in log[0].lower()  # sync: not on the loop
    assert log[1:] == ["async commit a@x", "task a@x"]  # the callbacks before the app's own tasks
    assert stored_emails(sync_engine) == ["a@x"]


@pytest.mark.parametrize("outcome", ["raise", "return-4xx", "conflict"])
def test_on_rollback_runs_instead_when_the_request_rolls_back(
    outcome: str, maker: Maker, sync_engine: sa.Engine, serve: Serve
) -> None:
    reset_tables(sync_engine)
    log: list[str] = []
    client = serve(callbacks_app(maker, log))
    if outcome == "conflict":
        with sync_engine.begin() as connection:
            connection.execute(sa.insert(User), [{"email": "b@x", "name": ""}])
        # The flush fails with a unique violation: rolled back, 409.
        response = client.post("/users/b@x", params={"outcome": "ok"})
        assert response.status_code == 409
    else:
        response = client.post("/users/b@x", params={"outcome": outcome})
        assert response.status_code in (400, 422)
        assert stored_emails(sync_engine) == []
    wait_until(lambda: bool(log), "the rollback callback")
    time.sleep(0.05)  # nothing else is on its way
    assert log == ["rollback b@x"]


def test_a_failing_commit_runs_on_rollback(maker: Maker, sync_engine: sa.Engine, serve: Serve) -> None:
    """A deferred failure: the row conflicts only at COMMIT (no flush in the endpoint)."""
    reset_tables(sync_engine)
    with sync_engine.begin() as connection:
        connection.execute(sa.insert(User), [{"email": "c@x", "name": ""}])
    app = FastAPI()
    maker.init_app(app)
    Db = Annotated[Any, maker.dependency]
    log: list[str] = []

    if maker.is_async:

        @app.post("/late")
        async def late_async(session: Db) -> str:
            session.add(User(email="c@x"))
            on_commit(session, lambda: log.append("commit"))
            on_rollback(session, lambda: log.append("rollback"))
            return "sent?"
    else:

        @app.post("/late")
        def late_sync(session: Db) -> str:
            session.add(User(email="c@x"))
            on_commit(session, lambda: log.append("commit"))
            on_rollback(session, lambda: log.append("rollback"))
            return "sent?"

    assert serve(app).post("/late").status_code == 409
    wait_until(lambda: bool(log), "the rollback callback")
    assert log == ["rollback"]


def test_a_failing_callback_is_logged_once_and_the_others_still_run(
    maker: Maker, sync_engine: sa.Engine, serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    reset_tables(sync_engine)
    app = FastAPI()
    maker.init_app(app)
    Db = Annotated[Any, maker.dependency]
    log: list[str] = []

    def broken_mailer() -> None:
        raise RuntimeError("smtp down")

    @app.post("/x")
    async def x(session: Db) -> str:
        on_commit(session, broken_mailer)
        on_commit(session, lambda: log.append("second"))
        return "ok"

    with caplog.at_level(logging.ERROR, logger="fastapi_sessionmaker"):
        assert serve(app).post("/x").status_code == 200
        wait_until(lambda: log == ["second"], "the second callback")
    failures = [r for r in caplog.records if "broken_mailer" in r.getMessage()]
    assert len(failures) == 1
    assert "POST /x" in failures[0].getMessage()
    assert repr(maker.name) in failures[0].getMessage()


def test_a_callback_in_a_rolled_back_savepoint_is_discarded(maker: Maker, sync_engine: sa.Engine) -> None:
    reset_tables(sync_engine)
    log: list[str] = []
    if isinstance(maker, AsyncFastAPISessionMaker):
        async_maker = maker

        async def main() -> None:
            async with async_maker.context_session() as session:
                on_commit(session, lambda: log.append("outer"))
                savepoint = await session.begin_nested()
                on_commit(session, lambda: log.append("undone"))
                await savepoint.rollback()
                async with session.begin_nested():
                    on_commit(session, lambda: log.append("released"))
            await async_maker.dispose()

        asyncio.run(main())
    else:
        assert isinstance(maker, FastAPISessionMaker)
        with maker.context_session() as session:
            on_commit(session, lambda: log.append("outer"))
            savepoint = session.begin_nested()
            on_commit(session, lambda: log.append("undone"))
            savepoint.rollback()
            with session.begin_nested():
                on_commit(session, lambda: log.append("released"))
    assert log == ["outer", "released"]


def test_sessions_outside_requests_run_callbacks_right_after_their_end(
    maker: Maker, sync_engine: sa.Engine
) -> None:
    reset_tables(sync_engine)
    log: list[str] = []
    if isinstance(maker, AsyncFastAPISessionMaker):
        async_maker = maker

        async def main() -> None:
            async with async_maker.context_session() as session:
                session.add(User(email="d@x"))
                on_commit(session, lambda: log.append(f"stored {stored_emails(sync_engine)}"))
            with contextlib.suppress(ValueError):
                async with async_maker.task_session() as task:
                    on_rollback(task, lambda: log.append("task rolled back"))
                    raise ValueError
            generator = async_maker.get_db()
            db = await generator.__anext__()
            on_commit(db, lambda: log.append("get_db committed"))
            with contextlib.suppress(StopAsyncIteration):
                await generator.__anext__()
            with pytest.raises(SessionClosedError):
                on_commit(session, lambda: None)
            await async_maker.dispose()

        asyncio.run(main())
    else:
        assert isinstance(maker, FastAPISessionMaker)
        with maker.context_session() as session:
            session.add(User(email="d@x"))
            on_commit(session, lambda: log.append(f"stored {stored_emails(sync_engine)}"))
        with contextlib.suppress(ValueError), maker.task_session() as task:
            on_rollback(task, lambda: log.append("task rolled back"))
            raise ValueError
        generator: Iterator[Any] = maker.get_db()
        db = next(generator)
        on_commit(db, lambda: log.append("get_db committed"))
        with contextlib.suppress(StopIteration):
            next(generator)
        with pytest.raises(SessionClosedError, match="closed"):
            on_commit(session, lambda: None)
    assert log == ["stored ['d@x']", "task rolled back", "get_db committed"]


def test_the_testing_helper_sees_and_can_hold_back_the_callbacks(tmp_path: Any) -> None:
    maker = FastAPISessionMaker(f"sqlite:///{tmp_path}/cb.db")
    log: list[str] = []
    try:
        with capture_on_commit(execute=False) as captured, maker.context_session() as session:
            on_commit(session, lambda: log.append("sent"))
        assert len(captured) == 1
        assert log == []
        captured[0]()
        assert log == ["sent"]
        with capture_on_commit() as captured, maker.context_session() as session:
            on_commit(session, lambda: log.append("sent again"))
        assert len(captured) == 1
        assert log == ["sent", "sent again"]
    finally:
        maker.dispose()


def test_the_plugin_fixture_lists_the_callbacks_that_ran(fsm_on_commit: list[Any], tmp_path: Any) -> None:
    maker = FastAPISessionMaker(f"sqlite:///{tmp_path}/fixture.db")
    log: list[str] = []
    try:
        with maker.context_session() as session:
            on_commit(session, lambda: log.append("ran"))
    finally:
        maker.dispose()
    assert log == ["ran"]
    assert len(fsm_on_commit) == 1
