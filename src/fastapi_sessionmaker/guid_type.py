"""``GUID``: a UUID column that works on every database (fastapi-utils compatible).

Native ``UUID`` on PostgreSQL, ``CHAR(32)`` hex elsewhere, so rows written by fastapi-utils stay
readable. Accepts ``uuid.UUID`` and ``str``; always returns ``uuid.UUID``.

Example:
    >>> import sqlalchemy as sa
    >>> metadata = sa.MetaData()
    >>> users = sa.Table(
    ...     "users", metadata, sa.Column("id", GUID, primary_key=True, default=GUID_DEFAULT_SQLITE)
    ... )
"""

from __future__ import annotations

import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.types import CHAR, TypeDecorator, TypeEngine

__all__ = [
    "GUID",
    "GUID_DEFAULT_SQLITE",
    "GUID_SERVER_DEFAULT_POSTGRESQL",
    "async_setup_guids_postgresql",
    "setup_guids_postgresql",
]


class GUID(TypeDecorator[uuid.UUID]):
    """Platform-independent UUID type: ``UUID`` on PostgreSQL, ``CHAR(32)`` hex elsewhere.

    Example:
        >>> things = sa.Table("things", sa.MetaData(), sa.Column("id", GUID, primary_key=True))
        >>> engine = sa.create_engine("sqlite://")
        >>> things.metadata.create_all(engine)
        >>> with engine.begin() as connection:
        ...     _ = connection.execute(things.insert(), {"id": "0b4f1f5e-8a9e-4b1e-9f7a-2f0d3c2c9f11"})
        ...     connection.execute(sa.select(things.c.id)).scalar_one()
        UUID('0b4f1f5e-8a9e-4b1e-9f7a-2f0d3c2c9f11')
        >>> engine.dispose()
    """

    impl = CHAR
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(postgresql.UUID(as_uuid=True))
        return dialect.type_descriptor(CHAR(32))

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        as_uuid = value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))
        if dialect.name == "postgresql":
            return as_uuid
        return f"{as_uuid.int:032x}"

    def process_result_value(self, value: Any, dialect: Dialect) -> uuid.UUID | None:
        if value is None or type(value) is uuid.UUID:
            return value
        if isinstance(value, uuid.UUID):  # asyncpg's own subclass: the same type on every driver
            return uuid.UUID(int=value.int)
        return uuid.UUID(str(value))


GUID_DEFAULT_SQLITE = uuid.uuid4
"""Client-side default for ``GUID`` primary keys (works on every database)."""

GUID_SERVER_DEFAULT_POSTGRESQL = sa.text("gen_random_uuid()")
"""Server-side default for ``GUID`` columns on PostgreSQL; one value serves any number of columns."""

_PGCRYPTO = sa.text('CREATE EXTENSION IF NOT EXISTS "pgcrypto"')


def setup_guids_postgresql(engine: sa.Engine) -> None:
    """Make ``gen_random_uuid()`` available (pgcrypto; built in since PostgreSQL 13).

    Example:
        >>> engine = sa.create_engine("postgresql+psycopg://postgres@127.0.0.1/test")  # doctest: +SKIP
        >>> setup_guids_postgresql(engine)  # doctest: +SKIP
    """
    with engine.begin() as connection:
        connection.execute(_PGCRYPTO)


async def async_setup_guids_postgresql(engine: AsyncEngine) -> None:
    """The async twin of :func:`setup_guids_postgresql`.

    Example:
        >>> from sqlalchemy.ext.asyncio import create_async_engine
        >>> engine = create_async_engine("postgresql+asyncpg://postgres@127.0.0.1/test")  # doctest: +SKIP
        >>> await async_setup_guids_postgresql(engine)  # doctest: +SKIP
    """
    async with engine.begin() as connection:
        await connection.execute(_PGCRYPTO)
