"""Database-wide locks held by one connection: PostgreSQL advisory locks, MariaDB/MySQL ``GET_LOCK``,
a file lock beside a SQLite database. What makes N workers that start at once migrate exactly once.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import sqlalchemy as sa

from fastapi_sessionmaker._errors import error_code
from fastapi_sessionmaker._sqlite import database_file
from fastapi_sessionmaker.exceptions import MigrationError

__all__ = ["database_lock"]

_PG_LOCK_NOT_AVAILABLE = "55P03"
_MYSQL_NAME_LIMIT = 64
_POLL_SECONDS = 0.05  # how often a SQLite file lock is tried again while another process holds it
_MEMORY_LOCK = threading.Lock()  # an in-memory SQLite database lives in one process


def _held_too_long(name: str, timeout: float) -> MigrationError:
    return MigrationError(
        f"another process held the lock {name!r} for more than {timeout:g} s (a migration still "
        "running, or a stuck one): wait for it, or raise lock_timeout"
    )


@contextlib.contextmanager
def database_lock(connection: sa.Connection, name: str, *, timeout: float) -> Iterator[None]:
    """Hold the lock ``name`` of the connection's database while the block runs, waiting ``timeout`` s.

    PostgreSQL: a session-level ``pg_advisory_lock`` on ``connection`` (the key is a hash of
    ``name``; advisory locks are per database); MariaDB/MySQL: ``GET_LOCK('<database>:<name>')`` on
    ``connection`` (user locks are per server: the current database qualifies the name); SQLite: an
    exclusive lock on the file ``<database>.lock`` beside the database (a process-wide lock for an
    in-memory database).
    The block may use ``connection`` (it is idle, outside a transaction); the lock survives its
    commits and is released at the end, or by the server when the connection dies. Waiting longer
    than ``timeout`` raises :class:`MigrationError`.
    """
    backend = connection.dialect.name
    if backend == "postgresql":
        lock = _postgresql_lock(connection, name, timeout)
    elif backend in {"mysql", "mariadb"}:
        lock = _mysql_lock(connection, name, timeout)
    elif backend == "sqlite":
        lock = _sqlite_lock(connection, name, timeout)
    else:  # pragma: no cover - the makers accept these three only
        raise MigrationError(f"no database lock for the {backend!r} dialect")
    with lock:
        yield


@contextlib.contextmanager
def _postgresql_lock(connection: sa.Connection, name: str, timeout: float) -> Iterator[None]:
    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
    try:
        # lock_timeout for this transaction only: the advisory lock itself outlives the commit.
        wait = f"{max(1, int(timeout * 1000))}ms"
        connection.execute(sa.text("SELECT set_config('lock_timeout', :wait, true)"), {"wait": wait})
        connection.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": key})
    except sa.exc.DBAPIError as exc:
        connection.rollback()
        if error_code(exc) == _PG_LOCK_NOT_AVAILABLE:
            raise _held_too_long(name, timeout) from exc
        raise
    connection.commit()
    try:
        yield
    finally:
        connection.rollback()  # whatever the block left open (a failed migration)
        connection.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
        connection.commit()


def mysql_lock_name(connection: sa.Connection, name: str) -> str:
    """``<database>:<name>``, the current database asked of the server; hashed beyond 64 characters."""
    database = connection.execute(sa.text("SELECT DATABASE()")).scalar()
    qualified = f"{database}:{name}"
    if len(qualified) <= _MYSQL_NAME_LIMIT:
        return qualified
    return qualified[:23] + "#" + hashlib.sha256(qualified.encode()).hexdigest()[:40]


@contextlib.contextmanager
def _mysql_lock(connection: sa.Connection, name: str, timeout: float) -> Iterator[None]:
    lock_name = mysql_lock_name(connection, name)
    got = connection.execute(
        sa.text("SELECT GET_LOCK(:name, :timeout)"), {"name": lock_name, "timeout": timeout}
    ).scalar()
    connection.commit()  # a user lock is not transactional: it stays until RELEASE_LOCK
    if got != 1:
        raise _held_too_long(lock_name, timeout)
    try:
        yield
    finally:
        connection.rollback()
        connection.execute(sa.text("SELECT RELEASE_LOCK(:name)"), {"name": lock_name})
        connection.commit()


def _sqlite_file(connection: sa.Connection) -> Path | None:
    database = database_file(connection.engine.url)  # resolved; None in memory
    return None if database is None else Path(database)


@contextlib.contextmanager
def _sqlite_lock(connection: sa.Connection, name: str, timeout: float) -> Iterator[None]:
    path = _sqlite_file(connection)
    if path is None:
        if not _MEMORY_LOCK.acquire(timeout=timeout):
            raise _held_too_long(name, timeout)
        try:
            yield
        finally:
            _MEMORY_LOCK.release()
        return
    lock_path = path.with_name(path.name + ".lock")
    with open(lock_path, "a+b") as handle:
        deadline = time.monotonic() + timeout
        while not _try_lock(handle):
            if time.monotonic() >= deadline:
                raise _held_too_long(str(lock_path), timeout)
            time.sleep(_POLL_SECONDS)
        try:
            yield
        finally:
            _unlock(handle)


if sys.platform == "win32":  # pragma: no cover - the suite runs on Linux
    import msvcrt

    def _try_lock(handle: IO[bytes]) -> bool:
        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    def _unlock(handle: IO[bytes]) -> None:
        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _try_lock(handle: IO[bytes]) -> bool:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _unlock(handle: IO[bytes]) -> None:
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
