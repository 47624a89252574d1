"""Health checks and pool statistics: a ready-made ``/healthz`` route for every installed database."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

import anyio
import sqlalchemy as sa
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from fastapi_sessionmaker._errors import is_connection_error
from fastapi_sessionmaker._readiness import readiness_checks

if TYPE_CHECKING:
    from fastapi_sessionmaker._async import AsyncFastAPISessionMaker
    from fastapi_sessionmaker._sync import FastAPISessionMaker

    AnyMaker: TypeAlias = FastAPISessionMaker | AsyncFastAPISessionMaker

__all__ = ["health_router", "pool_stats"]

logger = logging.getLogger("fastapi_sessionmaker")


def _pool(maker: AnyMaker, replica: int | None) -> sa.Pool:
    if replica is None:
        engine = maker.cached_engine
    else:
        if maker.replicas is None or not 0 <= replica < len(maker.replicas.replicas):
            count = 0 if maker.replicas is None else len(maker.replicas.replicas)
            raise ValueError(f"pool_stats(replica={replica}): {maker!r} has {count} replicas (0-based index)")
        engine = maker.replicas.engine_of(maker.replicas.replicas[replica])
    return engine.pool if isinstance(engine, sa.Engine) else engine.sync_engine.pool


def pool_stats(maker: AnyMaker, *, replica: int | None = None) -> dict[str, int | None]:
    """The maker's pool now: ``size``, ``checked_out``, ``checked_in``, ``overflow``.

    Values a pool does not keep (``NullPool``, ``StaticPool``) are ``None``. ``overflow`` is
    SQLAlchemy's count: negative while fewer than ``size`` connections exist. ``replica``: the
    pool of the maker's read replica with this index (0 for the first of ``replica_uris``).

    Example:
        >>> from fastapi_sessionmaker import FastAPISessionMaker, pool_stats
        >>> db = FastAPISessionMaker("sqlite:///./example.db", engine_options={"pool_size": 2})
        >>> pool_stats(db)["size"], pool_stats(db)["checked_out"]
        (2, 0)
    """
    pool = _pool(maker, replica)

    def read(name: str) -> int | None:
        method = getattr(pool, name, None)
        return int(method()) if callable(method) else None

    return {
        "size": read("size"),
        "checked_out": read("checkedout"),
        "checked_in": read("checkedin"),
        "overflow": read("overflow"),
    }


async def _ping(maker: AnyMaker, seconds: float) -> None:
    if maker.is_async:
        with anyio.fail_after(seconds):
            await maker.check_connection()  # type: ignore[misc]
        return
    with anyio.fail_after(seconds):
        # A hung connect must not hang the probe: the thread is left to finish on its own.
        await anyio.to_thread.run_sync(maker.check_connection, abandon_on_cancel=True)


async def check_database(maker: AnyMaker, *, seconds: float) -> dict[str, Any]:
    """``SELECT 1`` through the maker's pool within ``seconds``; the report of one database."""
    started = time.perf_counter()
    report: dict[str, Any] = {"status": "ok"}
    try:
        await _ping(maker, seconds)
        for check in readiness_checks(maker):  # e.g. the schema at its migrations' head
            with anyio.fail_after(seconds):
                reason, details = await check(maker)
            report.update(details)
            if reason is not None:
                report.update(status="not_ready", error=reason)
    except TimeoutError:
        report = {"status": "unavailable", "error": f"no answer within {seconds:g} s"}
    except Exception as exc:
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        if not isinstance(cause, (sa.exc.SQLAlchemyError, OSError)) and not is_connection_error(cause):
            raise
        report = {"status": "unavailable", "error": type(cause).__name__}
    report["latency_ms"] = round((time.perf_counter() - started) * 1000, 1)
    report["pool"] = pool_stats(maker)
    if maker.replicas is not None:
        report["replicas"] = await _check_replicas(maker, seconds)
    if report["status"] != "ok":
        logger.warning(
            "health check failed for database %r: %s",
            maker.name,
            report["error"],
            extra={"database": maker.name, "error_class": report["error"]},
        )
    return report


async def _check_replicas(maker: AnyMaker, seconds: float) -> list[dict[str, Any]]:
    """Check the replicas now (within ``seconds``); what each answered, with its pool. A replica
    that is skipped does not make the database unhealthy: its reads go elsewhere."""
    replicas = maker.replicas
    assert replicas is not None
    with anyio.move_on_after(seconds):
        if maker.is_async:
            await replicas.acheck()
        else:
            await anyio.to_thread.run_sync(replicas.check, abandon_on_cancel=True)
    reports = replicas.report()
    for index, report in enumerate(reports):
        report["pool"] = pool_stats(maker, replica=index)
    return reports


def health_router(
    *makers: AnyMaker,
    path: str = "/healthz",
    timeout: float = 2.0,
    include_in_schema: bool = False,
) -> APIRouter:
    """A router with one ``GET`` route that checks each database and reports its pool.

    Every database answers ``SELECT 1`` through its pool within ``timeout`` seconds, checked
    concurrently. The answer is 200 when all do, else 503 with ``Retry-After``; the body names
    each database with its status, latency, error class (never a message or URL) and pool
    stats (see :func:`pool_stats`). With no ``makers``, the makers installed on the app with
    ``init_app`` are checked. A database installed with ``init_app(app, migrations=...)`` is also
    not ready (``"not_ready"``, 503) while its schema is behind the migrations' head; its report
    then carries ``schema`` with the ``current`` and ``head`` revisions. A maker with read replicas
    also reports each replica under ``replicas`` (URL without secrets, ``ok`` or ``skipped`` with
    the reason, lag in bytes, pool); a skipped replica does not turn the answer into a 503, as
    its reads go elsewhere.

    Args:
        makers: The makers to check (default: those installed on the app).
        path: The route's path.
        timeout: Seconds each database has to answer.
        include_in_schema: Whether the route appears in the OpenAPI schema.

    Example:
        >>> from fastapi import FastAPI
        >>> from fastapi_sessionmaker import FastAPISessionMaker, health_router
        >>> db = FastAPISessionMaker("sqlite:///./example.db")
        >>> app = FastAPI()
        >>> db.init_app(app)
        >>> app.include_router(health_router(timeout=1.0))
    """
    router = APIRouter()
    chosen: Sequence[AnyMaker] = makers

    @router.get(path, include_in_schema=include_in_schema)
    async def healthz(request: Request) -> JSONResponse:
        targets = chosen or _installed(request)
        reports: dict[str, dict[str, Any]] = {}

        async def check(maker: AnyMaker) -> None:
            reports[maker.name] = await check_database(maker, seconds=timeout)

        async with anyio.create_task_group() as group:
            for maker in targets:
                group.start_soon(check, maker)
        healthy = all(report["status"] == "ok" for report in reports.values())
        body = {
            "status": "ok" if healthy else "unavailable",
            "databases": {maker.name: reports[maker.name] for maker in targets},
        }
        headers = {} if healthy else {"Retry-After": "1", "Cache-Control": "no-store"}
        return JSONResponse(body, status_code=200 if healthy else 503, headers=headers)

    return router


def _installed(request: Request) -> list[AnyMaker]:
    registry = getattr(request.app.state, "fastapi_sessionmaker", None)
    makers = getattr(registry, "makers", {})
    return list(makers.values())
