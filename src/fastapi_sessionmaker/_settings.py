"""Database settings read from the environment (pydantic-settings)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, PrivateAttr, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import URL

from fastapi_sessionmaker._urls import parse_url
from fastapi_sessionmaker.exceptions import ConfigurationError

__all__ = ["DatabaseSettings", "env_prefix"]

DEFAULT_NAME = "default"
"""The name of the database read from plain ``DATABASE_*`` variables (and a maker's default name)."""

_MISSING = "{prefix}URI is not set"


def _missing(prefix: str) -> str:
    return (
        f"{prefix}URI is not set: set {prefix}URI (e.g. postgresql://user:password@host:5432/name) "
        f"or {prefix}SCHEME with {prefix}HOST, {prefix}NAME, ..."
    )


def env_prefix(name: str) -> str:
    """The prefix of the variables of the database called ``name``: ``DATABASE_`` for
    ``"default"``, else ``DATABASE_<NAME>_`` (upper case, other characters than letters and
    digits as ``_``): ``"reports"`` reads ``DATABASE_REPORTS_URI``, ``DATABASE_REPORTS_POOL_SIZE``...
    """
    if name == DEFAULT_NAME:
        return "DATABASE_"
    word = re.sub(r"[^0-9A-Za-z]+", "_", name).strip("_").upper()
    if not word:
        raise ConfigurationError(
            f"database name {name!r} cannot name environment variables: use letters, digits or _ "
            "(e.g. name='reports' reads DATABASE_REPORTS_URI)"
        )
    return f"DATABASE_{word}_"


def _one_line(exc: ValidationError, prefix: str) -> str:
    """The validation errors as one line naming each variable; never the values (secrets)."""
    problems = []
    for error in exc.errors(include_input=False, include_url=False):
        cause = error.get("ctx", {}).get("error")
        message = " ".join((str(cause) if isinstance(cause, ValueError) else error["msg"]).split())
        if message == _MISSING:
            message = _missing(prefix)
        location = error["loc"]
        problems.append(f"{prefix}{str(location[0]).upper()}: {message}" if location else message)
    if problems == [_missing(prefix)]:
        return problems[0]
    return "invalid database settings: " + "; ".join(problems)


class DatabaseSettings(BaseSettings):
    """Where the database is and how to pool it, from ``DATABASE_*`` environment variables.

    Give either ``DATABASE_URI`` or its parts (``DATABASE_SCHEME``, ``DATABASE_USER``,
    ``DATABASE_PASSWORD``, ``DATABASE_HOST``, ``DATABASE_PORT``, ``DATABASE_NAME``); pool options are
    ``DATABASE_POOL_SIZE``, ``DATABASE_MAX_OVERFLOW``, ``DATABASE_POOL_TIMEOUT``,
    ``DATABASE_POOL_RECYCLE`` and ``DATABASE_ECHO``; ``DATABASE_PGBOUNCER=transaction`` sets the
    drivers up for PgBouncer in transaction mode (no prepared statements);
    ``DATABASE_TWO_PHASE=true`` turns on two-phase commit for requests that write to this and
    other databases; ``DATABASE_SLOW_QUERY_MS`` and ``DATABASE_SLOW_REQUEST_MS`` turn on the
    slow-query and slow-request log lines (the maker's ``slow_query_ms`` / ``slow_request_ms``).
    Read replicas: ``DATABASE_REPLICA_URIS`` (comma-separated URLs),
    ``DATABASE_REPLICA_MAX_LAG`` (bytes) and ``DATABASE_REPLICA_CHECK_INTERVAL`` (seconds). The
    password is a secret: it never appears in ``repr``, logs or errors. A missing or malformed
    value raises :class:`ConfigurationError` naming the variable. ``DATABASE_URI`` may carry its
    own password; it is masked the same way.

    Several databases: :meth:`named` reads the same variables with the database's name after
    ``DATABASE_`` (``DATABASE_REPORTS_URI``, ``DATABASE_REPORTS_POOL_SIZE``, ...), under the same
    rules and with errors naming those variables; ``FastAPISessionMaker(name="reports")`` does
    that when given no URL.

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
    pgbouncer: Literal["transaction"] | None = None

    replica_uris: SecretStr | None = None
    """Read replicas, comma-separated URLs (``DATABASE_REPLICA_URIS``); see ``replica_urls()``."""
    replica_max_lag: int | None = Field(default=None, ge=0)
    replica_check_interval: float | None = Field(default=None, gt=0)
    two_phase: bool = False

    _prefix: str = PrivateAttr("DATABASE_")

    slow_query_ms: float | None = Field(default=None, ge=0)
    slow_request_ms: float | None = Field(default=None, ge=0)

    def __init__(self, **values: Any) -> None:
        prefix = values.get("_env_prefix") or "DATABASE_"
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigurationError(_one_line(exc, prefix)) from None
        self._prefix = prefix

    @classmethod
    def named(cls, name: str, **values: Any) -> DatabaseSettings:
        """The settings of the database called ``name``, from ``DATABASE_<NAME>_*`` variables.

        ``"default"`` reads the plain ``DATABASE_*`` variables. Keyword ``values`` win over the
        environment, as with the constructor.

        Example:
            >>> import os
            >>> os.environ["DATABASE_REPORTS_URI"] = "postgresql://app:s3cret@reports-db/reports"
            >>> os.environ["DATABASE_REPORTS_POOL_SIZE"] = "3"
            >>> reports = DatabaseSettings.named("reports")
            >>> reports.pool_size, reports.variable("uri")
            (3, 'DATABASE_REPORTS_URI')
            >>> del os.environ["DATABASE_REPORTS_URI"], os.environ["DATABASE_REPORTS_POOL_SIZE"]
        """
        return cls(_env_prefix=env_prefix(name), **values)

    def variable(self, field: str) -> str:
        """The environment variable of ``field``: ``"uri"`` -> ``DATABASE_URI`` (or
        ``DATABASE_REPORTS_URI`` for :meth:`named` settings)."""
        return f"{self._prefix}{field.upper()}"

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
            return parse_url(self.uri.get_secret_value(), variable=self.variable("uri"))
        assert self.scheme is not None
        url = URL.create(
            drivername=self.scheme,
            username=self.user,
            password=self.password.get_secret_value() if self.password else None,
            host=self.host,
            port=self.port,
            database=self.name,
        )
        return parse_url(url, variable=self.variable("scheme"))

    def replica_urls(self) -> list[URL]:
        """The URLs of ``DATABASE_REPLICA_URIS`` (comma-separated; none when unset or empty)."""
        if self.replica_uris is None:
            return []
        parts = [part.strip() for part in self.replica_uris.get_secret_value().split(",")]
        return [parse_url(part, variable=self.variable("replica_uris")) for part in parts if part]

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
