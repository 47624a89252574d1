"""Every read of another package's internals, in one place; ``tests/test_compat_internals.py`` checks
each against the installed versions, so an upstream change fails there with a message naming it.

What is read, and why:

- FastAPI's per-endpoint exit stack (``scope["fastapi_function_astack"]``): the request dependency
  learns from it whether the endpoint raised, without being a generator (about 20 µs cheaper).
- SQLAlchemy's ``Session._is_clean()``: whether a commit would flush (a write that may wait on a
  lock), asked on every sync commit.
- SQLAlchemy's ``SessionTransaction._connections``: the connections a session's transaction holds,
  to ask their drivers whether a transaction is open on the server.
- SQLAlchemy's ``Session.commit()`` steps (``SessionTransaction._parent``, ``_state``,
  ``_connections``): :func:`commit` commits a transaction that has nothing to flush and no listener
  or option that a commit would run for by doing only what the commit would do then (commit each
  connection, close the transaction), about a tenth of a request's instructions on an async read
  cheaper.
- SQLAlchemy's ``QueuePool._timeout`` / ``_max_overflow`` and ``Pool._pre_ping``: the pool's size
  limits and checks (no public accessor exists).
- uvicorn's ``RequestResponseCycle.disconnected`` (the object behind the ``receive`` it passes):
  whether the client is gone, asked before a commit without waiting and without a loop turn.
- Driver connection attributes (asyncpg's and aiomysql's transports, PyMySQL's ``_sock``,
  psycopg's ``fileno()``, SQLAlchemy's async adapters' ``_connection``): the socket of an idle
  pooled connection, to see without a round trip that the server closed it.
- SQLAlchemy's ``Connection`` takes its DBAPI connection through ``Engine.raw_connection()``: the
  observability layer (:mod:`._observe`) wraps that method on the engines it observes to time the
  pool wait, as no event fires *before* a checkout.
- FastAPI's routes: ``fastapi.routing.iter_route_contexts`` (FastAPI 0.165+, where an included
  router's routes are served through inclusion contexts that add the router's dependencies)
  gives each route with the dependant it is served with; the guard is installed on the
  ``handle`` of each ``APIRoute`` one of whose dependants takes a request session (:mod:`._guard`).
- opentelemetry-instrumentation-sqlalchemy's ``EngineTracer``: the class its instrumentor attaches
  to each engine, built here for the engines of a maker with ``tracing=True`` (the instrumentor is
  a process-wide singleton that instruments the engines of its first call only).
"""

from __future__ import annotations

import functools
import inspect
import select
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session
from sqlalchemy.orm.session import SessionTransactionState

__all__ = [
    "api_routes",
    "dead_connection_probe",
    "fastapi_function_stack",
    "is_generator_dependency",
    "otel_trace_engine",
    "pool_max_overflow",
    "pool_pre_ping",
    "pool_timeout",
    "server_disconnected",
    "session_is_clean",
    "transaction_connections",
    "wrap_raw_connection",
]

FUNCTION_STACK_KEY = "fastapi_function_astack"


def fastapi_function_stack(scope: Any) -> AsyncExitStack | None:
    """FastAPI's exit stack closed right after the endpoint (and its ``scope="function"`` deps)."""
    stack = scope.get(FUNCTION_STACK_KEY)
    return stack if isinstance(stack, AsyncExitStack) else None


def api_routes(routes: Any) -> Iterator[tuple[Any, Any]]:
    """Every HTTP route of FastAPI's reachable from ``routes``, with a dependant it is served with:
    ``(APIRoute, Dependant)`` pairs, one per inclusion of the route (so one route can come twice,
    with different router dependencies), and ``(Mount, None)`` for each mounted application."""
    from fastapi import routing
    from starlette.routing import Host, Mount

    contexts = getattr(routing, "iter_route_contexts", None)
    for context in contexts(routes) if contexts is not None else routes:
        route = getattr(context, "original_route", context)
        if isinstance(route, routing.APIRoute):
            yield route, context.dependant
        elif isinstance(route, (Mount, Host)):
            yield route, None


def is_generator_dependency(call: Any) -> bool:
    """Whether FastAPI runs ``call`` as a dependency with ``yield`` (a function or a callable object)."""
    while isinstance(call, functools.partial):
        call = call.func
    if inspect.isgeneratorfunction(call) or inspect.isasyncgenfunction(call):
        return True
    if inspect.isroutine(call) or inspect.isclass(call):
        return False
    dunder_call = inspect.getattr_static(type(call), "__call__", None)  # FastAPI runs its __call__
    return inspect.isgeneratorfunction(dunder_call) or inspect.isasyncgenfunction(dunder_call)


_UVICORN_CYCLES = (
    "uvicorn.protocols.http.httptools_impl",
    "uvicorn.protocols.http.h11_impl",
)
_cycle_types: dict[type, bool] = {}


def server_disconnected(receive: Any) -> bool | None:
    """uvicorn's own flag for "the client is gone" when ``receive`` is its ``RequestResponseCycle``'s;
    ``None`` for another server (or a ``receive`` wrapped by a middleware): ask by polling then."""
    cycle = getattr(receive, "__self__", None)
    if cycle is None:
        return None
    kind = type(cycle)
    known = _cycle_types.get(kind)
    if known is None:
        known = _cycle_types[kind] = kind.__module__ in _UVICORN_CYCLES and hasattr(cycle, "disconnected")
    return bool(cycle.disconnected) if known else None


def session_is_clean(session: Session) -> bool:
    """Whether ``session`` has nothing to flush (no new, deleted or modified objects)."""
    return bool(session._is_clean())


def transaction_connections(session: Session) -> list[sa.Connection]:
    """The connections the session's current transaction holds (empty when none)."""
    transaction = session.get_transaction()
    if transaction is None:
        return []
    # Keyed by engine and by connection: one connection can appear twice.
    return list(dict.fromkeys(entry[0] for entry in transaction._connections.values()))


_ORM_COMMIT = Session.commit
_ACTIVE = SessionTransactionState.ACTIVE


def commit(session: Session, orm_commit: Callable[[], None] | None = None) -> None:
    """``session.commit()``, by its short way when that is all the commit would do.

    ``orm_commit`` is the commit to call otherwise (default ``session.commit``; a class's own
    ``commit`` that ends here passes ``super().commit``). When that is ``Session.commit`` itself
    (not overridden), the session's transaction is an active root one (no SAVEPOINT, not
    two-phase), nothing is to be flushed, no ``before_commit`` or ``after_commit`` listener is
    registered and ``expire_on_commit`` is off (the request sessions' default), ``Session.commit()``
    runs its prepare and state checks for nothing, then commits each connection and closes the
    transaction. Only those last steps run here: the connections'
    ``commit`` events, ``after_transaction_end`` and the return to the pool happen as in a commit,
    and a failed COMMIT raises the driver's error with the transaction left for ``rollback()``.
    Anything else goes through ``orm_commit()``.
    """
    if orm_commit is None:
        orm_commit = session.commit
    transaction = session._transaction
    if (
        getattr(orm_commit, "__func__", None) is not _ORM_COMMIT
        or transaction is None
        or transaction._parent is not None
        or transaction._state is not _ACTIVE
        or session.expire_on_commit
        or session.twophase
        or session.dispatch.before_commit
        or session.dispatch.after_commit
        or not session._is_clean()
    ):
        orm_commit()
        return
    for _, root, should_commit, _ in set(transaction._connections.values()):
        if should_commit:
            root.commit()
    transaction._state = SessionTransactionState.COMMITTED
    transaction.close()


def pool_timeout(pool: sa.Pool, default: float = 30.0) -> float:
    """``pool_timeout`` of a queue pool (``default`` for pools without one)."""
    return float(getattr(pool, "_timeout", default))


def pool_max_overflow(pool: sa.Pool) -> int | None:
    """``max_overflow`` of a queue pool (``None`` for pools without one)."""
    overflow = getattr(pool, "_max_overflow", None)
    return overflow if isinstance(overflow, int) else None


def pool_pre_ping(pool: sa.Pool) -> bool:
    """Whether the pool pings each connection on checkout (``pool_pre_ping=True``)."""
    return bool(pool._pre_ping)


_READABLE = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP


def _poller(fd: int) -> Callable[[], bool]:
    poller = select.poll()  # not select.select(): it fails for descriptors above 1023
    poller.register(fd, _READABLE)
    return lambda: bool(poller.poll(0))


def dead_connection_probe(dbapi_connection: Any) -> Callable[[], bool] | None:
    """A cheap "was this idle connection closed by the server?" test, or None if unknown.

    An idle database connection has nothing to say: a readable socket means the server closed it
    (or is closing it). Built once per DBAPI connection.
    """
    inner = getattr(dbapi_connection, "_connection", None)  # SQLAlchemy's async adapters
    for candidate in (dbapi_connection, inner):
        if candidate is None:
            continue
        transport = getattr(candidate, "_transport", None)  # asyncpg
        if transport is None:
            transport = getattr(getattr(candidate, "_writer", None), "transport", None)  # aiomysql
        if transport is not None:
            sock = transport.get_extra_info("socket")
            readable = _poller(sock.fileno()) if sock is not None else (lambda: False)
            return lambda: transport.is_closing() or readable()
        sock = getattr(candidate, "_sock", None)  # PyMySQL
        if sock is not None:
            readable = _poller(sock.fileno())
            return lambda: candidate._sock is None or readable()
        fileno = getattr(candidate, "fileno", None)  # psycopg 3
        if callable(fileno) and hasattr(candidate, "closed"):
            readable = _poller(fileno())
            return lambda: bool(candidate.closed) or readable()
    return None


def wrap_raw_connection(engine: sa.Engine, wrapper: Callable[[Callable[[], Any]], Callable[[], Any]]) -> None:
    """Make every checkout of ``engine`` (each ``Connection`` it opens) go through ``wrapper(original)``.

    ``Connection.__init__`` calls ``engine.raw_connection()``; the wrapper replaces that method on
    this engine instance only, so it survives ``engine.dispose()`` (which recreates the pool).
    """
    engine.raw_connection = wrapper(engine.raw_connection)  # type: ignore[method-assign]


def otel_traced(engine: sa.Engine) -> bool:
    """Whether opentelemetry-instrumentation-sqlalchemy already traces ``engine``'s statements."""
    from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer

    return any(
        isinstance(getattr(listener, "__self__", None), EngineTracer)
        for listener in engine.dispatch.before_cursor_execute
    )


def otel_trace_engine(engine: sa.Engine, provider: Any = None) -> bool:
    """Attach the SQLAlchemy instrumentation's ``EngineTracer`` to ``engine`` (a sync engine, or an
    async engine's ``sync_engine``) unless it is traced already; whether it was attached.

    The same tracer, meter and defaults as ``SQLAlchemyInstrumentor().instrument(engine=...)``,
    without patching ``create_engine`` for the whole process; ``provider``: a tracer provider
    (``None``: the global one).
    """
    from opentelemetry import metrics, trace
    from opentelemetry.instrumentation.sqlalchemy import __name__ as instrumentation
    from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer
    from opentelemetry.instrumentation.sqlalchemy.version import __version__
    from opentelemetry.semconv.metrics import MetricInstruments

    if otel_traced(engine):
        return False
    tracer = trace.get_tracer(instrumentation, __version__, tracer_provider=provider)
    meter = metrics.get_meter(instrumentation, __version__)
    usage = meter.create_up_down_counter(
        name=MetricInstruments.DB_CLIENT_CONNECTIONS_USAGE,
        unit="connections",
        description="The number of connections that are currently in state described by the state attribute.",
    )
    EngineTracer(tracer, engine, usage, False, {}, False)  # type: ignore[no-untyped-call]
    return True
