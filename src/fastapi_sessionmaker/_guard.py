"""The pure-ASGI guard ``init_app`` installs: it commits request sessions before the status line is
sent, turns a failed commit into a problem response, and closes the sessions when the body is done.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fastapi_sessionmaker._errors import Problem, log_mapped
from fastapi_sessionmaker._request import (
    ErrorMapper,
    Registry,
    RequestMaker,
    RequestState,
    enter_state,
    reset_state,
)
from fastapi_sessionmaker._shield import poll_receive, run_to_completion

if TYPE_CHECKING:
    from fastapi import FastAPI

logger = logging.getLogger("fastapi_sessionmaker")

__all__ = ["SessionGuard", "chain_lifespan", "registry_for"]


async def _send_problem(send: Send, problem: Problem) -> None:
    body = json.dumps(problem.body()).encode()
    headers = [
        (b"content-type", b"application/problem+json"),
        (b"content-length", str(len(body)).encode()),
    ]
    headers.extend((k.lower().encode(), v.encode()) for k, v in problem.headers.items())
    await send({"type": "http.response.start", "status": problem.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


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

    def __init__(self, guard: SessionGuard, scope: Scope, receive: Receive, send: Send) -> None:
        self.state = RequestState(guard.registry)
        self.guard = guard
        self.scope = scope
        self._receive = receive
        self._send = send

    async def receive(self) -> Message:
        if self.unread:
            return self.unread.pop(0)
        if self.disconnected:
            return {"type": "http.disconnect"}
        message = await self._receive()
        if message["type"] == "http.disconnect":
            self.disconnected = True
        return message

    async def gone(self) -> bool:
        """Whether the client has disconnected, asked without waiting."""
        if not self.disconnected:
            message = await poll_receive(self._receive)
            if message is not None:
                if message["type"] == "http.disconnect":
                    self.disconnected = True
                else:
                    if self.unread is None:
                        self.unread = []
                    self.unread.append(message)
        return self.disconnected

    async def send(self, message: Message) -> None:
        if self.replaced:
            return
        state = self.state
        if not state.entries:  # no session: pass through
            if message["type"] == "http.response.start":
                self.started = True
            await self._send(message)
            return
        if message["type"] == "http.response.start":
            failure = await run_to_completion(state.finish, message["status"], self.gone)
            if state.client_gone:
                logger.warning(
                    "client disconnected before the commit: rolled back %s %s",
                    self.scope.get("method", ""),
                    self.scope.get("path", ""),
                )
            self.started = True
            if failure is not None:
                self.replaced = True
                await _send_problem(self._send, self.guard._problem(failure, self.scope))
                return
        await self._send(message)
        # The response is complete: give the connections back before background tasks
        # run, and make the request's sessions unusable from them (clear error).
        if message["type"] == "http.response.body" and not message.get("more_body"):
            await self.close_all()

    async def close_all(self) -> None:
        state = self.state
        if state.needs_io_to_close():
            await run_to_completion(state.close)
        else:
            await state.close()  # nothing to roll back: no I/O, so nothing to interrupt
        if state.ready:  # on_commit / on_rollback callbacks: the response has been sent
            where = f"{self.scope.get('method', '')} {self.scope.get('path', '')}"
            await run_to_completion(state.run_callbacks, where)


class SessionGuard:
    """Pure ASGI layer installed by ``init_app``: commits request sessions before the response.

    Per HTTP request it costs one object, one context-variable set and a ``send`` that passes
    messages through; requests that open no session do no database work and no thread hop.
    """

    def __init__(self, app: ASGIApp, registry: Registry) -> None:
        self.app = app
        self.registry = registry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        exchange = _Exchange(self, scope, receive, send)
        state = exchange.state
        token = enter_state(state)
        try:
            await self.app(scope, exchange.receive, exchange.send)
        except Exception as exc:
            if state.entries:
                state.raised = True
                await run_to_completion(state.finish, None)
            if exchange.started:
                raise
            problem = self.registry.error_mapper(exc)
            if problem is None:
                raise
            maker = state.entries[0].maker if state.entries else None
            log_mapped(
                problem,
                exc,
                method=scope.get("method", ""),
                path=scope.get("path", ""),
                database=maker.name if maker is not None else "?",
            )
            await _send_problem(send, problem)
        finally:
            if state.entries:
                await exchange.close_all()
            reset_state(token)

    def _problem(self, failure: tuple[BaseException, RequestMaker], scope: Scope) -> Problem:
        exc, maker = failure
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
