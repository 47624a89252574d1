"""The PgBouncer preset: driver options under which PostgreSQL drivers work behind PgBouncer in
transaction mode (``pgbouncer="transaction"``, ``DATABASE_PGBOUNCER=transaction``).

In transaction mode PgBouncer hands each transaction to whichever server connection is free, so
anything a driver keeps on a server connection between transactions can go missing or meet another
client. Prepared statements do both: asyncpg's statement cache fails (``prepared statement
"__asyncpg_stmt_6__" does not exist``), and psycopg's automatic preparation (after 5 executions)
can run *another client's* statement of the same name and return its rows without any error. The
preset turns both off and refuses startup parameters PgBouncer would reject.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from sqlalchemy.engine import URL

from fastapi_sessionmaker.exceptions import ConfigurationError

__all__ = ["PGBOUNCER_MODES", "PgBouncerMode", "check_pgbouncer", "pgbouncer_options"]

PgBouncerMode = Literal["transaction"]
PGBOUNCER_MODES: tuple[PgBouncerMode, ...] = ("transaction",)

# What each driver must be told; SQLAlchemy passes ``connect_args`` to the driver's connect().
_DRIVER_CONNECT_ARGS: dict[str, dict[str, Any]] = {
    # asyncpg's own statement cache, and SQLAlchemy's cache of asyncpg prepared statements.
    "asyncpg": {"statement_cache_size": 0, "prepared_statement_cache_size": 0},
    # psycopg 3 prepares a query server-side after 5 executions; None: never.
    "psycopg": {"prepare_threshold": None},
    "psycopg_async": {"prepare_threshold": None},
}
# The startup parameters PgBouncer 1.18 passes on; any other one fails the connection
# ("unsupported startup parameter") unless the server's ignore_startup_parameters lists it.
_ACCEPTED_STARTUP = frozenset(
    {"application_name", "client_encoding", "datestyle", "timezone", "standard_conforming_strings"}
)


def check_pgbouncer(mode: str | None, url: URL, *, variable: str = "database_uri") -> PgBouncerMode | None:
    """``mode`` checked against ``url``: ``None`` (no PgBouncer) or ``"transaction"``.

    A mode other than ``"transaction"``, a URL that is not PostgreSQL, or a driver the preset does
    not know is a one-line :class:`ConfigurationError` saying what to do.
    """
    if mode is None:
        return None
    if mode not in PGBOUNCER_MODES:
        raise ConfigurationError(
            f"pgbouncer={mode!r} is not a PgBouncer preset: use 'transaction' (PgBouncer's "
            "pool_mode = transaction), or leave it unset (session mode and direct connections "
            "need no preset)"
        )
    backend = url.get_backend_name()
    if backend != "postgresql":
        raise ConfigurationError(
            f"pgbouncer='transaction' is for PostgreSQL, but {variable} is a {backend} URL: "
            "unset pgbouncer (DATABASE_PGBOUNCER) for this database"
        )
    driver = url.get_driver_name()
    if driver not in _DRIVER_CONNECT_ARGS:
        raise ConfigurationError(
            f"pgbouncer='transaction' supports the psycopg and asyncpg drivers, but {variable} "
            f"uses postgresql+{driver}: use postgresql+psycopg or postgresql+asyncpg (or leave the "
            "driver out: postgresql://...)"
        )
    return "transaction"


def _refuse_startup_parameters(names: list[str], where: str) -> None:
    rejected = sorted(name for name in names if name.lower() not in _ACCEPTED_STARTUP)
    if rejected:
        example = rejected[0] if rejected[0] != "options" else "<name>"
        raise ConfigurationError(
            f"{where} sets {', '.join(rejected)}, which PgBouncer rejects as a startup parameter "
            f"(pgbouncer='transaction'): set it on the server with ALTER ROLE <user> SET {example} "
            f"= ... (or ALTER DATABASE), or per transaction with set_local()"
        )


def pgbouncer_options(
    url: URL, options: Mapping[str, Any], mode: str | None, *, variable: str = "database_uri"
) -> dict[str, Any]:
    """``create_engine`` keyword arguments ``options`` adjusted for PgBouncer in ``mode``.

    Sets the driver's ``connect_args`` (asyncpg: ``statement_cache_size=0`` and
    ``prepared_statement_cache_size=0``; psycopg: ``prepare_threshold=None``) and keeps the normal
    pool. A value the caller set that would bring prepared statements back, or a startup parameter
    PgBouncer rejects (asyncpg ``server_settings`` other than ``application_name``,
    ``client_encoding``, ``datestyle``, ``timezone``, ``standard_conforming_strings``; libpq's
    ``options``), is a :class:`ConfigurationError` that says what to do: nothing is dropped
    silently (a dropped ``search_path`` would run queries in another schema).
    """
    kwargs = dict(options)
    if check_pgbouncer(mode, url, variable=variable) is None:
        return kwargs
    driver = url.get_driver_name()
    connect_args = dict(kwargs.get("connect_args") or {})
    for key, value in _DRIVER_CONNECT_ARGS[driver].items():
        given = connect_args.get(key, value)
        if given != value:
            raise ConfigurationError(
                f"engine_options connect_args {key}={given!r} brings prepared statements back, "
                f"which break behind PgBouncer in transaction mode: remove it (the preset sets "
                f"{key}={value!r})"
            )
        connect_args[key] = value
    if driver == "asyncpg":
        _refuse_startup_parameters(list(connect_args.get("server_settings") or {}), "server_settings")
    else:
        if "options" in connect_args:
            _refuse_startup_parameters(["options"], "engine_options connect_args")
        if "options" in url.query:
            _refuse_startup_parameters(["options"], variable)
    kwargs["connect_args"] = connect_args
    return kwargs
