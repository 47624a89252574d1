"""The request-session dependency refuses to run where it could not keep its promise.

None of these reach a database: each error is raised before a session is opened, so nothing is
left to roll back or give back to a pool.
"""

# No ``from __future__ import annotations``: FastAPI resolves the endpoints' local annotations.

import asyncio
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.requests import Request

from fastapi_sessionmaker import (
    AsyncDBSession,
    DBSession,
    FastAPISessionMaker,
    NotInstalledError,
)
from fastapi_sessionmaker._request import Registry, RequestState, dependency_for, enter_state, reset_state
from tests.conftest import checked_out, pool_of


def test_db_session_without_init_app_says_to_call_it() -> None:
    app = FastAPI()

    @app.get("/")
    def endpoint(session: DBSession) -> str:  # pragma: no cover - never reached
        return "unreachable"

    with TestClient(app) as client, pytest.raises(NotInstalledError, match=r"maker\.init_app\(app\)"):
        client.get("/")


def test_async_session_with_only_a_sync_maker_installed_names_the_missing_maker(tmp_path: Path) -> None:
    app = FastAPI()
    maker = FastAPISessionMaker(f"sqlite:///{tmp_path / 'db.sqlite'}")
    maker.init_app(app)

    @app.get("/")
    async def endpoint(session: AsyncDBSession) -> str:  # pragma: no cover - never reached
        return "unreachable"

    with TestClient(app) as client:
        pool = pool_of(maker)  # the app's own pool: the start-up check opened it
        with pytest.raises(NotInstalledError, match="AsyncFastAPISessionMaker"):
            client.get("/")
        assert checked_out(pool) == 0
        state = app.state.fastapi_sessionmaker
        assert state.makers == {"default": maker}  # nothing else was installed on the way


def test_without_fastapis_endpoint_exit_stack_no_session_is_opened(tmp_path: Path) -> None:
    # The exit stack is how the dependency learns that the endpoint raised; without it the commit
    # rule could not be applied, so the dependency refuses before opening anything.
    maker = FastAPISessionMaker(f"sqlite:///{tmp_path / 'db.sqlite'}")
    state = RequestState(Registry())
    dependency = dependency_for(lambda _: maker, None)
    request = Request({"type": "http", "method": "GET", "path": "/", "headers": [], "query_string": b""})

    async def call() -> None:
        token = enter_state(state)
        try:
            await dependency(request)
        finally:
            reset_state(token)

    with pytest.raises(NotInstalledError, match="fastapi_function_astack"):
        asyncio.run(call())
    assert state.entries == []
    assert maker._engine is None  # no engine, no pool, no connection
