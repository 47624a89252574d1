"""The exceptions this package raises.

Database errors are never wrapped: SQLAlchemy's (and the driver's) exceptions reach your code and
the HTTP edge as they were raised. What this package adds is for configuration and misuse::

    FastAPISessionMakerError
    ├── ConcurrentSessionUseError (also a RuntimeError) one AsyncSession used by several tasks at once
    ├── ConfigurationError (also a ValueError)      a bad DATABASE_URI, unknown dialect, missing driver
    ├── DatabaseUnavailableError                     the start-up check could not reach the database
    ├── MigrationError                               the schema is behind the migrations' head at
    │                                                start-up (``Migrations(mode="check")``), or the
    │                                                migration lock was not free in time
    ├── NotFoundError (also fastapi's HTTPException) ``get_or_404`` / ``one_or_404`` found no row: a 404
    ├── NotInstalledError (also a RuntimeError)      a request dependency used without ``init_app(app)``
    ├── ReadOnlySessionError (also a RuntimeError)   a flush of ORM changes in a read-only session
    ├── ResponseStartedError (also a RuntimeError)   a write through a request session after its
    │                                                response started (a streaming body)
    ├── SessionClosedError (also a RuntimeError)     a callback registered on a session already closed
    └── TransactionSettingsError (also a RuntimeError) ``set_local()`` where no transaction-scoped
                                                     setting exists (MariaDB, MySQL, SQLite)
"""

from __future__ import annotations

from fastapi import HTTPException

__all__ = [
    "ConcurrentSessionUseError",
    "ConfigurationError",
    "DatabaseUnavailableError",
    "FastAPISessionMakerError",
    "MigrationError",
    "NotFoundError",
    "NotInstalledError",
    "ReadOnlySessionError",
    "ResponseStartedError",
    "SessionClosedError",
    "TransactionSettingsError",
]


class FastAPISessionMakerError(Exception):
    """Base class of every exception defined by fastapi-sessionmaker."""


class ConcurrentSessionUseError(FastAPISessionMakerError, RuntimeError):
    """An ``AsyncSession`` was used by a second task while an operation of the first was running.

    A session (like its one connection) runs one operation at a time; ``asyncio.gather`` over one
    session fails in driver-specific ways, so the sessions of the async maker refuse it with this
    error. Give each task its own session: ``async with maker.task_session() as session:``.
    """


class ConfigurationError(FastAPISessionMakerError, ValueError):
    """The database settings cannot work: the message names the variable or the extra to install.

    Raised when the maker is built: it names the argument (``database_uri``) or, for settings
    read from the environment, the variable (``DATABASE_URI``, ``DATABASE_SCHEME``...).

    Example:
        >>> from fastapi_sessionmaker import FastAPISessionMaker
        >>> FastAPISessionMaker("not a url")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        fastapi_sessionmaker.exceptions.ConfigurationError: database_uri is not a valid ...
    """


class DatabaseUnavailableError(FastAPISessionMakerError):
    """The database did not answer the start-up check (``lifespan`` / ``check_connection``).

    The message holds the URL with its password hidden and the driver's error class.
    """


class MigrationError(FastAPISessionMakerError):
    """The start-up step of :class:`fastapi_sessionmaker.alembic.Migrations` refused to start.

    Either the schema is behind the migrations' head in ``mode="check"`` (the message names the
    database's current revision and the head: run ``alembic upgrade head``), or another process
    held the migration lock for longer than ``lock_timeout`` seconds.
    """


class NotFoundError(FastAPISessionMakerError, HTTPException):
    """No row for :func:`~fastapi_sessionmaker.get_or_404` / :func:`~fastapi_sessionmaker.one_or_404`.

    A ``fastapi.HTTPException`` with status 404 and the message as its ``detail``: every FastAPI
    app answers it with a 404; after ``init_app`` the answer is problem JSON
    (``{"type": "about:blank", "title": "Not Found", "status": 404, "detail": ...}``).

    Example:
        >>> NotFoundError("Hero 7 was not found.").status_code
        404
    """

    def __init__(self, detail: str) -> None:
        super().__init__(status_code=404, detail=detail)


class NotInstalledError(FastAPISessionMakerError, RuntimeError):
    """A request session was asked for in an app where ``maker.init_app(app)`` was not called."""


class ReadOnlySessionError(FastAPISessionMakerError, RuntimeError):
    """An ORM flush was attempted in a session opened with ``CommitPolicy.READ_ONLY``."""


class ResponseStartedError(FastAPISessionMakerError, RuntimeError):
    """A write through a request session after its response started (a streaming body).

    The request's session is committed when the status line is sent; what a streaming body (a
    ``StreamingResponse`` generator, an endpoint that ``yield``s) writes afterwards could no longer
    be committed before the response, so it is refused loudly instead of being dropped. Write
    before returning the response, or give the stream its own ``maker.context_session()``.
    """


class SessionClosedError(FastAPISessionMakerError, RuntimeError):
    """``on_commit`` / ``on_rollback`` on a session whose unit of work has already ended."""


class TransactionSettingsError(FastAPISessionMakerError, RuntimeError):
    """``set_local()`` was asked for a setting that cannot be scoped to the transaction.

    Per-transaction settings (``set_config(name, value, true)``) exist on PostgreSQL only:
    MariaDB and MySQL have no transaction-scoped variables and SQLite has no settings, so a
    session on those databases refuses them instead of letting a value outlive its transaction.
    Also raised for an ``AsyncSession`` whose transaction is already open (the setting must be
    applied at once): use ``await session.run_sync(set_local, name, value)``.
    """
