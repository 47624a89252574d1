"""The pytest plugin: each test in a transaction that is rolled back, the app's sessions joined to it.

Loaded through the ``pytest11`` entry point (or ``-p fastapi_sessionmaker.testing``) and inert until
configured: it only registers its options and fixtures. Configure it in ``pyproject.toml``::

    [tool.pytest.ini_options]
    fsm_database_url = "postgresql://postgres@127.0.0.1/myapp"   # or FSM_TEST_DATABASE_URL
    fsm_app = "myapp.main:app"
    fsm_metadata = "myapp.models:Base.metadata"

See ``docs/testing.md`` for the fixtures and how isolation works.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import httpx
    import sqlalchemy as sa
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
    from sqlalchemy.orm import Session

    from fastapi_sessionmaker.testing._database import TestDatabase

__all__ = [
    "fsm_app",
    "fsm_async_client",
    "fsm_async_connection",
    "fsm_async_engine",
    "fsm_async_session",
    "fsm_client",
    "fsm_connection",
    "fsm_database",
    "fsm_database_url",
    "fsm_engine",
    "fsm_metadata",
    "fsm_on_commit",
    "fsm_session",
]

URL_VARIABLES = ("FSM_TEST_DATABASE_URL", "DATABASE_URI")
DEFAULT_URL = "sqlite://"
"""The test database when none is configured: SQLite in memory."""
_ACTIVE = pytest.StashKey[bool]()
_DATABASE = pytest.StashKey["TestDatabase"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fastapi-sessionmaker", "fastapi-sessionmaker test database")
    group.addoption(
        "--fsm-database-url",
        dest="fsm_database_url",
        default=None,
        help="Database the tests derive their own database from "
        "(default: ini fsm_database_url, $FSM_TEST_DATABASE_URL, $DATABASE_URI).",
    )
    parser.addini("fsm_database_url", "Database URL the test database is derived from.", default="")
    parser.addini(
        "fsm_app", "The FastAPI app as 'module:attribute' (a trailing () calls a factory).", default=""
    )
    parser.addini(
        "fsm_metadata", "MetaData whose tables are created once per run, 'module:attribute'.", default=""
    )
    parser.addini(
        "fsm_create_database",
        "Create (and drop) test_<name>[_gwN] beside the configured database (false: use it as is).",
        type="bool",
        default=True,
    )


def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    """Before the first ``conftest.py`` is imported (it may import the app).

    See :func:`provide_database_uri`.
    """
    _activate(early_config)


def pytest_configure(config: pytest.Config) -> None:
    """Decide whether the plugin is active (a URL or the app is configured); if so, see
    :func:`provide_database_uri` (done here when the plugin came from a ``conftest.py``)."""
    _activate(config)


def _option(config: pytest.Config) -> str | None:
    # Before pytest_configure only the early parse of the command line holds the option.
    early = getattr(getattr(config, "known_args_namespace", None), "fsm_database_url", None)
    value = early or config.getoption("fsm_database_url", None)
    return str(value) if value else None


def _activate(config: pytest.Config) -> None:
    if _ACTIVE in config.stash:
        return
    config.stash[_ACTIVE] = active = bool(
        _option(config)
        or config.getini("fsm_database_url")
        or config.getini("fsm_app")
        or os.environ.get("FSM_TEST_DATABASE_URL")
    )
    if active:
        provide_database_uri(config)


def provide_database_uri(config: pytest.Config) -> None:
    """Point ``DATABASE_URI`` at the test database for the whole run, then restore it.

    Apps build their maker when their module is imported: ``FastAPISessionMaker()`` (or code that
    reads ``os.environ["DATABASE_URI"]``) then finds the test database, ``test_<name>``, never the
    configured one, and without ``DATABASE_URI`` set it finds the default in-memory database
    instead of failing. ``FSM_TEST_DATABASE_URL`` keeps the configured URL, so xdist workers
    (which inherit this environment) derive their own ``test_<name>_gwN`` from it.
    """
    from fastapi_sessionmaker.exceptions import ConfigurationError
    from fastapi_sessionmaker.testing._database import TestDatabase

    source = configured_url(config) or DEFAULT_URL
    try:
        database = TestDatabase(source, create=config.getini("fsm_create_database"))
        app_url = database.url_like(source)
    except ConfigurationError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[_DATABASE] = database
    saved = {name: os.environ.get(name) for name in URL_VARIABLES}

    def restore() -> None:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    config.add_cleanup(restore)
    os.environ["FSM_TEST_DATABASE_URL"] = source
    os.environ["DATABASE_URI"] = app_url


def pytest_report_header(config: pytest.Config) -> str | None:
    if not config.stash.get(_ACTIVE, False):
        return None
    app = config.getini("fsm_app") or "fixture fsm_app"
    return f"fastapi-sessionmaker: app {app}, each test rolled back"


def load_object(spec: str, option: str) -> Any:
    """Import ``'package.module:attribute.path'``; a trailing ``()`` calls the result.

    Example:
        >>> load_object("os.path:join", "fsm_app") is os.path.join
        True
    """
    module_name, sep, attribute = spec.strip().partition(":")
    if not sep or not module_name or not attribute:
        raise pytest.UsageError(f"{option} = {spec!r}: expected 'package.module:attribute'")
    call = attribute.endswith("()")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attribute.removesuffix("()").split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise pytest.UsageError(f"{option} = {spec!r}: {type(exc).__name__}: {exc}") from exc
    return obj() if call else obj


def configured_url(config: pytest.Config) -> str | None:
    """The database URL from the option, the ini file or the environment (in that order).

    The environment: ``FSM_TEST_DATABASE_URL``, ``DATABASE_URI``, or the ``DATABASE_SCHEME``,
    ``DATABASE_HOST``... parts that ``FastAPISessionMaker()`` reads too.
    """
    for value in (_option(config), config.getini("fsm_database_url")):
        if value:
            return str(value)
    for variable in URL_VARIABLES:
        if os.environ.get(variable):
            return os.environ[variable]
    if os.environ.get("DATABASE_SCHEME"):
        from fastapi_sessionmaker._settings import DatabaseSettings
        from fastapi_sessionmaker.exceptions import ConfigurationError

        try:
            return DatabaseSettings().url().render_as_string(hide_password=False)
        except ConfigurationError as exc:
            raise pytest.UsageError(str(exc)) from None
    return None


def _makers(app: FastAPI | None, *, is_async: bool) -> list[Any]:
    if app is None:
        return []
    registry = getattr(app.state, "fastapi_sessionmaker", None)
    if registry is None:
        raise pytest.UsageError(
            "fsm_app has no session maker installed: call maker.init_app(app) when creating the app"
        )
    return [maker for maker in registry.makers.values() if maker.is_async is is_async]


@contextlib.contextmanager
def join_connection(makers: list[Any], connection: Any) -> Iterator[None]:
    """Make ``makers`` hand out sessions joined to ``connection`` until the block ends.

    The fixtures do this for the makers installed on the app; use it for other makers.

    Example:
        >>> import sqlalchemy as sa
        >>> from fastapi_sessionmaker import FastAPISessionMaker
        >>> maker = FastAPISessionMaker("sqlite://")
        >>> engine = sa.create_engine("sqlite://")
        >>> with engine.connect() as connection, join_connection([maker], connection):
        ...     maker.cached_engine is engine
        True
        >>> engine.dispose()
    """
    for maker in makers:
        maker.join(connection)
    try:
        yield
    finally:
        _leave(makers)


def _leave(makers: list[Any]) -> None:
    for maker in makers:
        maker.leave()


# -- configuration fixtures (override them in your conftest.py) -------------------------------
@pytest.fixture(scope="session")
def fsm_app(request: pytest.FixtureRequest) -> FastAPI | None:
    """The app under test, from the ``fsm_app`` ini option; override it to build the app yourself.

    The test database exists before the app's module is imported, so code that runs at import
    (``Base.metadata.create_all(db.cached_engine)``) finds it through ``DATABASE_URI``.
    """
    spec = request.config.getini("fsm_app")
    if not spec:
        return None
    request.getfixturevalue("fsm_database")
    app: FastAPI = load_object(spec, "fsm_app")
    return app


@pytest.fixture(scope="session")
def fsm_metadata(pytestconfig: pytest.Config) -> sa.MetaData | None:
    """The ``MetaData`` whose tables are created once per run (ini ``fsm_metadata``)."""
    spec = pytestconfig.getini("fsm_metadata")
    return load_object(spec, "fsm_metadata") if spec else None


@pytest.fixture(scope="session")
def fsm_database(pytestconfig: pytest.Config) -> Iterator[TestDatabase]:
    """The test database of this run (and xdist worker): created first, dropped at the end."""
    from fastapi_sessionmaker.exceptions import ConfigurationError
    from fastapi_sessionmaker.testing._database import TestDatabase

    database = pytestconfig.stash.get(_DATABASE, None)
    if database is None:  # the plugin is not active: the fixture was asked for all the same
        url = configured_url(pytestconfig) or DEFAULT_URL
        try:
            database = TestDatabase(url, create=pytestconfig.getini("fsm_create_database"))
        except ConfigurationError as exc:
            raise pytest.UsageError(str(exc)) from None
    database.setup()
    try:
        yield database
    finally:
        database.teardown()


@pytest.fixture(scope="session")
def fsm_database_url(fsm_database: TestDatabase) -> str:
    """The test database's URL with its password (use ``fsm_database.safe_url()`` for logs)."""
    return fsm_database.url.render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def fsm_engine(fsm_database: TestDatabase, fsm_metadata: sa.MetaData | None) -> Iterator[sa.Engine]:
    """The sync engine of the run, with the tables of ``fsm_metadata`` created once."""
    engine = fsm_database.engine()
    try:
        if fsm_metadata is not None:
            with engine.begin() as connection:
                fsm_metadata.create_all(connection)
        yield engine
    finally:
        fsm_database.close_keeper()
        engine.dispose()


@pytest.fixture(scope="session")
def fsm_async_engine(fsm_engine: sa.Engine, fsm_database: TestDatabase) -> AsyncEngine:
    """The async engine of the run (no pool: each test's event loop opens its own connection)."""
    return fsm_database.async_engine()


# -- per test: sync -------------------------------------------------------------------------
@pytest.fixture
def fsm_connection(fsm_engine: sa.Engine) -> Iterator[sa.Connection]:
    """One connection in an outer transaction that is rolled back after the test."""
    with fsm_engine.connect() as connection:
        transaction = connection.begin()
        try:
            yield connection
        finally:
            if transaction.is_active:
                transaction.rollback()


@pytest.fixture
def fsm_session(fsm_connection: sa.Connection) -> Iterator[Session]:
    """A ``Session`` in the test's transaction: its commits release savepoints, nothing more."""
    from sqlalchemy.orm import Session

    with Session(bind=fsm_connection, join_transaction_mode="create_savepoint") as session:
        yield session


@pytest.fixture(autouse=True)
def _fsm_join_app(request: pytest.FixtureRequest) -> Iterator[None]:
    """While a test runs, the app's sync makers hand out sessions in the test's transaction.

    Does nothing (and opens nothing) when no app is configured, so the plugin stays inert.
    """
    makers = _makers(request.getfixturevalue("fsm_app"), is_async=False)
    if not makers:
        yield
        return
    with join_connection(makers, request.getfixturevalue("fsm_connection")):
        yield


def _refuse_sync_fixtures(app: FastAPI, request: pytest.FixtureRequest, client: str) -> None:
    """Stop a test that takes ``fsm_session`` / ``fsm_connection`` beside an async-only app.

    Those are a sync connection of their own, while the app's async makers work on the test's
    async connection: the test would see nothing the app wrote, and on PostgreSQL and MariaDB
    the two connections would wait on each other's row locks (for ever, within one test).
    """
    if _makers(app, is_async=False) or not _makers(app, is_async=True):
        return
    for fixture in ("fsm_session", "fsm_connection"):
        if fixture in request.fixturenames:
            raise pytest.UsageError(
                f"{fixture} cannot be used with {client}: the app's makers are all async "
                f"(AsyncFastAPISessionMaker) and work on the test's async connection, while {fixture} "
                "is a sync connection of its own: it would not see what the app wrote and could wait "
                "for the app's locks for ever. Write the test as `async def` with "
                "fsm_async_client + fsm_async_session (anyio's pytest plugin runs it), or use "
                "fsm_client alone and check the results through the app."
            )


@pytest.fixture
def fsm_client(fsm_app: FastAPI | None, request: pytest.FixtureRequest) -> Iterator[TestClient]:
    """A started ``TestClient`` for the app; every maker of the app works in the test's transaction.

    With an async-only app, ``fsm_session`` and ``fsm_connection`` cannot see what the app writes:
    asking for them beside ``fsm_client`` is a usage error that names the async fixtures.
    """
    from fastapi.testclient import TestClient

    if fsm_app is None:
        raise pytest.UsageError(
            "fsm_client needs the app: set fsm_app in the ini options or override the fsm_app fixture"
        )
    _refuse_sync_fixtures(fsm_app, request, "fsm_client")
    sync_makers = _makers(fsm_app, is_async=False)
    async_makers = _makers(fsm_app, is_async=True)
    async_engine: AsyncEngine | None = request.getfixturevalue("fsm_async_engine") if async_makers else None
    with contextlib.ExitStack() as stack:
        if sync_makers:
            stack.enter_context(join_connection(sync_makers, request.getfixturevalue("fsm_connection")))
        stack.callback(_leave, async_makers)
        for maker in async_makers:  # the app's start-up check connects to the test database
            maker.join(engine=async_engine)
        client = stack.enter_context(TestClient(fsm_app))
        if async_makers:
            # The async connection lives on the client's event loop, like the app's requests.
            assert client.portal is not None
            assert async_engine is not None
            connection = client.portal.call(_begin, async_engine)
            stack.callback(client.portal.call, _rollback, connection)
            for maker in async_makers:
                maker.join(connection)
        yield client


# -- per test: async (run by anyio's pytest plugin, which ships with FastAPI) --------------------
async def _begin(engine: AsyncEngine) -> AsyncConnection:
    connection = await engine.connect()
    await connection.begin()
    return connection


async def _rollback(connection: AsyncConnection) -> None:
    try:
        if connection.in_transaction():
            await connection.rollback()
    finally:
        await connection.close()


@pytest.fixture
async def fsm_async_connection(
    anyio_backend: str, fsm_async_engine: AsyncEngine, fsm_app: FastAPI | None
) -> AsyncIterator[AsyncConnection]:
    """An ``AsyncConnection`` in an outer transaction, rolled back after the test.

    The app's async makers hand out sessions joined to it while the test runs.
    """
    connection = await _begin(fsm_async_engine)
    try:
        with join_connection(_makers(fsm_app, is_async=True), connection):
            yield connection
    finally:
        await _rollback(connection)


@pytest.fixture
async def fsm_async_session(fsm_async_connection: AsyncConnection) -> AsyncIterator[AsyncSession]:
    """An ``AsyncSession`` in the test's transaction (commits release savepoints)."""
    from sqlalchemy.ext.asyncio import AsyncSession

    async with AsyncSession(bind=fsm_async_connection, join_transaction_mode="create_savepoint") as session:
        yield session


@pytest.fixture
async def fsm_async_client(
    fsm_app: FastAPI | None, fsm_async_connection: AsyncConnection, request: pytest.FixtureRequest
) -> AsyncIterator[httpx.AsyncClient]:
    """An ``httpx.AsyncClient`` calling the app in-process (no lifespan), in the test's transaction."""
    import httpx

    if fsm_app is None:
        raise pytest.UsageError(
            "fsm_async_client needs the app: set fsm_app in the ini options or override the fsm_app fixture"
        )
    _refuse_sync_fixtures(fsm_app, request, "fsm_async_client")
    transport = httpx.ASGITransport(app=fsm_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


@pytest.fixture
def fsm_on_commit() -> Iterator[list[Callable[[], Any]]]:
    """The ``on_commit`` / ``on_rollback`` callbacks that ran during the test, in order.

    Under the plugin the app's commits release SAVEPOINTs of the test's transaction, and its
    callbacks run as after a real commit; this list lets the test see them. To hold them back and
    run them yourself, use ``with capture_on_commit(execute=False) as callbacks:`` instead.
    """
    from fastapi_sessionmaker.testing import capture_on_commit

    with capture_on_commit(execute=True) as callbacks:
        yield callbacks
