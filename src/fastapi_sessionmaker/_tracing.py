"""OpenTelemetry spans for what only this package knows: the pool wait, the commit, the rollback and
the after-commit callbacks. Statements are traced by opentelemetry-instrumentation-sqlalchemy
(attached to every engine of a maker with ``tracing=True``, see :mod:`._observe`).

Nothing here runs unless a maker was created with ``tracing=True`` (the global tracer provider) or
``tracing=provider``: OpenTelemetry is imported then, and only then (the optional ``[otel]`` extra).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from sqlalchemy.orm import Session

from fastapi_sessionmaker.exceptions import ConfigurationError

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer, TracerProvider

__all__ = [
    "CALLBACK_SPAN",
    "COMMIT_SPAN",
    "POOL_WAIT_SPAN",
    "ROLLBACK_SPAN",
    "TracedSessionMixin",
    "callback_name",
    "callback_span",
    "span",
    "trace_callbacks",
    "traced_session_class",
    "tracer_for",
]

POOL_WAIT_SPAN = "fastapi_sessionmaker.pool_wait"
COMMIT_SPAN = "fastapi_sessionmaker.commit"
ROLLBACK_SPAN = "fastapi_sessionmaker.rollback"
CALLBACK_SPAN = "fastapi_sessionmaker.callback"

_S = TypeVar("_S", bound=Session)

_callback_tracers: dict[str, Tracer] = {}
"""The tracer of each database (maker name) created with tracing: its callbacks are spans."""


def tracer_for(provider: TracerProvider | None) -> Tracer:
    """This package's tracer from ``provider`` (``None``: the global one, looked up at each span).

    A one-line :class:`ConfigurationError` when OpenTelemetry is missing.
    """
    try:
        import opentelemetry.instrumentation.sqlalchemy  # noqa: F401 - statements' spans
        from opentelemetry import trace
    except ImportError as exc:
        raise ConfigurationError(
            f"tracing=True needs OpenTelemetry ({exc.name} is not installed): "
            "pip install 'fastapi-sessionmaker[otel]' and configure a tracer provider"
        ) from None
    from importlib.metadata import PackageNotFoundError, version

    try:
        own: str | None = version("fastapi-sessionmaker")
    except PackageNotFoundError:  # pragma: no cover - run from a source tree
        own = None
    return trace.get_tracer("fastapi_sessionmaker", own, tracer_provider=provider)


def trace_callbacks(database: str, tracer: Tracer) -> None:
    """Make the ``on_commit`` / ``on_rollback`` callbacks of ``database`` spans of ``tracer``."""
    _callback_tracers[database] = tracer


@contextlib.contextmanager
def span(tracer: Tracer, name: str, attributes: Mapping[str, Any], *, client: bool = False) -> Iterator[None]:
    """A span of this package, child of the current one; an exception is recorded and re-raised."""
    from opentelemetry.trace import SpanKind

    kind = SpanKind.CLIENT if client else SpanKind.INTERNAL
    with tracer.start_as_current_span(name, kind=kind, attributes=dict(attributes)):
        yield


class TracedSessionMixin(Session):
    """A span around each ``commit()`` (its flush included) and ``rollback()`` of a session.

    Composed with the configured ``Session`` class of a maker with ``tracing=True`` (for the async
    twin, with its ``sync_session_class``), so request sessions, ``context_session()``,
    ``task_session()``, ``get_db()`` and explicit commits under ``MANUAL`` are all traced.
    """

    _fsm_tracer: ClassVar[Tracer]
    _fsm_span_attributes: ClassVar[Mapping[str, Any]] = {}

    def commit(self) -> None:
        """Commit inside a ``fastapi_sessionmaker.commit`` span."""
        with span(self._fsm_tracer, COMMIT_SPAN, self._fsm_span_attributes, client=True):
            super().commit()

    def rollback(self) -> None:
        """Roll back inside a ``fastapi_sessionmaker.rollback`` span."""
        with span(self._fsm_tracer, ROLLBACK_SPAN, self._fsm_span_attributes, client=True):
            super().rollback()


def traced_session_class(base: type[_S], tracer: Tracer, attributes: Mapping[str, Any]) -> type[_S]:
    """``base`` with :class:`TracedSessionMixin` in front, its spans carrying ``attributes``."""
    namespace = {
        "__module__": base.__module__,
        "_fsm_tracer": tracer,
        "_fsm_span_attributes": dict(attributes),
    }
    return type(f"Traced{base.__name__}", (TracedSessionMixin, base), namespace)


def callback_name(callback: Callable[[], Any]) -> str:
    """How logs and spans name a callback: its qualified name."""
    return getattr(callback, "__qualname__", None) or type(callback).__qualname__


def callback_span(
    callback: Callable[[], Any], where: str, database: str
) -> contextlib.AbstractContextManager[None]:
    """A span around one ``on_commit`` / ``on_rollback`` callback of a traced database, else nothing."""
    tracer = _callback_tracers.get(database) if _callback_tracers else None
    if tracer is None:
        return contextlib.nullcontext()
    attributes = {
        "fastapi_sessionmaker.callback": callback_name(callback),
        "fastapi_sessionmaker.database": database,
        "fastapi_sessionmaker.where": where,
    }
    return span(tracer, CALLBACK_SPAN, attributes)
