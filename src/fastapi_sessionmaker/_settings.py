"""Database settings read from the environment (pydantic-settings)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import URL

from fastapi_sessionmaker._urls import parse_url
from fastapi_sessionmaker.exceptions import ConfigurationError

__all__ = ["DatabaseSettings"]


_MISSING = (
    "DATABASE_URI is not set: set DATABASE_URI (e.g. postgresql://user:password@host:5432/name) "
    "or DATABASE_SCHEME with DATABASE_HOST, DATABASE_NAME, ..."
)


def _one_line(exc: ValidationError) -> str:
    """The validation errors as one line naming each variable; never the values (secrets)."""
    problems = []
    for error in exc.errors(include_input=False, include_url=False):
        cause = error.get("ctx", {}).get("error")
        message = " ".join((str(cause) if isinstance(cause, ValueError) else error["msg"]).split())
        location = error["loc"]
        problems.append(f"DATABASE_{str(location[0]).upper()}: {message}" if location else message)
    if problems == [_MISSING]:
        return _MISSING
    return "invalid database settings: " + "; ".join(problems)


class DatabaseSettings(BaseSettings):
    """Where the database is and how to pool it, from ``DATABASE_*`` environment variables.

    Give either ``DATABASE_URI`` or its parts (``DATABASE_SCHEME``, ``DATABASE_USER``,
    ``DATABASE_PASSWORD``, ``DATABASE_HOST``, ``DATABASE_PORT``, ``DATABASE_NAME``); pool options are
    ``DATABASE_POOL_SIZE``, ``DATABASE_MAX_OVERFLOW``, ``DATABASE_POOL_TIMEOUT``,
    ``DATABASE_POOL_RECYCLE`` and ``DATABASE_ECHO``; ``DATABASE_SLOW_QUERY_MS`` and
    ``DATABASE_SLOW_REQUEST_MS`` turn on the slow-query and slow-request log lines (see the
    maker's ``slow_query_ms`` and ``slow_request_ms``). The password is a secret: it never appears in
    ``repr``, logs or errors. A missing or malformed value raises :class:`ConfigurationError`
    naming the variable. ``DATABASE_URI`` may carry its own password; it is masked the same way.

    Example:
        >>> settings = DatabaseSettings(uri="postgresql://app:s3cret@db:5432/shop", pool_size=10)
        >>> settings.url().render_as_string(hide_password=True)
        'postgresql://app:***@db:5432/shop'
        >>> "s3cret" in repr(settings)
        False
    """

    model_config = SettingsConfigDict(env_prefix="DATABASE_", extra="ignore", frozen=True)

    uri: SecretStr | None = None
    scheme: str | None = None
    user: str | None = None
    password: SecretStr | None = None
    host: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    name: str | None = None

    pool_size: int | None = None
    max_overflow: int | None = None
    pool_timeout: float | None = None
    pool_recycle: int | None = None
    echo: bool = False

    slow_query_ms: float | None = Field(default=None, ge=0)
    slow_request_ms: float | None = Field(default=None, ge=0)

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigurationError(_one_line(exc)) from None

    @model_validator(mode="after")
    def _uri_or_parts(self) -> DatabaseSettings:
        if self.uri is None and self.scheme is None:
            raise ValueError(_MISSING)
        return self

    def url(self) -> URL:
        """The SQLAlchemy URL: ``DATABASE_URI``, or one built from the parts.

        The driver is filled in later, by the maker that uses it (sync or async).
        """
        if self.uri is not None:
            return parse_url(self.uri.get_secret_value(), variable="DATABASE_URI")
        assert self.scheme is not None
        url = URL.create(
            drivername=self.scheme,
            username=self.user,
            password=self.password.get_secret_value() if self.password else None,
            host=self.host,
            port=self.port,
            database=self.name,
        )
        return parse_url(url, variable="DATABASE_SCHEME")

    def engine_options(self) -> dict[str, Any]:
        """Pool options that were set, as ``create_engine`` keyword arguments."""
        options: dict[str, Any] = {
            key: value
            for key in ("pool_size", "max_overflow", "pool_timeout", "pool_recycle")
            if (value := getattr(self, key)) is not None
        }
        if self.echo:
            options["echo"] = True
        return options
