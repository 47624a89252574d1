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

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fastapi_sessionmaker import _compat
from fastapi_sessionmaker._errors import Problem, is_retryable, log_mapped, send_problem
from fastapi_sessionmaker._multidb import PARTIAL
from fastapi_sessionmaker._notfound import not_found_response
from fastapi_sessionmaker._request import CURRENT, ErrorMapper, Registry, RequestMaker, RequestState
from fastapi_sessionmaker._retry import next_delay
from fastapi_sessionmaker._shield import poll_receive, run_to_completion
from fastapi_sessionmaker.exceptions import NotFoundError

if TYPE_CHECKING:
    from fastapi import FastAPI

    from fastapi_sessionmaker._observe import RequestStats

logger = logging.getLogger("fastapi_sessionmaker")

__all__ = ["SessionGuard", "chain_lifespan", "registry_for"]


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

    def __init__(self, guard: SessionGuard, scope: Scope, receive: Receive, send: Send) -> None:
        self.state = RequestState(guard.registry)
        self.guard = guard
        self.scope = scope
        self._receive = receive
        self._send = send

    def again(self) -> _Exchange:
        """The next attempt of this request: a fresh state, the request body replayed."""
        retry = _Exchange(self.guard, self.scope, self._receive, self._send)
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
            failure = await run_to_completion(state.finish, message["status"], self.gone)
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
            await run_to_completion(state.close)
        if retrying:
            state.ready = None  # a failed attempt's callbacks are discarded
        elif state.ready:  # on_commit / on_rollback callbacks: the response has been sent
            where = f"{self.scope.get('method', '')} {self.scope.get('path', '')}"
            await run_to_completion(state.run_callbacks, where)


class SessionGuard:
    """Pure ASGI layer installed by ``init_app``: commits request sessions before the response.

    Per HTTP request it costs two small objects, one context-variable set and a ``send`` that
    passes messages through; requests that open no session do no database work, no thread hop
    and no extra loop turn.
    """

    def __init__(self, app: ASGIApp, registry: Registry) -> None:
        self.app = app
        self.registry = registry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        first = _Exchange(self, scope, receive, send)
        observer = self.registry.observer
        if observer is not None:  # an installed maker observes: stats for this request
            first.observe(observer.start(scope))
        exchange: _Exchange | None = first
        while exchange is not None:  # one attempt per turn; again only to retry (depends(retries=))
            state = exchange.state
            token = CURRENT.set(weakref.ref(state))  # enter_state(), inline: one call less
            retry: Exception | None = None
            try:
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

    async def _failed(self, exchange: _Exchange, exc: Exception) -> Exception | None:
        """An attempt that raised: the error to retry it for, else a problem response (or raise)."""
        scope, state = exchange.scope, exchange.state
        if state.entries:
            state.raised = True
            await run_to_completion(state.finish, None)
        if exchange.started:
            raise exc
        if exchange.may_retry(exc):
            return exc
        problem = self.registry.error_mapper(exc)
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
        problem = self.registry.error_mapper(exc)
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
        app.add_middleware(SessionGuard, registry=registry)
        app.add_exception_handler(NotFoundError, not_found_response)  # get_or_404: problem JSON
    if error_mapper is not None:
        registry.error_mapper = error_mapper
    return registry


def chain_lifespan(app: FastAPI, hook: Callable[[], contextlib.AbstractAsyncContextManager[None]]) -> None:
    """Run ``hook()`` around the app's own lifespan (start-up check, dispose at shutdown)."""
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app_: Any) -> AsyncIterator[Any]:
        async with hook(), inner(app_) as state:
            yield state

    app.router.lifespan_context = lifespan
