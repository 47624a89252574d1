"""Models shared by the tests: users with a GUID id and a unique e-mail, and their items."""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from fastapi_sessionmaker import GUID, GUID_DEFAULT_SQLITE


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "fsm_users"

    id: Mapped[uuid.UUID] = mapped_column(GUID, primary_key=True, default=GUID_DEFAULT_SQLITE)
    email: Mapped[str] = mapped_column(sa.String(120), unique=True)
    name: Mapped[str] = mapped_column(sa.String(120), default="")


def reset_tables(engine: sa.Engine) -> None:
    """Drop and create the test tables."""
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)


def stored_emails(engine: sa.Engine) -> list[str]:
    """The e-mails stored, read on a fresh connection."""
    with engine.connect() as connection:
        return sorted(connection.scalars(sa.select(User.email)))
