"""Settings from the process environment and an optional ``.env`` file.

One loader, :func:`load_settings`, turns ``DATABASE_URL`` and the ``DB_*`` variables
into an immutable :class:`Settings`. The URL is normalised to the psycopg2 driver
(SQLAlchemy 2.1 would pick psycopg 3 for a bare ``postgresql://``) and is never shown
with its password: not in a repr, not in an error.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from dotenv import dotenv_values
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from todo_backend.errors import ConfigurationError

__all__ = ["Settings", "load_settings", "mask_url", "normalize_database_url"]

_POSTGRES_DRIVER: Final = "postgresql+psycopg2"
_POSTGRES_SCHEMES: Final = frozenset({"postgres", "postgresql", "postgresql+psycopg2"})
_SQLITE_SCHEMES: Final = frozenset({"sqlite", "sqlite+pysqlite"})
_QUERY_PASSWORD: Final = re.compile(r"(?P<key>[?&]password=)[^&]*")
_URL_HINT: Final = (
    "expected postgresql://USER:PASSWORD@HOST/DBNAME?sslmode=require "
    "or sqlite:///PATH (see .env.example)"
)


def normalize_database_url(raw: str) -> URL:
    """Parse *raw* and return it as a SQLAlchemy URL on a driver this package ships.

    ``postgres://`` (Heroku and Neon consoles) and ``postgresql://`` become
    ``postgresql+psycopg2://``; SQLite URLs pass through. Anything else raises
    :class:`ConfigurationError` with a message that does not echo the URL, since an
    unparseable URL cannot be masked reliably.
    """
    text = raw.strip()
    if not text:
        raise ConfigurationError(
            "DATABASE_URL is empty: set it in the environment or in .env (see .env.example)"
        )
    try:
        url = make_url(text)
    except (ArgumentError, ValueError):
        # The parser's own message repeats the input, password included. (A port that
        # is not a number surfaces as a bare ValueError.)
        raise ConfigurationError(f"DATABASE_URL is not a valid URL: {_URL_HINT}") from None
    if "password" in url.query:
        # libpq also takes ?password=; move it where SQLAlchemy knows to mask it in
        # every repr of the URL and the engine.
        password = url.query["password"]
        url = url.difference_update_query(["password"]).set(
            password=password if isinstance(password, str) else password[-1]
        )
    scheme = url.drivername.lower()
    if scheme in _POSTGRES_SCHEMES:
        if not url.host and "host" not in url.query:
            raise ConfigurationError(f"DATABASE_URL {mask_url(url)} names no host: {_URL_HINT}")
        return url.set(drivername=_POSTGRES_DRIVER)
    if scheme in _SQLITE_SCHEMES:
        return url.set(drivername="sqlite")
    raise ConfigurationError(
        f"DATABASE_URL scheme {url.drivername!r} is not supported: {_URL_HINT}"
    )


def mask_url(url: URL | str) -> str:
    """Render *url* with its password replaced by ``***``, for logs and messages."""
    if isinstance(url, str):
        try:
            url = make_url(url)
        except (ArgumentError, ValueError):
            return "<unparseable URL>"
    rendered = url.render_as_string(hide_password=True)
    # libpq also takes the password as a query parameter (?password=...).
    return _QUERY_PASSWORD.sub(r"\g<key>***", rendered) if "password" in url.query else rendered


@dataclass(frozen=True, slots=True)
class Settings:
    """Connection settings for one database, validated when built.

    ``pool_size + max_overflow`` bounds the connections one engine opens (5 to 20 by
    default, within Neon's per-compute limits); those above ``pool_size`` are closed
    once idle for ``pool_idle_timeout`` seconds. The repr masks the password.
    """

    database_url: str = field(repr=False)
    pool_size: int = 5
    max_overflow: int = 15
    pool_timeout: float = 30
    pool_idle_timeout: float = 60
    connect_timeout: int = 10
    statement_timeout: float = 15
    lock_timeout: float = 5
    idle_in_transaction_timeout: float = 30
    echo: bool = False

    def __post_init__(self) -> None:
        url = normalize_database_url(self.database_url)
        object.__setattr__(self, "database_url", url.render_as_string(hide_password=False))
        _require(self.pool_size >= 1, "DB_POOL_SIZE", "an integer of at least 1")
        _require(self.max_overflow >= 0, "DB_MAX_OVERFLOW", "an integer of at least 0")
        _require(self.pool_timeout > 0, "DB_POOL_TIMEOUT", "a number of seconds above 0")
        _require(self.pool_idle_timeout > 0, "DB_POOL_IDLE_TIMEOUT", "a number of seconds above 0")
        _require(self.connect_timeout >= 1, "DB_CONNECT_TIMEOUT", "an integer of at least 1")
        # PostgreSQL counts these bounds in whole milliseconds; 0 there means "no bound".
        for name, value in (
            ("DB_STATEMENT_TIMEOUT", self.statement_timeout),
            ("DB_LOCK_TIMEOUT", self.lock_timeout),
            ("DB_IDLE_IN_TRANSACTION_TIMEOUT", self.idle_in_transaction_timeout),
        ):
            _require(value >= 0.001, name, "a number of seconds of at least 0.001")

    @property
    def url(self) -> URL:
        """The normalised URL as a SQLAlchemy object."""
        return make_url(self.database_url)

    @property
    def masked_url(self) -> str:
        """The URL with its password replaced by ``***``."""
        return mask_url(self.database_url)

    def __repr__(self) -> str:
        return (
            f"Settings(database_url={self.masked_url!r}, pool_size={self.pool_size}, "
            f"max_overflow={self.max_overflow}, pool_timeout={self.pool_timeout}, "
            f"pool_idle_timeout={self.pool_idle_timeout}, "
            f"connect_timeout={self.connect_timeout}, statement_timeout={self.statement_timeout}, "
            f"lock_timeout={self.lock_timeout}, "
            f"idle_in_transaction_timeout={self.idle_in_transaction_timeout}, echo={self.echo})"
        )


def load_settings(
    env_file: str | os.PathLike[str] | None = ".env", *, database_url: str | None = None
) -> Settings:
    """Build :class:`Settings` from the environment, falling back to *env_file*.

    Variables: ``DATABASE_URL`` (required unless *database_url* is given),
    ``DB_POOL_SIZE``, ``DB_MAX_OVERFLOW``, ``DB_POOL_TIMEOUT``, ``DB_POOL_IDLE_TIMEOUT``,
    ``DB_CONNECT_TIMEOUT``,
    ``DB_STATEMENT_TIMEOUT``, ``DB_LOCK_TIMEOUT``, ``DB_IDLE_IN_TRANSACTION_TIMEOUT``,
    ``DB_ECHO``. A variable set in the process environment wins over the file; the
    file is optional and is read without touching ``os.environ``. *database_url*
    (a command line's ``--database-url``) replaces ``DATABASE_URL`` while the ``DB_*``
    settings still apply. Raises :class:`ConfigurationError` naming the variable that
    is missing or malformed.
    """
    values: dict[str, str] = {}
    if env_file is not None and Path(env_file).is_file():
        values.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
    values.update(os.environ)

    if database_url is None:
        database_url = values.get("DATABASE_URL", "").strip()
    if not database_url:
        raise ConfigurationError(
            "DATABASE_URL is not set: export it or put it in .env "
            "(copy .env.example and fill in your Neon connection string)"
        )
    return Settings(
        database_url=database_url,
        pool_size=_int(values, "DB_POOL_SIZE", 5),
        max_overflow=_int(values, "DB_MAX_OVERFLOW", 15),
        pool_timeout=_float(values, "DB_POOL_TIMEOUT", 30.0),
        pool_idle_timeout=_float(values, "DB_POOL_IDLE_TIMEOUT", 60.0),
        connect_timeout=_int(values, "DB_CONNECT_TIMEOUT", 10),
        statement_timeout=_float(values, "DB_STATEMENT_TIMEOUT", 15.0),
        lock_timeout=_float(values, "DB_LOCK_TIMEOUT", 5.0),
        idle_in_transaction_timeout=_float(values, "DB_IDLE_IN_TRANSACTION_TIMEOUT", 30.0),
        echo=_bool(values, "DB_ECHO", default=False),
    )


def _require(ok: bool, name: str, expected: str) -> None:
    if not ok:
        raise ConfigurationError(f"{name} must be {expected}")


def _int(values: dict[str, str], name: str, default: int) -> int:
    raw = values.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigurationError(f"{name} must be an integer, got {raw!r}") from None


def _float(values: dict[str, str], name: str, default: float) -> float:
    raw = values.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigurationError(f"{name} must be a number, got {raw!r}") from None


_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})


def _bool(values: dict[str, str], name: str, *, default: bool) -> bool:
    raw = values.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ConfigurationError(f"{name} must be one of true/false/1/0/yes/no/on/off, got {raw!r}")
