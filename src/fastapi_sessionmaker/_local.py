"""Per-transaction settings: ``SET LOCAL`` values and a schema map that never outlive a transaction.

:func:`set_local` gives a session a PostgreSQL setting (``app.tenant_id = 42``) that holds for
**every** transaction the session runs: it is applied with ``SELECT set_config(:name, :value,
true)`` (bound parameters, one round trip for all the session's settings) when each transaction
begins, from SQLAlchemy's ``after_begin`` session event, and at once in a transaction already
open. ``true`` makes the value transaction-scoped (``SET LOCAL``): PostgreSQL drops it at COMMIT
or ROLLBACK, so it cannot outlive the transaction on a pooled connection, and it works behind
PgBouncer in transaction mode, where a session-level ``SET`` would stay on a server connection that
the next transaction of another client gets. A request session's later reads (a streaming body runs
each in a short transaction of its own) get the settings too.

MariaDB / MySQL have no transaction-scoped variables and SQLite has no settings at all:
:func:`set_local` refuses them with :class:`~fastapi_sessionmaker.exceptions.TransactionSettingsError`
(a session variable would have to be reset before the connection goes back to the pool, and a
connection that skips the reset would hand the tenant to the next request).

:func:`use_schemas` gives a session its own ``schema_translate_map`` (a schema per tenant), set
on each connection the session takes, for as long as the session holds it; no I/O, any database.

Savepoints (``begin_nested``) inherit the enclosing transaction's settings: nothing is re-applied.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session, SessionTransaction

from fastapi_sessionmaker import _compat
from fastapi_sessionmaker.exceptions import TransactionSettingsError

__all__ = ["set_local", "use_schemas"]

_KEY = "fastapi_sessionmaker.local"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")
_DIALECTS = ("postgresql",)

SettingValue = str | int | float | uuid.UUID


class _Local:
    """What one session applies to each transaction it begins (kept in ``session.info``)."""

    __slots__ = ("restore", "schemas", "settings", "statement")

    def __init__(self) -> None:
        self.settings: dict[str, str] = {}
        self.statement: sa.Select[Any] | None = None
        self.schemas: dict[str | None, str | None] | None = None
        self.restore: list[tuple[sa.Connection, Any]] = []


def _sync(session: Session | AsyncSession) -> Session:
    if isinstance(session, AsyncSession):
        return session.sync_session
    if not isinstance(session, Session):
        raise TypeError(f"expected a Session or an AsyncSession, got {type(session).__name__}")
    return session


def _local(session: Session) -> _Local:
    local = session.info.get(_KEY)
    if local is None:
        local = session.info[_KEY] = _Local()
        sa.event.listen(session, "after_begin", _after_begin)
    assert isinstance(local, _Local)
    return local


def _refuse(dialect: str, name: str) -> TransactionSettingsError:
    if dialect in ("mysql", "mariadb"):
        why = (
            "MariaDB and MySQL have no transaction-scoped variables (a session variable would "
            "outlive the transaction on the pooled connection)"
        )
    else:
        why = f"{dialect} has no per-transaction settings"
    return TransactionSettingsError(
        f"set_local(session, {name!r}, ...) needs PostgreSQL: {why}. Filter by tenant in your "
        "queries on this database, or give each tenant its own schema with use_schemas()"
    )


def _check_dialect(bind: Any, name: str) -> None:
    dialect = bind.dialect.name
    if dialect not in _DIALECTS:
        raise _refuse(dialect, name)


def _settings_statement(settings: Mapping[str, str]) -> sa.Select[Any]:
    columns = [
        sa.func.set_config(
            sa.bindparam(f"fsm_name_{i}", name, type_=sa.Text),
            sa.bindparam(f"fsm_value_{i}", value, type_=sa.Text),
            sa.true(),
        ).label(f"fsm_{i}")
        for i, (name, value) in enumerate(settings.items())
    ]
    return sa.select(*columns)


def _apply_settings(local: _Local, connection: sa.Connection) -> None:
    if local.statement is not None:
        _check_dialect(connection, next(iter(local.settings)))
        connection.execute(local.statement)


def _apply_schemas(session: Session, local: _Local, connection: sa.Connection) -> None:
    if connection is session.bind and not any(c is connection for c, _ in local.restore):
        # A connection the session was given (a test's, joined): it outlives the session, so its
        # own map comes back when the session's transaction ends.
        local.restore.append((connection, connection.get_execution_options().get("schema_translate_map")))
        if not sa.event.contains(session, "after_transaction_end", _after_transaction_end):
            sa.event.listen(session, "after_transaction_end", _after_transaction_end)
    connection.execution_options(schema_translate_map=local.schemas)


def _after_begin(session: Session, transaction: SessionTransaction, connection: sa.Connection) -> None:
    if transaction.nested:
        return  # a savepoint: the enclosing transaction has the settings already
    local = session.info.get(_KEY)
    if not isinstance(local, _Local):
        return
    if local.schemas is not None:
        _apply_schemas(session, local, connection)
    _apply_settings(local, connection)


def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    local = session.info.get(_KEY)
    if transaction.parent is not None or not isinstance(local, _Local):
        return
    restore, local.restore = local.restore, []
    for connection, previous in restore:
        if not connection.closed:
            connection.execution_options(schema_translate_map=previous)


def _bind(session: Session) -> Any:
    try:
        return session.get_bind()
    except sa.exc.UnboundExecutionError:
        return None  # binds per mapper or table: each connection is checked when it is taken


def set_local(session: Session | AsyncSession, name: str, value: SettingValue) -> None:
    """Run every transaction of ``session`` with the PostgreSQL setting ``name = value``.

    ``SET LOCAL`` semantics: applied with ``set_config(name, value, true)`` (bound parameters)
    at the start of each transaction the session begins, and at once if one is open, so the
    value never outlives a transaction on a pooled connection (PgBouncer's transaction mode
    included). Call it from a dependency, before the endpoint runs, to scope a request to a
    tenant for row-level security policies on ``current_setting('app.tenant_id', true)``.
    Calling it again with the same name replaces the value from then on.

    Args:
        session: A ``Session`` or an ``AsyncSession`` (a request session or any other).
        name: A setting name: a dotted identifier such as ``app.tenant_id`` (or a built-in one,
            ``statement_timeout``); anything else is a ``ValueError``.
        value: Converted with ``str()``; ``None`` is a ``TypeError`` (an unknown tenant must not
            silently mean "no tenant").

    Raises:
        TransactionSettingsError: The session's database is not PostgreSQL (MariaDB, MySQL and
            SQLite have no transaction-scoped settings), or an ``AsyncSession``'s transaction is
            already open: then run it in the session's greenlet with
            ``await session.run_sync(set_local, name, value)``.

    Example:
        >>> from sqlalchemy.orm import Session
        >>> from fastapi_sessionmaker import set_local
        >>> session = Session()  # in an app: the request's session, in a dependency
        >>> set_local(session, "app.tenant_id", 42)
        >>> set_local(session, "app.tenant; DROP TABLE t", 1)
        Traceback (most recent call last):
        ...
        ValueError: set_local(): 'app.tenant; DROP TABLE t' is not a setting name ...
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"set_local(): {name!r} is not a setting name (a dotted identifier such as app.tenant_id)"
        )
    if value is None:
        raise TypeError(f"set_local(session, {name!r}, None): pass the value to set (a str or a number)")
    target = _sync(session)
    bind = _bind(target)
    if bind is not None:
        _check_dialect(bind, name)
    connections = _compat.transaction_connections(target) if target.in_transaction() else []
    if connections and target is not session:
        raise TransactionSettingsError(
            f"set_local(session, {name!r}, ...): this AsyncSession's transaction is already open, "
            f"so the setting must be applied now, in the session's greenlet: use `await "
            f"session.run_sync(set_local, {name!r}, value)` (or call set_local before the first "
            "statement, e.g. in a dependency)"
        )
    local = _local(target)
    local.settings[name] = str(value)
    local.statement = _settings_statement(local.settings)
    if connections:
        statement = _settings_statement({name: str(value)})
        for connection in connections:
            _check_dialect(connection, name)
            target.execute(statement, bind_arguments={"bind": connection})


def use_schemas(session: Session | AsyncSession, schemas: Mapping[str | None, str | None]) -> None:
    """Give ``session`` its own ``schema_translate_map``: a schema per tenant, for this session only.

    Every connection the session takes from then on (and the one it holds now) renders table
    schemas through ``schemas`` (``{None: "tenant_a"}``: tables without a schema are read and
    written in ``tenant_a``), for as long as the session holds it; other sessions, and the
    pooled connection afterwards, are untouched. No I/O: works the same for sync and async
    sessions, on any database. Call it before the session loads objects: objects already in
    the session came from the schemas of before.

    Args:
        session: A ``Session`` or an ``AsyncSession``.
        schemas: SQLAlchemy's ``schema_translate_map``: schema (``None`` for the default) to
            schema; an empty mapping translates nothing.

    Example:
        >>> from sqlalchemy.orm import Session
        >>> from fastapi_sessionmaker import use_schemas
        >>> session = Session()  # in an app: the request's session, in a dependency
        >>> use_schemas(session, {None: "tenant_a"})
    """
    for key, schema in schemas.items():
        if not isinstance(key, str | None) or not isinstance(schema, str | None):
            raise TypeError(f"use_schemas(): schema names are str or None, got {key!r}: {schema!r}")
    target = _sync(session)
    local = _local(target)
    local.schemas = dict(schemas)
    if target.in_transaction():
        for connection in _compat.transaction_connections(target):
            _apply_schemas(target, local, connection)
