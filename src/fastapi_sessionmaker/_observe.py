"""Observability, off unless asked for: per-request statement counts and database time, slow-query
and slow-request log lines, and OpenTelemetry (:mod:`._tracing`).

A maker created with any of ``stats=True``, ``slow_query_ms=``, ``slow_request_ms=`` or
``tracing=True`` gets an :class:`Observer`; a maker without one attaches no listener, wraps
nothing and costs nothing per statement or per request. What an observer adds to each engine the
maker creates (the async twin's ``sync_engine``):

- ``before_cursor_execute`` / ``after_cursor_execute`` / ``handle_error`` listeners that time each
  statement (counts and slow queries);
- a wrapper around ``Engine.raw_connection`` that times each checkout (the pool wait), and opens a
  ``fastapi_sessionmaker.pool_wait`` span when tracing;
- with ``tracing=True``: opentelemetry-instrumentation-sqlalchemy's statement spans, and a session
  class whose commits and rollbacks are spans.

Per request, the guard (:mod:`._guard`) makes one :class:`RequestStats` when an installed maker
observes; engine listeners find it through the request's state (a context variable, copied into
worker threads and SQLAlchemy's greenlets).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.orm import Session
from starlette.requests import HTTPConnection

from fastapi_sessionmaker import _compat
from fastapi_sessionmaker._request import current_state
from fastapi_sessionmaker._tracing import (
    POOL_WAIT_SPAN,
    span,
    trace_callbacks,
    traced_session_class,
    tracer_for,
)
from fastapi_sessionmaker._urls import scrub
from fastapi_sessionmaker.exceptions import ConfigurationError

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer, TracerProvider
    from starlette.types import Message, Scope, Send

    from fastapi_sessionmaker._request import Registry

__all__ = ["AppObserver", "Observer", "RequestStats", "make_observer", "request_stats"]

slow_query_logger = logging.getLogger("fastapi_sessionmaker.slow.query")
slow_request_logger = logging.getLogger("fastapi_sessionmaker.slow.request")

STATS_KEY = "fastapi_sessionmaker.stats"
"""Where the guard keeps a request's :class:`RequestStats` in the ASGI scope."""

STATEMENT_LIMIT = 2000
"""Characters of statement text a slow-query line keeps (the rest is cut, marked with ``...``)."""

_STARTED = "_fsm_started"  # the start time of a statement, kept on its execution context


class RequestStats:
    """What one HTTP request did in the database, counted while it runs.

    Read it with :func:`request_stats`. Counted: every statement sent to the database through a
    cursor (``SELECT``, ``INSERT`` of a flush, ``set_config`` of ``set_local``, ...) by the
    request's sessions and any other session opened in the request's context (``get_db()``,
    ``context_session()`` inside an endpoint), each once, failed ones included. Not counted: the
    driver's own ``BEGIN``, ``COMMIT`` and ``ROLLBACK`` (no statement goes through a cursor; their
    time is in the ``fastapi_sessionmaker.commit`` / ``rollback`` spans when tracing).

    Attributes:
        statements: Statements executed so far.
        db_ms: Wall time spent executing them, in milliseconds.
        checkouts: Connections taken from the pool.
        pool_wait_ms: Wall time spent waiting for those connections (connecting included).
        status: The response status once the status line was sent, else ``None``.
        duration_ms: The request's wall time up to the end of its response, once it ended.

    Example:
        >>> from fastapi import FastAPI, Request
        >>> from fastapi_sessionmaker import DBSession, FastAPISessionMaker, request_stats
        >>> db = FastAPISessionMaker("sqlite://", stats=True)
        >>> app = FastAPI()
        >>> db.init_app(app)
        >>> @app.get("/count")
        ... def count(request: Request, session: DBSession) -> int:
        ...     session.execute(sa.text("SELECT 1"))
        ...     return request_stats(request).statements
    """

    __slots__ = (
        "checkouts",
        "counting",
        "db_ms",
        "duration_ms",
        "pool_wait_ms",
        "scope",
        "slow_request_ms",
        "started",
        "statements",
        "status",
    )

    def __init__(self, scope: Scope, *, counting: bool, slow_request_ms: float | None) -> None:
        self.scope = scope
        self.counting = counting
        self.slow_request_ms = slow_request_ms
        self.started = time.perf_counter()
        self.statements = 0
        self.db_ms = 0.0
        self.checkouts = 0
        self.pool_wait_ms = 0.0
        self.status: int | None = None
        self.duration_ms: float | None = None

    def __repr__(self) -> str:
        return (
            f"RequestStats(statements={self.statements}, db_ms={self.db_ms:.3f}, "
            f"checkouts={self.checkouts}, pool_wait_ms={self.pool_wait_ms:.3f})"
        )

    def watch(self, send: Send) -> Callable[[Message], Awaitable[None]]:
        """``send`` that notes the status and, after the last body chunk, logs a slow request."""

        async def watched(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                self.status = message["status"]
            await send(message)
            if kind == "http.response.body" and not message.get("more_body"):
                self.ended()

        return watched

    def ended(self) -> None:
        """The response is complete: note the duration, log the request if it was slow."""
        if self.duration_ms is not None:
            return
        self.duration_ms = (time.perf_counter() - self.started) * 1000
        threshold = self.slow_request_ms
        if threshold is None or self.duration_ms < threshold:
            return
        method, path = self.scope.get("method", ""), self.scope.get("path", "")
        slow_request_logger.warning(
            "slow request: %s %s %s in %.1f ms: %d statements, %.1f ms in the database, "
            "%.1f ms waiting for %d connections",
            method,
            path,
            self.status,
            self.duration_ms,
            self.statements,
            self.db_ms,
            self.pool_wait_ms,
            self.checkouts,
            extra={
                "method": method,
                "path": path,
                "status": self.status,
                "duration_ms": self.duration_ms,
                "statements": self.statements,
                "db_ms": self.db_ms,
                "pool_wait_ms": self.pool_wait_ms,
                "checkouts": self.checkouts,
            },
        )


def _current_stats() -> RequestStats | None:
    state = current_state()
    if state is None:
        return None
    stats: RequestStats | None = state.stats
    return stats


def request_stats(request: HTTPConnection) -> RequestStats:
    """The :class:`RequestStats` of ``request``: statements, database time and pool wait so far.

    Needs an installed maker created with ``stats=True`` (or ``slow_request_ms=...``); otherwise
    nothing is counted and this raises :class:`ConfigurationError`. Readable anywhere the request
    is: the endpoint, a dependency, a middleware (also one outside the guard, after the response).

    Example:
        >>> from fastapi import FastAPI, Request
        >>> from fastapi_sessionmaker import DBSession, FastAPISessionMaker, request_stats
        >>> db = FastAPISessionMaker("sqlite://", stats=True)
        >>> app = FastAPI()
        >>> db.init_app(app)
        >>> @app.get("/items")
        ... def items(request: Request, session: DBSession) -> dict[str, int]:
        ...     session.execute(sa.text("SELECT 1"))
        ...     return {"statements": request_stats(request).statements}
    """
    stats = request.scope.get(STATS_KEY)
    if not isinstance(stats, RequestStats) or not stats.counting:
        raise ConfigurationError(
            "request_stats(): this app counts no statements: create its maker with stats=True "
            "(or slow_request_ms=...) and install it with maker.init_app(app)"
        )
    return stats


class Observer:
    """What one maker observes; attached to each engine it creates (see the module docstring)."""

    def __init__(
        self,
        *,
        name: str,
        stats: bool,
        slow_query_ms: float | None,
        slow_request_ms: float | None,
        tracing: bool | TracerProvider,
    ) -> None:
        self.name = name
        self.counting = stats or slow_request_ms is not None
        self.slow_query_ms = slow_query_ms
        self.slow_request_ms = slow_request_ms
        self.tracing = tracing is not False
        self.tracer_provider = None if isinstance(tracing, bool) else tracing
        self.tracer: Tracer | None = None
        if self.tracing:
            self.tracer = tracer_for(self.tracer_provider)
            trace_callbacks(name, self.tracer)

    def span_attributes(self, url: sa.URL) -> dict[str, Any]:
        """The attributes of this maker's spans: the database system and name, the maker's name."""
        backend = url.get_backend_name()
        attributes: dict[str, Any] = {
            "db.system": "postgresql" if backend.startswith("postgres") else backend,
            "fastapi_sessionmaker.database": self.name,
        }
        if url.database:
            attributes["db.name"] = url.database
        return attributes

    def trace_sessions(self, session_options: dict[str, Any], url: sa.URL, *, is_async: bool) -> None:
        """Make the maker's session class (the async twin's ``sync_session_class``) trace its
        commits and rollbacks, when tracing."""
        if self.tracer is None:
            return
        key = "sync_session_class" if is_async else "class_"
        base = session_options.get(key, Session)
        session_options[key] = traced_session_class(base, self.tracer, self.span_attributes(url))

    def instrument(self, engine: sa.Engine) -> None:
        """Attach what this observer needs to ``engine`` (an async engine's ``sync_engine``)."""
        if self.counting or self.slow_query_ms is not None:
            sa.event.listen(engine, "before_cursor_execute", _before_statement)
            sa.event.listen(engine, "after_cursor_execute", self._statement_done(engine))
            sa.event.listen(engine, "handle_error", self._statement_failed(engine))
        if self.counting or self.tracing:
            attributes = self.span_attributes(engine.url)
            _compat.wrap_raw_connection(engine, lambda original: self._checkout(original, attributes))
        if self.tracing:
            _compat.otel_trace_engine(engine, self.tracer_provider)

    def install(self, registry: Registry) -> None:
        """Make the app of ``registry`` keep a :class:`RequestStats` per request."""
        if not (self.counting or self.slow_query_ms is not None):
            return  # tracing alone needs nothing per request
        app_observer = registry.observer
        if not isinstance(app_observer, AppObserver):
            app_observer = registry.observer = AppObserver()
        app_observer.add(self)

    # -- engine hooks -----------------------------------------------------------------------------
    def _record(self, engine: sa.Engine, statement: str, started: float) -> None:
        elapsed = (time.perf_counter() - started) * 1000
        stats = _current_stats() if self.counting or self.slow_query_ms is not None else None
        if self.counting and stats is not None:
            stats.statements += 1
            stats.db_ms += elapsed
        threshold = self.slow_query_ms
        if threshold is not None and elapsed >= threshold:
            self._log_slow(engine, statement, elapsed, stats)

    def _statement_done(self, engine: sa.Engine) -> Callable[..., None]:
        def after_statement(
            conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
        ) -> None:
            started = getattr(context, _STARTED, None)
            if started is not None:
                self._record(engine, statement, started)

        return after_statement

    def _statement_failed(self, engine: sa.Engine) -> Callable[[Any], None]:
        def statement_failed(exception_context: Any) -> None:
            context = exception_context.execution_context
            started = getattr(context, _STARTED, None)
            if started is not None:
                setattr(context, _STARTED, None)
                self._record(engine, exception_context.statement or "", started)

        return statement_failed

    def _checkout(self, original: Callable[[], Any], attributes: Mapping[str, Any]) -> Callable[[], Any]:
        counting, tracer = self.counting, self.tracer

        def raw_connection() -> Any:
            started = time.perf_counter()
            try:
                if tracer is not None:
                    with span(tracer, POOL_WAIT_SPAN, attributes):
                        return original()
                return original()
            finally:
                if counting:
                    stats = _current_stats()
                    if stats is not None:
                        stats.checkouts += 1
                        stats.pool_wait_ms += (time.perf_counter() - started) * 1000

        return raw_connection

    def _log_slow(
        self, engine: sa.Engine, statement: str, elapsed: float, stats: RequestStats | None
    ) -> None:
        text = scrub(" ".join(statement.split()), engine.url)  # never parameters, never a password
        if len(text) > STATEMENT_LIMIT:
            text = text[:STATEMENT_LIMIT] + "..."
        method = path = None
        if stats is not None:
            method, path = stats.scope.get("method", ""), stats.scope.get("path", "")
        where = f"on {method} {path}" if path is not None else "outside a request"
        slow_query_logger.warning(
            "slow query: %.1f ms %s (database %r): %s",
            elapsed,
            where,
            self.name,
            text,
            extra={
                "duration_ms": elapsed,
                "statement": text,
                "method": method,
                "path": path,
                "database": self.name,
            },
        )


def _before_statement(
    conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
) -> None:
    if context is not None:
        setattr(context, _STARTED, time.perf_counter())


class AppObserver:
    """The observing makers installed on one app: what the guard asks for at each request."""

    def __init__(self) -> None:
        self.observers: list[Observer] = []
        self.counting = False
        self.slow_request_ms: float | None = None

    def add(self, observer: Observer) -> None:
        if observer in self.observers:
            return
        self.observers.append(observer)
        self.counting = self.counting or observer.counting
        thresholds = [o.slow_request_ms for o in self.observers if o.slow_request_ms is not None]
        self.slow_request_ms = min(thresholds) if thresholds else None

    def start(self, scope: Scope) -> RequestStats:
        """A new request's :class:`RequestStats`, kept in its scope for :func:`request_stats`."""
        stats = RequestStats(scope, counting=self.counting, slow_request_ms=self.slow_request_ms)
        scope[STATS_KEY] = stats
        return stats


def _threshold(value: float | None, argument: str, variable: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigurationError(
            f"{argument}={value!r}: give a number of milliseconds, 0 or more "
            f"(or leave {argument} and {variable} unset to turn it off)"
        )
    return float(value)


def make_observer(
    *,
    name: str,
    stats: bool,
    slow_query_ms: float | None,
    slow_request_ms: float | None,
    tracing: bool | TracerProvider,
) -> Observer | None:
    """The observer of a maker, or ``None`` when nothing is observed (then nothing is attached)."""
    slow_query = _threshold(slow_query_ms, "slow_query_ms", "DATABASE_SLOW_QUERY_MS")
    slow_request = _threshold(slow_request_ms, "slow_request_ms", "DATABASE_SLOW_REQUEST_MS")
    if not (stats or tracing is not False or slow_query is not None or slow_request is not None):
        return None
    return Observer(
        name=name, stats=stats, slow_query_ms=slow_query, slow_request_ms=slow_request, tracing=tracing
    )
