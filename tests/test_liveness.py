"""Dead pooled connections are replaced on checkout, without a round trip per checkout."""

import asyncio

import pytest
import sqlalchemy as sa

from fastapi_sessionmaker import AsyncFastAPISessionMaker, FastAPISessionMaker
from fastapi_sessionmaker._liveness import checks_liveness
from tests.conftest import Maker, MakerFactory


def sync_engine_of(maker: Maker) -> sa.Engine:
    engine = maker.cached_engine
    return engine if isinstance(engine, sa.Engine) else engine.sync_engine


def test_servers_get_the_check_and_sqlite_needs_none(backend: str, maker: Maker) -> None:
    assert checks_liveness(sync_engine_of(maker)) is (backend != "sqlite")


@pytest.mark.parametrize(("pre_ping", "expected"), [(True, True), (False, False)])
def test_an_explicit_pool_pre_ping_wins(
    make_maker: MakerFactory, backend: str, pre_ping: bool, expected: bool
) -> None:
    engine = sync_engine_of(make_maker(engine_options={"pool_pre_ping": pre_ping}))
    assert bool(engine.pool._pre_ping) is pre_ping
    listeners = [getattr(f, "__name__", "") for f in engine.pool.dispatch.checkout]
    assert "liveness_check" not in listeners
    assert checks_liveness(engine) is expected


def kill_statement(backend: str) -> tuple[str, str]:
    """(query for this connection's server-side id, statement killing an id and waiting for it)."""
    if backend == "postgresql":
        return "SELECT pg_backend_pid()", "SELECT pg_terminate_backend(:id, 5000)"
    return "SELECT CONNECTION_ID()", "KILL :id"


def kill(database_url: str, backend: str, connection_id: int) -> None:
    admin = FastAPISessionMaker(database_url, engine_options={"poolclass": sa.NullPool})
    try:
        with admin.cached_engine.connect() as connection:
            connection.execute(sa.text(kill_statement(backend)[1]), {"id": connection_id})
            if backend == "mariadb":  # KILL returns at once: wait until the thread is gone
                for _ in range(500):
                    alive = connection.execute(
                        sa.text("SELECT COUNT(*) FROM information_schema.processlist WHERE id = :id"),
                        {"id": connection_id},
                    ).scalar_one()
                    if not alive:
                        break
    finally:
        admin.dispose()


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
def test_a_killed_pooled_connection_costs_no_statement(
    make_maker: MakerFactory, database_url: str, backend: str
) -> None:
    maker = make_maker(engine_options={"pool_size": 1, "max_overflow": 0})
    id_query = sa.text(kill_statement(backend)[0])
    if isinstance(maker, FastAPISessionMaker):
        with maker.context_session() as session:
            first = session.execute(id_query).scalar_one()
        kill(database_url, backend, first)
        with maker.context_session() as session:
            second = session.execute(id_query).scalar_one()
    else:
        assert isinstance(maker, AsyncFastAPISessionMaker)

        async def twice() -> tuple[int, int]:
            async with maker.context_session() as session:
                first = (await session.execute(id_query)).scalar_one()
            await asyncio.to_thread(kill, database_url, backend, first)
            async with maker.context_session() as session:
                second = (await session.execute(id_query)).scalar_one()
            await maker.dispose()
            return first, second

        first, second = asyncio.run(twice())
    assert second != first  # the dead connection was replaced before the statement ran
