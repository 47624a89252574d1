"""Request sessions are the configured class composed with the request rules, never a replacement."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from fastapi_sessionmaker import (
    AsyncFastAPISessionMaker,
    CommitPolicy,
    ConcurrentSessionUseError,
    FastAPISessionMaker,
    ReadOnlySessionError,
)
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
