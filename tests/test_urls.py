"""``_urls``: the pure URL rules (no database, no maker), one case per rule."""

from __future__ import annotations

import re

import pytest

from fastapi_sessionmaker import ConfigurationError
from fastapi_sessionmaker._urls import parse_url, render_url, resolve_url, scrub, url_secrets

DRIVERLESS = {
    ("postgresql://u@h/db", False): "postgresql+psycopg",
    ("postgresql://u@h/db", True): "postgresql+asyncpg",
    ("mysql://u@h/db", False): "mysql+pymysql",
    ("mysql://u@h/db", True): "mysql+aiomysql",
    ("mariadb://u@h/db", False): "mariadb+pymysql",
    ("sqlite:///./a.db", False): "sqlite+pysqlite",
    ("sqlite:///./a.db", True): "sqlite+aiosqlite",
}


@pytest.mark.parametrize(("uri", "is_async"), list(DRIVERLESS))
def test_each_twin_fills_in_its_own_driver(uri: str, is_async: bool) -> None:
    assert resolve_url(uri, is_async=is_async).drivername == DRIVERLESS[(uri, is_async)]


@pytest.mark.parametrize(
    ("uri", "is_async", "fix"),
    [
        ("postgresql+asyncpg://u@h/db", False, "postgresql+psycopg"),
        ("mysql+pymysql://u@h/db", True, "mysql+aiomysql"),
    ],
)
def test_a_driver_of_the_other_twin_names_the_right_one(uri: str, is_async: bool, fix: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(fix)):
        resolve_url(uri, is_async=is_async, variable="database_uri")


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("nonsense", "not a valid database URL"),
        ("oracle://u@h/db", "unknown database dialect 'oracle'"),
        ("postgresql://u@h:0/db", "port 0"),
        ("postgresql://u@h:70000/db", "port 70000"),
    ],
)
def test_bad_urls_are_one_line_naming_the_variable(uri: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as caught:
        parse_url(uri, variable="DATABASE_REPORTS_URI")
    assert str(caught.value).startswith("DATABASE_REPORTS_URI ")
    assert "\n" not in str(caught.value)


def test_every_secret_is_masked_where_a_url_is_shown() -> None:
    url = parse_url("postgresql://app:p%40ss@db/shop?password=q1&sslpassword=q2&application_name=api")
    assert sorted(url_secrets(url)) == ["p@ss", "q1", "q2"]
    shown = render_url(url)
    assert shown == "postgresql://app:***@db/shop?application_name=api&password=***&sslpassword=***"
    message = scrub("auth failed for p@ss (p%40ss) with q1 and q2", url)
    assert message == "auth failed for *** (***) with *** and ***"


def test_an_unparsable_url_is_never_echoed() -> None:
    assert render_url("postgresql://u:secret@h:notaport/db") == "<invalid database URL>"
