"""The commit rule and the error -> HTTP mapping, written once for both twins."""

from __future__ import annotations

import errno
import logging
import socket
from dataclasses import dataclass, field
from enum import Enum

import sqlalchemy as sa

logger = logging.getLogger("fastapi_sessionmaker")

__all__ = ["CommitPolicy", "Problem", "default_error_mapper"]


class CommitPolicy(str, Enum):
    """When a request's session commits. The session always closes and its connection goes back.

    ==========================  ===================================================================
    ``AUTO`` (default)          commit before the response when nothing was raised and the status
                                is below 400; otherwise roll back
    ``COMMIT_UNLESS_RAISED``    as ``AUTO``, but a *returned* error response (status >= 400) commits
    ``MANUAL``                  never commit for you: call ``session.commit()``; the rest rolls back
    ``READ_ONLY``               never commit; an ORM flush of changes raises ``ReadOnlySessionError``
    ==========================  ===================================================================

    Example:
        >>> from fastapi_sessionmaker import CommitPolicy, FastAPISessionMaker
        >>> maker = FastAPISessionMaker("sqlite://", policy=CommitPolicy.MANUAL)
        >>> maker.policy.should_commit(status=200, raised=False)
        False
    """

    AUTO = "auto"
    COMMIT_UNLESS_RAISED = "commit_unless_raised"
    MANUAL = "manual"
    READ_ONLY = "read_only"

    def should_commit(self, *, status: int | None, raised: bool) -> bool:
        """Whether a unit of work that ended with ``status`` (None outside HTTP) commits."""
        if raised or self is CommitPolicy.MANUAL or self is CommitPolicy.READ_ONLY:
            return False
        if self is CommitPolicy.AUTO:
            return status is None or status < 400
        return True


@dataclass(frozen=True)
class Problem:
    """An RFC 9457 problem: what a database error becomes at the HTTP edge.

    Example:
        >>> Problem(409, "Conflict", "The request conflicts with data already stored.").status
        409
    """

    status: int
    title: str
    detail: str
    headers: dict[str, str] = field(default_factory=dict)
    type: str = "about:blank"

    def body(self) -> dict[str, object]:
        """The JSON body (``application/problem+json``)."""
        return {
            "type": self.type,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }


_CONNECTION_ERRNOS = frozenset(
    {
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ETIMEDOUT,
        errno.EPIPE,
    }
)


# PostgreSQL SQLSTATEs (besides class 08, connection exception) that mean "not now".
_PG_UNAVAILABLE = frozenset({"53300", "57P01", "57P02", "57P03"})
# MySQL/MariaDB error numbers that mean the server is out of reach or refuses connections.
_MYSQL_UNAVAILABLE = frozenset({1040, 1053, 1152, 1927, 2002, 2003, 2005, 2006, 2013, 2055, 4031})
# SQLite primary result codes: SQLITE_BUSY, SQLITE_LOCKED, SQLITE_CANTOPEN.
_SQLITE_UNAVAILABLE = frozenset({5, 6, 14})


def _operational_unavailable(orig: BaseException | None) -> bool:
    """Whether a driver's ``OperationalError`` is about reaching the database.

    SQLite and the MySQL drivers also raise ``OperationalError`` for mistakes in the SQL (no such
    table, unknown column): those are 500, not "retry later". Errors that carry no code we know
    (psycopg's client-side connection failures carry no SQLSTATE) count as unavailable.
    """
    sqlstate = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if isinstance(sqlstate, str):
        return sqlstate.startswith("08") or sqlstate in _PG_UNAVAILABLE
    if type(orig).__module__.startswith("sqlite3"):
        code = getattr(orig, "sqlite_errorcode", None)
        if isinstance(code, int):
            return code & 0xFF in _SQLITE_UNAVAILABLE
        text = str(orig)  # Python 3.10: no error code on sqlite3 exceptions
        return "database is locked" in text or "unable to open database" in text
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], int):  # PyMySQL, aiomysql, asyncmy: (errno, message)
        return args[0] in _MYSQL_UNAVAILABLE
    return True


def is_connection_error(exc: BaseException) -> bool:
    """True for errors that mean the database is out of reach (retrying later may work).

    Covers SQLAlchemy's pool timeout and disconnect errors and the bare ``OSError`` family that
    asyncpg raises when PostgreSQL is down (SQLAlchemy does not wrap those).
    """
    if isinstance(exc, (sa.exc.TimeoutError, sa.exc.DisconnectionError)):
        return True
    if isinstance(exc, sa.exc.DBAPIError):
        if exc.connection_invalidated or isinstance(exc, sa.exc.InterfaceError):
            return True
        return isinstance(exc, sa.exc.OperationalError) and _operational_unavailable(exc.orig)
    if isinstance(exc, (ConnectionError, TimeoutError, socket.gaierror)):
        return True
    if type(exc) is OSError:
        # asyncpg joins several refused addresses into one "Multiple exceptions: ..." OSError.
        return exc.errno in _CONNECTION_ERRNOS or "Connect call failed" in str(exc)
    return False


def default_error_mapper(exc: BaseException, *, retry_after: int = 1) -> Problem | None:
    """Map a database error to a :class:`Problem`; ``None`` for anything that is not one.

    Integrity violations are 409; connection loss, pool timeout or an unreachable database are
    503 with ``Retry-After``; any other SQLAlchemy error is 500. Messages never contain SQL,
    parameters or the URL.

    Example:
        >>> import sqlalchemy as sa
        >>> default_error_mapper(sa.exc.IntegrityError("INSERT", {}, Exception("dup"))).status
        409
    """
    if isinstance(exc, sa.exc.IntegrityError):
        return Problem(409, "Conflict", "The request conflicts with data already stored.")
    if is_connection_error(exc):
        return Problem(
            503,
            "Service Unavailable",
            "The database is unavailable; retry later.",
            headers={"Retry-After": str(retry_after)},
        )
    if isinstance(exc, sa.exc.SQLAlchemyError):
        return Problem(500, "Internal Server Error", "A database error occurred.")
    return None


def log_mapped(problem: Problem, exc: BaseException, *, method: str, path: str, database: str) -> None:
    """One structured line per mapped error: status, error class, path, database (no secrets)."""
    level = logging.ERROR if problem.status >= 500 and problem.status != 503 else logging.WARNING
    logger.log(
        level,
        "database error mapped to %s: %s on %s %s (database %r)",
        problem.status,
        type(exc).__name__,
        method,
        path,
        database,
        extra={
            "status": problem.status,
            "error_class": type(exc).__name__,
            "path": path,
            "database": database,
        },
    )
