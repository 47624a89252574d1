"""What every benchmark app shares: settings from the environment, the table, the schemas.

Only SQLAlchemy, pydantic and the standard library: each peer's virtualenv imports this file.
"""

from __future__ import annotations

import os

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SYNC_URL = os.environ.get("BENCH_SYNC_URL", "sqlite:///./bench.db")
"""A sync SQLAlchemy URL with its driver (``sqlite:///...``, ``postgresql+psycopg://...``)."""
ASYNC_URL = os.environ.get("BENCH_ASYNC_URL", "sqlite+aiosqlite:///./bench.db")
"""The async URL of the same database (``sqlite+aiosqlite``, ``postgresql+asyncpg``)."""
POOL_SIZE = int(os.environ.get("BENCH_POOL_SIZE", "32"))
MAX_OVERFLOW = int(os.environ.get("BENCH_MAX_OVERFLOW", "10"))
POOL_TIMEOUT = float(os.environ.get("BENCH_POOL_TIMEOUT", "30"))
ENGINE_OPTIONS: dict[str, object] = {
    "pool_size": POOL_SIZE,
    "max_overflow": MAX_OVERFLOW,
    "pool_timeout": POOL_TIMEOUT,
}
"""The same pool for every approach. Dead-connection handling is each library's own default:
ours checks sockets on checkout (no round trip), fastapi-utils turns ``pool_pre_ping`` on (a
``SELECT 1`` per checkout), the tutorial pattern and the other peers have none."""


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(100))
    value: Mapped[int]


class ItemIn(BaseModel):
    name: str
    value: int


class ItemOut(ItemIn):
    model_config = ConfigDict(from_attributes=True)

    id: int
