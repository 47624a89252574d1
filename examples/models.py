"""Tables and schemas of the demo: users (unique e-mail) and their items, with GUID ids."""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from fastapi_sessionmaker import GUID, GUID_DEFAULT_SQLITE


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "demo_users"

    id: Mapped[uuid.UUID] = mapped_column(GUID, primary_key=True, default=GUID_DEFAULT_SQLITE)
    email: Mapped[str] = mapped_column(sa.String(255), unique=True)
    name: Mapped[str] = mapped_column(sa.String(100))


class Item(Base):
    __tablename__ = "demo_items"

    id: Mapped[uuid.UUID] = mapped_column(GUID, primary_key=True, default=GUID_DEFAULT_SQLITE)
    owner_id: Mapped[uuid.UUID] = mapped_column(GUID, sa.ForeignKey("demo_users.id", ondelete="CASCADE"))
    title: Mapped[str] = mapped_column(sa.String(200))


class UserIn(BaseModel):
    email: str
    name: str


class UserOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    email: str
    name: str


class ItemIn(BaseModel):
    title: str


class ItemOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    owner_id: uuid.UUID
    title: str


DEFAULT_DATABASE_URI = "sqlite:///./demo.db"
"""Used when ``DATABASE_URI`` is not set: a SQLite file in the working directory."""
