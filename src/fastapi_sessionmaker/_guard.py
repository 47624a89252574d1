"""The pure-ASGI guard ``init_app`` installs: it commits request sessions before the status line is
sent, turns a failed commit into a problem response, and closes the sessions when the body is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fastapi_sessionmaker import _compat
from fastapi_sessionmaker._errors import Problem, is_retryable, log_mapped, problem_response, send_problem
from fastapi_sessionmaker._multidb import PARTIAL
from fastapi_sessionmaker._notfound import not_found_response
from fastapi_sessionmaker._request import (
    CURRENT,
    Declared,
    ErrorMapper,
    Registry,
    RequestMaker,
    RequestState,
    current_state,
    is_request_session,
    route_sessions,
)
from fastapi_sessionmaker._retry import next_delay
from fastapi_sessionmaker._shield import poll_receive, run_to_completion
from fastapi_sessionmaker.exceptions import NotFoundError

if TYPE_CHECKING:
    from fastapi import FastAPI

    from fastapi_sessionmaker._observe import RequestStats

logger = logging.getLogger("fastapi_sessionmaker")

__all__ = ["SessionGuard", "chain_lifespan", "guard_routes", "registry_for"]


REPLAY_LIMIT = 1 << 20
"""Bytes of request body the guard keeps to replay for a retry (``depends(retries=...)``)."""


class _RetryRequest(BaseException):
    """Raised through the app by the guard's ``send`` to abandon an attempt that will be re-run.

    A ``BaseException``: no exception handler of the app may take it for an error of its own.
    """

    def __init__(self, cause: Exception) -> None:
        super().__init__(cause)
        self.cause = cause


_INTERNAL = Problem(500, "Internal Server Error", "The request could not be completed.")


class _Exchange:
    """One HTTP request through the guard: the ASGI side, holding the request's :class:`RequestState`.

    ``receive`` and ``send`` are what the app gets. A message the disconnect check took from the
    server is handed to the app by the next ``receive``.
    """

    started = False
    replaced = False
    disconnected = False
    unread: list[Message] | None = None
    received: list[Message] | None = None  # what the app was given: replayed by a retry
    replayable = True  # False once the body outgrew REPLAY_LIMIT: such a request is not retried
    recorded = 0
    attempt = 1

    def __init__(
        self, guard: SessionGuard, registry: Registry, scope: Scope, receive: Receive, send: Send
    ) -> None:
        self.state = RequestState(registry)
        self.guard = guard
        self.scope = scope
        self._receive = receive
        self._send = send

    def again(self) -> _Exchange:
        """The next attempt of this request: a fresh state, the request body replayed."""
        retry = _Exchange(self.guard, self.state.registry, self.scope, self._receive, self._send)
        retry.attempt = self.attempt + 1
        retry.disconnected = self.disconnected
        retry.state.stats = self.state.stats  # every attempt counts in the request's stats
        replay = [*(self.received or ()), *(self.unread or ())]
        retry.unread = replay or None
        return retry

    def may_retry(self, exc: BaseException) -> bool:
        """Whether a retryable failure can re-run the request: nothing sent, attempts left."""
        return (
            self.replayable
            and not self.started
            and self.state.partial is None
            and not self.state.client_gone
            and self.attempt <= self.state.retries
            and is_retryable(exc)
        )

    def observe(self, stats: RequestStats) -> None:
        """Count this request's statements in ``stats`` and let it see the status and the end."""
        self.state.stats = stats
        self._send = stats.watch(self._send)

    async def receive(self) -> Message:
        if self.unread:
            message = self.unread.pop(0)
        elif self.disconnected:
            return {"type": "http.disconnect"}
        else:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self.disconnected = True
                return message
        if self.replayable:
            self._record(message)
        if self.state.pending and not message.get("more_body"):  # the body is complete
            await self.state.open_pending()
        return message

    def _record(self, message: Message) -> None:
        if self.received is None:
            self.received = []
        self.received.append(message)
        self.recorded += len(message.get("body", b""))
        if self.recorded > REPLAY_LIMIT:  # an upload: never held in memory for a retry
            self.received, self.replayable = None, False

    async def gone(self) -> bool:
        """Whether the client has disconnected, asked without waiting: uvicorn knows without a
        loop turn; any other server is polled (a message it had ready is kept for the app)."""
        if not self.disconnected:
            known = _compat.server_disconnected(self._receive)
            if known is not None:
                self.disconnected = known
                return known
            message = await poll_receive(self._receive)
            if message is not None:
                if message["type"] == "http.disconnect":
                    self.disconnected = True
                else:
                    if self.unread is None:
                        self.unread = []
                    self.unread.append(message)
        return self.disconnected

    def send(self, message: Message) -> Awaitable[None]:
        """The app's ``send``: the server's own awaitable while the request has no session (no
        coroutine of ours per message), else :meth:`_send_guarded`."""
        if not self.state.entries:
            if message["type"] == "http.response.start":
                self.started = True
            return self._send(message)
        return self._send_guarded(message)

    async def _send_guarded(self, message: Message) -> None:
        state = self.state
        if self.replaced:
            return
        if message["type"] == "http.response.start":
            failure = await run_to_completion(
                state.finish, message["status"], self.gone, here=state.loop_only
            )
            if state.client_gone:
                logger.warning(
                    "client disconnected before the commit: rolled back %s %s",
                    self.scope.get("method", ""),
                    self.scope.get("path", ""),
                )
            cause = failure[0] if failure is not None else None
            if isinstance(cause, Exception) and self.may_retry(cause):
                raise _RetryRequest(cause)  # unwinds the app: its response is never sent
            self.started = True
            if failure is not None:
                self.replaced = True
                await send_problem(self._send, self.guard._problem(failure, self.scope, state))
                return
        await self._send(message)
        # The response is complete: give the connections back before background tasks
        # run, and make the request's sessions unusable from them (clear error).
        if message["type"] == "http.response.body" and not message.get("more_body"):
            await self.close_all()

    async def close_all(self, *, retrying: bool = False) -> None:
        state = self.state
        if not state.close_now():  # no I/O, so nothing to interrupt: closed here, without a task
            await run_to_completion(state.close, here=state.loop_only)
        if retrying:
            state.ready = None  # a failed attempt's callbacks are discarded
        elif state.ready:  # on_commit / on_rollback callbacks: the response has been sent
            where = f"{self.scope.get('method', '')} {self.scope.get('path', '')}"
            await run_to_completion(state.run_callbacks, where)


class SessionGuard:
    """Pure ASGI layer installed by ``init_app``: commits request sessions before the response.

    On a route (``registry`` None, see :func:`guard_routes`) it serves each request with the
    makers of the app serving it: one router's routes can be included in several apps (FastAPI
    0.165 shares the route objects between them). In front of a whole app it has that app's.
    Per HTTP request it costs two small objects, one context-variable set and a ``send`` that
    passes messages through; requests that open no session do no database work, no thread hop
    and no extra loop turn.

    ``declared``: the sessions the route's endpoint declares (``@maker.with_session``), opened
    before the route runs, into the state of whichever guard serves the request.
    """

    def __init__(
        self, app: ASGIApp, registry: Registry | None = None, declared: tuple[Declared, ...] = ()
    ) -> None:
        self.app = app
        self.registry = registry
        self.declared = declared
        # Only a sync maker's declared session waits for the request body: async routes skip the look.
        self._body_matters = any(not maker.is_async for maker, _, _ in declared)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        registry = None if scope["type"] != "http" else self.registry or _registry_of(scope)
        if registry is None:  # not HTTP, no maker installed, or served by an outer guard
            outer = current_state() if self.declared and scope["type"] == "http" else None
            if outer is not None:  # the guard in front of the app (stats=True) serves it
                await self._open_declared(outer, scope)
            await self.app(scope, receive, send)
            return
        first = _Exchange(self, registry, scope, receive, send)
        observer = registry.observer
        if observer is not None:  # an installed maker observes: stats for this request
            first.observe(observer.start(scope))
        exchange: _Exchange | None = first
        while exchange is not None:  # one attempt per turn; again only to retry (depends(retries=))
            state = exchange.state
            token = CURRENT.set(weakref.ref(state))  # enter_state(), inline: one call less
            retry: Exception | None = None
            try:
                if self.declared:
                    await self._open_declared(state, scope)
                await self.app(scope, exchange.receive, exchange.send)
            except _RetryRequest as signal:
                retry = signal.cause
            except Exception as exc:
                retry = await self._failed(exchange, exc)
            finally:
                if state.entries:
                    await exchange.close_all(retrying=retry is not None)
                CURRENT.reset(token)
            exchange = None if retry is None else await self._again(exchange, retry)

    async def _open_declared(self, state: RequestState, scope: Scope) -> None:
        """Open the route's declared sessions into ``state``; a sync maker's, when the request has
        a body, once the body is complete (the serving guard's ``_Exchange.receive``)."""
        body = self._body_matters and _has_body(scope)
        for maker, policy, retries in self.declared:
            await state.declare(maker, policy, retries, body=body)

    async def _failed(self, exchange: _Exchange, exc: Exception) -> Exception | None:
        """An attempt that raised: the error to retry it for, else a problem response (or raise)."""
        scope, state = exchange.scope, exchange.state
        if state.entries:
            state.raised = True
            await run_to_completion(state.finish, None, here=state.loop_only)
        if exchange.started:
            raise exc
        if exchange.may_retry(exc):
            return exc
        problem = state.registry.error_mapper(exc)
        if problem is None:
            raise exc
        maker = state.entries[0].maker if state.entries else None
        log_mapped(
            problem,
            exc,
            method=scope.get("method", ""),
            path=scope.get("path", ""),
            database=maker.name if maker is not None else "?",
        )
        await send_problem(exchange._send, problem)
        return None

    async def _again(self, exchange: _Exchange, retry: Exception) -> _Exchange:
        """The next attempt of a request whose transaction hit a retryable failure, after a pause."""
        state = exchange.state
        database = state.entries[0].maker.name if state.entries else "?"
        delay = next_delay(retry, exchange.attempt, state.retries + 1, database)  # logs the retry
        if delay is None:  # pragma: no cover - may_retry() said yes
            raise retry
        await asyncio.sleep(delay)
        return exchange.again()

    def _problem(
        self, failure: tuple[BaseException, RequestMaker], scope: Scope, state: RequestState
    ) -> Problem:
        exc, maker = failure
        if state.partial is not None:  # stored in some databases only: one line says which
            state.partial.log(scope.get("method", ""), scope.get("path", ""))
            return PARTIAL
        problem = state.registry.error_mapper(exc)
        if problem is None:
            logger.error(
                "commit failed with a non-database error on %s %s (database %r)",
                scope.get("method", ""),
                scope.get("path", ""),
                maker.name,
                exc_info=exc,
            )
            return _INTERNAL
        log_mapped(
            problem,
            exc,
            method=scope.get("method", ""),
            path=scope.get("path", ""),
            database=maker.name,
        )
        return problem


def registry_for(app: FastAPI, *, error_mapper: ErrorMapper | None = None) -> Registry:
    """The app's registry, installing the guard on first use."""
    registry = getattr(app.state, "fastapi_sessionmaker", None)
    if not isinstance(registry, Registry):
        registry = Registry()
        app.state.fastapi_sessionmaker = registry
        # Where a route's guard finds it per request (_registry_of): on the app, and on its router
        # for the routes of mounted apps without makers of their own.
        app.fastapi_sessionmaker_registry = registry  # type: ignore[attr-defined]
        app.router.fastapi_sessionmaker_registry = registry  # type: ignore[attr-defined]
        app.add_middleware(guard_routes, registry=registry, routes=app.router)
        app.add_exception_handler(NotFoundError, not_found_response)  # get_or_404: problem JSON
        if sa.exc.SQLAlchemyError not in app.exception_handlers:  # the app's own handler stays
            app.add_exception_handler(sa.exc.SQLAlchemyError, _unguarded_errors(registry))
    if error_mapper is not None:
        registry.error_mapper = error_mapper
    return registry


def guard_routes(app: ASGIApp, registry: Registry, routes: Any) -> ASGIApp:
    """Put the guard on each route that takes a request session; return ``app`` as it is.

    Called by Starlette where the guard sits in ``app.user_middleware``, when it builds the
    middleware stack: at start-up (or the first request), once every route is there. A route is
    guarded when one of its dependants (one per inclusion of the route, with the including
    routers' dependencies) has, at any depth, a request-session dependency or a dependency with
    ``yield`` (``get_db()`` and wrappers of it join the request's session through the guard).
    Every other route, and every request that matches none, is served by FastAPI alone: no layer
    of ours, no object, no context variable. Mounted routers and apps are walked too. Each route's
    guard takes the makers of the app serving the request (:func:`_registry_of`).

    A route whose endpoint declares sessions (``@maker.with_session``) gets a guard that opens
    them before the route runs.

    A maker that observes every request (``stats=True``, :mod:`._observe`) needs the guard in
    front of every request instead: then this returns the guard around ``app``, and only the
    routes that declare sessions get a guard of their own (it opens them, nothing else).
    """
    if registry.observer is not None:
        _guard_routes_of(routes, declared_only=True)
        return SessionGuard(app, registry)
    _guard_routes_of(routes)
    return app


def _unguarded_errors(registry: Registry) -> Callable[[Request, Exception], Awaitable[Response]]:
    """The exception handler for SQLAlchemy's errors: mapped like the guard maps them on routes the
    guard is not on (a ``task_session()`` or ``context_session()`` in an endpoint without a request
    session, a request session kept past its request); re-raised on the guard's own routes, whose
    guard rolls back, retries or maps the error itself."""

    async def database_error(request: Request, exc: Exception) -> Response:
        if current_state() is not None:
            raise exc
        problem = registry.error_mapper(exc)
        if problem is None:
            raise exc
        log_mapped(
            problem, exc, method=request.method, path=request.url.path, database="(no request session)"
        )
        return problem_response(problem)

    return database_error


def _guard_routes_of(routes: Any, *, declared_only: bool = False) -> None:
    for route, dependant in _compat.api_routes(routes.routes):
        if dependant is None:  # a mount: its routes too (served with the mounted app's makers, if any)
            _guard_routes_of(route, declared_only=declared_only)
            continue
        if isinstance(route.__dict__.get("handle"), SessionGuard):
            continue
        declared = route_sessions(dependant.call)
        if declared or (not declared_only and _takes_session(dependant)):
            route.handle = SessionGuard(route.handle, declared=declared)


def _has_body(scope: Scope) -> bool:
    """Whether the request announces a body (a non-zero ``content-length``, or chunked)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            return bool(value != b"0")
        if name == b"transfer-encoding":
            return True
    return False


def _registry_of(scope: Scope) -> Registry | None:
    """For a route's guard, the registry of the app serving ``scope``: the innermost app's
    (``scope["app"]``), else the outermost app's (``scope["router"]``, set by the first router)
    for a mounted app without one; ``None`` when there is none, or when the guard in front of
    that whole app (``stats=True``) already serves the request."""
    registry = getattr(scope.get("app"), "fastapi_sessionmaker_registry", None)
    if registry is None:
        registry = getattr(scope.get("router"), "fastapi_sessionmaker_registry", None)
    if not isinstance(registry, Registry):
        return None
    outer = current_state()
    return None if outer is not None and outer.registry is registry else registry


def _takes_session(dependant: Any) -> bool:
    """Whether a dependency of ``dependant``, at any depth, is a request session or has ``yield``."""
    pending = list(dependant.dependencies)
    while pending:
        sub = pending.pop()
        call = sub.call
        if call is not None and (is_request_session(call) or _compat.is_generator_dependency(call)):
            return True
        pending.extend(sub.dependencies)
    return False


def chain_lifespan(app: FastAPI, hook: Callable[[], contextlib.AbstractAsyncContextManager[None]]) -> None:
    """Run ``hook()`` around the app's own lifespan (start-up check, dispose at shutdown)."""
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app_: Any) -> AsyncIterator[Any]:
        async with hook(), inner(app_) as state:
            yield state

    app.router.lifespan_context = lifespan
