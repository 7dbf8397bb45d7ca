"""Settings loading: environment over .env, URL normalisation, masked secrets."""

from __future__ import annotations

from pathlib import Path

import pytest

from todo_backend.config import (
    MigrationSettings,
    Settings,
    load_migration_settings,
    load_settings,
    mask_url,
    normalize_database_url,
)
from todo_backend.errors import ConfigurationError, TodoBackendError

SECRET = "Sup3rSecretSentinel"
VARIABLES = (
    "DATABASE_URL",
    "DB_POOL_SIZE",
    "DB_MAX_OVERFLOW",
    "DB_POOL_TIMEOUT",
    "DB_CONNECT_TIMEOUT",
    "DB_STATEMENT_TIMEOUT",
    "DB_LOCK_TIMEOUT",
    "DB_IDLE_IN_TRANSACTION_TIMEOUT",
    "DB_ECHO",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Run each test in an empty directory with none of the settings variables set."""
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_defaults_with_only_a_url(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only DATABASE_URL is required; the pool defaults give 5..20 connections."""
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:p@db.example.com/app")
    settings = load_settings()
    assert settings.pool_size == 5
    assert settings.max_overflow == 15
    assert settings.pool_size + settings.max_overflow == 20
    assert settings.pool_timeout == 30
    assert settings.connect_timeout == 10
    assert (settings.statement_timeout, settings.lock_timeout) == (15, 5)
    assert settings.idle_in_transaction_timeout == 30
    assert settings.echo is False


def test_reads_every_variable_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each DB_* variable maps onto its setting."""
    monkeypatch.setenv("DATABASE_URL", "sqlite:///x.db")
    monkeypatch.setenv("DB_POOL_SIZE", "7")
    monkeypatch.setenv("DB_MAX_OVERFLOW", "3")
    monkeypatch.setenv("DB_POOL_TIMEOUT", "2.5")
    monkeypatch.setenv("DB_CONNECT_TIMEOUT", "4")
    monkeypatch.setenv("DB_STATEMENT_TIMEOUT", "20")
    monkeypatch.setenv("DB_LOCK_TIMEOUT", "0.5")
    monkeypatch.setenv("DB_IDLE_IN_TRANSACTION_TIMEOUT", "60")
    monkeypatch.setenv("DB_ECHO", "yes")
    assert load_settings() == Settings(
        database_url="sqlite:///x.db",
        pool_size=7,
        max_overflow=3,
        pool_timeout=2.5,
        connect_timeout=4,
        statement_timeout=20,
        lock_timeout=0.5,
        idle_in_transaction_timeout=60,
        echo=True,
    )


def test_env_file_is_read_and_environment_wins(
    monkeypatch: pytest.MonkeyPatch, clean_env: Path
) -> None:
    """Values come from .env, but a variable set in the process environment wins."""
    (clean_env / ".env").write_text(
        "DATABASE_URL=postgresql://file:pw@file-host/db\nDB_POOL_SIZE=9\nDB_ECHO=true\n"
    )
    assert load_settings().database_url.endswith("@file-host/db")
    monkeypatch.setenv("DATABASE_URL", "sqlite:///env.db")
    settings = load_settings()
    assert settings.database_url == "sqlite:///env.db"
    assert settings.pool_size == 9
    assert settings.echo is True


def test_env_file_path_can_be_chosen(clean_env: Path) -> None:
    """load_settings(env_file=...) reads the named file; None reads no file."""
    custom = clean_env / "custom.env"
    custom.write_text("DATABASE_URL=sqlite:///custom.db\n")
    assert load_settings(custom).database_url == "sqlite:///custom.db"
    with pytest.raises(ConfigurationError):
        load_settings(None)


def test_env_file_does_not_leak_into_os_environ(clean_env: Path) -> None:
    """Reading .env leaves the process environment untouched."""
    import os

    (clean_env / ".env").write_text("DATABASE_URL=sqlite:///f.db\n")
    load_settings()
    assert "DATABASE_URL" not in os.environ


@pytest.mark.parametrize("value", [None, "", "   "])
def test_missing_or_blank_url_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    """A missing or blank DATABASE_URL says which variable and points at .env.example."""
    if value is not None:
        monkeypatch.setenv("DATABASE_URL", value)
    with pytest.raises(ConfigurationError, match=r"DATABASE_URL.*\.env\.example") as info:
        load_settings()
    assert isinstance(info.value, TodoBackendError)


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("postgres://u:p@h/db", "postgresql+psycopg2://u:p@h/db"),
        (
            "postgresql://u:p@h:6543/db?sslmode=require",
            "postgresql+psycopg2://u:p@h:6543/db?sslmode=require",
        ),
        ("postgresql+psycopg2://u@h/db", "postgresql+psycopg2://u@h/db"),
        ("sqlite://", "sqlite://"),
        ("sqlite:///todo.db", "sqlite:///todo.db"),
        ("sqlite+pysqlite:////abs/path.db", "sqlite:////abs/path.db"),
    ],
)
def test_urls_are_normalised_to_shipped_drivers(raw: str, normalised: str) -> None:
    """postgres:// and postgresql:// name psycopg2 explicitly; SQLite passes through."""
    assert normalize_database_url(raw).render_as_string(hide_password=False) == normalised
    assert Settings(database_url=raw).database_url == normalised


@pytest.mark.parametrize(
    "raw",
    [
        f"mysql://u:{SECRET}@h/db",
        f"postgresql+asyncpg://u:{SECRET}@h/db",
        f"not a url {SECRET}",
        f"://u:{SECRET}@",
        f"postgresql://u:{SECRET}@/db",
        f"postgresql://u:{SECRET}@h:notaport/db",
    ],
)
def test_bad_urls_are_configuration_errors_without_the_password(raw: str) -> None:
    """Unsupported schemes and malformed URLs raise ConfigurationError that hides the password."""
    with pytest.raises(ConfigurationError) as info:
        Settings(database_url=raw)
    assert SECRET not in str(info.value)
    assert info.value.__cause__ is None or SECRET not in str(info.value.__cause__)
    assert "DATABASE_URL" in str(info.value)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DB_POOL_SIZE", "0"),
        ("DB_POOL_SIZE", "five"),
        ("DB_MAX_OVERFLOW", "-1"),
        ("DB_POOL_TIMEOUT", "0"),
        ("DB_POOL_TIMEOUT", "soon"),
        ("DB_CONNECT_TIMEOUT", "0"),
        ("DB_STATEMENT_TIMEOUT", "0"),
        ("DB_STATEMENT_TIMEOUT", "never"),
        ("DB_LOCK_TIMEOUT", "-1"),
        ("DB_IDLE_IN_TRANSACTION_TIMEOUT", "0"),
        ("DB_ECHO", "maybe"),
    ],
)
def test_bad_numbers_name_their_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    """A malformed or out-of-range DB_* value raises ConfigurationError naming it."""
    monkeypatch.setenv("DATABASE_URL", "sqlite://")
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError, match=name):
        load_settings()


@pytest.mark.parametrize(("raw", "expected"), [("1", True), ("off", False), ("FALSE", False)])
def test_echo_accepts_common_spellings(
    monkeypatch: pytest.MonkeyPatch, raw: str, expected: bool
) -> None:
    """DB_ECHO understands true/false, 1/0, yes/no, on/off in any case."""
    monkeypatch.setenv("DATABASE_URL", "sqlite://")
    monkeypatch.setenv("DB_ECHO", raw)
    assert load_settings().echo is expected


def test_repr_and_masked_url_hide_the_password() -> None:
    """Neither repr(), str() nor masked_url show the password."""
    settings = Settings(database_url=f"postgresql://neondb_owner:{SECRET}@ep-x.neon.tech/neondb")
    for text in (repr(settings), str(settings), settings.masked_url):
        assert SECRET not in text
        assert "ep-x.neon.tech" in text
    assert SECRET in settings.database_url  # the engine still needs it


def test_mask_url_handles_strings_and_garbage() -> None:
    """mask_url masks a URL string and does not echo an unparseable one."""
    assert SECRET not in mask_url(f"postgresql://u:{SECRET}@h/db")
    assert mask_url(f"postgresql://u@h/db?password={SECRET}&sslmode=require") == (
        "postgresql://u@h/db?password=***&sslmode=require"
    )
    query_password = Settings(database_url=f"postgresql://u@h/db?password={SECRET}&x=1")
    assert SECRET not in repr(query_password)
    assert query_password.url.password == SECRET
    assert query_password.url.query == {"x": "1"}
    assert mask_url(f"::{SECRET}::") == "<unparseable URL>"
    assert mask_url(f"postgresql://u:{SECRET}@h:notaport/db") == "<unparseable URL>"


def test_explicit_url_replaces_database_url_but_keeps_the_tuning(
    monkeypatch: pytest.MonkeyPatch, clean_env: Path
) -> None:
    """load_settings(database_url=...) overrides DATABASE_URL; DB_* still apply."""
    (clean_env / ".env").write_text("DATABASE_URL=sqlite:///from-file.db\nDB_POOL_TIMEOUT=4\n")
    monkeypatch.setenv("DB_ECHO", "true")
    settings = load_settings(database_url="sqlite:///explicit.db")
    assert settings.database_url == "sqlite:///explicit.db"
    assert settings.echo is True
    assert settings.pool_timeout == 4


def test_migration_settings_default_to_a_short_lock_wait_and_a_minute_of_retries(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """DB_MIGRATION_LOCK_TIMEOUT (3 s) and DB_MIGRATION_RETRY_FOR (60 s) need no DATABASE_URL."""
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("DB_MIGRATION_LOCK_TIMEOUT", raising=False)
    monkeypatch.delenv("DB_MIGRATION_RETRY_FOR", raising=False)
    assert load_migration_settings(None) == MigrationSettings(lock_timeout=3.0, retry_for=60.0)
    env_file = tmp_path / ".env"
    env_file.write_text("DB_MIGRATION_LOCK_TIMEOUT=2.5\nDB_MIGRATION_RETRY_FOR=10\n")
    assert load_migration_settings(env_file) == MigrationSettings(2.5, 10.0)
    monkeypatch.setenv("DB_MIGRATION_RETRY_FOR", "0")
    assert load_migration_settings(env_file).retry_for == 0


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DB_MIGRATION_LOCK_TIMEOUT", "0"),
        ("DB_MIGRATION_LOCK_TIMEOUT", "soon"),
        ("DB_MIGRATION_RETRY_FOR", "-1"),
    ],
)
def test_bad_migration_settings_name_their_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    """A malformed or out-of-range DB_MIGRATION_* value raises ConfigurationError naming it."""
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError, match=name):
        load_migration_settings(None)
