"""Settings from the process environment and an optional ``.env`` file.

One loader, :func:`load_settings`, turns ``DATABASE_URL`` and the ``DB_*`` variables
into an immutable :class:`Settings`; pydantic-settings reads them (the environment
over the file) and pydantic checks each against its allowed range. The URL is
normalised to the psycopg2 driver, whichever PostgreSQL driver it names (the async
engine swaps in psycopg 3 itself), and is never shown with its password: not in a
repr, not in an error. Errors are :class:`ConfigurationError` naming the variable and
what it accepts, never the value given.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Final

from pydantic import (
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic.dataclasses import dataclass
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from todo_backend.errors import ConfigurationError

__all__ = [
    "MAX_POOL",
    "MAX_SECONDS",
    "VARIABLES",
    "MigrationSettings",
    "Settings",
    "load_migration_settings",
    "load_settings",
    "mask_url",
    "normalize_database_url",
]

_POSTGRES_DRIVER: Final = "postgresql+psycopg2"
# The spellings users bring: libpq's and Heroku's/Neon's consoles', and SQLAlchemy's
# names of psycopg2 and psycopg 3 (what the FastAPI full-stack template's settings
# produce). Each engine picks its own driver; the URL only says "PostgreSQL".
_POSTGRES_SCHEMES: Final = frozenset(
    {
        "postgres",
        "postgresql",
        "postgresql+psycopg2",
        "postgresql+psycopg",
        "postgresql+psycopg_async",
    }
)
_SQLITE_SCHEMES: Final = frozenset({"sqlite", "sqlite+pysqlite", "sqlite+aiosqlite"})
_MASK: Final = "***"
# libpq's key is "password"; any capitalisation is treated as one, so none slips past.
_QUERY_PASSWORD: Final = re.compile(r"(?P<key>[?&]password=)[^&]*", re.IGNORECASE)
_URL_HINT: Final = (
    "expected postgresql://USER:PASSWORD@HOST/DBNAME?sslmode=require "
    "(or postgres://, postgresql+psycopg://, postgresql+psycopg2://) "
    "or sqlite:///PATH (see .env.example)"
)
_NOT_SET: Final = (
    "DATABASE_URL is not set: export it or put it in .env "
    "(copy .env.example and fill in your Neon connection string)"
)

MAX_SECONDS: Final = 2_147_483.647
"""The longest duration any setting takes: PostgreSQL's bounds are 32-bit milliseconds.

``statement_timeout``, ``lock_timeout`` and ``idle_in_transaction_session_timeout``
stop at 2,147,483,647 ms (about 24.8 days), and so does SQLite's busy timeout, which
``DB_POOL_TIMEOUT`` sets; the other durations share the limit.
"""
MAX_POOL: Final = 1000
"""The most connections ``DB_POOL_SIZE`` or ``DB_MAX_OVERFLOW`` asks of one engine.

PostgreSQL's ``max_connections`` defaults to 100, and a process wanting more than a
thousand connections of its own wants a pooler in front (Neon's pooled endpoint).
"""

_Seconds = Annotated[float, Field(ge=0.001, le=MAX_SECONDS, allow_inf_nan=False)]


def normalize_database_url(raw: str) -> URL:
    """Parse *raw* and return it as a SQLAlchemy URL on a driver this package ships.

    ``postgres://`` (Heroku and Neon consoles), ``postgresql://``,
    ``postgresql+psycopg://`` and ``postgresql+psycopg_async://`` (psycopg 3) become
    ``postgresql+psycopg2://``, the sync engine's driver (the async engine swaps in
    psycopg 3 whichever was named); ``sqlite://``, ``sqlite+pysqlite://`` and
    ``sqlite+aiosqlite://`` become ``sqlite://``. Anything else raises
    :class:`ConfigurationError` with a message that does not echo the URL, since an
    unparseable URL cannot be masked reliably.
    """
    text = raw.strip()
    if not text:
        raise ConfigurationError(
            "DATABASE_URL is empty: set it in the environment or in .env (see .env.example)"
        )
    url = _parse(text)
    if url is None:
        raise ConfigurationError(f"DATABASE_URL is not a valid URL: {_URL_HINT}")
    if url.host and "@" in url.host:
        # An unencoded @ in the password (or user name) splits it at the first @, and the
        # rest of it would show as part of the host in every masked URL and message.
        raise ConfigurationError(
            "DATABASE_URL has more than one @ before its host: percent-encode @ in the "
            "password (or user name) as %40"
        )
    keys = _password_keys(url)
    if keys:
        # libpq also takes ?password=; move it where SQLAlchemy knows to mask it in
        # every repr of the URL and the engine.
        password = url.query[keys[-1]]
        url = url.difference_update_query(keys).set(
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


def _password_keys(url: URL) -> list[str]:
    """Return the query keys of *url* that name a password, whatever their capitalisation."""
    return [key for key in url.query if key.lower() == "password"]


def _parse(text: str) -> URL | None:
    """Parse *text* as a URL, or return None: the parser's error repeats the input.

    Raised inside an ``except`` block, a ConfigurationError would still carry that
    error as its ``__context__`` (password included) even ``from None``; the caller
    raises its own outside of one. (A port that is not a number is a bare ValueError.)
    """
    try:
        return make_url(text)
    except (ArgumentError, ValueError):
        return None


def mask_url(url: URL | str) -> str:
    """Render *url* with its password replaced by ``***``, for logs and messages."""
    if isinstance(url, str):
        parsed = _parse(url)
        if parsed is None:
            return "<unparseable URL>"
        url = parsed
    if url.host and "@" in url.host:
        # An unencoded @ in the password: the host part holds the rest of the password.
        url = url.set(host=url.host.rpartition("@")[2], password=_MASK)
    rendered = url.render_as_string(hide_password=True)
    # libpq also takes the password as a query parameter (?password=...).
    return _QUERY_PASSWORD.sub(r"\g<key>***", rendered) if _password_keys(url) else rendered


@dataclass(frozen=True, slots=True, config=ConfigDict(extra="forbid"))
class Settings:
    """Connection settings for one database, validated when built.

    ``pool_size + max_overflow`` bounds the connections one engine opens (5 to 20 by
    default, within Neon's per-compute limits); those above ``pool_size`` are closed
    once idle for ``pool_idle_timeout``. Every duration is in seconds, at most
    :data:`MAX_SECONDS`; the statement, lock and idle-in-transaction bounds at least
    0.001 (PostgreSQL counts them in whole milliseconds, and 0 would mean "no bound").
    A value out of range, infinite, NaN or of the wrong type raises
    :class:`ConfigurationError` naming its variable and the range, not the value.
    Built directly, it reads no environment: that is :func:`load_settings`' job. The
    repr masks the password.
    """

    database_url: str = Field(repr=False)
    pool_size: Annotated[int, Field(ge=1, le=MAX_POOL)] = 5
    max_overflow: Annotated[int, Field(ge=0, le=MAX_POOL)] = 15
    pool_timeout: Annotated[float, Field(gt=0, le=MAX_SECONDS, allow_inf_nan=False)] = 30
    connect_timeout: Annotated[int, Field(ge=1, le=int(MAX_SECONDS))] = 10
    statement_timeout: _Seconds = 15
    lock_timeout: _Seconds = 5
    idle_in_transaction_timeout: _Seconds = 30
    echo: bool = False
    # Last, so that positional arguments written before it keep their meaning.
    pool_idle_timeout: Annotated[float, Field(gt=0, le=MAX_SECONDS, allow_inf_nan=False)] = 60

    # Each field's variable is this prefix and its upper-cased name (DB_POOL_SIZE).
    variable_prefix: ClassVar[str] = "DB_"

    @field_validator("database_url")
    @classmethod
    def _normalise(cls, value: str) -> str:
        # ConfigurationError is no ValueError: pydantic lets it through as it is.
        return normalize_database_url(value).render_as_string(hide_password=False)

    @model_validator(mode="wrap")
    @classmethod
    def _name_the_variable(cls, data: Any, handler: Any) -> Any:
        return _validated(cls, data, handler)

    @property
    def url(self) -> URL:
        """The normalised URL as a SQLAlchemy object."""
        return make_url(self.database_url)

    @property
    def masked_url(self) -> str:
        """The URL with its password replaced by ``***``."""
        return mask_url(self.database_url)

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{name}={getattr(self, name)!r}"
            for name in (field.name for field in dataclasses.fields(self))
            if name != "database_url"
        )
        return f"Settings(database_url={self.masked_url!r}, {fields})"


def _variables(cls: type) -> dict[str, str]:
    """Map each field of a settings class to its environment variable."""
    prefix: str = cls.variable_prefix  # type: ignore[attr-defined]
    fields: Mapping[str, FieldInfo] = cls.__pydantic_fields__  # type: ignore[attr-defined]
    return {
        field: "DATABASE_URL" if field == "database_url" else f"{prefix}{field.upper()}"
        for field in fields
    }


VARIABLES: Final[Mapping[str, str]] = _variables(Settings)
"""Each :class:`Settings` field's environment variable (``pool_size``: ``DB_POOL_SIZE``)."""


def _allowed(info: FieldInfo) -> str:
    """Say in words what a field accepts, from its type and its bounds."""
    if info.annotation is bool:
        return "one of true/false, 1/0, yes/no, on/off"
    kind = "an integer" if info.annotation is int else "a number of seconds"
    # The metadata holds annotated_types' Ge, Gt and Le, one bound each.
    bounds = {
        name: getattr(item, name)
        for item in info.metadata
        for name in ("ge", "gt", "le")
        if hasattr(item, name)
    }
    low = f"from {bounds['ge']} to" if "ge" in bounds else f"above {bounds['gt']} and at most"
    return f"{kind} {low} {bounds['le']}"


def _validated(cls: type, data: Any, handler: Any) -> Any:
    """Run pydantic's validation of a settings class; a failure names the variable."""
    try:
        return handler(data)
    except ValidationError as error:
        problem = error.errors(include_input=False)[0]
    # pydantic's message repeats the input: name the variable and its range only, and
    # raise outside the handler, where the error is no one's __context__.
    raise _configuration_error(cls, problem)


def _configuration_error(cls: type, error: Any) -> Exception:
    # A validator sees the class pydantic built before adding slots: use the final one.
    cls = _SETTINGS_CLASSES[cls.__name__]
    location = error["loc"]
    field = str(location[0]) if location else ""
    variables = _variables(cls)
    if field not in variables:
        # A mistake in the calling code, not in the environment: what Python raises.
        where = f"at position {field}" if isinstance(location[0], int) else repr(field)
        return TypeError(f"{cls.__name__}() got an unexpected argument {where}")
    name = variables[field]
    if field == "database_url":
        return ConfigurationError(
            _NOT_SET
            if error["type"] in {"missing", "missing_argument"}
            else f"{name} must be a URL string: {_URL_HINT}"
        )
    info: FieldInfo = cls.__pydantic_fields__[field]  # type: ignore[attr-defined]
    return ConfigurationError(
        f"{name} must be {_allowed(info)}: fix it in the environment or in .env (see .env.example)"
    )


class _EnvironmentBase(BaseSettings):
    # A variable set blank in the environment still wins over .env (and then means
    # the default), as a variable set at all does.
    model_config = SettingsConfigDict(
        case_sensitive=True, extra="ignore", env_ignore_empty=False, env_file_encoding="utf-8"
    )


def _environment(variables: Mapping[str, str]) -> type[BaseSettings]:
    """Return a reader of the raw text of *variables*; the settings class checks it."""
    raw_fields: dict[str, Any] = {
        field: (str | None, Field(default=None, validation_alias=name))
        for field, name in variables.items()
    }
    return create_model("_Environment", __base__=_EnvironmentBase, **raw_fields)


def _read(reader: type[BaseSettings], env_file: str | os.PathLike[str] | None) -> dict[str, Any]:
    """Read the variables that are set and not blank, the environment over *env_file*.

    A file that is not UTF-8 raises :class:`ConfigurationError` naming the file only:
    the decoder's error holds the file's bytes (secrets too), so it is raised outside
    the ``except`` block, where it is no one's ``__context__``.
    """
    path = None if env_file is None else os.fspath(env_file)
    try:
        read = reader(_env_file=path)
    except UnicodeDecodeError:
        read = None
    if read is None:
        raise ConfigurationError(
            f"the env file {path} is not UTF-8 text: save it as UTF-8 (see .env.example)"
        )
    return {
        field: value.strip()
        for field, value in read.model_dump().items()
        if value is not None and value.strip()
    }


_Environment: Final = _environment(VARIABLES)


def load_settings(
    env_file: str | os.PathLike[str] | None = ".env", *, database_url: str | None = None
) -> Settings:
    """Build :class:`Settings` from the environment, falling back to *env_file*.

    Variables: ``DATABASE_URL`` (required unless *database_url* is given),
    ``DB_POOL_SIZE``, ``DB_MAX_OVERFLOW``, ``DB_POOL_TIMEOUT``, ``DB_POOL_IDLE_TIMEOUT``,
    ``DB_CONNECT_TIMEOUT``, ``DB_STATEMENT_TIMEOUT``, ``DB_LOCK_TIMEOUT``,
    ``DB_IDLE_IN_TRANSACTION_TIMEOUT``, ``DB_ECHO``; one that is unset or blank takes its
    default. A variable set in the process environment wins over the file; the file is
    optional, is read without touching ``os.environ``, and may hold other variables too.
    *database_url* (a command line's ``--database-url``) replaces ``DATABASE_URL`` while
    the ``DB_*`` settings still apply. Raises :class:`ConfigurationError` naming the
    variable that is missing or out of range, and the range, or saying to save a
    *env_file* that is not UTF-8 as UTF-8.
    """
    values = _read(_Environment, env_file)
    if database_url is not None:
        values["database_url"] = database_url
    if not values.get("database_url", "").strip():
        raise ConfigurationError(_NOT_SET)
    return Settings(**values)


@dataclass(frozen=True, slots=True, config=ConfigDict(extra="forbid"))
class MigrationSettings:
    """How long a migration may wait for a table lock, and how long it keeps retrying.

    ``lock_timeout`` (``DB_MIGRATION_LOCK_TIMEOUT``, seconds) bounds each wait of a
    migration's statements for a lock, and so how long the application's calls can
    queue behind a waiting migration; ``retry_for`` (``DB_MIGRATION_RETRY_FOR``,
    seconds, 0 for no retry) bounds how long a step that ran out of lock time is
    retried. Separate from :class:`Settings` because a migration needs no pool
    settings and offline SQL needs no ``DATABASE_URL``. Out-of-range values raise
    :class:`ConfigurationError` naming the variable and the range, as Settings does.
    """

    lock_timeout: _Seconds = 3.0
    retry_for: Annotated[float, Field(ge=0, le=MAX_SECONDS, allow_inf_nan=False)] = 60.0

    variable_prefix: ClassVar[str] = "DB_MIGRATION_"

    @model_validator(mode="wrap")
    @classmethod
    def _name_the_variable(cls, data: Any, handler: Any) -> Any:
        return _validated(cls, data, handler)


_MigrationEnvironment: Final = _environment(_variables(MigrationSettings))
_SETTINGS_CLASSES: Final[dict[str, type]] = {
    cls.__name__: cls for cls in (Settings, MigrationSettings)
}


def load_migration_settings(env_file: str | os.PathLike[str] | None = ".env") -> MigrationSettings:
    """Build :class:`MigrationSettings` from the environment, falling back to *env_file*.

    Reads ``DB_MIGRATION_LOCK_TIMEOUT`` (default 3) and ``DB_MIGRATION_RETRY_FOR``
    (default 60) the way :func:`load_settings` reads its variables; ``DATABASE_URL``
    is not needed. Raises :class:`ConfigurationError` naming a malformed variable.
    """
    return MigrationSettings(**_read(_MigrationEnvironment, env_file))
