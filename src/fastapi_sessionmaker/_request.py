"""Per-request state: the sessions one HTTP request opened, the registry of makers installed on an
app, and the request-session dependencies (``DBSession``, ``db.dependency``).

How a request session ends (the guard, :mod:`._guard`, drives steps 2-4):

1. A dependency opens the session and registers it with the request's :class:`RequestState`
   (a context variable set by the guard). A callback on FastAPI's per-endpoint exit stack only
   records whether an exception was raised through the endpoint.
2. When the app sends ``http.response.start``, the policy decides whether to commit (the status is
   known, whether the response was returned, raised or made by an exception handler); the guard
   commits or rolls back and only then lets the status line go out.
3. An exception that escapes the app rolls the sessions back. If the client has already
   disconnected when the status line is due, nothing is committed.
4. When the response body is complete (before background tasks run), or else when the app returns
   or is cancelled, every session is closed, shielded from cancellation.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import types
import weakref
from collections.abc import Awaitable, Callable
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from starlette.requests import HTTPConnection

from fastapi_sessionmaker import _compat
from fastapi_sessionmaker._errors import Problem, default_error_mapper
from fastapi_sessionmaker._multidb import PartialCommit, finish_several
from fastapi_sessionmaker._oncommit import Callback, run_async, settle
from fastapi_sessionmaker._policy import CommitPolicy
from fastapi_sessionmaker._sessions import discarded_changes, mark_response_started
from fastapi_sessionmaker.exceptions import NotInstalledError

if TYPE_CHECKING:
    from fastapi_sessionmaker._observe import AppObserver, RequestStats
    from fastapi_sessionmaker._unit import Lifecycle

logger = logging.getLogger("fastapi_sessionmaker")

__all__ = [
    "CURRENT",
    "ErrorMapper",
    "Registry",
    "RequestMaker",
    "RequestState",
    "current_state",
    "default_async_session",
    "default_sync_session",
    "dependency_for",
    "dependency_of",
    "enter_state",
    "is_request_session",
    "reset_state",
    "route_sessions",
    "session_of",
    "with_session",
]

ErrorMapper = Callable[[BaseException], "Problem | None"]
Declared = tuple["RequestMaker", CommitPolicy | None, int]
"""A session an endpoint declares with ``@maker.with_session``: the maker, its policy, its retries."""
F = TypeVar("F", bound=Callable[..., Any])


class RequestMaker(Protocol):
    """What the guard needs from a maker (sync or async): its name, policy and lifecycle."""

    name: str
    policy: CommitPolicy
    is_async: bool
    two_phase: bool

    @property
    def lifecycle(self) -> Lifecycle: ...


class _Entry:
    __slots__ = ("closed", "committed", "finished", "maker", "policy", "semaphore", "session")

    def __init__(
        self,
        maker: RequestMaker,
        session: Any,
        policy: CommitPolicy,
        semaphore: asyncio.Semaphore | None,
    ) -> None:
        self.maker = maker
        self.session = session
        self.policy = policy
        self.semaphore = semaphore
        self.finished = False
        self.committed = False
        self.closed = False

    def release(self) -> None:
        if self.semaphore is not None:
            self.semaphore.release()
            self.semaphore = None


class Registry:
    """The makers installed on one app (``app.state.fastapi_sessionmaker``)."""

    observer: AppObserver | None = None
    """Set when an installed maker observes (:mod:`._observe`): the guard then keeps stats per request."""

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
    retries = 0
    """How often the guard may re-run this request after a serialization failure or deadlock."""
    ready: list[tuple[list[Callback], str]] | None = None
    partial: PartialCommit | None = None
    """Set when a request of several databases was stored in some of them only (see _multidb)."""
    stats: RequestStats | None = None
    """What the request did in the database, when an installed maker observes (:mod:`._observe`)."""
    pending: list[tuple[RequestMaker, CommitPolicy | None]] | None = None
    """Declared sessions of sync makers waiting for the request body (see ``_guard``), opened by
    the guard when it is complete, or by :func:`session_of` if the body is never read."""
    open_error: Exception | None = None
    """Why a session in :attr:`pending` could not be opened (a pool timeout): raised where it is
    used, since FastAPI would turn an error raised while it reads the body into a 400."""
    loop_only = True
    """Every session is an async maker's: ending and closing them runs our code, SQLAlchemy and an
    asyncio driver only (no anyio, no worker thread), so the guard runs it in the request's own
    task (``run_to_completion(..., here=True)``)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.entries: list[_Entry] = []

    async def open(self, maker: RequestMaker, policy: CommitPolicy | None, retries: int = 0) -> Any:
        """The request's session for ``maker``: one per maker and request, opened on first use;
        ``retries``: the re-runs this session allows the request (the most any of its sessions asks)."""
        if retries > self.retries:
            self.retries = retries
        for entry in self.entries:
            if entry.maker is maker:
                return entry.session
        lifecycle = maker.lifecycle
        limiter = lifecycle.limiter()
        semaphore = await limiter.acquire() if limiter is not None else None
        try:
            chosen = maker.policy if policy is None else policy
            session = lifecycle.open(chosen)
        except BaseException:
            if semaphore is not None:
                semaphore.release()
            raise
        self._add(_Entry(maker, session, chosen, semaphore))
        return session

    async def declare(
        self, maker: RequestMaker, policy: CommitPolicy | None, retries: int, *, body: bool
    ) -> None:
        """A session declared with ``@maker.with_session``: opened now, or, for a sync maker while a
        request ``body`` is still to come, once it is (:meth:`open_pending`): its pool slot is not
        held during an upload, as a ``DBSession`` parameter's is not (FastAPI reads the body first)."""
        if body and not maker.is_async:
            if retries > self.retries:
                self.retries = retries
            self.pending = [*(self.pending or ()), (maker, policy)]
        else:
            await self.open(maker, policy, retries)

    def _add(self, entry: _Entry) -> None:
        self.entries.append(entry)
        if not entry.maker.is_async:
            self.loop_only = False

    def record_exit(self, exc_type: type[BaseException] | None, exc: object, tb: object) -> bool:
        """Exit-stack callback run when the endpoint is done: remember whether it raised."""
        if exc_type is not None:
            self.raised = True
        return False  # never swallow the exception

    def share(self, maker: RequestMaker, policy: CommitPolicy | None = None) -> Any:
        """The request's session for ``maker`` for ``get_db()``: the same one ``DBSession`` gets.

        Opened here (without a pool slot: ``get_db`` runs in a worker thread) when no dependency
        opened it yet; either way it commits before the response, once.
        """
        for entry in self.entries:
            if entry.maker is maker:
                return entry.session
        chosen = maker.policy if policy is None else policy
        session = maker.lifecycle.open(chosen)
        self._add(_Entry(maker, session, chosen, None))
        return session

    async def open_pending(self) -> None:
        """Open the declared sessions that waited for the request body (it is complete)."""
        pending, self.pending = self.pending or [], None
        try:
            for maker, policy in pending:
                await self.open(maker, policy)
        except Exception as exc:
            self.open_error = exc

    async def finish(
        self, status: int | None, client_gone: Callable[[], Awaitable[bool]] | None = None
    ) -> tuple[BaseException, RequestMaker] | None:
        """Commit or roll back every open session; the first failure, if any.

        ``client_gone`` is asked once, just before the first commit: when it answers True the
        client has disconnected and every session rolls back instead. Several sessions end in
        their commit order, with two-phase commit where asked (:mod:`._multidb`).
        """
        if len(self.entries) != 1:
            return await finish_several(self, status, client_gone) if self.entries else None
        entry = self.entries[0]
        if entry.finished:
            return None
        entry.finished = True
        commit = entry.policy.should_commit(status=status, raised=self.raised)
        if commit and client_gone is not None:
            self.client_gone = await client_gone()
        if self.client_gone:
            commit = False
        try:
            await entry.maker.lifecycle.end(entry.session, commit)
            entry.committed = commit
        except Exception as exc:
            return (exc, entry.maker)
        finally:
            mark_response_started(entry.session)
            if entry.semaphore is not None:
                entry.release()
        return None

    def close_now(self) -> bool:
        """Close every session here, on the event loop, if none needs I/O or a wait to close
        (each ended, holding no transaction, used by no other task or thread); whether all are
        closed. The others are left to :meth:`close`, run shielded from cancellation."""
        for entry in self.entries:
            if not entry.closed and not entry.finished:
                return False  # still to roll back: I/O
        for entry in self.entries:
            if entry.closed:
                continue
            discarded = discarded_changes(entry.session)  # asked before the close forgets them
            try:
                if not entry.maker.lifecycle.close_now(entry.session):
                    return False  # busy, or a transaction began after the response started
            except Exception:
                logger.exception("closing a session of database %r failed", entry.maker.name)
            entry.closed = True
            self._closed(entry, discarded)
        return True

    async def close(self) -> None:
        """Close every session (when the response is complete, or the request ends or is cancelled)."""
        for entry in self.entries:
            if entry.closed:
                continue
            entry.closed = True
            discarded = discarded_changes(entry.session)
            try:
                if not entry.finished:
                    entry.finished = True
                    await entry.maker.lifecycle.end(entry.session, False)
                await entry.maker.lifecycle.close(entry.session)
            except Exception:
                logger.exception("closing a session of database %r failed", entry.maker.name)
            finally:
                self._closed(entry, discarded)

    def _closed(self, entry: _Entry, discarded: bool) -> None:
        """What follows a session's close: the discarded changes logged, its pool slot given
        back, its callbacks settled."""
        if discarded:
            logger.error(
                "changes made to objects of a request session after its response started were "
                "discarded (database %r): write before returning the response",
                entry.maker.name,
            )
        if entry.semaphore is not None:
            entry.release()
        callbacks = settle(entry.session, entry.committed)
        if callbacks:
            if self.ready is None:
                self.ready = []
            self.ready.append((callbacks, entry.maker.name))

    async def run_callbacks(self, where: str) -> None:
        """Run the ``on_commit`` / ``on_rollback`` callbacks the closed sessions settled."""
        ready, self.ready = self.ready or [], None
        for callbacks, database in ready:
            await run_async(callbacks, where=where, database=database)


# The context holds a weak reference: asyncio copies the context into every callback scheduled
# from the request (uvicorn's keep-alive timer among them, alive for seconds), and a strong one
# would keep each finished request's objects alive with it. Under load that promoted them into
# the old GC generations and caused full collections of ~30 ms (the p99 of a no-database
# endpoint went from 3 to 28 ms; measured with wrk, see benchmarks/).
_current: ContextVar[weakref.ref[RequestState] | None] = ContextVar(
    "fastapi_sessionmaker_request", default=None
)
CURRENT = _current
"""The context variable :func:`enter_state` sets (the guard sets it inline: one call less)."""


def enter_state(state: RequestState) -> Token[weakref.ref[RequestState] | None]:
    """Make ``state`` the current request's state (undo with :func:`reset_state`)."""
    return _current.set(weakref.ref(state))


def reset_state(token: Token[weakref.ref[RequestState] | None]) -> None:
    """Undo :func:`enter_state`."""
    _current.reset(token)


def current_state() -> RequestState | None:
    """The request state of the request being served in this context, if any."""
    ref = _current.get()
    return None if ref is None else ref()


def dependency_for(
    resolve: Callable[[RequestState], RequestMaker], policy: CommitPolicy | None, retries: int = 0
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
        state = current_state()
        if state is None:
            raise _not_guarded(request)
        stack = _compat.fastapi_function_stack(request.scope)
        if stack is None:
            raise NotInstalledError(
                "fastapi_sessionmaker: this FastAPI version has no per-endpoint exit stack "
                "(scope['fastapi_function_astack']), so an exception raised by the endpoint could "
                "not be seen before the commit: use fastapi>=0.121 and report the version you run"
            )
        session = await state.open(resolve(state), policy, retries)
        stack.push(state.record_exit)
        return session

    request_session.fastapi_sessionmaker_session = True  # type: ignore[attr-defined]
    return request_session


ROUTE_SESSIONS = "fastapi_sessionmaker_route_sessions"
"""The attribute :func:`with_session` sets on an endpoint: the sessions its route's guard opens."""


def with_session(endpoint: F, declared: Declared) -> F:
    """``endpoint`` with a request session of its own that needs no dependency (``maker.session``).

    The route's guard (installed at start-up on every route whose endpoint carries
    :data:`ROUTE_SESSIONS`) opens the session before the route runs, so dependencies can use it
    too, and commits it before the status line like a ``DBSession``. FastAPI solves no dependency
    for it: about 15 µs less per request than any ``Depends`` (``benchmarks/dependency_cost.py``).

    The returned function calls ``endpoint`` and records an exception raised through it (the
    exit-stack callback of the dependency does that for ``DBSession``), so a response an exception
    handler makes of it still rolls back. It is built with ``endpoint``'s globals: older FastAPI
    versions (0.121 among them) resolve string annotations in the ``__globals__`` of the function
    they are given, without unwrapping it. Generator
    endpoints (streamed responses) are marked, not wrapped: their response starts before they end.
    """
    previous: tuple[Declared, ...] = getattr(endpoint, ROUTE_SESSIONS, ())
    if any(maker is declared[0] for maker, _, _ in previous):
        raise TypeError(f"with_session: {endpoint!r} already declares a session of this maker")
    if inspect.isasyncgenfunction(endpoint) or inspect.isgeneratorfunction(endpoint):
        wrapper: Any = endpoint
    else:
        wrapper = _recording(endpoint)
    setattr(wrapper, ROUTE_SESSIONS, (*previous, declared))
    return wrapper  # type: ignore[no-any-return]


def _recording(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    """``endpoint``, recording in the request's state an exception raised through it."""
    # An object whose __call__ is async is an async endpoint too, as FastAPI tells them.
    is_async = inspect.iscoroutinefunction(endpoint) or inspect.iscoroutinefunction(type(endpoint).__call__)
    call = _recording_async(endpoint) if is_async else _recording_sync(endpoint)
    namespace = getattr(endpoint, "__globals__", None)
    if namespace is not None:  # the body reads closure cells and builtins only
        call = types.FunctionType(call.__code__, namespace, call.__name__, None, call.__closure__)
    return functools.wraps(endpoint)(call)


def _recording_async(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    record = _record_raised

    async def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return await endpoint(*args, **kwargs)
        except BaseException:
            record()
            raise

    return call


def _recording_sync(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    record = _record_raised

    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return endpoint(*args, **kwargs)
        except BaseException:
            record()
            raise

    return call


def _record_raised() -> None:
    state = current_state()
    if state is not None:
        state.raised = True


def route_sessions(endpoint: Any) -> tuple[Declared, ...]:
    """The sessions ``endpoint`` declares with ``@maker.with_session`` (none: ``()``)."""
    declared = getattr(endpoint, ROUTE_SESSIONS, ())
    return declared if isinstance(declared, tuple) else ()


def session_of(maker: RequestMaker) -> Any:
    """``maker.session``: the current request's session of ``maker``, opened by the route's guard."""
    state = current_state()
    if state is not None:
        for entry in state.entries:
            if entry.maker is maker:
                return entry.session
        if state.open_error is not None:
            raise state.open_error
        for waiting, policy in state.pending or ():
            if waiting is maker:  # the endpoint did not read the request body: no slot, as get_db()
                return state.share(maker, policy)
    kind = "async " if maker.is_async else ""
    raise NotInstalledError(
        f"fastapi_sessionmaker: maker.session (database {maker.name!r}) is the request session of "
        "an endpoint declared with @maker.with_session (written below @app.get(...)); "
        + (
            "this request's route does not declare it, nor take it as a dependency."
            if state is not None
            else "no guarded request is being served here (is the route declared, and "
            "maker.init_app(app) called?)."
        )
        + f" Outside requests, open one: `{kind}with maker.context_session() as session:`"
    )


def is_request_session(call: Any) -> bool:
    """Whether ``call`` is a request-session dependency (``DBSession``, ``db.dependency``, ...)."""
    return getattr(call, "fastapi_sessionmaker_session", False) is True


def _not_guarded(request: HTTPConnection) -> NotInstalledError:
    app = request.scope.get("app")
    if not isinstance(getattr(getattr(app, "state", None), "fastapi_sessionmaker", None), Registry):
        return NotInstalledError(
            "fastapi_sessionmaker: this app has no session guard, so the request session cannot "
            "be committed before the response. Call maker.init_app(app) once after creating the "
            "app (or, in tests, use the app that did)."
        )
    route = request.scope.get("route")
    where = getattr(route, "path", None) or request.scope.get("path", "?")
    return NotInstalledError(
        f"fastapi_sessionmaker: the route {where} has no session guard. The guard is installed "
        "when the app starts, on every route one of whose dependencies is a request session or a "
        "dependency with yield; this route had none then (it was added after the app started, "
        "or a dependency override brought the session in). Declare the session on the route "
        "(a DBSession parameter, or dependencies=[Depends(dependency_of(DBSession))]) or add "
        "the route before the app starts."
    )


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


def dependency_of(alias: Any) -> Callable[..., Any]:
    """The callable behind a session dependency: the key to use in ``app.dependency_overrides``.

    ``alias`` is an ``Annotated[..., Depends(...)]`` alias (:data:`DBSession`,
    :data:`AsyncDBSession`, one of your own) or a ``Depends`` (``db.dependency``,
    ``db.depends(policy=...)``). Each is a different dependency: override the one your endpoints take.

    Example:
        >>> from fastapi import FastAPI
        >>> from fastapi_sessionmaker import DBSession, dependency_of
        >>> app = FastAPI()
        >>> app.dependency_overrides[dependency_of(DBSession)] = lambda: "a session of your own"
    """
    from fastapi import params

    for candidate in getattr(alias, "__metadata__", (alias,)):
        if isinstance(candidate, params.Depends) and candidate.dependency is not None:
            return candidate.dependency
    raise TypeError(
        f"dependency_of({alias!r}): expected Depends(...) or an Annotated[..., Depends(...)] alias "
        "such as DBSession"
    )
