"""Logs: one structured line per mapped error, never a password; SQL echo hides bound parameters."""

import logging
import socket
from collections.abc import Callable
from typing import Annotated, Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI

from fastapi_sessionmaker import FastAPISessionMaker
from tests.conftest import Maker, MakerFactory
from tests.models import User, reset_tables

Serve = Callable[..., httpx.Client]
SECRET = "s3cret-pw"


def mapped(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "fastapi_sessionmaker" and hasattr(r, "error_class")]


def create_users_app(maker: Maker) -> FastAPI:
    app = FastAPI()
    maker.init_app(app, check_on_startup=False)
    Db = Annotated[Any, maker.dependency]

    if maker.is_async:

        @app.post("/users/{email}")
        async def create_async(email: str, session: Db) -> str:
            session.add(User(email=email))
            return email
    else:

        @app.post("/users/{email}")
        def create_sync(email: str, session: Db) -> str:
            session.add(User(email=email))
            return email

    return app


def test_one_structured_line_per_mapped_error(
    make_maker: MakerFactory, sync_engine: sa.Engine, serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    reset_tables(sync_engine)
    maker = make_maker(name="main")
    client = serve(create_users_app(maker))
    assert client.post("/users/a@x").status_code == 200
    with caplog.at_level(logging.WARNING, logger="fastapi_sessionmaker"):
        assert client.post("/users/a@x").status_code == 409
    (record,) = mapped(caplog)
    assert record.status == 409  # type: ignore[attr-defined]
    assert record.error_class == "IntegrityError"  # type: ignore[attr-defined]
    assert record.path == "/users/a@x"  # type: ignore[attr-defined]
    assert record.database == "main"  # type: ignore[attr-defined]
    assert record.getMessage() == (
        "database error mapped to 409: IntegrityError on POST /users/a@x (database 'main')"
    )


def test_mapped_outage_is_logged_once_without_the_password(
    twin: str, make_maker: MakerFactory, serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    connect = {"connect_timeout" if twin == "sync" else "timeout": 3}
    maker = make_maker(
        f"postgresql://app:{SECRET}@127.0.0.1:{port}/app",
        name="orders",
        engine_options={"connect_args": connect},
    )
    client = serve(create_users_app(maker))
    with caplog.at_level(logging.DEBUG):
        response = client.post("/users/a@x")
    assert response.status_code == 503
    (record,) = mapped(caplog)
    assert record.status == 503  # type: ignore[attr-defined]
    assert record.database == "orders"  # type: ignore[attr-defined]
    assert SECRET not in caplog.text
    assert all(SECRET not in r.getMessage() for r in caplog.records)
    assert SECRET not in repr(maker)


@pytest.mark.parametrize(("hide", "visible"), [(None, False), (False, True)])
def test_sql_echo_hides_bound_parameters_by_default(
    database_url: str,
    sync_engine: sa.Engine,
    hide: bool | None,
    visible: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    reset_tables(sync_engine)
    options: dict[str, Any] = {"echo": True}
    if hide is not None:
        options["hide_parameters"] = hide
    maker = FastAPISessionMaker(database_url, engine_options=options)
    try:
        with caplog.at_level(logging.INFO, logger="sqlalchemy.engine"), maker.context_session() as session:
            session.add(User(email="private-value@x"))
    finally:
        maker.dispose()
    assert "INSERT INTO fsm_users" in caplog.text
    assert ("private-value@x" in caplog.text) is visible
