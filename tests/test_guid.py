"""``GUID`` on all three databases: fastapi-utils' storage, str/UUID in, UUID out, defaults."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from fastapi_sessionmaker import (
    GUID,
    GUID_DEFAULT_SQLITE,
    GUID_SERVER_DEFAULT_POSTGRESQL,
    AsyncFastAPISessionMaker,
    FastAPISessionMaker,
    async_setup_guids_postgresql,
    setup_guids_postgresql,
)
from tests.conftest import Databases, Maker


class Base(DeclarativeBase):
    pass


class Thing(Base):
    __tablename__ = "guid_things"

    id: Mapped[uuid.UUID] = mapped_column(GUID, primary_key=True, default=GUID_DEFAULT_SQLITE)
    other: Mapped[uuid.UUID | None] = mapped_column(GUID, nullable=True)
    label: Mapped[str] = mapped_column(sa.String(40), default="")


@pytest.fixture
def things(sync_engine: sa.Engine) -> Iterator[sa.Table]:
    """The ``guid_things`` table, fresh on the test database."""
    Base.metadata.drop_all(sync_engine)
    Base.metadata.create_all(sync_engine)
    yield Thing.__table__  # type: ignore[misc]
    Base.metadata.drop_all(sync_engine)


@pytest.fixture
def pg_engine(databases: Databases) -> Iterator[sa.Engine]:
    """A sync engine on this run's PostgreSQL database (the server-side default is PostgreSQL's)."""
    engine = FastAPISessionMaker(databases.url("postgresql")).get_new_engine()
    yield engine
    engine.dispose()


def test_native_uuid_on_postgresql_char32_elsewhere(
    backend: str, sync_engine: sa.Engine, things: sa.Table
) -> None:
    columns = {column["name"]: column["type"] for column in sa.inspect(sync_engine).get_columns(things.name)}
    if backend == "postgresql":
        assert isinstance(columns["id"], (postgresql.UUID, sa.Uuid))
    else:
        assert isinstance(columns["id"], sa.CHAR)
        assert columns["id"].length == 32


@pytest.mark.parametrize(
    "given",
    [
        pytest.param(lambda u: u, id="uuid"),
        pytest.param(str, id="str-hyphens"),
        pytest.param(lambda u: u.hex, id="str-hex"),
        pytest.param(lambda u: str(u).upper(), id="str-upper"),
    ],
)
def test_accepts_str_and_uuid_returns_uuid(
    backend: str, sync_engine: sa.Engine, things: sa.Table, given: object
) -> None:
    assert callable(given)
    value = uuid.uuid4()
    other = uuid.uuid4()
    with sync_engine.begin() as connection:
        connection.execute(things.insert(), {"id": given(value), "other": given(other), "label": "x"})
    with sync_engine.connect() as connection:
        row = connection.execute(sa.select(things.c.id, things.c.other)).one()
        # A filter with a str finds the row too: bind values are normalised the same way.
        found = connection.execute(sa.select(things.c.label).where(things.c.id == str(value))).scalar()
        raw = connection.execute(sa.text(f"SELECT id FROM {things.name}")).scalar_one()
    assert type(row.id) is uuid.UUID
    assert row.id == value
    assert type(row.other) is uuid.UUID
    assert row.other == other
    assert found == "x"
    if backend != "postgresql":
        assert raw == f"{value.int:032x}"  # fastapi-utils' storage: 32 lowercase hex digits


def test_none_stays_none(sync_engine: sa.Engine, things: sa.Table) -> None:
    with sync_engine.begin() as connection:
        connection.execute(things.insert(), {"id": uuid.uuid4(), "other": None})
        assert connection.execute(sa.select(things.c.other)).scalar_one() is None


def test_rejects_what_is_not_a_uuid(sync_engine: sa.Engine, things: sa.Table) -> None:
    with sync_engine.begin() as connection, pytest.raises(sa.exc.StatementError) as caught:
        connection.execute(things.insert(), {"id": "not-a-uuid"})
    assert isinstance(caught.value.orig, ValueError)


def test_reads_rows_written_by_fastapi_utils(sync_engine: sa.Engine, things: sa.Table) -> None:
    """fastapi-utils stored ``"%.32x" % uuid.int``: such rows, inserted with raw SQL, read back."""
    values = [uuid.uuid4() for _ in range(3)]
    with sync_engine.begin() as connection:
        for value in values:
            connection.execute(
                sa.text(f"INSERT INTO {things.name} (id, label) VALUES (:id, :label)"),
                {"id": f"{value.int:032x}", "label": str(value)},
            )
    with sync_engine.connect() as connection:
        rows = connection.execute(sa.select(things.c.id, things.c.label)).all()
        one = connection.execute(sa.select(things.c.id).where(things.c.id == values[1])).scalar_one()
    assert sorted((row.id, row.label) for row in rows) == sorted((v, str(v)) for v in values)
    assert all(type(row.id) is uuid.UUID for row in rows)
    assert one == values[1]


def test_guid_default_sqlite_gives_ids(sync_engine: sa.Engine, things: sa.Table) -> None:
    with sync_engine.begin() as connection:
        first = connection.execute(things.insert(), {"label": "a"}).inserted_primary_key
        second = connection.execute(things.insert(), {"label": "b"}).inserted_primary_key
    assert first is not None
    assert second is not None
    assert isinstance(first[0], uuid.UUID)
    assert first[0] != second[0]
    with sync_engine.connect() as connection:
        stored = set(connection.execute(sa.select(things.c.id)).scalars())
    assert stored == {first[0], second[0]}


def test_setup_guids_postgresql_on_sqlalchemy_2(pg_engine: sa.Engine) -> None:
    setup_guids_postgresql(pg_engine)
    setup_guids_postgresql(pg_engine)  # idempotent: safe at every start-up
    with pg_engine.connect() as connection:
        extensions = set(connection.execute(sa.text("SELECT extname FROM pg_extension")).scalars())
        generated = connection.execute(sa.text("SELECT gen_random_uuid()")).scalar_one()
    assert "pgcrypto" in extensions
    assert isinstance(generated, uuid.UUID)


def test_async_setup_guids_postgresql(databases: Databases) -> None:
    maker = AsyncFastAPISessionMaker(databases.url("postgresql"))

    async def main() -> object:
        try:
            await async_setup_guids_postgresql(maker.cached_engine)
            async with maker.cached_engine.connect() as connection:
                return (await connection.execute(sa.text("SELECT gen_random_uuid()"))).scalar_one()
        finally:
            await maker.dispose()

    assert isinstance(asyncio.run(main()), uuid.UUID)


def test_server_default_postgresql_on_several_columns_and_tables(pg_engine: sa.Engine) -> None:
    setup_guids_postgresql(pg_engine)
    metadata = sa.MetaData()
    tables = [
        sa.Table(
            name,
            metadata,
            sa.Column("id", GUID, primary_key=True, server_default=GUID_SERVER_DEFAULT_POSTGRESQL),
            sa.Column("token", GUID, nullable=False, server_default=GUID_SERVER_DEFAULT_POSTGRESQL),
            sa.Column("label", sa.String(10)),
        )
        for name in ("guid_server_a", "guid_server_b")
    ]
    metadata.drop_all(pg_engine)
    metadata.create_all(pg_engine)
    try:
        generated: list[uuid.UUID] = []
        with pg_engine.begin() as connection:
            for table in tables:
                for label in ("one", "two"):
                    row = connection.execute(
                        table.insert().values(label=label).returning(table.c.id, table.c.token)
                    ).one()
                    generated.extend(row)
        inspector = sa.inspect(pg_engine)
        defaults = [
            str(column["default"]) for table in tables for column in inspector.get_columns(table.name)[:2]
        ]
    finally:
        metadata.drop_all(pg_engine)
    assert len(generated) == 8
    assert all(type(value) is uuid.UUID for value in generated)
    assert len(set(generated)) == 8
    assert all("gen_random_uuid()" in default for default in defaults)


def test_round_trip_through_each_twin(backend: str, maker: Maker, sync_engine: sa.Engine) -> None:
    """A GUID written and read through the maker's own driver (asyncpg, aiomysql, aiosqlite too)."""
    Base.metadata.drop_all(sync_engine)
    Base.metadata.create_all(sync_engine)
    given = uuid.uuid4()

    def write_and_read_sync(maker: FastAPISessionMaker) -> list[uuid.UUID]:
        with maker.context_session() as session:
            session.add_all([Thing(label="default"), Thing(id=given, other=str(given), label="given")])
        with maker.context_session() as session:
            found = session.get(Thing, str(given))
            assert found is not None
            rows = session.execute(sa.select(Thing.id, Thing.other).order_by(Thing.label)).all()
        return [found.id, *(value for row in rows for value in row if value is not None)]

    async def write_and_read_async(maker: AsyncFastAPISessionMaker) -> list[uuid.UUID]:
        try:
            async with maker.context_session() as session:
                session.add_all([Thing(label="default"), Thing(id=given, other=str(given), label="given")])
            async with maker.context_session() as session:
                found = await session.get(Thing, str(given))
                assert found is not None
                result = await session.execute(sa.select(Thing.id, Thing.other).order_by(Thing.label))
                rows = result.all()
            return [found.id, *(value for row in rows for value in row if value is not None)]
        finally:
            await maker.dispose()

    try:
        if isinstance(maker, FastAPISessionMaker):
            try:
                values = write_and_read_sync(maker)
            finally:
                maker.dispose()
        else:
            values = asyncio.run(write_and_read_async(maker))
    finally:
        Base.metadata.drop_all(sync_engine)
    # found.id, then the "default" row's id, then the "given" row's id and other
    assert values[0] == given
    assert values[2:] == [given, given]
    assert values[1] != given
    assert [type(value) for value in values] == [uuid.UUID] * 4
