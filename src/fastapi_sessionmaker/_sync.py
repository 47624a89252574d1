"""The sync maker: a cached engine and sessionmaker, the request dependency, sessions for scripts."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from fastapi_sessionmaker._base import (
    Limiter,
    MakerBase,
    enforce_sqlite_foreign_keys,
    install_liveness_check,
    missing_driver,
    pool_capacity,
    scrub,
    unknown_driver,
)
from fastapi_sessionmaker._policy import CommitPolicy
from fastapi_sessionmaker._request import current_state
from fastapi_sessionmaker._sessions import ReadOnlySession, compose, try_lock, unlock
from fastapi_sessionmaker.exceptions import DatabaseUnavailableError

__all__ = ["FastAPISessionMaker", "ReadOnlySession"]


def create_checked_engine(
    url: sa.URL, kwargs: dict[str, Any], variable: str, *, sqlite_foreign_keys: bool = True
) -> sa.Engine:
    """``create_engine`` with our liveness check and SQLite foreign keys on; a one-line
    :class:`ConfigurationError` naming ``variable`` (never the URL) for a driver SQLAlchemy does
    not know or cannot import."""
    try:
        engine = sa.create_engine(url, **kwargs)
    except sa.exc.NoSuchModuleError:
        raise unknown_driver(url, is_async=False, variable=variable) from None
    except ImportError as exc:
        raise missing_driver(url, exc.name, is_async=False, variable=variable) from None
    install_liveness_check(engine, kwargs)
    if sqlite_foreign_keys:
        enforce_sqlite_foreign_keys(engine)
    return engine


def unavailable(maker: MakerBase, exc: BaseException) -> DatabaseUnavailableError:
    """A one-line start-up error: the URL without secrets, the error class, its first line."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = scrub(text, maker.url)
    return DatabaseUnavailableError(
        f"cannot reach database {maker.name!r} at {maker.safe_url()}: {type(exc).__name__}: {text}".rstrip(
            ": "
        )
    )


class FastAPISessionMaker(MakerBase):
    """Sessions for FastAPI and for code outside requests, from one database URL.

    The engine (dead pooled connections replaced on checkout) and sessionmaker are created on
    first use and cached.
    Call :meth:`init_app` once: request sessions then commit *before* the response is sent,
    roll back on any error, and always give their connection back. The names of fastapi-utils'
    ``FastAPISessionMaker`` all work.

    Args:
        database_uri: A SQLAlchemy URL; ``None`` reads :class:`DatabaseSettings` from the env.
        settings: Settings to take the URL and pool options from.
        name: The database's name in logs, health checks and ``init_app`` (several databases).
        policy: When request sessions commit (:class:`CommitPolicy`).
        engine_options: Extra ``create_engine`` keyword arguments (they win over ours).
        session_options: Extra ``sessionmaker`` keyword arguments (they win over our
            ``expire_on_commit=False`` and ``autoflush=False``, as in fastapi-utils).
        sqlite_foreign_keys: On SQLite, run ``PRAGMA foreign_keys=ON`` on every connection
            (the default), so ``FOREIGN KEY`` and ``ON DELETE CASCADE`` are enforced; ``False``
            keeps SQLite's own default (not enforced). Other databases always enforce them.

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
        super().__init__(database_uri, **kwargs)
        self._engine: sa.Engine | None = None
        self._sessionmaker: sessionmaker[Session] | None = None

    # -- fastapi-utils names ---------------------------------------------------------------
    @property
    def cached_engine(self) -> sa.Engine:
        """The engine, created on first access and reused."""
        if self._joined_engine is not None:
            return self._joined_engine  # type: ignore[no-any-return]
        if self._engine is None:
            self._engine = self.get_new_engine()
        return self._engine

    @property
    def cached_sessionmaker(self) -> sessionmaker[Session]:
        """The sessionmaker bound to :attr:`cached_engine`."""
        if self._joined is not None:
            return self._joined  # type: ignore[no-any-return]
        if self._sessionmaker is None:
            self._sessionmaker = self.get_new_sessionmaker(self.cached_engine)
        return self._sessionmaker

    def get_new_engine(self) -> sa.Engine:
        """A new engine with this maker's options (dead pooled connections replaced on checkout)."""
        return create_checked_engine(
            self.url, self._engine_kwargs(), self._variable, sqlite_foreign_keys=self.sqlite_foreign_keys
        )

    def get_new_sessionmaker(self, engine: sa.Engine | None) -> sessionmaker[Session]:
        """A new sessionmaker bound to ``engine`` (the cached engine when ``None``)."""
        return sessionmaker(bind=engine or self.cached_engine, **self.session_options)

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
        with unit_of_work(self.cached_sessionmaker(), commit=True) as session:
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
        with unit_of_work(
            self.cached_sessionmaker(), commit=self.policy.should_commit(status=None, raised=False)
        ) as session:
            yield session

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
        session = self._new_request_session(chosen)
        with unit_of_work(session, commit=chosen.should_commit(status=None, raised=False)):
            yield session

    def reset_cache(self) -> None:
        """Forget the cached engine and sessionmaker, disposing the old engine's pool."""
        self.dispose()

    # -- lifecycle -------------------------------------------------------------------------
    def dispose(self) -> None:
        """Close the pool's connections and forget the engine; the next use makes a new one."""
        engine, self._engine, self._sessionmaker = self._engine, None, None
        self._reset_limiter()
        if engine is not None:
            engine.dispose()

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

    # -- testing ---------------------------------------------------------------------------
    def _join(self, connection: sa.Connection | None) -> None:
        """Hand out sessions joined to ``connection`` (``None``: back to the maker's own engine).

        Used by :mod:`fastapi_sessionmaker.testing`: the app's commits release savepoints inside
        the test's outer transaction, which the test rolls back.
        """
        if connection is None:
            self._joined = self._joined_engine = self._joined_limiter = None
            return
        options = {**self.session_options, "join_transaction_mode": "create_savepoint"}
        self._joined = sessionmaker(bind=connection, **options)
        self._joined_engine = connection.engine
        self._joined_limiter = Limiter(1, 30.0)  # one connection: one request session at a time

    # -- request sessions ------------------------------------------------------------------
    def _new_request_session(self, policy: CommitPolicy) -> Session:
        factory = self.cached_sessionmaker
        cls = compose(factory.class_, policy is CommitPolicy.READ_ONLY)
        return cls(**{**factory.kw, "close_resets_only": False})

    def _request_limiter(self) -> Limiter | None:
        if self._joined_limiter is not None:
            return self._joined_limiter
        if not self._limiter_ready:
            engine = self.cached_engine
            capacity = pool_capacity(engine)
            timeout = float(getattr(engine.pool, "_timeout", 30.0))
            self._limiter = Limiter(capacity, timeout) if capacity else None
            self._limiter_ready = True
        return self._limiter

    async def _end_transaction(self, session: Session, commit: bool) -> None:
        if not session.in_transaction():
            return
        if try_lock(session):  # no thread is running a statement on it
            try:
                if _ends_without_io(session):
                    _end_transaction(session, commit)  # nothing to wait for: no thread hop
                    return
            finally:
                unlock(session)
        # In a worker thread: it waits (under the session's lock) for a statement another thread
        # is still running, e.g. a sync endpoint whose request was cancelled.
        await anyio.to_thread.run_sync(_end_transaction, session, commit)

    async def _close_session(self, session: Session) -> None:
        if try_lock(session):
            try:
                if not session.in_transaction() or _ends_without_io(session):
                    session.close()
                    return
            finally:
                unlock(session)
        await anyio.to_thread.run_sync(session.close)


_SESSION_HOOKS = (
    "before_commit",
    "after_commit",
    "after_transaction_end",
    "after_rollback",
    "after_soft_rollback",
)


def _ends_without_io(session: Session) -> bool:
    """Whether ending ``session``'s transaction can neither block nor run user code.

    True when every DBAPI connection the session holds reports that no database transaction is
    open (pysqlite begins one only at the first write, so a SQLite read ends with a commit that
    does nothing), nothing is waiting to be flushed (a flush is a write, and a SQLite write can
    wait seconds for another request's lock) and no listener would run: then the commit is done
    on the event loop instead of in a worker thread. Any doubt (another driver, pending changes, a
    session or engine event) means a hop.
    """
    if not session._is_clean():
        return False
    transaction = session.get_transaction()
    connections = [entry[0] for entry in getattr(transaction, "_connections", {}).values()]
    # The driver first: for every database but SQLite this answers at once, on the hot path.
    if not connections or any(
        getattr(c.connection.dbapi_connection, "in_transaction", None) is not False for c in connections
    ):
        return False
    dispatch = session.dispatch
    if any(getattr(dispatch, name) for name in _SESSION_HOOKS):
        return False
    return not any(
        c.dispatch.commit
        or c.dispatch.rollback
        or c.engine.pool.dispatch.checkin
        or c.engine.pool.dispatch.reset
        for c in connections
    )


def _end_transaction(session: Session, commit: bool) -> None:
    if not commit:
        session.rollback()
        return
    try:
        session.commit()
    except BaseException:
        session.rollback()
        raise


@contextlib.contextmanager
def unit_of_work(session: Session, *, commit: bool) -> Iterator[Session]:
    """Yield ``session``; then commit (or roll back when ``commit`` is False), roll back on error,
    and always close. The one sync rule for sessions outside the request guard."""
    try:
        yield session
        if commit:
            session.commit()
        else:
            session.rollback()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
