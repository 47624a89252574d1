"""FastAPI glue: the request guard that commits before the response, dependencies, lifespan.

How a request session ends, in one place:

1. A dependency opens the session and registers it with the request's :class:`RequestState`
   (a context variable set by :class:`SessionGuard`). A callback on FastAPI's per-endpoint exit
   stack only records whether an exception was raised through the endpoint.
2. When the app sends ``http.response.start``, the guard asks the policy whether to commit (the
   status is known, whether the response was returned, raised or made by an exception handler),
   commits or rolls back, and only then lets the status line go out. A failed commit replaces
   the response with a problem response (409/503/500) and is logged once.
3. An exception that escapes the app rolls the sessions back; a database error becomes a
   problem response, anything else is re-raised.
   If the client has already disconnected when the status line is due, nothing is committed:
   the sessions roll back (the client cannot learn that the write happened, and its retry must
   not find it stored twice).
4. When the response body is complete (before background tasks run), or else when the app returns
   or is cancelled, every session is closed, shielded from cancellation. A closed request session
   cannot be used again: it raises instead of opening a connection that would leak.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import anyio
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fastapi_sessionmaker._policy import CommitPolicy, Problem, default_error_mapper, log_mapped
from fastapi_sessionmaker._sessions import discarded_changes, mark_response_started
from fastapi_sessionmaker.exceptions import NotInstalledError

if TYPE_CHECKING:
    from fastapi import FastAPI

logger = logging.getLogger("fastapi_sessionmaker")

ErrorMapper = Callable[[BaseException], "Problem | None"]

_T = TypeVar("_T")


def _asyncio_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:  # another event loop (trio): anyio's shield covers every cancellation
        return None


if sys.version_info >= (3, 12):

    def _start(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, _T]) -> asyncio.Task[_T]:
        """A task that runs ``coro`` at once up to its first wait (one loop turn saved)."""
        return asyncio.Task(coro, loop=loop, eager_start=True)

else:

    def _start(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, _T]) -> asyncio.Task[_T]:
        return loop.create_task(coro)


async def run_to_completion(function: Callable[..., Coroutine[Any, Any, _T]], *args: Any) -> _T:
    """Await ``function(*args)`` to its end even if the calling task is cancelled meanwhile.

    ``anyio.CancelScope(shield=True)`` stops anyio's cancel scopes but not a plain asyncio
    ``task.cancel()`` (``asyncio.timeout``, ``wait_for``, a server cancelling its tasks): a second
    cancellation would interrupt a commit or a rollback halfway. On asyncio the work runs in a task
    of its own that cancellation cannot reach; a cancellation received meanwhile is re-raised once
    the work is done, so the caller never returns before its cleanup finished.
    """
    loop = _asyncio_loop()
    if loop is None:
        with anyio.CancelScope(shield=True):
            result = await function(*args)
        return result
    task = _start(loop, function(*args))
    if task.done():  # finished without waiting (Python >= 3.12 starts it eagerly): no shield needed
        return task.result()
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError as exc:
        if task.done() and task.cancelled():
            raise
        cancelled = exc
    with anyio.CancelScope(shield=True):  # no re-delivery by anyio while we wait
        while not task.done():
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError as exc:
                if task.done() and task.cancelled():
                    raise
                cancelled = exc
    if not task.cancelled() and task.exception() is not None:
        logger.error("cleanup failed while the request was cancelled", exc_info=task.exception())
    raise cancelled


async def poll_receive(receive: Receive) -> Message | None:
    """The next ASGI message if the server has one ready, ``None`` if ``receive`` would wait.

    Runs in a task of its own (see :func:`run_to_completion`): the interruption is a plain
    ``task.cancel()`` scheduled for the next loop iteration, far cheaper than a cancelled anyio
    scope. A server that knows the client is gone answers ``http.disconnect`` at once.
    """
    loop = _asyncio_loop()
    if loop is None:
        with anyio.CancelScope() as scope:
            scope.cancel()
            return await receive()
        return None
    task = asyncio.current_task()
    assert task is not None
    fired = False

    def interrupt() -> None:
        nonlocal fired
        fired = True
        task.cancel()

    handle = loop.call_soon(interrupt)
    try:
        return await receive()
    except asyncio.CancelledError:
        if not fired:
            raise
        if sys.version_info >= (3, 11):
            task.uncancel()
        return None
    finally:
        handle.cancel()


class RequestMaker(Protocol):
    """What the guard needs from a maker (sync or async)."""

    name: str
    policy: CommitPolicy
    is_async: bool

    def _new_request_session(self, policy: CommitPolicy) -> Any: ...

    def _request_limiter(self) -> Any: ...

    async def _end_transaction(self, session: Any, commit: bool) -> None: ...

    async def _close_session(self, session: Any) -> None: ...


class _Entry:
    __slots__ = ("closed", "finished", "maker", "policy", "semaphore", "session", "shared")

    def __init__(
        self,
        maker: RequestMaker,
        session: Any,
        policy: CommitPolicy,
        semaphore: asyncio.Semaphore | None,
        shared: bool,
    ) -> None:
        self.maker = maker
        self.session = session
        self.policy = policy
        self.semaphore = semaphore
        self.shared = shared
        self.finished = False
        self.closed = False

    def release(self) -> None:
        if self.semaphore is not None:
            self.semaphore.release()
            self.semaphore = None


class Registry:
    """The makers installed on one app (``app.state.fastapi_sessionmaker``)."""

    def __init__(self) -> None:
        self.makers: dict[str, RequestMaker] = {}
        self.default_sync: RequestMaker | None = None
        self.default_async: RequestMaker | None = None
        self.error_mapper: ErrorMapper = default_error_mapper

    def add(self, maker: RequestMaker) -> None:
        existing = self.makers.get(maker.name)
        if existing is not None and existing is not maker:
            raise ValueError(
                f"a maker named {maker.name!r} is already installed on this app: give each "
                "database its own name=..."
            )
        self.makers[maker.name] = maker
        if maker.is_async:
            if self.default_async is None:
                self.default_async = maker
        elif self.default_sync is None:
            self.default_sync = maker


class RequestState:
    """The sessions one HTTP request opened, and whether an exception went through the endpoint."""

    # Flags are class-level defaults: a request that opens no session writes none of them.
    raised = False
    client_gone = False

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.entries: list[_Entry] = []

    async def open(self, maker: RequestMaker, policy: CommitPolicy | None) -> Any:
        """The request's session for ``maker``: one per maker and request, opened on first use."""
        for entry in self.entries:
            if entry.maker is maker and entry.shared:
                return entry.session
        limiter = maker._request_limiter()
        semaphore = await limiter.acquire() if limiter is not None else None
        try:
            chosen = maker.policy if policy is None else policy
            session = maker._new_request_session(chosen)
        except BaseException:
            if semaphore is not None:
                semaphore.release()
            raise
        self.entries.append(_Entry(maker, session, chosen, semaphore, shared=True))
        return session

    def record_exit(self, exc_type: type[BaseException] | None, exc: object, tb: object) -> bool:
        """Exit-stack callback run when the endpoint is done: remember whether it raised."""
        if exc_type is not None:
            self.raised = True
        return False  # never swallow the exception

    def share(self, maker: RequestMaker) -> Any:
        """The request's session for ``maker`` for ``get_db()``: the same one ``DBSession`` gets.

        Opened here (without a pool slot: ``get_db`` runs in a worker thread) when no dependency
        opened it yet; either way it commits before the response, once.
        """
        for entry in self.entries:
            if entry.maker is maker and entry.shared:
                return entry.session
        session = maker._new_request_session(maker.policy)
        self.entries.append(_Entry(maker, session, maker.policy, None, shared=True))
        return session

    async def finish(
        self, status: int | None, client_gone: Callable[[], Awaitable[bool]] | None = None
    ) -> tuple[BaseException, RequestMaker] | None:
        """Commit or roll back every open session; the first failure, if any.

        ``client_gone`` is asked once, just before the first commit: when it answers True the
        client has disconnected and every session rolls back instead.
        """
        failure: tuple[BaseException, RequestMaker] | None = None
        for entry in self.entries:
            if entry.finished:
                continue
            entry.finished = True
            commit = failure is None and entry.policy.should_commit(status=status, raised=self.raised)
            if commit and client_gone is not None:
                self.client_gone = await client_gone()
                client_gone = None
            if self.client_gone:
                commit = False
            try:
                await entry.maker._end_transaction(entry.session, commit)
            except Exception as exc:
                if failure is None:
                    failure = (exc, entry.maker)
                else:
                    logger.exception("rollback failed on database %r", entry.maker.name)
            finally:
                mark_response_started(entry.session)
                entry.release()
        return failure

    def needs_io_to_close(self) -> bool:
        """Whether closing may talk to a database (a transaction is still open somewhere)."""
        return any(
            not entry.closed and (not entry.finished or entry.session.in_transaction())
            for entry in self.entries
        )

    async def close(self) -> None:
        """Close every session (when the response is complete, or the request ends or is cancelled)."""
        for entry in self.entries:
            if entry.closed:
                continue
            entry.closed = True
            if discarded_changes(entry.session):
                logger.error(
                    "changes made to objects of a request session after its response started were "
                    "discarded (database %r): write before returning the response",
                    entry.maker.name,
                )
            try:
                if not entry.finished:
                    entry.finished = True
                    await entry.maker._end_transaction(entry.session, False)
                await entry.maker._close_session(entry.session)
            except Exception:
                logger.exception("closing a session of database %r failed", entry.maker.name)
            finally:
                entry.release()


# The context holds a weak reference: asyncio copies the context into every callback scheduled
# from the request (uvicorn's keep-alive timer among them, alive for seconds), and a strong one
# would keep each finished request's objects alive with it. Under load that promoted them into
# the old GC generations and caused full collections of ~30 ms (the p99 of a no-database
# endpoint went from 3 to 28 ms; measured with wrk, see benchmarks/).
_current: ContextVar[weakref.ref[RequestState] | None] = ContextVar(
    "fastapi_sessionmaker_request", default=None
)


def enter_state(state: RequestState) -> Token[weakref.ref[RequestState] | None]:
    """Make ``state`` the current request's state (undo with ``_current.reset(token)``)."""
    return _current.set(weakref.ref(state))


def current_state() -> RequestState | None:
    """The request state of the request being served in this context, if any."""
    ref = _current.get()
    return None if ref is None else ref()


def require_state() -> RequestState:
    state = current_state()
    if state is None:
        raise NotInstalledError(
            "fastapi_sessionmaker: this app has no session guard, so the request session cannot "
            "be committed before the response. Call maker.init_app(app) once after creating the "
            "app (or, in tests, use the app that did)."
        )
    return state


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


class _Exchange(RequestState):
    """One HTTP request through the guard: its sessions plus the ASGI side (one object, no closures).

    ``receive`` and ``send`` are what the app gets. A message the disconnect check took from the
    server is handed to the app by the next ``receive``.
    """

    started = False
    replaced = False
    disconnected = False
    unread: list[Message] | None = None

    def __init__(self, guard: SessionGuard, scope: Scope, receive: Receive, send: Send) -> None:
        super().__init__(guard.registry)
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
        if not self.entries:  # no session: pass through
            if message["type"] == "http.response.start":
                self.started = True
            await self._send(message)
            return
        if message["type"] == "http.response.start":
            failure = await run_to_completion(self.finish, message["status"], self.gone)
            if self.client_gone:
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
        if self.needs_io_to_close():
            await run_to_completion(self.close)
        else:
            await self.close()  # nothing to roll back: no I/O, so nothing to interrupt


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
        token = enter_state(exchange)
        try:
            await self.app(scope, exchange.receive, exchange.send)
        except Exception as exc:
            if not exchange.entries and exchange.started:
                raise
            if exchange.entries:
                exchange.raised = True
                await run_to_completion(exchange.finish, None)
            if exchange.started:
                raise
            problem = self.registry.error_mapper(exc)
            if problem is None:
                raise
            maker = exchange.entries[0].maker if exchange.entries else None
            log_mapped(
                problem,
                exc,
                method=scope.get("method", ""),
                path=scope.get("path", ""),
                database=maker.name if maker is not None else "?",
            )
            await _send_problem(send, problem)
        finally:
            if exchange.entries:
                await exchange.close_all()
            _current.reset(token)

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


def dependency_for(
    resolve: Callable[[RequestState], RequestMaker], policy: CommitPolicy | None
) -> Callable[[HTTPConnection], Awaitable[Any]]:
    """A dependency returning the request's session of ``resolve(state)``.

    A plain coroutine, not a generator: FastAPI's generator machinery costs about 20 µs per
    request (``benchmarks/dependency_cost.py`` measures it). Whether the endpoint raised is learned
    from a callback on the exit stack FastAPI closes when the endpoint (and its
    ``scope="function"`` dependencies) are done, the moment a generator dependency's ``except``
    would run.
    """

    async def request_session(request: HTTPConnection) -> Any:
        if request.scope["type"] != "http":
            raise NotInstalledError(
                "fastapi_sessionmaker: a request session is for HTTP requests; a WebSocket would "
                "hold its connection for the socket's lifetime. Open a short session per message "
                "instead: `with maker.context_session() as session:` "
                "(async: `async with maker.context_session() as session:`)"
            )
        state = require_state()
        stack = request.scope.get("fastapi_function_astack")
        if stack is None:
            raise NotInstalledError(
                "fastapi_sessionmaker: this FastAPI version has no per-endpoint exit stack "
                "(scope['fastapi_function_astack']), so an exception raised by the endpoint could "
                "not be seen before the commit: use fastapi>=0.121 and report the version you run"
            )
        session = await state.open(resolve(state), policy)
        stack.push(state.record_exit)
        return session

    return request_session


def _default_sync(state: RequestState) -> RequestMaker:
    if state.registry.default_sync is None:
        raise NotInstalledError("DBSession needs a FastAPISessionMaker installed with maker.init_app(app)")
    return state.registry.default_sync


def _default_async(state: RequestState) -> RequestMaker:
    if state.registry.default_async is None:
        raise NotInstalledError(
            "AsyncDBSession needs an AsyncFastAPISessionMaker installed with maker.init_app(app)"
        )
    return state.registry.default_async


default_sync_session = dependency_for(_default_sync, None)
default_async_session = dependency_for(_default_async, None)
