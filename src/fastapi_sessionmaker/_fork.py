"""Fork safety: an engine used before ``os.fork()`` (e.g. ``create_all`` at import under gunicorn
``--preload``) gets a fresh, empty pool in the child, so no pooled socket is shared by two processes.

Every engine this package creates is tracked (weakly). In a forked child each one gets SQLAlchemy's
``engine.dispose(close=False)``: a new pool, the parent's connections neither used nor closed (a
close would end the parent's sessions on the server). The old pools are kept referenced in the
child, never garbage-collected, so no driver finalizer touches the parent's sockets either. Costs
nothing per request; processes started by spawn (``uvicorn --workers``) inherit nothing anyway.
"""

from __future__ import annotations

import os
import weakref

import sqlalchemy as sa

__all__ = ["fork_safe"]

_engines: weakref.WeakSet[sa.Engine] = weakref.WeakSet()
# The pools inherited from the parent: kept alive (their sockets are the parent's), never used.
_inherited: list[sa.Pool] = []


def fork_safe(engine: sa.Engine) -> sa.Engine:
    """Give ``engine`` (an async engine passes its ``sync_engine``) a fresh pool in forked children."""
    _engines.add(engine)
    return engine


def _after_fork_in_child() -> None:
    for engine in list(_engines):
        _inherited.append(engine.pool)
        engine.dispose(close=False)


if hasattr(os, "register_at_fork"):  # pragma: no branch - every POSIX Python; Windows cannot fork
    os.register_at_fork(after_in_child=_after_fork_in_child)
