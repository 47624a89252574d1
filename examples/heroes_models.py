"""The models of FastAPI's SQLModel tutorial ("SQL (Relational) Databases"), unchanged.

``Hero`` is the table; ``HeroPublic``, ``HeroCreate`` and ``HeroUpdate`` are what the API reads
and returns. Used by ``examples/heroes.py`` and its async twin ``examples/async_heroes.py``.
"""

from __future__ import annotations

from sqlmodel import Field, SQLModel

DEFAULT_DATABASE_URI = "sqlite:///./heroes.db"


class HeroBase(SQLModel):
    name: str = Field(index=True)
    age: int | None = Field(default=None, index=True)


class Hero(HeroBase, table=True):
    id: int | None = Field(default=None, primary_key=True)
    secret_name: str


class HeroPublic(HeroBase):
    id: int


class HeroCreate(HeroBase):
    secret_name: str


class HeroUpdate(HeroBase):
    name: str | None = None  # type: ignore[assignment]
    age: int | None = None
    secret_name: str | None = None
