"""Request sessions are the configured class composed with the request rules, never a replacement."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session, SessionTransaction

from fastapi_sessionmaker import (
    AsyncFastAPISessionMaker,
    CommitPolicy,
    ConcurrentSessionUseError,
    FastAPISessionMaker,
    ReadOnlySessionError,
    ResponseStartedError,
)
from fastapi_sessionmaker._sessions import LockedMixin, RequestSessionMixin, mark_response_started
from tests.models import User, reset_tables


class MySession(Session):
    def hello(self) -> str:
        return "mine"


class MyAsyncSession(AsyncSession):
    def hello(self) -> str:
        return "mine, async"


@pytest.mark.parametrize("policy", list(CommitPolicy))
def test_the_sync_request_session_keeps_the_configured_class(tmp_path: Path, policy: CommitPolicy) -> None:
    maker = FastAPISessionMaker(f"sqlite:///{tmp_path}/s.db", session_options={"class_": MySession})
    reset_tables(maker.cached_engine)
    session = maker.lifecycle.open(policy)
    try:
        assert isinstance(session, MySession)
        assert session.hello() == "mine"
        session.add(User(email="a@x"))
        if policy is CommitPolicy.READ_ONLY:
            with pytest.raises(ReadOnlySessionError):
                session.flush()
        else:
            session.flush()
    finally:
        session.close()
        maker.dispose()


@pytest.mark.parametrize("policy", [CommitPolicy.AUTO, CommitPolicy.READ_ONLY])
def test_the_async_request_session_keeps_the_configured_classes(tmp_path: Path, policy: CommitPolicy) -> None:
    maker = AsyncFastAPISessionMaker(
        f"sqlite:///{tmp_path}/a.db",
        session_options={"class_": MyAsyncSession, "sync_session_class": MySession},
    )

    async def main() -> None:
        session: Any = maker.lifecycle.open(policy)
        try:
            assert isinstance(session, MyAsyncSession)
            assert session.hello() == "mine, async"
            assert isinstance(session.sync_session, MySession)
            # The serial check composes with the configured class too.
            results = await asyncio.gather(
                session.execute(sa.text("SELECT 1")),
                session.execute(sa.text("SELECT 2")),
                return_exceptions=True,
            )
            assert any(isinstance(r, ConcurrentSessionUseError) for r in results)
        finally:
            await session.close()
            await maker.dispose()

    asyncio.run(main())


def test_only_the_sync_twin_locks_every_method(tmp_path: Path) -> None:
    """The sync twin's sessions may be used by a worker thread while the guard ends them, so
    every method that may do I/O holds the session's lock; the async twin's run on the event
    loop's thread only (one task at a time is SerialAsyncSession's check) and skip that layer:
    until the response starts they are the configured class itself (no layer between the endpoint
    and SQLAlchemy), then they take the rules that matter there: writes refused and reads alone."""
    sync = FastAPISessionMaker(f"sqlite:///{tmp_path}/s.db")
    session = sync.lifecycle.open(CommitPolicy.AUTO)
    try:
        assert isinstance(session, LockedMixin)
        assert "get" in vars(LockedMixin)
    finally:
        session.close()
        sync.dispose()
    maker = AsyncFastAPISessionMaker(f"sqlite:///{tmp_path}/a.db")

    async def main() -> None:
        reset = maker.cached_engine
        async with reset.begin() as connection:
            await connection.run_sync(lambda c: reset_tables(c.engine))
        session: Any = maker.lifecycle.open(CommitPolicy.AUTO)
        try:
            inner = session.sync_session
            assert not isinstance(inner, RequestSessionMixin)  # no rule to pay before the start
            assert type(inner).execute is Session.execute
            assert type(inner).add is Session.add
            session.add(User(email="early@x"))
            await session.commit()
            mark_response_started(session)
            assert isinstance(inner, RequestSessionMixin)  # the rules, from the status line on
            assert not isinstance(inner, LockedMixin)
            assert type(inner).get is Session.get  # no wrapper between the session and SQLAlchemy
            assert (await session.execute(sa.text("SELECT 2"))).scalar() == 2  # a read of its own
            assert not session.in_transaction()
            with pytest.raises(ResponseStartedError):
                session.add(User(email="late@x"))
            rows = await session.execute(sa.text("SELECT email FROM fsm_users"))
            assert rows.scalars().all() == ["early@x"]
        finally:
            await session.close()
            await maker.dispose()

    asyncio.run(main())


def test_the_sync_twin_commits_by_the_short_way_under_its_lock(
    tmp_path: Path, orm_prepares: list[SessionTransaction]
) -> None:
    """A sync request session's commit takes ``_compat.commit``'s short way (nothing to flush, no
    listener) while holding the session's lock, so a guard ending it from another thread waits."""
    maker = FastAPISessionMaker(f"sqlite:///{tmp_path}/s.db")
    engine = maker.cached_engine
    reset_tables(engine)
    prepared = orm_prepares
    session: Any = maker.lifecycle.open(CommitPolicy.AUTO)
    held: list[bool] = []
    sa.event.listen(engine, "commit", lambda connection: held.append(session._fsm_lock._is_owned()))
    try:
        session.execute(sa.text("INSERT INTO fsm_users (id, email, name) VALUES ('1', 'raw@x', '')"))
        session.commit()
        assert prepared == []  # the short way
        assert held == [True]
        session.add(User(email="orm@x"))
        session.commit()  # something to flush: Session.commit(), under the lock too
        assert prepared  # the ORM's own commit ran
        assert held == [True, True]
    finally:
        session.close()
    with engine.connect() as connection:
        emails = connection.execute(sa.text("SELECT email FROM fsm_users ORDER BY email")).scalars()
        assert list(emails) == ["orm@x", "raw@x"]
    maker.dispose()


def test_the_async_twin_commits_by_the_short_way_unless_its_class_has_its_own_commit(
    tmp_path: Path, orm_prepares: list[SessionTransaction]
) -> None:
    """The composed AsyncSession's ``commit`` goes through ``_compat.commit`` (request sessions,
    units of work, a user's own ``await session.commit()``); a configured class with its own
    ``commit`` keeps it."""
    own_commits: list[str] = []

    class OwnCommit(AsyncSession):
        async def commit(self) -> None:
            own_commits.append("own")
            await super().commit()

    async def commit_one(maker: AsyncFastAPISessionMaker, email: str) -> None:
        async with maker.cached_engine.begin() as connection:
            await connection.run_sync(lambda c: reset_tables(c.engine))
        session: Any = maker.lifecycle.open(CommitPolicy.AUTO)
        try:
            await session.execute(
                sa.text("INSERT INTO fsm_users (id, email, name) VALUES (:id, :email, '')"),
                {"id": email[0] * 32, "email": email},
            )
            await session.commit()
            rows = await session.execute(sa.text("SELECT email FROM fsm_users"))
            assert rows.scalars().all() == [email]
        finally:
            await session.close()
            await maker.dispose()

    asyncio.run(commit_one(AsyncFastAPISessionMaker(f"sqlite:///{tmp_path}/a.db"), "plain@x"))
    assert orm_prepares == []  # the short way
    assert own_commits == []
    own = AsyncFastAPISessionMaker(f"sqlite:///{tmp_path}/b.db", session_class=OwnCommit)
    asyncio.run(commit_one(own, "own@x"))
    assert own_commits == ["own"]
    assert orm_prepares  # the class's own commit, then SQLAlchemy's
