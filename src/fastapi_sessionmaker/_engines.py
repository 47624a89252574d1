"""Engine defaults under the caller's options: SQLite in memory on one connection, SQLite foreign keys
enforced, SQL echo without parameters; and how many connections a pool can hand out."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL
from sqlalchemy.pool import StaticPool

from fastapi_sessionmaker import _compat
from fastapi_sessionmaker._pgbouncer import pgbouncer_options

__all__ = ["enforce_sqlite_foreign_keys", "engine_kwargs", "pool_capacity"]


def engine_kwargs(
    url: URL,
    options: Mapping[str, Any],
    *,
    is_async: bool,
    pgbouncer: str | None = None,
    variable: str = "database_uri",
) -> dict[str, Any]:
    """Our defaults under the caller's options: SQLite in memory on one connection; with
    ``pgbouncer="transaction"`` the driver options of :func:`pgbouncer_options`.

    ``pool_pre_ping`` is not set: unless the caller sets it, :func:`install_liveness_check` gives
    the same protection for a fraction of the cost (``pool_pre_ping=True`` asks for SQLAlchemy's
    ping on every checkout, ``False`` for no check at all).
    """
    kwargs: dict[str, Any] = {}
    memory = url.database in (None, "", ":memory:") or url.query.get("mode") == "memory"
    if url.get_backend_name() == "sqlite" and memory:  # also "file:name?mode=memory&uri=true"
        # One shared in-memory database; the maker's limiter gives the one connection to one
        # session at a time, so a request never sees (or commits) another request's work.
        kwargs["poolclass"] = StaticPool
        kwargs["connect_args"] = {"check_same_thread": False}
    kwargs.update(options)
    if kwargs.get("echo"):
        kwargs.setdefault("hide_parameters", True)  # SQL echo never prints bound values by default
    return pgbouncer_options(url, kwargs, pgbouncer, variable=variable)


def enforce_sqlite_foreign_keys(engine: sa.Engine) -> None:
    """Run ``PRAGMA foreign_keys=ON`` on every new SQLite connection of ``engine``.

    SQLite ignores ``FOREIGN KEY`` and ``ON DELETE`` unless each connection turns them on. Every
    engine this package creates calls this (an async engine passes its ``sync_engine``: the
    listener works for pysqlite and aiosqlite alike); other databases are left as they are. It is
    a "connect" listener: it runs once per new DBAPI connection, never at checkout or commit.

    Example:
        >>> engine = sa.create_engine("sqlite://")
        >>> enforce_sqlite_foreign_keys(engine)
        >>> with engine.connect() as connection:
        ...     connection.exec_driver_sql("PRAGMA foreign_keys").scalar()
        1
    """
    if engine.dialect.name != "sqlite":
        return

    def sqlite_foreign_keys(dbapi_connection: Any, record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    sa.event.listen(engine, "connect", sqlite_foreign_keys)


def pool_capacity(engine: sa.Engine) -> int | None:
    """How many connections ``engine``'s pool can hand out at once (None: no fixed limit)."""
    pool = engine.pool
    if isinstance(pool, StaticPool):
        return 1
    size = getattr(pool, "size", None)
    overflow = _compat.pool_max_overflow(pool)
    if callable(size) and overflow is not None:
        capacity = size()
        if overflow < 0 or capacity <= 0:
            return None
        return int(capacity) + overflow
    return None
