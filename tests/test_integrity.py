"""Foreign keys are enforced on every database: on SQLite too (``PRAGMA foreign_keys=ON``).

An orphan insert is a 409 and stores nothing, ``ON DELETE CASCADE`` removes the children, for both
twins; on SQLite the maker's ``sqlite_foreign_keys=False`` keeps SQLite's default (not enforced).
"""

# No ``from __future__ import annotations``: FastAPI resolves the endpoints' local annotations.

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI, Response

from fastapi_sessionmaker import AsyncFastAPISessionMaker
from fastapi_sessionmaker.session import get_engine
from fastapi_sessionmaker.testing._database import TestDatabase
from tests.conftest import Maker, MakerFactory

METADATA = sa.MetaData()
PARENTS = sa.Table(
    "fsm_parents", METADATA, sa.Column("id", sa.Integer, primary_key=True, autoincrement=False)
)
CHILDREN = sa.Table(
    "fsm_children",
    METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("parent_id", sa.Integer, sa.ForeignKey("fsm_parents.id", ondelete="CASCADE"), nullable=False),
)


def family_app(maker: Maker) -> FastAPI:
    """``POST /parents/{id}``, ``POST /children/{id}?parent=...``, ``DELETE /parents/{id}``."""
    app = FastAPI()
    maker.init_app(app)
    Db = Annotated[Any, maker.dependency]
    statements: dict[str, Callable[[int, int], sa.Executable]] = {
        "parent": lambda id, parent: PARENTS.insert().values(id=id),
        "child": lambda id, parent: CHILDREN.insert().values(id=id, parent_id=parent),
        "delete": lambda id, parent: PARENTS.delete().where(PARENTS.c.id == id),
    }

    def add(path: str, method: str, kind: str, status: int) -> None:
        statement = statements[kind]
        if maker.is_async:

            async def endpoint_async(id: int, session: Db, parent: int = 0) -> Response:
                await session.execute(statement(id, parent))
                return Response(status_code=status)

            app.add_api_route(path, endpoint_async, methods=[method])
        else:

            def endpoint_sync(id: int, session: Db, parent: int = 0) -> Response:
                session.execute(statement(id, parent))
                return Response(status_code=status)

            app.add_api_route(path, endpoint_sync, methods=[method])

    add("/parents/{id}", "POST", "parent", 201)
    add("/children/{id}", "POST", "child", 201)
    add("/parents/{id}", "DELETE", "delete", 204)
    return app


def rows(engine: sa.Engine, table: sa.Table) -> list[tuple[Any, ...]]:
    with engine.connect() as connection:
        return [tuple(row) for row in connection.execute(sa.select(table).order_by(table.c.id))]


@pytest.fixture
def tables(sync_engine: sa.Engine) -> sa.Engine:
    METADATA.drop_all(sync_engine)
    METADATA.create_all(sync_engine)
    return sync_engine


def test_an_orphan_insert_is_409_and_stores_nothing(
    maker: Maker, tables: sa.Engine, serve: Callable[..., httpx.Client]
) -> None:
    client = serve(family_app(maker))
    assert client.post("/parents/1").status_code == 201
    assert client.post("/children/10", params={"parent": 1}).status_code == 201

    response = client.post("/children/11", params={"parent": 999})

    assert response.status_code == 409, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["status"] == 409
    assert rows(tables, CHILDREN) == [(10, 1)]


def test_on_delete_cascade_removes_the_children(
    maker: Maker, tables: sa.Engine, serve: Callable[..., httpx.Client]
) -> None:
    client = serve(family_app(maker))
    for parent in (1, 2):
        assert client.post(f"/parents/{parent}").status_code == 201
    for child, parent in ((10, 1), (11, 1), (20, 2)):
        assert client.post(f"/children/{child}", params={"parent": parent}).status_code == 201

    assert client.delete("/parents/1").status_code == 204

    assert rows(tables, PARENTS) == [(2,)]
    assert rows(tables, CHILDREN) == [(20, 2)]


def test_context_sessions_enforce_foreign_keys_too(maker: Maker, tables: sa.Engine) -> None:
    orphan = CHILDREN.insert().values(id=1, parent_id=999)
    if isinstance(maker, AsyncFastAPISessionMaker):
        async_maker = maker

        async def main() -> None:
            try:
                async with async_maker.context_session() as session:
                    await session.execute(orphan)
            finally:
                await async_maker.dispose()

        with pytest.raises(sa.exc.IntegrityError):
            asyncio.run(main())
    else:
        with pytest.raises(sa.exc.IntegrityError), maker.context_session() as session:
            session.execute(orphan)
    assert rows(tables, CHILDREN) == []


@pytest.mark.parametrize("backend", ["sqlite"])
def test_sqlite_foreign_keys_false_keeps_sqlites_default(
    make_maker: MakerFactory, tables: sa.Engine, serve: Callable[..., httpx.Client]
) -> None:
    maker = make_maker(sqlite_foreign_keys=False)
    client = serve(family_app(maker))

    response = client.post("/children/11", params={"parent": 999})

    assert response.status_code == 201  # SQLite's own behaviour: the orphan is stored
    assert rows(tables, CHILDREN) == [(11, 999)]


@pytest.mark.parametrize("backend", ["sqlite"])
def test_every_engine_of_the_package_turns_sqlite_foreign_keys_on(database_url: str, tmp_path: Path) -> None:
    engine = get_engine(database_url)
    try:
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        engine.dispose()
    database = TestDatabase(f"sqlite:///{tmp_path}/app.db")
    database.setup()
    sync_engine = database.engine()
    async_engine = database.async_engine()
    try:
        with sync_engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1

        async def async_pragma() -> Any:
            async with async_engine.connect() as connection:
                return (await connection.exec_driver_sql("PRAGMA foreign_keys")).scalar()

        assert asyncio.run(async_pragma()) == 1
    finally:
        sync_engine.dispose()
        asyncio.run(async_engine.dispose())
        database.teardown()
