"""The sync maker: a cached engine and sessionmaker, the request dependency, sessions for scripts."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from fastapi_sessionmaker._base import MakerBase
from fastapi_sessionmaker._engines import enforce_sqlite_foreign_keys
from fastapi_sessionmaker._fork import fork_safe
from fastapi_sessionmaker._liveness import install_liveness_check
from fastapi_sessionmaker._multidb import discard_on_failed_prepare, in_doubt, resolve_in_doubt
from fastapi_sessionmaker._policy import CommitPolicy
from fastapi_sessionmaker._request import current_state
from fastapi_sessionmaker._retry import run_sync
from fastapi_sessionmaker._sessions import ReadOnlySession
from fastapi_sessionmaker._sqlite import install_writer_queue
from fastapi_sessionmaker._unit import SyncLifecycle, sync_unit
from fastapi_sessionmaker._urls import missing_driver, scrubbed_line, unknown_driver
from fastapi_sessionmaker.exceptions import DatabaseUnavailableError

if TYPE_CHECKING:
    from sqlalchemy.engine.interfaces import IsolationLevel

__all__ = ["FastAPISessionMaker", "ReadOnlySession"]

T = TypeVar("T")


def create_checked_engine(
    url: sa.URL, kwargs: dict[str, Any], variable: str, *, sqlite_foreign_keys: bool = True
) -> sa.Engine:
    """``create_engine`` with our liveness check, SQLite foreign keys on and SQLite writers taking
    turns per file (:func:`install_writer_queue`); a one-line :class:`ConfigurationError` naming
    ``variable`` (never the URL) for a driver SQLAlchemy does not know or cannot import."""
    try:
        engine = sa.create_engine(url, **kwargs)
    except sa.exc.NoSuchModuleError:
        raise unknown_driver(url, is_async=False, variable=variable) from None
    except ImportError as exc:
        raise missing_driver(url, exc.name, is_async=False, variable=variable) from None
    install_liveness_check(engine, kwargs)
    if sqlite_foreign_keys:
        enforce_sqlite_foreign_keys(engine)
    install_writer_queue(engine, kwargs.get("connect_args"))
    return fork_safe(engine)


def unavailable(maker: MakerBase[Any, Any], exc: BaseException) -> DatabaseUnavailableError:
    """A one-line start-up error: the URL without secrets, the error class, its first line."""
    text = scrubbed_line(exc, maker.url)
    return DatabaseUnavailableError(
        f"cannot reach database {maker.name!r} at {maker.safe_url()}: {type(exc).__name__}: {text}".rstrip(
            ": "
        )
    )


class FastAPISessionMaker(MakerBase[sa.Engine, sessionmaker[Session]]):
    """Sessions for FastAPI and for code outside requests, from one database URL.

    The engine (dead pooled connections replaced on checkout) and sessionmaker are created on
    first use and cached.
    Call :meth:`init_app` once: request sessions then commit *before* the response is sent,
    roll back on any error, and always give their connection back. The names of fastapi-utils'
    ``FastAPISessionMaker`` all work.

    Args:
        database_uri: A SQLAlchemy URL; ``None`` reads :class:`DatabaseSettings` from the env
            (``DATABASE_*``, or ``DATABASE_<NAME>_*`` for a maker with a ``name``).

    Keyword Args:
        settings (DatabaseSettings | None): Settings to take the URL and pool options from.
        name (str): The database's name in logs, health checks and ``init_app`` (several
            databases), and which variables it reads: ``name="reports"`` reads
            ``DATABASE_REPORTS_URI``...; default ``"default"``.
        policy (CommitPolicy | str): When request sessions commit (:class:`CommitPolicy`);
            default ``"auto"``.
        engine_options (Mapping[str, Any] | None): Extra ``create_engine`` keyword arguments
            (they win over ours).
        session_options (Mapping[str, Any] | None): Extra ``sessionmaker`` keyword arguments
            (they win over our ``expire_on_commit=False`` and ``autoflush=False``, as in
            fastapi-utils).
        session_class (type[Session] | None): The ``Session`` subclass of request sessions and
            :meth:`context_session`, e.g. ``sqlmodel.Session`` (then ``session.exec()`` works
            under every policy). The async twin takes an ``AsyncSession`` subclass, e.g.
            SQLModel's ``sqlmodel.ext.asyncio.session.AsyncSession``.
        sqlite_foreign_keys (bool): On SQLite, run ``PRAGMA foreign_keys=ON`` on every
            connection (the default), so ``FOREIGN KEY`` and ``ON DELETE CASCADE`` are enforced;
            ``False`` keeps SQLite's own default (not enforced). Other databases always enforce
            them.
        pgbouncer (str | None): ``"transaction"`` when the URL points at PgBouncer in
            transaction mode: the driver never keeps prepared statements (see the Scaling out
            page); default: the settings' ``DATABASE_PGBOUNCER``, else none.
        two_phase (bool | None): Two-phase commit: when a request writes to this and other
            databases, this one's transaction is prepared before any commits (PostgreSQL
            prepared transactions, MySQL/MariaDB XA; SQLite has none). Default:
            ``DATABASE_TWO_PHASE`` (off).
        stats (bool): Count each request's statements, database time and pool wait
            (:func:`request_stats`). Off by default: no listener, no cost.
        slow_query_ms (float | None): Log every statement that takes at least this long on the
            ``fastapi_sessionmaker.slow.query`` logger (text without parameters; default
            ``DATABASE_SLOW_QUERY_MS`` when settings are read, else off).
        slow_request_ms (float | None): Log every request that takes at least this long, with
            its counts, on ``fastapi_sessionmaker.slow.request`` (default
            ``DATABASE_SLOW_REQUEST_MS``; implies ``stats``).
        tracing (bool | TracerProvider): OpenTelemetry spans: statements
            (opentelemetry-instrumentation-sqlalchemy), pool wait, commit, rollback and
            after-commit callbacks (the ``[otel]`` extra), from the global tracer provider, or
            from the ``TracerProvider`` given here.

    Example:
        >>> from typing import Annotated
        >>> from fastapi import FastAPI
        >>> from sqlalchemy.orm import Session
        >>> db = FastAPISessionMaker("sqlite:///./example.db")
        >>> app = FastAPI()
        >>> db.init_app(app)
        >>> DbSession = Annotated[Session, db.dependency]
    """

    is_async = False

    def __init__(self, database_uri: str | sa.URL | None = None, **kwargs: Any) -> None:
        self.lifecycle: SyncLifecycle = SyncLifecycle(self)
        super().__init__(database_uri, **kwargs)

    # -- fastapi-utils names ---------------------------------------------------------------
    def get_new_engine(self) -> sa.Engine:
        """A new engine with this maker's options (dead pooled connections replaced on checkout)."""
        return self._engine_for(self.url, self._variable)

    def _engine_for(self, url: sa.URL, variable: str) -> sa.Engine:
        kwargs = self._engine_kwargs(url, variable)
        engine = create_checked_engine(url, kwargs, variable, sqlite_foreign_keys=self.sqlite_foreign_keys)
        if self.two_phase:
            discard_on_failed_prepare(engine)
        if self.observer is not None:
            self.observer.instrument(engine)
        return engine

    def get_new_sessionmaker(self, engine: sa.Engine | None) -> sessionmaker[Session]:
        """A new sessionmaker bound to ``engine`` (the cached engine when ``None``)."""
        return sessionmaker(bind=engine or self.cached_engine, **self.session_options)

    def _sessionmaker_class(self) -> type[sessionmaker[Session]]:
        return sessionmaker

    @property
    def session(self) -> Session:
        """The current request's session, in an endpoint declared with :meth:`with_session`
        (or in a dependency of it); :class:`NotInstalledError` anywhere else."""
        session: Session = self._request_session()
        return session

    def get_db(self) -> Iterator[Session]:
        """The fastapi-utils generator dependency: commit after the endpoint, rollback on error.

        Under a plain ``Depends`` FastAPI runs the code after ``yield`` *after* the response is
        sent. Call :meth:`init_app` once and it yields the request's session (the same one
        ``DBSession`` gets), committed before the response like every request session.
        """
        state = current_state()
        if state is not None:  # the guard commits (or rolls back) the request's one session
            yield state.share(self)
            return
        with sync_unit(self.cached_sessionmaker(), commit=True) as session:
            yield session

    @contextlib.contextmanager
    def context_session(self) -> Iterator[Session]:
        """A session for code outside requests, with the same commit policy.

        Example:
            >>> db = FastAPISessionMaker("sqlite://")
            >>> with db.context_session() as session:
            ...     session.execute(sa.text("SELECT 1")).scalar()
            1
        """
        commit = self.policy.should_commit(status=None, raised=False)
        with sync_unit(self.cached_sessionmaker(), commit=commit) as session:
            yield session

    def run_in_transaction(
        self,
        fn: Callable[[Session], T],
        /,
        *,
        attempts: int = 5,
        isolation_level: IsolationLevel | None = None,
    ) -> T:
        """Run ``fn(session)`` in a transaction of its own, again after a serialization failure or
        a deadlock; return what it returned once the transaction committed.

        Each attempt gets a fresh session and transaction from :meth:`context_session` (the
        maker's policy: under ``AUTO`` it commits at the end). A serialization failure or a
        deadlock (:func:`~fastapi_sessionmaker.is_retryable`), raised by ``fn`` or by the commit,
        rolls the attempt back, waits a jittered exponential backoff (up to 10 ms, doubling, at
        most 0.5 s) and starts over, ``attempts`` times at most; then the last error is re-raised
        unchanged. Any other error is re-raised at once. Each retry is logged at WARNING. ``fn``
        may run more than once: keep what cannot be undone (e-mails, HTTP calls) out of it.

        Args:
            fn: The work, done with the session it is given.
            attempts: How many times ``fn`` may run in all (1: no retry).
            isolation_level: This transaction's level, e.g. ``"SERIALIZABLE"``, set on its
                connection and reset when the connection goes back to the pool. Not applied while
                the maker is joined to a test's transaction (:meth:`join`), which has its own.

        Example:
            >>> db = FastAPISessionMaker("sqlite://")
            >>> def count(session: Session) -> int:
            ...     return session.execute(sa.text("SELECT 41 + 1")).scalar_one()
            >>> db.run_in_transaction(count, isolation_level="SERIALIZABLE")
            42
            >>> db.dispose()
        """
        level = None if self._joined is not None else isolation_level
        return run_sync(
            self.context_session, fn, attempts=attempts, isolation_level=level, database=self.name
        )

    @contextlib.contextmanager
    def task_session(self, *, policy: CommitPolicy | str | None = None) -> Iterator[Session]:
        """A short-lived session of its own for one of several concurrent threads.

        The sync twin of ``AsyncFastAPISessionMaker.task_session``: a ``Session`` is not safe to
        share between threads, so work fanned out to a thread pool opens one here per thread. It
        commits when the block ends without an exception (under ``AUTO``), rolls back otherwise,
        and is always closed. Inside a request (in a thread that carries the request's context)
        it takes the policy of the request's session of this maker, else the maker's.

        Example:
            >>> from concurrent.futures import ThreadPoolExecutor
            >>> db = FastAPISessionMaker("sqlite:///./tasks.db")
            >>> def one(n: int) -> int:
            ...     with db.task_session() as session:
            ...         return int(session.execute(sa.text("SELECT :n"), {"n": n}).scalar_one())
            >>> with ThreadPoolExecutor(3) as pool:
            ...     list(pool.map(one, [1, 2, 3]))
            [1, 2, 3]
            >>> db.dispose()
        """
        chosen = self._task_policy() if policy is None else CommitPolicy(policy)
        session = self.lifecycle.open(chosen)
        with sync_unit(session, commit=chosen.should_commit(status=None, raised=False)):
            yield session

    def reset_cache(self) -> None:
        """Forget the cached engine and sessionmaker, disposing the old engine's pool."""
        self.dispose()

    # -- lifecycle -------------------------------------------------------------------------
    def dispose(self) -> None:
        """Close the pool's connections and forget the engine; the next use makes a new one."""
        if self.replicas is not None:
            self.replicas.dispose()
        engine = self._forget()
        if engine is not None:
            engine.dispose()

    def in_doubt(self) -> list[str]:
        """The ids of the prepared (two-phase) transactions waiting on this database's server.

        A two-phase commit whose last step failed (logged at ERROR with the id) leaves its
        transaction prepared, holding its locks, until :meth:`resolve_in_doubt` finishes it.
        PostgreSQL lists those of every database on the server, MySQL/MariaDB every XA one.
        """
        with self.cached_engine.connect() as connection:
            return in_doubt(connection)

    def resolve_in_doubt(self, xid: str, *, commit: bool = True) -> None:
        """Commit (or with ``commit=False`` roll back) the prepared transaction ``xid``.

        Example:
            >>> db = FastAPISessionMaker("postgresql://app@db/shop", two_phase=True)  # doctest: +SKIP
            >>> for xid in db.in_doubt():  # doctest: +SKIP
            ...     db.resolve_in_doubt(xid)  # the log line says commit=True or commit=False
        """
        with self.cached_engine.connect() as connection:
            resolve_in_doubt(connection, xid, commit)

    def check_connection(self) -> None:
        """Run ``SELECT 1``; raise :class:`DatabaseUnavailableError` with a one-line reason."""
        try:
            with self.cached_engine.connect() as connection:
                connection.execute(sa.text("SELECT 1"))
        except (sa.exc.SQLAlchemyError, OSError) as exc:
            raise unavailable(self, exc) from exc

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any = None) -> AsyncIterator[None]:
        """Check the database at start-up, dispose the pool at shutdown (``init_app`` uses it)."""
        await anyio.to_thread.run_sync(self.check_connection)
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(self.dispose)

    async def _adispose(self) -> None:
        await anyio.to_thread.run_sync(self.dispose)
