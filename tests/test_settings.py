"""``DatabaseSettings`` from the environment, the makers built from it, and one-line config errors."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

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
from fastapi_sessionmaker import _urls as base
from fastapi_sessionmaker._urls import render_url
from fastapi_sessionmaker.session import get_engine
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


def assert_not_chained(error: BaseException) -> None:
    """No "During handling of the above exception..." traceback above the one-line error."""
    assert error.__cause__ is None
    assert error.__context__ is None or error.__suppress_context__


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


# A password in the query (psycopg and PyMySQL accept ``?password=``), secret-looking query keys,
# and a password with characters that must be URL-encoded: never shown, raw or encoded.
SPECIAL = "p@ss:w/rd%" + SECRET


def secret_forms(secret: str) -> set[str]:
    """``secret`` as written and as it may appear URL-encoded."""
    return {secret, quote(secret, safe=""), quote(secret, safe=" +"), quote_plus(secret)}


def secret_url(scheme: str, where: str, port: int) -> tuple[str, str]:
    """A URL on ``127.0.0.1:port`` holding a secret ``where``; the URL and the secret."""
    host = f"127.0.0.1:{port}"
    if where == "query-password":
        return f"{scheme}://app@{host}/shop?password={SECRET}", SECRET
    if where == "query-keys":
        return f"{scheme}://app@{host}/shop?connect_timeout=5&api_key={SECRET}&token={SECRET}", SECRET
    return f"{scheme}://app:{quote(SPECIAL, safe='')}@{host}/shop", SPECIAL


def test_render_url_masks_every_secret() -> None:
    url = f"postgresql://app:{quote(SPECIAL, safe='')}@db/shop?sslpassword=a1&pwd=b2&api_key=c3&Token=d4&x=1"
    text = render_url(url)
    assert text == "postgresql://app:***@db/shop?Token=***&api_key=***&pwd=***&sslpassword=***&x=1"
    assert render_url("postgresql://app@db/shop?password=s3&application_name=api") == (
        "postgresql://app@db/shop?application_name=api&password=***"
    )
    assert render_url("not a url") == "<invalid database URL>"


@pytest.mark.parametrize("where", ["query-password", "query-keys", "userinfo-special"])
@pytest.mark.parametrize("scheme", ["postgresql", "mysql"])
def test_a_secret_anywhere_in_the_url_is_never_shown(
    twin: str, scheme: str, where: str, caplog: pytest.LogCaptureFixture, no_leftover_makers: list[Maker]
) -> None:
    url, secret = secret_url(scheme, where, closed_port())
    caplog.set_level(logging.DEBUG)
    maker = maker_class(twin)(url, name="orders")
    no_leftover_makers.append(maker)
    shown = [repr(maker), maker.safe_url()]
    if where != "query-keys":  # drivers refuse unknown keys: only ``password`` reaches a connect
        app = FastAPI()
        maker.init_app(app)
        with pytest.raises(DatabaseUnavailableError) as caught, TestClient(app):
            pass  # pragma: no cover - start-up fails
        shown += [str(caught.value), repr(caught.value), caplog.text]
        assert "\n" not in str(caught.value)
        assert "'orders'" in str(caught.value)
    for text in shown:
        for form in secret_forms(secret):
            assert form not in text, (form, text)
    assert "app@127.0.0.1" in maker.safe_url() or "app:***@127.0.0.1" in maker.safe_url()
    assert "***" in maker.safe_url()
    # ...but the driver gets it.
    assert secret in (maker.url.password, *maker.url.query.values())


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
        maker_class(twin)(None if source == "env" else uri)  # fails when built, not at first use
    text = assert_one_line_without_secret(caught.value)
    named = "DATABASE_URI" if source == "env" else "database_uri"
    assert f"{named} is not a valid database URL" in text
    assert "postgresql://user:password@host:5432/name" in text  # shows the expected shape
    assert_not_chained(caught.value)


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


@pytest.mark.parametrize(
    ("uri", "fix"),
    [
        ("mysql+mysqldb://root@db/shop", "pip install mysqlclient"),
        ("postgresql+pg8000://app@db/shop", "pip install pg8000"),
        ("mysql+mysqlconnector://root@db/shop", "pip install mysql-connector-python"),
        ("mariadb+mariadbconnector://root@db/shop", "pip install mariadb"),
        # Drivers SQLAlchemy knows that have no entry of ours: the missing module is named.
        ("postgresql+psycopg2cffi://app@db/shop", "'psycopg2cffi'"),
        ("mysql+cymysql://root@db/shop", "'cymysql'"),
    ],
)
@pytest.mark.parametrize("where", ["maker", "get_engine"])
def test_a_sync_driver_that_is_not_installed_names_the_fix(uri: str, fix: str, where: str) -> None:
    backend = uri.split("+")[0]
    named = "database_uri" if where == "maker" else "uri"
    build = FastAPISessionMaker if where == "maker" else get_engine
    with pytest.raises(ConfigurationError) as caught:
        build(f"{uri}?password={SECRET}")
    text = assert_one_line_without_secret(caught.value)
    assert text.startswith(f"{named} uses the {uri.split(':')[0]} driver, but ")
    assert fix in text
    assert f"{backend}+pymysql" in text or f"{backend}+psycopg" in text  # the default driver
    assert "db/shop" not in text  # never the URL
    assert_not_chained(caught.value)


@pytest.mark.parametrize(
    ("twin_", "uri", "module"),
    [
        ("sync", "mysql+mysqldb://root@db/shop", "MySQLdb"),
        ("async", "mysql+asyncmy://root@db/shop", "asyncmy"),
    ],
)
def test_an_import_error_at_engine_creation_is_one_line_too(
    clean_env: pytest.MonkeyPatch, twin_: str, uri: str, module: str
) -> None:
    """Whatever the check at construction missed, ``create_engine``'s ImportError is one line."""
    clean_env.setattr(base, "_installed", lambda name: True)  # the check believes it is installed
    maker = maker_class(twin_)(uri)
    with pytest.raises(ConfigurationError) as caught:
        maker.get_new_engine()
    text = assert_one_line_without_secret(caught.value)
    assert text.startswith(f"database_uri uses the {uri.split(':')[0]} driver, but {module!r}")
    assert_not_chained(caught.value)


@pytest.mark.parametrize("port", [0, 65536, 99999])
@pytest.mark.parametrize("source", ["env", "argument", "components"])
def test_a_port_out_of_range_is_one_line(
    clean_env: pytest.MonkeyPatch, twin: str, port: int, source: str
) -> None:
    uri = f"postgresql://app:{SECRET}@db:{port}/shop"
    if source == "env":
        clean_env.setenv("DATABASE_URI", uri)
    elif source == "components":
        clean_env.setenv("DATABASE_SCHEME", "postgresql")
        clean_env.setenv("DATABASE_PASSWORD", SECRET)
        clean_env.setenv("DATABASE_PORT", str(port))
    with pytest.raises(ConfigurationError) as caught:
        maker_class(twin)(uri if source == "argument" else None)
    text = assert_one_line_without_secret(caught.value)
    if source == "components":  # DatabaseSettings checks the range: "DATABASE_PORT: Input should be..."
        assert "DATABASE_PORT:" in text, text
    else:
        named = "DATABASE_URI" if source == "env" else "database_uri"
        assert text.startswith(f"{named} has port {port}: a port is a number from 1 to 65535"), text


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("nonsense", "database_uri is not a valid database URL"),
        ("oracle://app@db/shop", "database_uri names an unknown database dialect 'oracle'"),
        ("postgresql+nodriver://app@db/shop", "database_uri names a driver SQLAlchemy does not know"),
        ("mysql+mysqldb://root@db/shop", "database_uri uses the mysql+mysqldb driver"),
    ],
)
def test_a_bad_argument_fails_when_the_maker_is_built(
    clean_env: pytest.MonkeyPatch, twin: str, uri: str, expected: str
) -> None:
    clean_env.setenv("DATABASE_URI", "sqlite://")  # the environment is not what is wrong
    if twin == "async" and "mysqldb" in uri:
        expected = "database_uri uses mysql+mysqldb, a sync driver"
    with pytest.raises(ConfigurationError) as caught:
        maker_class(twin)(uri)  # not at first use of the engine
    text = assert_one_line_without_secret(caught.value)
    assert text.startswith(expected), text
    assert "DATABASE_URI" not in text
    assert_not_chained(caught.value)


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
