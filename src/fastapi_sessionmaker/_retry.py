"""Retries of a whole unit of work after a serialization failure or a deadlock: the loop and its
backoff, sync and async twins side by side (the makers' ``run_in_transaction``).

Each attempt runs the caller's function in a fresh session and transaction (a unit the maker
opens: ``context_session()``), which commits at its end; an error that :func:`._errors.is_retryable`
accepts (raised by the function or by the commit) rolls that attempt back, and after a short,
jittered, exponentially growing wait the next attempt starts from scratch. Any other error, and
the last retryable one, is re-raised unchanged. Each retry is logged at WARNING with the attempt
number and the database's name (never SQL or parameters).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import TYPE_CHECKING, TypeVar

from fastapi_sessionmaker._errors import error_code, is_retryable

if TYPE_CHECKING:
    from sqlalchemy.engine.interfaces import IsolationLevel
    from sqlalchemy.ext.asyncio import AsyncSession
    from sqlalchemy.orm import Session

__all__ = ["BASE_DELAY", "MAX_DELAY", "backoff", "check_attempts", "next_delay", "run_async", "run_sync"]

logger = logging.getLogger("fastapi_sessionmaker")

BASE_DELAY = 0.01
"""Seconds: the longest wait after the first failed attempt; it doubles with each attempt."""
MAX_DELAY = 0.5
"""Seconds: the longest wait between two attempts, however many failed."""

T = TypeVar("T")


def backoff(attempt: int, *, base: float = BASE_DELAY, cap: float = MAX_DELAY) -> float:
    """The wait after failed attempt ``attempt`` (1, 2, ...): uniform between 0 and
    ``min(cap, base * 2 ** (attempt - 1))`` ("full jitter"), so that transactions that failed
    together do not all start again together."""
    return random.uniform(0.0, min(cap, base * 2.0 ** (attempt - 1)))


def check_attempts(attempts: int) -> None:
    """``attempts`` must be a whole number of at least 1 (1: no retry)."""
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
        raise ValueError(f"attempts must be an int >= 1 (1 means no retry), not {attempts!r}")


def next_delay(exc: Exception, attempt: int, attempts: int, database: str) -> float | None:
    """After failed attempt ``attempt``: the wait before the next one (the retry is logged), or
    ``None`` when ``exc`` is not retried (the caller re-raises it unchanged)."""
    # A failed attempt ends here: its transaction was rolled back and its session closed, so its
    # ``on_commit`` callbacks were discarded (``_oncommit.settle``); the guard's per-route retry
    # discards its ``on_rollback`` ones too (the request as a whole goes on).
    if attempt >= attempts or not is_retryable(exc):
        return None
    delay = backoff(attempt)
    code = error_code(exc)
    logger.warning(
        "transaction on database %r failed with %s%s (attempt %d of %d); retrying in %.0f ms",
        database,
        type(exc).__name__,
        f" ({code})" if code else "",
        attempt,
        attempts,
        delay * 1000,
        extra={
            "database": database,
            "attempt": attempt,
            "attempts": attempts,
            "error_class": type(exc).__name__,
            "error_code": code,
        },
    )
    return delay


def run_sync(
    open_unit: Callable[[], AbstractContextManager[Session]],
    fn: Callable[[Session], T],
    *,
    attempts: int,
    isolation_level: IsolationLevel | None,
    database: str,
) -> T:
    """Call ``fn(session)`` in ``open_unit()``, a fresh unit of work each attempt, until one
    commits (its return value is returned) or an error is not retried (re-raised unchanged)."""
    check_attempts(attempts)
    attempt = 1
    while True:
        try:
            with open_unit() as session:
                if isolation_level is not None:
                    session.connection(execution_options={"isolation_level": isolation_level})
                return fn(session)
        except Exception as exc:
            delay = next_delay(exc, attempt, attempts, database)
            if delay is None:
                raise
        time.sleep(delay)
        attempt += 1


async def run_async(
    open_unit: Callable[[], AbstractAsyncContextManager[AsyncSession]],
    fn: Callable[[AsyncSession], Awaitable[T]],
    *,
    attempts: int,
    isolation_level: IsolationLevel | None,
    database: str,
) -> T:
    """The async twin of :func:`run_sync`: ``await fn(session)`` in a fresh ``AsyncSession``
    unit each attempt; the wait between attempts does not block the event loop."""
    check_attempts(attempts)
    attempt = 1
    while True:
        try:
            async with open_unit() as session:
                if isolation_level is not None:
                    await session.connection(execution_options={"isolation_level": isolation_level})
                return await fn(session)
        except Exception as exc:
            delay = next_delay(exc, attempt, attempts, database)
            if delay is None:
                raise
        await asyncio.sleep(delay)
        attempt += 1
