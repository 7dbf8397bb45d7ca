"""Settings loading: environment over .env, URL normalisation, masked secrets."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from todo_backend.config import (
    MAX_SECONDS,
    VARIABLES,
    MigrationSettings,
    Settings,
    load_migration_settings,
    load_settings,
    mask_url,
    normalize_database_url,
)
from todo_backend.errors import ConfigurationError, TodoBackendError

SECRET = "Sup3rSecretSentinel"
# What each numeric variable refuses beyond what every one of them refuses
# (COMMON_REFUSED), and the lowest and highest value it takes. Keyed by the
# variables the code declares: a new numeric setting must be added here.
POSTGRES_BOUNDS = ("DB_STATEMENT_TIMEOUT", "DB_LOCK_TIMEOUT", "DB_IDLE_IN_TRANSACTION_TIMEOUT")
COMMON_REFUSED = (
    "inf",
    "-inf",
    "Infinity",
    "nan",
    "NaN",
    "1e400",  # overflows to inf
    "-1",
    "2147483.648",  # one millisecond past PostgreSQL's 2,147,483,647 ms
    "3000000",
    "1e10",
    "twelve",
    "",  # placeholder replaced by a value holding the secret, see refused_values()
)
REFUSED: dict[str, tuple[str, ...]] = {
    "DB_POOL_SIZE": ("0", "1001", "2.5"),
    "DB_MAX_OVERFLOW": ("1001", "2.5"),
    "DB_POOL_TIMEOUT": ("0", "-0.001"),
    "DB_POOL_IDLE_TIMEOUT": ("0", "-0.001"),
    "DB_CONNECT_TIMEOUT": ("0", "2147484", "1.5"),
    **dict.fromkeys(POSTGRES_BOUNDS, ("0", "0.0009", "-0.001")),
}
ACCEPTED: dict[str, tuple[str, str]] = {
    "DB_POOL_SIZE": ("1", "1000"),
    "DB_MAX_OVERFLOW": ("0", "1000"),
    "DB_POOL_TIMEOUT": ("0.001", "2147483.647"),
    "DB_POOL_IDLE_TIMEOUT": ("0.001", "2147483.647"),
    "DB_CONNECT_TIMEOUT": ("1", "2147483"),
    **dict.fromkeys(POSTGRES_BOUNDS, ("0.001", "2147483.647")),
}
NUMERIC = tuple(name for name in VARIABLES.values() if name not in {"DATABASE_URL", "DB_ECHO"})


def refused_values() -> Iterator[tuple[str, str]]:
    """Yield (variable, value) for every value a numeric variable must refuse."""
    for name in NUMERIC:
        for value in (*COMMON_REFUSED, *REFUSED[name]):
            yield name, value or f"{SECRET}:{SECRET}@host"


def field_of(name: str) -> str:
    """The Settings field that *name* (an environment variable) sets."""
    return next(field for field, variable in VARIABLES.items() if variable == name)


def error_chain(error: BaseException) -> str:
    """Every message of *error*, its cause and its context, as one text."""
    texts: list[str] = []
    seen: BaseException | None = error
    while seen is not None:
        texts += [str(seen), repr(seen), *getattr(seen, "__notes__", [])]
        seen = seen.__cause__ or seen.__context__
    return "\n".join(texts)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Run each test in an empty directory with none of the settings variables set."""
    for name in VARIABLES.values():
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
    assert settings.pool_idle_timeout == 60
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
    monkeypatch.setenv("DB_POOL_IDLE_TIMEOUT", "45")
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
        pool_idle_timeout=45,
    )


def test_env_file_is_read_and_environment_wins(
    monkeypatch: pytest.MonkeyPatch, clean_env: Path
) -> None:
    """Values come from .env, but a variable set in the process environment wins."""
    (clean_env / ".env").write_text(
        "DATABASE_URL=postgresql://file:pw@file-host/db\nDB_POOL_SIZE=9\nDB_ECHO=true\n"
        "DB_LOCK_TIMEOUT=2\n"
    )
    assert load_settings().database_url.endswith("@file-host/db")
    monkeypatch.setenv("DATABASE_URL", "sqlite:///env.db")
    monkeypatch.setenv("DB_LOCK_TIMEOUT", "0.25")
    settings = load_settings()
    assert settings.database_url == "sqlite:///env.db"
    assert settings.lock_timeout == 0.25
    assert settings.pool_size == 9
    assert settings.echo is True


def test_env_file_path_can_be_chosen(clean_env: Path) -> None:
    """load_settings(env_file=...) reads the named file; None reads no file."""
    custom = clean_env / "custom.env"
    custom.write_text("DATABASE_URL=sqlite:///custom.db\n")
    assert load_settings(custom).database_url == "sqlite:///custom.db"
    with pytest.raises(ConfigurationError):
        load_settings(None)


@pytest.mark.parametrize("load", [load_settings, load_migration_settings])
def test_an_env_file_that_is_not_utf8_is_a_configuration_error(
    clean_env: Path, load: Callable[[], object]
) -> None:
    """A .env in another encoding raises ConfigurationError saying to save it as UTF-8."""
    (clean_env / ".env").write_bytes(
        f"DATABASE_URL=postgresql://u:{SECRET}@h/db\n# caf\xe9\n".encode("latin-1")
    )
    with pytest.raises(ConfigurationError, match="UTF-8") as info:
        load()
    assert SECRET not in error_chain(info.value)
    assert "caf" not in error_chain(info.value)
    assert info.value.__context__ is None


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
        ("postgresql+psycopg://u:p@h/db", "postgresql+psycopg2://u:p@h/db"),
        ("postgresql+psycopg_async://u:p@h/db", "postgresql+psycopg2://u:p@h/db"),
        ("POSTGRESQL+PSYCOPG://u:p@h/db", "postgresql+psycopg2://u:p@h/db"),
        ("sqlite://", "sqlite://"),
        ("sqlite+aiosqlite:///todo.db", "sqlite:///todo.db"),
        ("sqlite:///todo.db", "sqlite:///todo.db"),
        ("sqlite+pysqlite:////abs/path.db", "sqlite:////abs/path.db"),
    ],
)
def test_urls_are_normalised_to_shipped_drivers(raw: str, normalised: str) -> None:
    """Every PostgreSQL spelling names psycopg2 (the sync face); SQLite ones become sqlite://."""
    assert normalize_database_url(raw).render_as_string(hide_password=False) == normalised
    assert Settings(database_url=raw).database_url == normalised


@pytest.mark.parametrize(
    "raw",
    [
        f"mysql://u:{SECRET}@h/db",
        f"postgresql+asyncpg://u:{SECRET}@h/db",
        f"postgresql+pg8000://u:{SECRET}@h/db",
        f"not a url {SECRET}",
        f"://u:{SECRET}@",
        f"postgresql://u:{SECRET}@/db",
        f"postgresql://u:{SECRET}@h:notaport/db",
        "   ",
    ],
)
def test_bad_urls_are_configuration_errors_without_the_password(raw: str) -> None:
    """Unsupported schemes and malformed URLs raise ConfigurationError that hides the password."""
    with pytest.raises(ConfigurationError) as info:
        Settings(database_url=raw)
    assert SECRET not in error_chain(info.value)
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


@pytest.mark.parametrize(
    "raw",
    [
        "postgresql://app:Tr0ub4dor@Horse-Battery@db.invalid/app",
        "postgresql://app:Tr0ub4dor@Horse@Battery@db.invalid:5432/app?sslmode=require",
        "postgres://app:Tr0ub4dor@Horse-Battery@db.invalid/app?password=Battery",
    ],
)
def test_an_unencoded_at_before_the_host_is_refused_without_echoing(raw: str) -> None:
    """A URL with an @ left unencoded in its credentials is refused, saying to write %40."""
    with pytest.raises(ConfigurationError, match="%40") as info:
        Settings(database_url=raw)
    for piece in ("Tr0ub4dor", "Horse", "Battery"):
        assert piece not in error_chain(info.value)
    assert "Tr0ub4dor" not in mask_url(raw)
    assert "Horse" not in mask_url(raw)
    assert "Battery" not in mask_url(raw)


def test_an_encoded_at_in_the_password_is_kept() -> None:
    """A password with @ written as %40 connects with the @ and is masked whole."""
    settings = Settings(database_url="postgresql://app:Tr0ub4dor%40Horse@db.invalid/app")
    assert settings.url.password == "Tr0ub4dor@Horse"
    assert settings.url.host == "db.invalid"
    assert "Horse" not in settings.masked_url
    assert "Horse" not in repr(settings)


@pytest.mark.parametrize("key", ["PASSWORD", "Password", "passWord"])
def test_a_query_password_in_any_case_is_moved_and_masked(key: str) -> None:
    """?PASSWORD= in any capitalisation becomes the URL's password and never shows."""
    raw = f"postgresql://u@h/db?{key}={SECRET}&sslmode=require"
    assert mask_url(raw) == f"postgresql://u@h/db?{key}=***&sslmode=require"
    settings = Settings(database_url=raw)
    assert settings.url.password == SECRET
    assert settings.url.query == {"sslmode": "require"}
    assert SECRET not in repr(settings)
    assert SECRET not in settings.masked_url


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


@pytest.mark.parametrize(("name", "value"), list(refused_values()))
def test_numeric_variables_refuse_what_their_consumers_cannot_take(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    """Out of range, infinite, NaN or not a number: ConfigurationError with name and range only."""
    monkeypatch.setenv("DATABASE_URL", f"postgresql://u:{SECRET}@h/db")
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError) as info:
        load_settings()
    message = str(info.value)
    assert message.startswith(f"{name} must be ")
    assert ACCEPTED[name][1] in message  # the top of the allowed range
    assert SECRET not in error_chain(info.value)


@pytest.mark.parametrize("name", NUMERIC)
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, MAX_SECONDS + 0.001, -1.0])
def test_settings_built_in_code_refuse_the_same_numbers(name: str, value: float) -> None:
    """Settings(...) refuses infinite, NaN and out-of-range numbers as the loader does."""
    arguments: dict[str, object] = {"database_url": "sqlite://", field_of(name): value}
    with pytest.raises(ConfigurationError, match=f"^{name} must be "):
        Settings(**arguments)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", NUMERIC)
def test_numeric_variables_take_both_ends_of_their_range(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """The lowest and the highest allowed value of each variable load as given."""
    monkeypatch.setenv("DATABASE_URL", "sqlite://")
    for value in ACCEPTED[name]:
        monkeypatch.setenv(name, value)
        assert getattr(load_settings(), field_of(name)) == float(value)


def test_largest_bound_is_postgresqls_largest_millisecond_count() -> None:
    """MAX_SECONDS is 2,147,483,647 ms, the most statement_timeout and its kin hold."""
    assert round(MAX_SECONDS * 1000) == 2**31 - 1


def test_wrong_types_in_code_hide_the_value() -> None:
    """A value of the wrong type passed to Settings(...) is named by variable, never echoed."""
    url = f"postgresql://u:{SECRET}@h/db"
    for arguments in (
        {"database_url": url, "statement_timeout": SECRET},
        {"database_url": url, "echo": SECRET},
        {"database_url": url, "pool_size": [SECRET]},
        {"database_url": [url]},
    ):
        with pytest.raises(ConfigurationError) as info:
            Settings(**arguments)
        assert SECRET not in error_chain(info.value)
        assert str(info.value).startswith(VARIABLES[next(reversed(arguments))])


def test_unknown_arguments_are_type_errors() -> None:
    """A misspelt keyword is a mistake in the calling code: TypeError, as for any function."""
    with pytest.raises(TypeError, match="statement_timout"):
        Settings(database_url="sqlite://", statement_timout=5)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="position 10"):
        Settings("sqlite://", 5, 15, 30, 10, 15, 5, 30, False, 60, True)  # type: ignore[call-arg]


def test_env_file_ignores_other_variables(clean_env: Path) -> None:
    """Other programs' variables, DB_ lookalikes and lowercase names in .env are left alone."""
    (clean_env / ".env").write_text(
        f"SECRET_KEY={SECRET}\nDB_UNKNOWN=many\nDB_POOL=3\ndb_pool_size=many\n"
        "database_url=mysql://u@h/db\nDATABASE_URL=sqlite:///f.db\nexport DB_ECHO=on\n"
    )
    assert load_settings() == Settings(database_url="sqlite:///f.db", echo=True)


def test_blank_variables_take_their_defaults(
    monkeypatch: pytest.MonkeyPatch, clean_env: Path
) -> None:
    """A DB_* variable set blank, in the environment or in .env, means its default."""
    (clean_env / ".env").write_text(
        "DATABASE_URL=sqlite://\nDB_POOL_SIZE=\nDB_ECHO=  \nDB_STATEMENT_TIMEOUT=99\n"
    )
    monkeypatch.setenv("DB_STATEMENT_TIMEOUT", "")  # set, so it wins over the file
    monkeypatch.setenv("DB_LOCK_TIMEOUT", " 2 ")
    assert load_settings() == Settings(database_url="sqlite://", lock_timeout=2)


def test_settings_built_in_code_read_no_environment(
    monkeypatch: pytest.MonkeyPatch, clean_env: Path
) -> None:
    """Settings(...) takes its arguments only: the environment and .env play no part."""
    (clean_env / ".env").write_text("DB_POOL_SIZE=9\nDB_ECHO=true\n")
    monkeypatch.setenv("DATABASE_URL", "sqlite:///env.db")
    monkeypatch.setenv("DB_STATEMENT_TIMEOUT", "99")
    monkeypatch.setenv("DB_POOL_SIZE", "not a number")
    assert Settings(database_url="sqlite://") == Settings("sqlite://", 5, 15, 30, 10, 15, 5, 30)


def test_settings_are_immutable_hashable_and_checked_again_on_replace() -> None:
    """A Settings cannot change in place, serves as a dict key, and replace() validates anew."""
    settings = Settings(database_url="postgres://u:p@h/db")
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.pool_size = 50  # type: ignore[misc]
    assert {settings: 1}[Settings(database_url="postgresql+psycopg2://u:p@h/db")] == 1
    assert dataclasses.replace(settings, pool_size=7).pool_size == 7
    with pytest.raises(ConfigurationError, match=r"^DB_STATEMENT_TIMEOUT must be "):
        dataclasses.replace(settings, statement_timeout=math.inf)


def test_env_example_documents_every_variable_with_its_default() -> None:
    """.env.example sets each variable, and loads as is to the documented defaults."""
    root = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
    example = root / ".env.example"
    lines = example.read_text(encoding="utf-8").splitlines()
    migration_variables = {"DB_MIGRATION_LOCK_TIMEOUT", "DB_MIGRATION_RETRY_FOR"}
    assert {line.split("=")[0] for line in lines if "=" in line and line[0] != "#"} == {
        *VARIABLES.values(),
        *migration_variables,
    }
    settings = load_settings(example)
    assert settings == Settings(database_url=settings.database_url)
    assert load_migration_settings(example) == MigrationSettings()


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
        ("DB_MIGRATION_RETRY_FOR", "inf"),
        ("DB_MIGRATION_LOCK_TIMEOUT", "2147484"),
    ],
)
def test_bad_migration_settings_name_their_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    """A malformed or out-of-range DB_MIGRATION_* value raises ConfigurationError naming it."""
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError, match=name):
        load_migration_settings(None)
