"""The checkout check: a pooled connection the server closed while it was idle is replaced before a
statement fails, without a round trip (SQLAlchemy's ping for drivers whose socket is unknown)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa

from fastapi_sessionmaker import _compat

__all__ = ["checks_liveness", "install_liveness_check"]


def install_liveness_check(engine: sa.Engine, kwargs: Mapping[str, Any]) -> None:
    """Check each pooled connection on checkout without a round trip to the database.

    When an idle connection's socket is readable or closed, the server has closed it (restart,
    ``pg_terminate_backend``, ``wait_timeout``): the pool replaces it, and the connections older
    than it, before any statement fails. Drivers whose socket cannot be reached get SQLAlchemy's
    ping instead. SQLite needs no check. An explicit ``pool_pre_ping`` in ``kwargs`` wins.
    """
    if engine.dialect.name == "sqlite" or "pool_pre_ping" in kwargs:
        return
    dialect = engine.dialect

    def liveness_check(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        cached = record.info.get("fastapi_sessionmaker.probe")
        if cached is None or cached[0] is not dbapi_connection:
            cached = (dbapi_connection, _compat.dead_connection_probe(dbapi_connection))
            record.info["fastapi_sessionmaker.probe"] = cached
        probe = cached[1]
        if probe is None:
            if not dialect.do_ping(dbapi_connection):  # pragma: no cover - do_ping raises or True
                raise sa.exc.InvalidatePoolError("the database did not answer a ping")
        elif probe():
            raise sa.exc.InvalidatePoolError("the database closed this connection while it was idle")

    sa.event.listen(engine, "checkout", liveness_check)


def checks_liveness(engine: sa.Engine) -> bool:
    """Whether dead pooled connections of ``engine`` are caught on checkout (ours or pre-ping)."""
    return _compat.pool_pre_ping(engine.pool) or any(
        getattr(listener, "__name__", "") == "liveness_check" for listener in engine.pool.dispatch.checkout
    )
