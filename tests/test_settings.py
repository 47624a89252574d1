"""``DatabaseSettings`` from the environment, the makers built from it, and one-line config errors."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url

from fastapi_sessionmaker import (
    AsyncFastAPISessionMaker,
    ConfigurationError,
    DatabaseSettings,
    DatabaseUnavailableError,
    FastAPISessionMaker,
)
from tests.conftest import Databases, Maker

SECRET = "s3cr3t-pw-x9"
VARIABLES = ("URI", "SCHEME", "USER", "PASSWORD", "HOST", "PORT", "NAME")
POOL_VARIABLES = ("POOL_SIZE", "MAX_OVERFLOW", "POOL_TIMEOUT", "POOL_RECYCLE", "ECHO")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No ``DATABASE_*`` variable from the machine leaks into a test."""
    for variable in VARIABLES + POOL_VARIABLES:
        monkeypatch.delenv(f"DATABASE_{variable}", raising=False)
    return monkeypatch


def maker_class(twin: str) -> type[Maker]:
    return FastAPISessionMaker if twin == "sync" else AsyncFastAPISessionMaker


def pool_of(maker: Maker) -> sa.Pool:
    engine = maker.cached_engine
    return engine.pool if isinstance(engine, sa.Engine) else engine.sync_engine.pool


def sync_engine_of(maker: Maker) -> sa.Engine:
    engine = maker.cached_engine
    return engine if isinstance(engine, sa.Engine) else engine.sync_engine


def select_one(maker: Maker) -> int:
    """``SELECT 1`` through the maker's own session (and driver), then dispose its pool."""
    if isinstance(maker, FastAPISessionMaker):
        try:
            with maker.context_session() as session:
                return int(session.execute(sa.text("SELECT 1")).scalar_one())
        finally:
            maker.dispose()

    async def main() -> int:
        try:
            async with maker.context_session() as session:
                return int((await session.execute(sa.text("SELECT 1"))).scalar_one())
        finally:
            await maker.dispose()

    return asyncio.run(main())


def dispose(maker: Maker) -> None:
    if isinstance(maker, FastAPISessionMaker):
        maker.dispose()
    else:
        asyncio.run(maker.dispose())


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def assert_one_line_without_secret(error: BaseException) -> str:
    text = str(error)
    assert text
    assert "\n" not in text
    assert SECRET not in text
    assert SECRET not in repr(error)
    return text


# -- reading the environment ---------------------------------------------------------------


def test_database_uri_from_environment(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("DATABASE_URI", f"postgresql://app:{SECRET}@db.example:6432/shop")
    settings = DatabaseSettings()
    url = settings.url()
    assert url.render_as_string(hide_password=False) == f"postgresql://app:{SECRET}@db.example:6432/shop"
    assert settings.engine_options() == {}


def test_components_derive_the_uri(clean_env: pytest.MonkeyPatch) -> None:
    for variable, value in {
        "SCHEME": "postgresql+psycopg",
        "USER": "app",
        "PASSWORD": SECRET + "/@:",  # characters that must be escaped in a URL
        "HOST": "db.example",
        "PORT": "6432",
        "NAME": "shop",
    }.items():
        clean_env.setenv(f"DATABASE_{variable}", value)
    url = DatabaseSettings().url()
    assert url.drivername == "postgresql+psycopg"
    assert (url.username, url.password, url.host, url.port, url.database) == (
        "app",
        SECRET + "/@:",
        "db.example",
        6432,
        "shop",
    )
    # The derived URI is a real URL: rendering and parsing it again gives the same parts.
    assert make_url(url.render_as_string(hide_password=False)) == url


def test_uri_wins_over_components(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("DATABASE_URI", "sqlite:///./from-uri.db")
    clean_env.setenv("DATABASE_SCHEME", "postgresql")
    clean_env.setenv("DATABASE_HOST", "elsewhere")
    assert DatabaseSettings().url().render_as_string() == "sqlite:///./from-uri.db"


def test_pool_options_reach_the_engine(clean_env: pytest.MonkeyPatch, twin: str, tmp_path: Path) -> None:
    clean_env.setenv("DATABASE_URI", f"sqlite:///{tmp_path}/pool.db")
    for variable, value in {
        "POOL_SIZE": "3",
        "MAX_OVERFLOW": "4",
        "POOL_TIMEOUT": "7.5",
        "POOL_RECYCLE": "120",
        "ECHO": "true",
    }.items():
        clean_env.setenv(f"DATABASE_{variable}", value)
    maker = maker_class(twin)()
    try:
        pool = pool_of(maker)
        engine = sync_engine_of(maker)
        assert isinstance(pool, sa.QueuePool)
        assert pool.size() == 3
        assert pool._max_overflow == 4
        assert pool._timeout == 7.5
        assert pool._recycle == 120
        assert engine.echo is True
        assert engine.hide_parameters is True  # echo never prints bound values by default
    finally:
        dispose(maker)


def test_echo_hides_bound_parameters(twin: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = DatabaseSettings(uri=f"sqlite:///{tmp_path}/echo.db", echo=True)
    maker = maker_class(twin)(settings=settings)
    caplog.set_level(logging.INFO, logger="sqlalchemy.engine")
    if isinstance(maker, FastAPISessionMaker):
        try:
            with maker.context_session() as session:
                session.execute(sa.text("SELECT :value"), {"value": SECRET})
        finally:
            maker.dispose()
    else:
        async_maker = maker

        async def main() -> None:
            try:
                async with async_maker.context_session() as session:
                    await session.execute(sa.text("SELECT :value"), {"value": SECRET})
            finally:
                await async_maker.dispose()

        asyncio.run(main())
    assert "SELECT ?" in caplog.text  # the statement is echoed...
    assert "parameters hidden" in caplog.text
    assert SECRET not in caplog.text  # ...its bound values are not


def test_explicit_engine_options_win_over_settings(tmp_path: Path) -> None:
    settings = DatabaseSettings(uri=f"sqlite:///{tmp_path}/win.db", pool_size=3, echo=True)
    maker = FastAPISessionMaker(settings=settings, engine_options={"pool_size": 9, "hide_parameters": False})
    try:
        assert isinstance(maker.cached_engine.pool, sa.QueuePool)
        assert maker.cached_engine.pool.size() == 9
        assert maker.cached_engine.hide_parameters is False
    finally:
        maker.dispose()


# -- the password is a secret --------------------------------------------------------------


@pytest.mark.parametrize("where", ["uri", "components"])
def test_password_never_printed(clean_env: pytest.MonkeyPatch, where: str) -> None:
    if where == "uri":
        clean_env.setenv("DATABASE_URI", f"postgresql://app:{SECRET}@db.example/shop")
    else:
        clean_env.setenv("DATABASE_SCHEME", "postgresql")
        clean_env.setenv("DATABASE_USER", "app")
        clean_env.setenv("DATABASE_PASSWORD", SECRET)
        clean_env.setenv("DATABASE_HOST", "db.example")
        clean_env.setenv("DATABASE_NAME", "shop")
    settings = DatabaseSettings()
    for text in (
        repr(settings),
        str(settings),
        settings.model_dump_json(),
        str(settings.model_dump()),
        repr(FastAPISessionMaker(settings=settings)),
        repr(AsyncFastAPISessionMaker(settings=settings)),
        FastAPISessionMaker(settings=settings).safe_url(),
    ):
        assert SECRET not in text
    # ...but the engine gets it.
    assert settings.url().password == SECRET


@pytest.mark.parametrize(
    ("variables", "named"),
    [
        pytest.param({"PORT": "not-a-port"}, "DATABASE_PORT", id="port"),
        pytest.param({"POOL_SIZE": "many"}, "DATABASE_POOL_SIZE", id="pool-size"),
        pytest.param({"ECHO": "maybe"}, "DATABASE_ECHO", id="echo"),
    ],
)
def test_invalid_value_names_the_variable_not_the_password(
    clean_env: pytest.MonkeyPatch, variables: dict[str, str], named: str
) -> None:
    clean_env.setenv("DATABASE_URI", f"postgresql://app:{SECRET}@db.example/shop")
    clean_env.setenv("DATABASE_PASSWORD", SECRET)
    for variable, value in variables.items():
        clean_env.setenv(f"DATABASE_{variable}", value)
    with pytest.raises(ConfigurationError) as caught:
        DatabaseSettings()
    text = assert_one_line_without_secret(caught.value)
    assert named in text


# -- makers built from settings, on the real databases -------------------------------------


def test_maker_from_settings_object(clean_env: pytest.MonkeyPatch, database_url: str, twin: str) -> None:
    settings = DatabaseSettings(uri=database_url, pool_size=2, max_overflow=1)
    maker = maker_class(twin)(settings=settings)
    assert select_one(maker) == 1
    # the pool options were used (a new engine after the dispose in select_one)
    pool = pool_of(maker)
    try:
        if isinstance(pool, sa.QueuePool):
            assert pool.size() == 2
            assert pool._max_overflow == 1
    finally:
        dispose(maker)


def test_maker_reads_the_environment(clean_env: pytest.MonkeyPatch, database_url: str, twin: str) -> None:
    clean_env.setenv("DATABASE_URI", database_url)
    maker = maker_class(twin)()
    assert maker.url.get_backend_name() == make_url(database_url).get_backend_name()
    assert select_one(maker) == 1


def test_maker_from_components_on_postgresql(
    clean_env: pytest.MonkeyPatch, databases: Databases, twin: str
) -> None:
    url = make_url(databases.url("postgresql"))
    clean_env.setenv("DATABASE_SCHEME", "postgresql")  # no driver: each twin picks its own
    clean_env.setenv("DATABASE_USER", str(url.username))
    clean_env.setenv("DATABASE_HOST", str(url.host))
    clean_env.setenv("DATABASE_PORT", str(url.port))
    clean_env.setenv("DATABASE_NAME", str(url.database))
    maker = maker_class(twin)()
    assert maker.url.drivername == ("postgresql+psycopg" if twin == "sync" else "postgresql+asyncpg")
    assert select_one(maker) == 1


def test_async_maker_needs_no_sync_driver(clean_env: pytest.MonkeyPatch, databases: Databases) -> None:
    """An app installed with only the ``asyncpg`` extra reads ``DATABASE_URI=postgresql://...``."""
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> Any:
        return None if name == "psycopg" else real_find_spec(name, package)

    clean_env.setattr(importlib.util, "find_spec", find_spec)
    clean_env.setenv("DATABASE_URI", databases.url("postgresql"))
    maker = AsyncFastAPISessionMaker()
    assert maker.url.drivername == "postgresql+asyncpg"
    assert select_one(maker) == 1


# -- one-line configuration errors that name the fix ---------------------------------------


def test_missing_database_uri_names_the_variable(twin: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        maker_class(twin)()
    text = assert_one_line_without_secret(caught.value)
    assert text.startswith("DATABASE_URI is not set")
    assert "DATABASE_SCHEME" in text  # the other way to configure it


@pytest.mark.parametrize(
    "uri",
    [
        pytest.param("not a url", id="words"),
        pytest.param("", id="empty"),
        pytest.param(f"postgresql://app:{SECRET}@db:not-a-port/shop", id="bad-port"),
    ],
)
@pytest.mark.parametrize("source", ["env", "argument"])
def test_malformed_uri(clean_env: pytest.MonkeyPatch, twin: str, uri: str, source: str) -> None:
    if source == "env":
        clean_env.setenv("DATABASE_URI", uri)
    with pytest.raises(ConfigurationError) as caught:
        maker_class(twin)(None if source == "env" else uri).cached_engine  # noqa: B018
    text = assert_one_line_without_secret(caught.value)
    assert "DATABASE_URI is not a valid database URL" in text
    assert "postgresql://user:password@host:5432/name" in text  # shows the expected shape


@pytest.mark.parametrize("source", ["uri", "scheme"])
def test_unknown_dialect(clean_env: pytest.MonkeyPatch, twin: str, source: str) -> None:
    if source == "uri":
        clean_env.setenv("DATABASE_URI", f"oracle://app:{SECRET}@db/shop")
    else:
        clean_env.setenv("DATABASE_SCHEME", "oracle")
        clean_env.setenv("DATABASE_PASSWORD", SECRET)
    with pytest.raises(ConfigurationError) as caught:
        maker_class(twin)().cached_engine  # noqa: B018
    text = assert_one_line_without_secret(caught.value)
    assert f"DATABASE_{source.upper()} names an unknown database dialect 'oracle'" in text
    assert "postgresql, mysql, mariadb, sqlite" in text


@pytest.mark.parametrize(
    ("twin_", "uri", "missing", "extra"),
    [
        ("async", "postgresql+asyncpg://app@db/shop", {"asyncpg"}, "fastapi-sessionmaker[asyncpg]"),
        ("async", "postgresql://app@db/shop", {"asyncpg", "psycopg"}, "fastapi-sessionmaker[asyncpg]"),
        ("sync", "postgresql://app@db/shop", {"psycopg"}, "fastapi-sessionmaker[postgres]"),
        ("sync", "mysql://root@db/shop", {"pymysql"}, "fastapi-sessionmaker[mysql]"),
        ("async", "mariadb://root@db/shop", {"aiomysql"}, "fastapi-sessionmaker[mysql]"),
        ("async", "sqlite:///./app.db", {"aiosqlite"}, "fastapi-sessionmaker[aiosqlite]"),
    ],
)
def test_driver_not_installed_names_the_extra(
    clean_env: pytest.MonkeyPatch, twin_: str, uri: str, missing: set[str], extra: str
) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> Any:
        return None if name in missing else real_find_spec(name, package)

    clean_env.setattr(importlib.util, "find_spec", find_spec)
    clean_env.setenv("DATABASE_URI", uri)
    with pytest.raises(ConfigurationError) as caught:
        maker_class(twin_)().cached_engine  # noqa: B018
    text = assert_one_line_without_secret(caught.value)
    assert f"pip install '{extra}'" in text
    assert "DATABASE_URI" in text


def test_asyncpg_missing_falls_back_to_psycopg(clean_env: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> Any:
        return None if name == "asyncpg" else real_find_spec(name, package)

    clean_env.setattr(importlib.util, "find_spec", find_spec)
    maker = AsyncFastAPISessionMaker("postgresql://app@db/shop")
    assert maker.url.drivername == "postgresql+psycopg"  # psycopg 3 is async too


@pytest.mark.parametrize(
    ("twin_", "uri", "suggested"),
    [
        ("async", f"postgresql+psycopg2://app:{SECRET}@db/shop", "postgresql+asyncpg"),
        ("async", "sqlite+pysqlite:///./app.db", "sqlite+aiosqlite"),
        ("async", "mysql+pymysql://root@db/shop", "mysql+aiomysql"),
        ("sync", f"postgresql+asyncpg://app:{SECRET}@db/shop", "postgresql+psycopg"),
        ("sync", "sqlite+aiosqlite:///./app.db", "sqlite+pysqlite"),
        ("sync", "mysql+aiomysql://root@db/shop", "mysql+pymysql"),
    ],
)
def test_driver_of_the_wrong_twin(twin_: str, uri: str, suggested: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        maker_class(twin_)(uri).cached_engine  # noqa: B018
    text = assert_one_line_without_secret(caught.value)
    assert ("a sync driver" if twin_ == "async" else "an async driver") in text
    assert f"use {suggested}" in text
    assert "leave the driver out" in text


def test_driver_sqlalchemy_does_not_know(twin: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        maker_class(twin)(f"postgresql+nodriver://app:{SECRET}@db/shop").cached_engine  # noqa: B018
    text = assert_one_line_without_secret(caught.value)
    assert "'postgresql+nodriver'" in text
    assert "leave the driver out" in text


# -- an unreachable database fails start-up -------------------------------------------------


@pytest.fixture
def no_leftover_makers() -> Iterator[list[Maker]]:
    made: list[Maker] = []
    yield made
    for maker in made:
        dispose(maker)


@pytest.mark.parametrize("scheme", ["postgresql", "mysql"])
def test_unreachable_database_fails_startup_in_one_line(
    twin: str, scheme: str, caplog: pytest.LogCaptureFixture, no_leftover_makers: list[Maker]
) -> None:
    port = closed_port()
    maker = maker_class(twin)(f"{scheme}://app:{SECRET}@127.0.0.1:{port}/shop", name="orders")
    no_leftover_makers.append(maker)
    app = FastAPI()
    maker.init_app(app)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(DatabaseUnavailableError) as caught, TestClient(app):
        pass  # pragma: no cover - start-up fails
    text = assert_one_line_without_secret(caught.value)
    assert "'orders'" in text
    assert f"app:***@127.0.0.1:{port}/shop" in text  # the URL, password masked
    assert SECRET not in caplog.text
    # The cause stays attached for debugging (it holds no password either).
    assert caught.value.__cause__ is not None
    assert SECRET not in str(caught.value.__cause__)
