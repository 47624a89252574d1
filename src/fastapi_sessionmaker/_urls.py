"""Database URLs: parsing with one-line errors, the driver each twin fills in, masking secrets."""

from __future__ import annotations

import importlib.util
from urllib.parse import quote, quote_plus

import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url

from fastapi_sessionmaker.exceptions import ConfigurationError

__all__ = [
    "missing_driver",
    "parse_url",
    "render_url",
    "resolve_url",
    "scrub",
    "scrubbed_line",
    "unknown_driver",
    "url_secrets",
]


# The driver used when the URL names none, per (backend, async), with the extra that installs it.
_DEFAULT_DRIVERS: dict[tuple[str, bool], str] = {
    ("postgresql", False): "psycopg",
    ("postgresql", True): "asyncpg",
    ("mysql", False): "pymysql",
    ("mysql", True): "aiomysql",
    ("mariadb", False): "pymysql",
    ("mariadb", True): "aiomysql",
    ("sqlite", False): "pysqlite",
    ("sqlite", True): "aiosqlite",
}
_ASYNC_FALLBACK = {("postgresql", True): "psycopg"}  # psycopg 3 is async too
# The DBAPI module of each driver and the fix when it is missing (an extra, or the package).
_DRIVER_MODULES = {
    "psycopg": ("psycopg", "pip install 'fastapi-sessionmaker[postgres]'"),
    "psycopg2": ("psycopg2", "pip install psycopg2-binary (not an extra)"),
    "pg8000": ("pg8000", "pip install pg8000 (not an extra)"),
    "asyncpg": ("asyncpg", "pip install 'fastapi-sessionmaker[asyncpg]'"),
    "pymysql": ("pymysql", "pip install 'fastapi-sessionmaker[mysql]'"),
    "aiomysql": ("aiomysql", "pip install 'fastapi-sessionmaker[mysql]'"),
    "asyncmy": ("asyncmy", "pip install asyncmy (not an extra)"),
    "mysqldb": ("MySQLdb", "pip install mysqlclient (not an extra)"),
    "mysqlconnector": ("mysql.connector", "pip install mysql-connector-python (not an extra)"),
    "mariadbconnector": ("mariadb", "pip install mariadb (not an extra)"),
    "aiosqlite": ("aiosqlite", "pip install 'fastapi-sessionmaker[aiosqlite]'"),
    "pysqlite": ("sqlite3", "sqlite3 ships with Python: use a Python built with it"),
}
_KNOWN_BACKENDS = ("postgresql", "mysql", "mariadb", "sqlite")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # "mysql.connector" without "mysql"
        return False


# Query keys whose values are secrets (``?password=...`` works with psycopg and PyMySQL).
_SECRET_KEY_PARTS = ("pass", "pwd", "secret", "token", "key", "auth", "credential")
MASK = "***"


def _secret_key(key: str) -> bool:
    lowered = key.lower()
    return any(part in lowered for part in _SECRET_KEY_PARTS)


def _values(value: str | tuple[str, ...]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else value


def url_secrets(url: URL) -> list[str]:
    """The secrets in ``url``: its password and the values of query keys that look secret."""
    secrets = [str(url.password)] if url.password else []
    for key, value in url.query.items():
        if _secret_key(key):
            secrets.extend(v for v in _values(value) if v)
    return secrets


def render_url(url: str | URL) -> str:
    """The one way this package shows a URL: the password and secret-looking query values masked.

    Example:
        >>> render_url("postgresql://app:pw@db:5432/shop?sslpassword=pw2&application_name=api")
        'postgresql://app:***@db:5432/shop?application_name=api&sslpassword=***'
    """
    try:
        parsed = make_url(url)
    except (sa.exc.ArgumentError, ValueError):
        return "<invalid database URL>"
    text = parsed.set(query={}).render_as_string(hide_password=True)
    if parsed.query:
        text += "?" + "&".join(
            f"{quote_plus(key)}={MASK if _secret_key(key) else quote_plus(element)}"
            for key in sorted(parsed.query)
            for element in _values(parsed.query[key])
        )
    return text


def scrub(text: str, url: URL | None) -> str:
    """``text`` with every secret of ``url`` replaced by ``***``, as written or URL-encoded."""
    if url is None:
        return text
    for secret in sorted(url_secrets(url), key=len, reverse=True):
        for form in {secret, quote(secret, safe=""), quote(secret, safe=" +"), quote_plus(secret)}:
            text = text.replace(form, MASK)
    return text


def scrubbed_line(exc: BaseException, url: URL | None) -> str:
    """The first line of ``exc``'s message (``""`` if it has none), with ``url``'s secrets masked."""
    text = str(exc).strip()
    return scrub(text.splitlines()[0] if text else "", url)


# Drivers that only work with one twin: a sync driver under the async maker or the reverse.
_ASYNC_ONLY_DRIVERS = frozenset({"asyncpg", "aiomysql", "asyncmy", "aiosqlite", "psycopg_async"})
_SYNC_ONLY_DRIVERS = frozenset(
    {"psycopg2", "psycopg2cffi", "pg8000", "pymysql", "mysqldb", "mysqlconnector", "mariadbconnector"}
    | {"cymysql", "pysqlite", "pysqlcipher", "pyodbc"}
)


def parse_url(database_uri: str | URL, *, variable: str = "DATABASE_URI") -> URL:
    """Parse ``database_uri`` and check its dialect and port; :class:`ConfigurationError` naming
    ``variable``."""
    try:
        url = make_url(database_uri)
    except (sa.exc.ArgumentError, ValueError):
        # ValueError: e.g. a port that is not a number. Never echo the value: it may hold a password.
        raise ConfigurationError(
            f"{variable} is not a valid database URL (expected e.g. "
            "'postgresql://user:password@host:5432/name' or 'sqlite:///./app.db')"
        ) from None
    backend = url.get_backend_name()
    if backend not in _KNOWN_BACKENDS:
        raise ConfigurationError(
            f"{variable} names an unknown database dialect {backend!r}: use one of "
            + ", ".join(_KNOWN_BACKENDS)
        )
    if url.port is not None and not 1 <= url.port <= 65535:
        raise ConfigurationError(f"{variable} has port {url.port}: a port is a number from 1 to 65535")
    return url


def missing_driver(
    url: URL, module: str | None, *, is_async: bool, variable: str = "DATABASE_URI", hint: str | None = None
) -> ConfigurationError:
    """The one-line error for a driver whose DBAPI module is not installed, naming the fix."""
    backend = url.get_backend_name()
    driver = url.get_driver_name()
    default = _DEFAULT_DRIVERS[(backend, is_async)]
    fix = hint or (f"pip install the package that provides {module!r}" if module else "install it")
    if driver != default:
        fix += f", or use {backend}+{default} (leave the driver out: {backend}://...)"
    what = f"{module!r} is not installed" if module else "its module cannot be imported"
    return ConfigurationError(f"{variable} uses the {backend}+{driver} driver, but {what}: {fix}")


def resolve_url(database_uri: str | URL, *, is_async: bool, variable: str = "DATABASE_URI") -> URL:
    """Parse ``database_uri``, fill in an installed driver when it names none, check the driver.

    ``postgresql://`` becomes ``postgresql+psycopg://`` (sync) or ``postgresql+asyncpg://`` (async,
    psycopg when asyncpg is missing), ``mysql://`` and ``mariadb://`` use PyMySQL / aiomysql and
    ``sqlite://`` aiosqlite when async, so one ``DATABASE_URI`` serves both twins. A driver that
    SQLAlchemy does not know, or whose module is not installed, is a :class:`ConfigurationError`
    naming ``variable`` and the fix, never the URL.
    """
    url = parse_url(database_uri, variable=variable)
    backend = url.get_backend_name()
    driver = url.get_driver_name() if "+" in url.drivername else None
    if driver is None:
        driver = _DEFAULT_DRIVERS[(backend, is_async)]
        fallback = _ASYNC_FALLBACK.get((backend, is_async))
        if fallback and not _installed(_DRIVER_MODULES[driver][0]) and _installed(fallback):
            driver = fallback
        url = url.set(drivername=f"{backend}+{driver}")
    wrong_twin = _SYNC_ONLY_DRIVERS if is_async else _ASYNC_ONLY_DRIVERS
    if driver in wrong_twin:
        kind, maker = (
            ("a sync", "AsyncFastAPISessionMaker") if is_async else ("an async", "FastAPISessionMaker")
        )
        suggested = f"{backend}+{_DEFAULT_DRIVERS[(backend, is_async)]}"
        raise ConfigurationError(
            f"{variable} uses {backend}+{driver}, {kind} driver, with {maker}: use {suggested}, "
            f"or leave the driver out ({backend}://...) and each maker picks its own"
        )
    module_hint = _DRIVER_MODULES.get(driver)
    if module_hint is not None:
        if not _installed(module_hint[0]):
            raise missing_driver(
                url, module_hint[0], is_async=is_async, variable=variable, hint=module_hint[1]
            )
        return url
    # Any other driver: SQLAlchemy must know it, and its DBAPI module must import.
    try:
        dialect = url.get_dialect(_is_async=is_async)
    except sa.exc.NoSuchModuleError:
        raise unknown_driver(url, is_async=is_async, variable=variable) from None
    if is_async and not getattr(dialect, "is_async", False):
        raise ConfigurationError(
            f"{variable} uses {url.drivername!r}, which is not an async driver: use "
            f"{backend}+{_DEFAULT_DRIVERS[(backend, True)]}, or leave the driver out ({backend}://...)"
        )
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        raise missing_driver(url, exc.name, is_async=is_async, variable=variable) from None
    return url


def unknown_driver(url: URL, *, is_async: bool, variable: str = "DATABASE_URI") -> ConfigurationError:
    """The one-line error for a driver SQLAlchemy has no dialect for, naming the usual one."""
    backend = url.get_backend_name()
    suggested = f"{backend}+{_DEFAULT_DRIVERS[(backend, is_async)]}"
    return ConfigurationError(
        f"{variable} names a driver SQLAlchemy does not know: {url.drivername!r}: use {suggested}, "
        f"or leave the driver out ({backend}://...)"
    )
