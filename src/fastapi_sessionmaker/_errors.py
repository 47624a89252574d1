"""Database errors: classification by driver code (SQLSTATE, error number), the error -> HTTP mapping,
and the one log line of every mapped error."""

from __future__ import annotations

import errno
import json
import logging
import socket
from dataclasses import dataclass, field

import sqlalchemy as sa
from starlette.responses import Response
from starlette.types import Send

logger = logging.getLogger("fastapi_sessionmaker")

__all__ = [
    "Problem",
    "classify",
    "default_error_mapper",
    "error_code",
    "is_connection_error",
    "is_integrity_error",
    "is_retryable",
    "log_mapped",
    "problem_response",
    "send_problem",
]


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


# PostgreSQL SQLSTATEs (besides class 08, connection exception) that mean "not now": too many
# connections, admin / crash shutdown, the server is starting up or shutting down.
_PG_UNAVAILABLE = frozenset({"53300", "57P01", "57P02", "57P03"})
# MySQL/MariaDB error numbers that mean the server is out of reach or refuses connections.
_MYSQL_UNAVAILABLE = frozenset({1040, 1053, 1152, 1203, 1226, 1927, 2002, 2003, 2005, 2006, 2013, 2055, 4031})
# MySQL/MariaDB error numbers of integrity violations: duplicate key, foreign key, NOT NULL, CHECK.
# PyMySQL raises some of them as OperationalError (MariaDB's CHECK failure, 4025) or InternalError.
_MYSQL_INTEGRITY = frozenset(
    {1022, 1048, 1062, 1169, 1216, 1217, 1451, 1452, 1557, 1586, 1761, 1762, 3819, 4025}
)
# Serialization failures and deadlocks: the database rolled the transaction back so that another one
# could go on. The same transaction, run again from the start, normally succeeds. PostgreSQL:
# serialization_failure, deadlock_detected (whatever the driver's class: psycopg raises
# OperationalError, asyncpg a plain DBAPIError). MySQL/MariaDB: 1213 deadlock (also Galera's
# certification failure), 1020 "record has changed since last read" (MariaDB's REPEATABLE READ
# under innodb_snapshot_isolation, "try restarting transaction").
_PG_RETRYABLE = frozenset({"40001", "40P01"})
_MYSQL_RETRYABLE = frozenset({1020, 1213})
# Lock wait timeouts: MySQL/MariaDB 1205 (innodb_lock_wait_timeout), PostgreSQL 55P03
# (lock_timeout, NOWAIT). Not retried: the transaction that holds the lock is still there, so a
# retry waits the whole timeout again (50 s by default on InnoDB), and InnoDB rolls back only the
# statement, not the transaction. Busy rather than broken: 503 at the HTTP edge.
_MYSQL_LOCK_TIMEOUT = frozenset({1205})
_PG_LOCK_TIMEOUT = frozenset({"55P03"})
# A write sent to a read-only transaction: a hot standby (a read replica) or SET TRANSACTION READ ONLY.
_PG_READ_ONLY = frozenset({"25006"})
# SQLite primary result codes: SQLITE_BUSY, SQLITE_LOCKED, SQLITE_CANTOPEN; SQLITE_CONSTRAINT.
_SQLITE_UNAVAILABLE = frozenset({5, 6, 14})
_SQLITE_CONSTRAINT = 19

UNAVAILABLE = "unavailable"
INTEGRITY = "integrity"
RETRYABLE = "retryable"
LOCK_TIMEOUT = "lock_timeout"
READ_ONLY = "read_only"
OTHER = "other"


def _sqlstate(orig: BaseException | None) -> str | None:
    """The SQLSTATE a driver's exception carries (psycopg, asyncpg and its SQLAlchemy adapter).

    SQLAlchemy's asyncpg adapter copies it to ``sqlstate`` / ``pgcode``; the asyncpg exception
    itself (``__cause__``) has ``sqlstate`` too. MySQL's generic ``HY000`` says nothing.
    """
    for candidate in (orig, getattr(orig, "__cause__", None)):
        for name in ("sqlstate", "pgcode"):
            code = getattr(candidate, name, None)
            if isinstance(code, str) and len(code) == 5 and code != "HY000":
                return code.upper()
    return None


def _mysql_errno(orig: BaseException | None) -> int | None:
    """The MySQL/MariaDB error number: ``args[0]`` (PyMySQL, aiomysql, asyncmy, mysqlclient) or
    ``errno`` (mysql-connector, MariaDB Connector/Python)."""
    if isinstance(orig, OSError):  # its args[0] is an errno, not a MySQL error number
        return None
    if type(orig).__module__.split(".")[0] in {"mysql", "mariadb"}:
        code = getattr(orig, "errno", None)
        if isinstance(code, int):
            return code
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], int) and not isinstance(args[0], bool):
        return args[0]
    return None


def _sqlite_kind(orig: BaseException | None) -> str:
    code = getattr(orig, "sqlite_errorcode", None)
    if isinstance(code, int):
        primary = code & 0xFF
        if primary == _SQLITE_CONSTRAINT:
            return INTEGRITY
        return UNAVAILABLE if primary in _SQLITE_UNAVAILABLE else OTHER
    text = str(orig)  # Python 3.10: no error code on sqlite3 exceptions
    if "database is locked" in text or "unable to open database" in text:
        return UNAVAILABLE
    return INTEGRITY if "constraint failed" in text else OTHER


def classify(orig: BaseException | None) -> str | None:
    """What a driver's exception means by its code, whatever its class: ``"unavailable"``,
    ``"integrity"``, ``"retryable"`` (serialization failure, deadlock), ``"lock_timeout"``,
    ``"read_only"`` (SQLSTATE 25006: a write on a hot standby), ``"other"``, or ``None`` when it
    carries no code this package knows.

    SQLite's result code decides for sqlite3 / aiosqlite; a MySQL/MariaDB error number we know
    comes before the SQLSTATE (MySQL's SQLSTATEs are coarse: ``42000`` is also "too many
    connections for this user"); then the SQLSTATE (class 08, 53300, 57P01-57P03: unavailable;
    class 23: integrity; 40001, 40P01: retryable; 55P03: lock timeout), from psycopg, asyncpg or
    the MySQL drivers.

    Example:
        >>> import sqlite3
        >>> classify(sqlite3.OperationalError("database is locked"))
        'unavailable'
    """
    if type(orig).__module__.startswith("sqlite3"):
        return _sqlite_kind(orig)
    errno_ = _mysql_errno(orig)
    if errno_ in _MYSQL_UNAVAILABLE:
        return UNAVAILABLE
    if errno_ in _MYSQL_INTEGRITY:
        return INTEGRITY
    if errno_ in _MYSQL_RETRYABLE:
        return RETRYABLE
    if errno_ in _MYSQL_LOCK_TIMEOUT:
        return LOCK_TIMEOUT
    sqlstate = _sqlstate(orig)
    if sqlstate is not None:
        if sqlstate.startswith("08") or sqlstate in _PG_UNAVAILABLE:
            return UNAVAILABLE
        if sqlstate in _PG_RETRYABLE:
            return RETRYABLE
        if sqlstate in _PG_LOCK_TIMEOUT:
            return LOCK_TIMEOUT
        if sqlstate in _PG_READ_ONLY:
            return READ_ONLY
        return INTEGRITY if sqlstate.startswith("23") else OTHER
    return None if errno_ is None else OTHER


def error_code(exc: BaseException) -> str | None:
    """The driver's code of ``exc`` as text, for logs: the MySQL/MariaDB error number, else the
    SQLSTATE; ``None`` when it carries neither (nothing else of the error: no SQL, no parameters).

    Example:
        >>> import sqlalchemy as sa
        >>> import pymysql
        >>> deadlock = pymysql.err.OperationalError(1213, "Deadlock found")
        >>> error_code(sa.exc.OperationalError("SELECT 1", {}, deadlock))
        '1213'
    """
    orig = exc.orig if isinstance(exc, sa.exc.DBAPIError) else exc
    number = _mysql_errno(orig)
    return str(number) if number is not None else _sqlstate(orig)


_DRIVER_PACKAGES = frozenset(
    {"asyncpg", "psycopg", "psycopg2", "pg8000", "pymysql", "aiomysql", "asyncmy", "MySQLdb"}
    | {"mysql", "mariadb", "sqlite3", "aiosqlite"}
)


def _driver_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a driver's own exception that SQLAlchemy did not wrap.

    asyncpg's connection-time server errors (``TooManyConnectionsError``, ``CannotConnectNowError``)
    escape unwrapped on some Python versions.
    """
    return type(exc).__module__.split(".")[0] in _DRIVER_PACKAGES and not isinstance(exc, OSError)


def is_integrity_error(exc: BaseException) -> bool:
    """True for integrity violations (unique, foreign key, NOT NULL, CHECK): the class or the code.

    ``IntegrityError`` always is; any other ``DBAPIError`` is when the driver's code says so
    (SQLSTATE class 23, MySQL 1062 / 1451 / 1452 / 4025..., SQLite ``SQLITE_CONSTRAINT``).
    """
    if isinstance(exc, sa.exc.IntegrityError):
        return True
    if isinstance(exc, sa.exc.DBAPIError):
        return classify(exc.orig) == INTEGRITY
    return _driver_error(exc) and classify(exc) == INTEGRITY


def _code_kind(exc: BaseException) -> str | None:
    """:func:`classify` of a wrapped driver error's ``orig``, or of a driver error SQLAlchemy did
    not wrap; ``None`` for anything else."""
    if isinstance(exc, sa.exc.DBAPIError):
        return classify(exc.orig)
    return classify(exc) if _driver_error(exc) else None


def is_retryable(exc: BaseException) -> bool:
    """True for a serialization failure or a deadlock: the database rolled the transaction back so
    that a concurrent one could go on, and the whole transaction, run again, normally succeeds.

    Decided by the driver's code, whatever class SQLAlchemy gave the error (psycopg raises
    ``OperationalError``, asyncpg a plain ``DBAPIError``; asyncpg's own exception unwrapped counts
    too): SQLSTATE 40001 (serialization failure) and 40P01 (deadlock), MySQL/MariaDB 1213
    (deadlock, also Galera's certification failure) and 1020 (MariaDB's "record has changed since
    last read" under ``innodb_snapshot_isolation``). A lock wait timeout (MySQL 1205, PostgreSQL
    55P03) is *not* retryable: the transaction holding the lock is still there, so a retry would
    wait the whole timeout again (50 s by default on InnoDB). Integrity violations never are.

    Example:
        >>> import psycopg
        >>> import sqlalchemy as sa
        >>> is_retryable(sa.exc.OperationalError("UPDATE ...", {}, psycopg.errors.SerializationFailure()))
        True
        >>> is_retryable(sa.exc.IntegrityError("INSERT ...", {}, psycopg.errors.UniqueViolation()))
        False
    """
    if isinstance(exc, sa.exc.IntegrityError):
        return False
    return _code_kind(exc) == RETRYABLE


def is_connection_error(exc: BaseException) -> bool:
    """True for errors that mean the database is out of reach (retrying later may work).

    Covers SQLAlchemy's pool timeout and disconnect errors, any ``DBAPIError`` (whatever its
    class: asyncpg's server errors arrive as a plain ``DBAPIError``) whose SQLSTATE or error number
    says so, and the bare ``OSError`` family that asyncpg raises when PostgreSQL is down
    (SQLAlchemy does not wrap those). An ``OperationalError`` without a code we know (psycopg's
    client-side connection failures) counts as unavailable.
    """
    if isinstance(exc, (sa.exc.TimeoutError, sa.exc.DisconnectionError)):
        return True
    if isinstance(exc, sa.exc.DBAPIError):
        if exc.connection_invalidated or isinstance(exc, sa.exc.InterfaceError):
            return True
        kind = classify(exc.orig)
        if kind is None:
            return isinstance(exc, sa.exc.OperationalError)
        return kind == UNAVAILABLE
    if _driver_error(exc):
        return classify(exc) == UNAVAILABLE
    if isinstance(exc, (ConnectionError, TimeoutError, socket.gaierror)):
        return True
    if type(exc) is OSError:
        # asyncpg joins several refused addresses into one "Multiple exceptions: ..." OSError.
        return exc.errno in _CONNECTION_ERRNOS or "Connect call failed" in str(exc)
    return False


def default_error_mapper(exc: BaseException, *, retry_after: int = 1) -> Problem | None:
    """Map a database error to a :class:`Problem`; ``None`` for anything that is not one.

    Integrity violations are 409; connection loss, pool timeout or an unreachable database are
    503 with ``Retry-After``; a serialization failure or deadlock (:func:`is_retryable`) that no
    retry absorbed, and a lock wait timeout, are 503 with ``Retry-After`` too; a write in a read-only
    transaction (SQLSTATE 25006, e.g. on a read replica) is 500 saying so; any other
    SQLAlchemy error is 500. A driver error is classified by its SQLSTATE or error number,
    whatever class SQLAlchemy gave it (see :func:`classify`), also when SQLAlchemy did not wrap it
    (asyncpg's connection-time errors on some Pythons). Messages never contain SQL, parameters or
    the URL.

    Why 503 and not 409 for a serialization failure or deadlock: 409 already says "this request
    conflicts with data already stored", which sending it again will not change (clients do not
    retry a 409). A serialization failure or deadlock is transient: the transaction was rolled
    back (nothing was stored, so resending is safe, even a ``POST``) and the same request, sent
    again, normally succeeds. 503 with ``Retry-After`` is the status HTTP defines for "not now,
    try again after", which generic clients already act on (urllib3's ``Retry`` honours
    ``Retry-After`` on 503), and it is logged as a warning, not as a server error.

    Example:
        >>> import sqlalchemy as sa
        >>> default_error_mapper(sa.exc.IntegrityError("INSERT", {}, Exception("dup"))).status
        409
    """
    if is_integrity_error(exc):
        return Problem(409, "Conflict", "The request conflicts with data already stored.")
    kind = _code_kind(exc)
    if kind in (RETRYABLE, LOCK_TIMEOUT):
        detail = (
            "The transaction conflicted with a concurrent one and was rolled back; retry the request."
            if kind == RETRYABLE
            else "The database waited too long for a lock and the transaction was rolled back; retry later."
        )
        return Problem(503, "Service Unavailable", detail, headers={"Retry-After": str(retry_after)})
    if kind == READ_ONLY:
        return Problem(
            500,
            "Internal Server Error",
            "The request tried to write in a read-only transaction (a read replica, or a session "
            "under CommitPolicy.READ_ONLY); nothing was stored: write in a session that can.",
        )
    if is_connection_error(exc):
        return Problem(
            503,
            "Service Unavailable",
            "The database is unavailable; retry later.",
            headers={"Retry-After": str(retry_after)},
        )
    if isinstance(exc, sa.exc.SQLAlchemyError) or _driver_error(exc):
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


def _encoded(problem: Problem) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    body = json.dumps(problem.body()).encode()
    headers = [
        (b"content-type", b"application/problem+json"),
        (b"content-length", str(len(body)).encode()),
    ]
    headers.extend((k.lower().encode(), v.encode()) for k, v in problem.headers.items())
    return body, headers


async def send_problem(send: Send, problem: Problem) -> None:
    """Send ``problem`` as a complete ``application/problem+json`` response on the ASGI ``send``."""
    body, headers = _encoded(problem)
    await send({"type": "http.response.start", "status": problem.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def problem_response(problem: Problem) -> Response:
    """``problem`` as a Starlette response (for an exception handler), as :func:`send_problem` sends it."""
    body, headers = _encoded(problem)
    response = Response(body, status_code=problem.status)
    response.raw_headers = headers
    return response
