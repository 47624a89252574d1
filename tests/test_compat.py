"""fastapi-utils compatibility: the documented example, ``get_db`` code, and the old names.

``tests/seed_app.py`` is fastapi-utils' own documentation example with only its imports changed.
"""

# No ``from __future__ import annotations``: FastAPI resolves the endpoints' local annotations.

import asyncio
import contextlib
import inspect
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from types import ModuleType
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import Depends, FastAPI
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

import fastapi_sessionmaker
from fastapi_sessionmaker import AsyncFastAPISessionMaker, FastAPISessionMaker, guid_type, session
from fastapi_sessionmaker._liveness import checks_liveness
from tests.conftest import Maker, Server, checked_out, drop_database, pool_of
from tests.models import User, reset_tables, stored_emails


@pytest.fixture
def seed(monkeypatch: pytest.MonkeyPatch, database_url: str) -> Iterator[ModuleType]:
    """The seed example module, reading this test's database from ``DATABASE_URI``."""
    monkeypatch.setenv("DATABASE_URI", database_url)
    from tests import seed_app

    seed_app._get_fastapi_sessionmaker.cache_clear()
    yield seed_app
    if seed_app._get_fastapi_sessionmaker.cache_info().currsize:
        maker = seed_app._get_fastapi_sessionmaker()
        assert checked_out(maker.cached_engine.pool) == 0, maker.cached_engine.pool.status()
        maker.dispose()
    seed_app._get_fastapi_sessionmaker.cache_clear()


def test_seed_example_serves_a_user_written_with_the_engine(
    seed: ModuleType, sync_engine: sa.Engine, serve: Callable[..., httpx.Client]
) -> None:
    # The seed's ``sa.String`` has no length, which MySQL/MariaDB refuse in CREATE TABLE; the
    # table is the same otherwise (``user``: GUID primary key, non-null name).
    table = sa.Table(
        "user",
        sa.MetaData(),
        sa.Column("id", guid_type.GUID, primary_key=True),
        sa.Column("name", sa.String(100), nullable=False),
    )
    table.drop(sync_engine, checkfirst=True)
    table.create(sync_engine)
    user_id = uuid.uuid4()
    with sync_engine.begin() as connection:
        connection.execute(seed.User.__table__.insert().values(id=user_id, name="Ada Lovelace"))
    client = serve(seed.app)

    response = client.get(f"/{user_id}")

    assert response.status_code == 200, response.text
    assert response.json() == "Ada Lovelace"
    assert seed._get_fastapi_sessionmaker().url.get_backend_name() == sync_engine.dialect.name
    with sync_engine.connect() as connection:
        stored: object = connection.execute(
            sa.select(sa.column("id")).select_from(sa.table("user"))
        ).scalar_one()
    # fastapi-utils' storage: native UUID on PostgreSQL, 32 hex characters elsewhere.
    assert stored == (user_id if sync_engine.dialect.name == "postgresql" else user_id.hex)


def user_app(maker: Maker, idle_at_shutdown: list[int]) -> FastAPI:
    """An app in the fastapi-utils style: the user's own ``get_db`` under a plain ``Depends``.

    Its lifespan records how many connections are checked out once every request is done.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        idle_at_shutdown.append(checked_out(pool_of(maker)))
        if isinstance(maker, AsyncFastAPISessionMaker):
            await maker.dispose()
        else:
            maker.dispose()

    app = FastAPI(lifespan=lifespan)
    if isinstance(maker, AsyncFastAPISessionMaker):
        async_maker = maker

        async def get_async_db() -> AsyncIterator[AsyncSession]:
            async for db in async_maker.get_db():
                yield db

        @app.post("/users/{email}")
        async def create_async(email: str, db: AsyncSession = Depends(get_async_db)) -> str:
            db.add(User(email=email))
            return email
    else:
        sync_maker = maker

        def get_db() -> Iterator[Session]:
            yield from sync_maker.get_db()

        @app.post("/users/{email}")
        def create_sync(email: str, db: Session = Depends(get_db)) -> str:
            db.add(User(email=email))
            return email

    return app


@pytest.mark.parametrize("installed", [False, True], ids=["plain", "init_app"])
def test_get_db_style_commits_after_the_response_unless_init_app(
    maker: Maker, sync_engine: sa.Engine, installed: bool
) -> None:
    reset_tables(sync_engine)
    with sync_engine.begin() as connection:
        connection.execute(sa.insert(User), [{"id": uuid.uuid4(), "email": "a@x", "name": ""}])
    idle_at_shutdown: list[int] = []
    app = user_app(maker, idle_at_shutdown)
    if installed:
        maker.init_app(app)  # the one app-level call that moves get_db's commit before the response
    server = Server(app)
    client = httpx.Client(base_url=server.start(), timeout=30.0)
    try:
        new = client.post("/users/b@x")
        duplicate = client.post("/users/a@x")
    finally:
        client.close()
        server.stop()  # waits for get_db's teardown, which runs after the response

    assert new.status_code == 200
    if installed:
        assert duplicate.status_code == 409
        assert duplicate.headers["content-type"] == "application/problem+json"
    else:
        # The lost write: the client was told 200, the commit failed after the response.
        assert duplicate.status_code == 200
        assert duplicate.json() == "a@x"
    assert stored_emails(sync_engine) == ["a@x", "b@x"]
    assert idle_at_shutdown == [0]


@pytest.mark.parametrize("twin", ["sync"])
def test_get_db_raises_the_database_error_unwrapped(maker: Maker, sync_engine: sa.Engine) -> None:
    assert isinstance(maker, FastAPISessionMaker)
    reset_tables(sync_engine)
    with sync_engine.begin() as connection:
        connection.execute(sa.insert(User), [{"id": uuid.uuid4(), "email": "a@x", "name": ""}])
    dependency = maker.get_db()
    db = next(dependency)
    db.add(User(email="a@x"))

    with pytest.raises(sa.exc.IntegrityError):
        next(dependency)  # FastAPI resumes the generator after the endpoint: the commit fails

    assert checked_out(maker.cached_engine.pool) == 0
    assert stored_emails(sync_engine) == ["a@x"]


def run_twin(maker: Maker, sync_steps: Callable[[FastAPISessionMaker], None], async_steps: Any) -> None:
    """Run ``sync_steps(maker)`` or ``asyncio.run(async_steps(maker))`` by twin."""
    if isinstance(maker, AsyncFastAPISessionMaker):
        asyncio.run(async_steps(maker))
    else:
        assert isinstance(maker, FastAPISessionMaker)
        sync_steps(maker)


def test_reset_cache_disposes_the_old_engine(maker: Maker) -> None:
    def sync_steps(maker: FastAPISessionMaker) -> None:
        engine = maker.cached_engine
        pool = engine.pool
        assert isinstance(pool, sa.QueuePool)
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
        assert pool.checkedin() == 1
        maker.reset_cache()
        assert pool.checkedin() == 0
        assert maker.cached_engine is not engine
        assert maker.cached_sessionmaker.kw["bind"] is maker.cached_engine
        with maker.context_session() as db:
            assert db.execute(sa.text("SELECT 1")).scalar_one() == 1
        maker.dispose()

    async def async_steps(maker: AsyncFastAPISessionMaker) -> None:
        engine = maker.cached_engine
        pool = engine.sync_engine.pool
        assert isinstance(pool, sa.QueuePool)
        async with engine.connect() as connection:
            await connection.execute(sa.text("SELECT 1"))
        assert pool.checkedin() == 1
        await maker.reset_cache()
        assert pool.checkedin() == 0
        assert maker.cached_engine is not engine
        assert maker.cached_sessionmaker.kw["bind"] is maker.cached_engine
        async with maker.context_session() as db:
            assert (await db.execute(sa.text("SELECT 1"))).scalar_one() == 1
        await maker.dispose()

    run_twin(maker, sync_steps, async_steps)


@pytest.fixture
def other_database_url(
    backend: str, database_url: str, sync_engine: sa.Engine, tmp_path: Any
) -> Iterator[str]:
    """A second, empty database beside this test's (its tables made), dropped at the end."""
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path}/other.db"
    else:
        name = f"{sa.make_url(database_url).database}_other"
        admin = sync_engine.execution_options(isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}")
            connection.exec_driver_sql(f"CREATE DATABASE {name}")
        url = sa.make_url(database_url).set(database=name).render_as_string(hide_password=False)
    engine = session.get_engine(url)
    reset_tables(engine)
    engine.dispose()
    yield url
    if backend != "sqlite":
        drop_database(backend, name)


@pytest.mark.parametrize("order", ["assign-then-reset", "reset-then-assign"])
def test_assigning_database_uri_switches_the_database_like_fastapi_utils(
    maker: Maker, sync_engine: sa.Engine, other_database_url: str, order: str
) -> None:
    """fastapi-utils' own test_session.py: set ``database_uri``, ``reset_cache()``, use the engine."""
    reset_tables(sync_engine)
    other = sa.make_url(other_database_url)

    def sync_steps(maker: FastAPISessionMaker) -> None:
        old = maker.cached_engine
        old_pool = old.pool
        assert isinstance(old_pool, sa.QueuePool)
        with old.connect() as connection:  # the URL resolved, the engine cached and used
            connection.execute(sa.text("SELECT 1"))
        assert old_pool.checkedin() == 1
        repr(maker)
        if order == "assign-then-reset":
            maker.database_uri = other_database_url
            assert maker.cached_engine is old  # assigning alone closes nothing
            new_engine = maker.get_new_engine()  # ...but a new engine is on the new URL
            assert new_engine.url.database == other.database
            new_engine.dispose()
            maker.reset_cache()
        else:
            maker.reset_cache()
            maker.database_uri = other_database_url
        assert old_pool.checkedin() == 0  # the old engine was disposed
        assert maker.database_uri == other_database_url
        assert maker.cached_engine.url.database == other.database
        assert maker.cached_sessionmaker.kw["bind"] is maker.cached_engine
        with maker.context_session() as db:
            db.add(User(email="b@x"))
        maker.dispose()

    async def async_steps(maker: AsyncFastAPISessionMaker) -> None:
        old = maker.cached_engine
        old_pool = old.sync_engine.pool
        assert isinstance(old_pool, sa.QueuePool)
        async with old.connect() as connection:
            await connection.execute(sa.text("SELECT 1"))
        assert old_pool.checkedin() == 1
        repr(maker)
        if order == "assign-then-reset":
            maker.database_uri = other_database_url
            assert maker.cached_engine is old
            new_engine = maker.get_new_engine()
            assert new_engine.url.database == other.database
            await new_engine.dispose()
            await maker.reset_cache()
        else:
            await maker.reset_cache()
            maker.database_uri = other_database_url
        assert old_pool.checkedin() == 0
        assert maker.database_uri == other_database_url
        assert maker.cached_engine.url.database == other.database
        assert maker.cached_sessionmaker.kw["bind"] is maker.cached_engine
        async with maker.context_session() as db:
            db.add(User(email="b@x"))
        await maker.dispose()

    run_twin(maker, sync_steps, async_steps)
    other_engine = session.get_engine(other_database_url)
    try:
        assert stored_emails(other_engine) == ["b@x"]  # the write went to the new database...
    finally:
        other_engine.dispose()
    assert stored_emails(sync_engine) == []  # ...not to the old one


@pytest.mark.parametrize("options", [{}, {"autoflush": True}], ids=["default", "autoflush-on"])
def test_sessions_do_not_autoflush_by_default_like_fastapi_utils(
    make_maker: Callable[..., Maker], sync_engine: sa.Engine, options: dict[str, Any]
) -> None:
    """fastapi-utils and the tutorial's ``SessionLocal`` use ``autoflush=False``; so do we."""
    reset_tables(sync_engine)
    maker = make_maker(session_options=options)
    autoflush = options.get("autoflush", False)
    pending_seen: list[int] = []

    def sync_steps(maker: FastAPISessionMaker) -> None:
        for opened in (maker.context_session, maker.task_session, contextlib.contextmanager(maker.get_db)):
            with opened() as db:
                assert db.autoflush is autoflush
                db.add(User(email=f"{len(pending_seen)}@x"))
                pending_seen.append(db.scalar(sa.select(sa.func.count()).select_from(User)) or 0)
                db.rollback()
        request_session = maker.lifecycle.open(maker.policy)
        assert request_session.autoflush is autoflush
        request_session.close()
        maker.dispose()

    async def async_steps(maker: AsyncFastAPISessionMaker) -> None:
        for opened in (
            maker.context_session,
            maker.task_session,
            contextlib.asynccontextmanager(maker.get_db),
        ):
            async with opened() as db:
                assert db.sync_session.autoflush is autoflush
                db.add(User(email=f"{len(pending_seen)}@x"))
                pending_seen.append(await db.scalar(sa.select(sa.func.count()).select_from(User)) or 0)
                await db.rollback()
        request_session = maker.lifecycle.open(maker.policy)
        assert request_session.sync_session.autoflush is autoflush
        await request_session.close()
        await maker.dispose()

    run_twin(maker, sync_steps, async_steps)
    # Without autoflush the query does not see the pending row; with it, the row is flushed first.
    assert pending_seen == ([1, 1, 1] if autoflush else [0, 0, 0])
    assert stored_emails(sync_engine) == []


def test_context_session_commits_on_success_and_rolls_back_on_error(
    maker: Maker, sync_engine: sa.Engine
) -> None:
    reset_tables(sync_engine)

    def sync_steps(maker: FastAPISessionMaker) -> None:
        with maker.context_session() as db:
            db.add(User(email="kept@x"))

        def write_then_fail() -> None:
            with maker.context_session() as db:
                db.add(User(email="dropped@x"))
                db.flush()
                raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            write_then_fail()
        assert checked_out(maker.cached_engine.pool) == 0
        maker.dispose()

    async def async_steps(maker: AsyncFastAPISessionMaker) -> None:
        async with maker.context_session() as db:
            db.add(User(email="kept@x"))

        async def write_then_fail() -> None:
            async with maker.context_session() as db:
                db.add(User(email="dropped@x"))
                await db.flush()
                raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            await write_then_fail()
        assert checked_out(maker.cached_engine.sync_engine.pool) == 0
        await maker.dispose()

    run_twin(maker, sync_steps, async_steps)
    assert stored_emails(sync_engine) == ["kept@x"]


def test_module_level_engine_sessionmaker_and_context_session(database_url: str) -> None:
    engine = session.get_engine(database_url)
    try:
        assert checks_liveness(engine) is (engine.dialect.name != "sqlite")
        reset_tables(engine)
        with session.context_session(engine) as db:
            db.add(User(email="kept@x"))

        def write_then_fail() -> None:
            with session.context_session(engine) as db:
                db.add(User(email="dropped@x"))
                db.flush()
                raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            write_then_fail()
        assert stored_emails(engine) == ["kept@x"]
        factory = session.get_sessionmaker_for_engine(engine)
        with factory() as db:
            assert db.get_bind() is engine
            assert db.autoflush is False
        assert checked_out(engine.pool) == 0
    finally:
        engine.dispose()


def test_fastapi_utils_names_and_signatures() -> None:
    assert set(session.__all__) >= {
        "FastAPISessionMaker",
        "get_engine",
        "get_sessionmaker_for_engine",
        "context_session",
    }
    assert set(guid_type.__all__) >= {
        "GUID",
        "GUID_DEFAULT_SQLITE",
        "GUID_SERVER_DEFAULT_POSTGRESQL",
        "setup_guids_postgresql",
    }
    for module in (session, guid_type):
        for name in module.__all__:
            assert getattr(fastapi_sessionmaker, name) is getattr(module, name), name
    assert session.FastAPISessionMaker is FastAPISessionMaker
    assert next(iter(inspect.signature(FastAPISessionMaker).parameters)) == "database_uri"
    assert list(inspect.signature(FastAPISessionMaker.get_new_sessionmaker).parameters) == [
        "self",
        "engine",
    ]
    assert inspect.isgeneratorfunction(FastAPISessionMaker.get_db)
    assert isinstance(inspect.getattr_static(FastAPISessionMaker, "cached_engine"), property)
    assert isinstance(inspect.getattr_static(FastAPISessionMaker, "cached_sessionmaker"), property)
    for name in ("get_new_engine", "reset_cache", "context_session"):
        assert callable(getattr(FastAPISessionMaker, name)), name
