"""aiosqlite: a ``commit()`` or ``rollback()`` with no SQLite transaction open is answered on the
event loop, without a round trip through aiosqlite's thread (``_sqlite.skip_idle_ends``).

sqlite3 itself does nothing then, so the only observable difference must be the missing hop:
every write is still stored, every rollback still discards, a failed COMMIT still releases
SQLite's write lock, and a driver in PEP 249 mode (``autocommit=False``, Python >= 3.12), which
always holds a transaction, still gets every call.
"""

import asyncio
import sys
from pathlib import Path
from typing import Any

import aiosqlite
import pytest
import sqlalchemy as sa

from fastapi_sessionmaker import AsyncFastAPISessionMaker
from fastapi_sessionmaker._sqlite import skip_idle_ends
from tests.conftest import checked_out, pool_of


@pytest.fixture
def hops(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the sqlite3 calls aiosqlite ran in its thread (``commit``, ``rollback``...)."""
    seen: list[str] = []
    original = aiosqlite.Connection._execute

    async def counted(self: aiosqlite.Connection, fn: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(getattr(fn, "__name__", repr(fn)))
        return await original(self, fn, *args, **kwargs)  # type: ignore[no-untyped-call]

    monkeypatch.setattr(aiosqlite.Connection, "_execute", counted)
    return seen


def ends(seen: list[str]) -> list[str]:
    return [name for name in seen if name in ("commit", "rollback")]


def make(tmp_path: Path, **engine_options: Any) -> AsyncFastAPISessionMaker:
    url = f"sqlite+aiosqlite:///{tmp_path / 'idle.db'}"
    maker = AsyncFastAPISessionMaker(url, engine_options=engine_options)

    async def create() -> None:
        async with maker.cached_engine.begin() as connection:
            await connection.exec_driver_sql("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")

    asyncio.run(create())
    return maker


def stored(tmp_path: Path) -> list[str]:
    """The notes as a fresh sync connection sees them (only what was committed)."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'idle.db'}")
    try:
        with engine.connect() as connection:
            return list(connection.exec_driver_sql("SELECT body FROM notes ORDER BY id").scalars())
    finally:
        engine.dispose()


def test_a_read_ends_without_a_hop_and_a_write_with_one_commit(tmp_path: Path, hops: list[str]) -> None:
    maker = make(tmp_path)

    async def scenario() -> None:
        try:
            hops.clear()
            async with maker.context_session() as session:  # commits at the end
                assert (await session.execute(sa.text("SELECT count(*) FROM notes"))).scalar() == 0
            # The read opened no SQLite transaction: neither its COMMIT nor the pool's reset
            # ROLLBACK went to the driver's thread.
            assert ends(hops) == []
            hops.clear()
            async with maker.context_session() as session:
                await session.execute(sa.text("INSERT INTO notes (body) VALUES ('kept')"))
            assert ends(hops) == ["commit"]  # the pool's reset after it: no transaction left
            assert checked_out(pool_of(maker)) == 0
        finally:
            await maker.dispose()

    asyncio.run(scenario())
    assert stored(tmp_path) == ["kept"]


def test_a_rollback_still_discards_and_a_savepoint_still_works(tmp_path: Path, hops: list[str]) -> None:
    maker = make(tmp_path)

    async def scenario() -> None:
        try:
            hops.clear()
            session = maker.cached_sessionmaker()
            await session.execute(sa.text("INSERT INTO notes (body) VALUES ('dropped')"))
            await session.rollback()
            assert ends(hops) == ["rollback"]
            await session.close()
            async with maker.context_session() as session:
                await session.execute(sa.text("INSERT INTO notes (body) VALUES ('outer')"))
                nested = await session.begin_nested()
                await session.execute(sa.text("INSERT INTO notes (body) VALUES ('inner')"))
                await nested.rollback()
        finally:
            await maker.dispose()

    asyncio.run(scenario())
    assert stored(tmp_path) == ["outer"]


def test_a_failed_commit_still_releases_the_write_lock(tmp_path: Path) -> None:
    """A deferred foreign key fails at COMMIT and leaves SQLite's transaction open: the rollback
    that follows must still reach the driver, or every other writer would be locked out."""
    maker = make(tmp_path)

    async def scenario() -> None:
        try:
            async with maker.cached_engine.begin() as connection:
                await connection.exec_driver_sql(
                    "CREATE TABLE child (id INTEGER PRIMARY KEY, note_id INTEGER "
                    "REFERENCES notes (id) DEFERRABLE INITIALLY DEFERRED)"
                )
            with pytest.raises(sa.exc.IntegrityError, match="FOREIGN KEY"):
                async with maker.context_session() as session:
                    await session.execute(sa.text("INSERT INTO child (note_id) VALUES (42)"))
            async with maker.context_session() as session:  # would be "database is locked"
                await session.execute(sa.text("INSERT INTO notes (body) VALUES ('after')"))
            assert checked_out(pool_of(maker)) == 0
        finally:
            await maker.dispose()

    asyncio.run(scenario())
    assert stored(tmp_path) == ["after"]


@pytest.mark.skipif(sys.version_info < (3, 12), reason="sqlite3's autocommit attribute is new in 3.12")
def test_a_driver_in_pep_249_mode_gets_every_call(tmp_path: Path, hops: list[str]) -> None:
    """``autocommit=False`` keeps a transaction open at all times: nothing may be skipped."""
    maker = make(tmp_path, connect_args={"autocommit": False})

    async def scenario() -> None:
        try:
            hops.clear()
            async with maker.context_session() as session:
                await session.execute(sa.text("SELECT 1"))
            assert "commit" in ends(hops)
            async with maker.context_session() as session:
                await session.execute(sa.text("INSERT INTO notes (body) VALUES ('pep 249')"))
        finally:
            await maker.dispose()

    asyncio.run(scenario())
    assert stored(tmp_path) == ["pep 249"]


def test_only_aiosqlite_engines_are_touched(tmp_path: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'sync.db'}")
    try:
        assert skip_idle_ends(engine) is False
        assert "do_commit" not in vars(engine.dialect)
    finally:
        engine.dispose()
    maker = AsyncFastAPISessionMaker(f"sqlite+aiosqlite:///{tmp_path / 'async.db'}")
    try:
        assert "do_commit" in vars(maker.cached_engine.sync_engine.dialect)  # installed by the maker
    finally:
        asyncio.run(maker.dispose())
