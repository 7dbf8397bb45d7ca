"""The todo-db command-line tool on SQLite, called in-process through ``main([...])``.

What only a real process can show (exit status, stderr, the fallback database file,
``.env`` in the working directory) is tested with the console script itself in
``tests/integration/test_cli_script.py``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import Engine, event
from sqlalchemy.engine import make_url

from tests.cli_runner import (
    FALLBACK_NOTE,
    SENTINEL,
    UNREACHABLE,
    cli,
    cli_json,
    use_workdir,
)
from tests.migration_scripts import HEAD
from todo_backend import TaskRead, __version__
from todo_backend.cli import ExitCode, describe_endpoint, redact, resolve_settings


@pytest.fixture(autouse=True)
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory; in-process runs use ./todo.db through DATABASE_URL."""
    return use_workdir(tmp_path, monkeypatch)


# -- in-process: parser, output and error mapping ---------------------------------------


def test_help_documents_every_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    """`--help` exits 0 and lists every exit code with its meaning."""
    code, out, _ = cli(capsys, "--help")
    assert code == 0
    assert "exit codes:" in out
    for exit_code in ExitCode:
        assert f"\n  {int(exit_code)}  " in out
    for command in ("demo", "init", "check", "add", "list", "done", "delete"):
        assert f"    {command} " in out


def test_version_and_missing_command(capsys: pytest.CaptureFixture[str]) -> None:
    """`--version` prints the version; no command at all is a usage error."""
    code, out, _ = cli(capsys, "--version")
    assert (code, out.strip()) == (0, f"todo-db {__version__}")
    code, _, err = cli(capsys)
    assert code == ExitCode.USAGE
    assert "the following arguments are required: COMMAND" in err


def test_database_url_before_and_after_the_subcommand(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--database-url works before the command, and one after it wins over one before."""
    code, _, err = cli(capsys, "--database-url", "sqlite:///a.db", "add", "--user", "u", "in a")
    assert (code, err) == (0, "")
    assert (workdir / "a.db").is_file()
    tasks = cli_json(
        capsys,
        *("--database-url", "sqlite:///b.db", "list", "--user", "u", "--json"),
        *("--database-url", "sqlite:///a.db"),
    )
    assert [t["title"] for t in tasks] == ["in a"]
    assert not (workdir / "b.db").exists()


def test_list_table_filters_and_limit(capsys: pytest.CaptureFixture[str]) -> None:
    """list prints a table newest first, filters by state, and says when --limit cut it."""
    for title in ("first", "second", "third"):
        cli(capsys, "add", "--user", "alice", title)
    cli(capsys, "done", "--user", "alice", "2")

    code, out, _ = cli(capsys, "list", "--user", "alice")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "DONE", "CREATED", "(UTC)", "TITLE"]
    assert [line.split()[:2] + line.split()[4:] for line in lines[1:]] == [
        ["3", "no", "third"],
        ["2", "yes", "second"],
        ["1", "no", "first"],
    ]
    pending = cli_json(capsys, "list", "--user", "alice", "--pending", "--json")
    assert [t["id"] for t in pending] == [3, 1]
    done = cli_json(capsys, "list", "--user", "alice", "--done", "--json")
    assert [t["id"] for t in done] == [2]

    _, out, _ = cli(capsys, "list", "--user", "alice", "--limit", "2")
    assert out.splitlines()[-1] == "(the newest 2 shown; --limit takes up to 100)"
    _, out, _ = cli(capsys, "list", "--user", "bob", "--done")
    assert out == "no done tasks for user bob\n"


def test_add_and_done_print_one_line_or_json(capsys: pytest.CaptureFixture[str]) -> None:
    """add and done print one line, or the TaskRead object with --json; tables clip titles."""
    title = "x" * 200
    code, out, _ = cli(capsys, "add", "--user", "alice", title)
    assert (code, out) == (0, f"added task 1 for user alice: {title} (pending)\n")
    code, out, _ = cli(capsys, "done", "--user", "alice", "1")
    assert (code, out) == (0, f"completed task 1 for user alice: {title} (done)\n")
    _, out, _ = cli(capsys, "list", "--user", "alice")
    assert out.splitlines()[1].endswith(" " + "x" * 59 + "…")

    added = cli_json(capsys, "add", "--user", "bob", "with json", "--json")
    assert set(added) == set(TaskRead.model_fields)  # every column
    assert (added["id"], added["user_id"], added["complete"]) == (2, "bob", False)
    assert cli_json(capsys, "done", "--user", "bob", "2", "--json")["complete"] is True


def test_other_users_cannot_complete_or_delete(capsys: pytest.CaptureFixture[str]) -> None:
    """done and delete on another user's task, or an id that cannot exist, are 'not found'."""
    cli(capsys, "add", "--user", "alice", "mine")
    for args in (
        ("done", "--user", "bob", "1"),
        ("delete", "--user", "bob", "1"),
        ("done", "--user", "alice", "0"),
        ("delete", "--user", "alice", str(2**70)),
    ):
        code, out, err = cli(capsys, *args)
        assert code == ExitCode.NOT_FOUND
        assert out == ""
        assert err == f"todo-db: error: no task {args[-1]} for user {args[2]}\n"
    [task] = cli_json(capsys, "list", "--user", "alice", "--json")
    assert (task["title"], task["complete"]) == ("mine", False)
    assert cli(capsys, "delete", "--user", "alice", "1") == (
        0,
        "deleted task 1 for user alice\n",
        "",
    )


def test_invalid_user_ids_are_validation_errors(capsys: pytest.CaptureFixture[str]) -> None:
    """A user id with surrounding spaces, control characters or 256 characters exits 5."""
    for user in (" alice", "al\x01ice", "u" * 256):
        code, out, err = cli(capsys, "list", "--user", user)
        assert code == ExitCode.INVALID_INPUT
        assert out == ""
        [line] = err.splitlines()
        assert line.startswith("todo-db: error: invalid user: ")


def test_bad_limits_and_ids_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    """--limit outside 1..100 or not a number, and a non-integer id, exit 2."""
    for args in (
        ("list", "--user", "a", "--limit", "0"),
        ("list", "--user", "a", "--limit", "101"),
        ("list", "--user", "a", "--limit", "ten"),
        ("done", "--user", "a", "one"),
        ("list", "--user", "a", "--done", "--pending"),
    ):
        code, out, err = cli(capsys, *args)
        assert code == ExitCode.USAGE
        assert out == ""
        assert "error: argument" in err


def test_invalid_command_that_looks_like_a_url_is_masked(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A URL given where the command belongs is echoed by argparse with its password masked."""
    code, _, err = cli(capsys, UNREACHABLE, "list")
    assert code == ExitCode.USAGE
    assert SENTINEL not in err
    assert "invalid choice: 'postgresql://u:***@127.0.0.1:1/db'" in err


def test_configuration_errors_exit_3(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unsupported scheme, a bad DB_* value or a malformed .env URL exits 3, no fallback."""
    code, _, err = cli(capsys, "list", "--user", "a", "--database-url", f"mysql://u:{SENTINEL}@h/d")
    assert code == ExitCode.CONFIGURATION
    assert "scheme 'mysql' is not supported" in err
    assert SENTINEL not in err

    monkeypatch.delenv("DATABASE_URL")
    (workdir / ".env").write_text("DATABASE_URL=sqlite:///x.db\nDB_POOL_SIZE=many\n")
    code, _, err = cli(capsys, "init")
    assert (code, err) == (
        ExitCode.CONFIGURATION,
        "todo-db: error: DB_POOL_SIZE must be an integer from 1 to 1000: "
        "fix it in the environment or in .env (see .env.example)\n",
    )

    (workdir / ".env").write_text("DATABASE_URL=:not a url:\n")
    code, _, err = cli(capsys, "init")
    assert code == ExitCode.CONFIGURATION
    assert "DATABASE_URL is not a valid URL" in err
    assert FALLBACK_NOTE not in err
    assert not (workdir / "todo.db").exists()


def test_blank_database_url_falls_back(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A blank DATABASE_URL in the environment counts as unset, even over a .env value."""
    (workdir / ".env").write_text("DATABASE_URL=sqlite:///from_env.db\n")
    monkeypatch.setenv("DATABASE_URL", "  ")
    code, _, err = cli(capsys, "init")
    assert (code, err) == (0, f"todo-db: {FALLBACK_NOTE}\n")
    assert (workdir / "todo.db").is_file()
    assert not (workdir / "from_env.db").exists()


def test_unreachable_database_exits_4(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A refused connection or an unopenable SQLite file exits 4 and points at `todo-db check`."""
    for url in (UNREACHABLE, f"sqlite:///{workdir}/missing/dir/x.db"):
        code, out, err = cli(capsys, "add", "--user", "a", "t", "--database-url", url)
        assert code == ExitCode.UNAVAILABLE
        assert out == ""
        [line] = err.splitlines()
        assert line.startswith("todo-db: error: cannot connect to the database: ")
        assert line.endswith("Run `todo-db check` to see what is wrong.")
        assert SENTINEL not in err


def test_a_refused_statement_exits_1(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A tasks table of the wrong shape makes the statement fail: exit 1, one line, no SQL."""
    with sqlite3.connect(workdir / "odd.db") as conn:
        conn.execute("CREATE TABLE tasks (x INTEGER)")
    conn.close()
    code, _, err = cli(capsys, "list", "--user", "a", "--database-url", "sqlite:///odd.db")
    assert code == ExitCode.DATABASE_ERROR
    assert err.startswith("todo-db: error: the database is behind the code")
    assert "todo-db migrate" in err
    assert len(err.splitlines()) == 1
    assert "SELECT" not in err


def test_check_reports_a_healthy_sqlite_database(capsys: pytest.CaptureFixture[str]) -> None:
    """check on the SQLite file says reachable, names SQLite, and exits 0."""
    code, out, err = cli(capsys, "check")
    assert (code, err) == (0, "")
    report = dict(line.split(":", 1) for line in out.splitlines())
    assert report["database"].strip() == "sqlite:///todo.db"
    assert report["reachable"].strip() == "yes"
    assert report["latency"].strip().endswith("ms (connect and one query)")
    assert report["server"].strip().startswith("SQLite 3.")
    assert report["tls"].strip() == "not applicable (SQLite)"
    assert report["endpoint"].strip() == "embedded SQLite (todo.db)"


def test_check_masks_a_password_given_as_a_query_parameter(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A password in the URL's query string (libpq accepts one) is masked in the report too."""
    url = f"postgresql://u@127.0.0.1:1/db?password={SENTINEL}"
    code, out, err = cli(capsys, "check", "--database-url", url)
    assert code == ExitCode.UNAVAILABLE
    assert SENTINEL not in out + err
    assert "database:  postgresql+psycopg2://u:***@127.0.0.1:1/db" in out


def test_init_is_idempotent(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """init creates the table once; a second run says there is nothing to do."""
    code, out, _ = cli(capsys, "init")
    assert (code, out) == (0, "table tasks created on sqlite:///todo.db\n")
    code, out, _ = cli(capsys, "init")
    assert (code, out) == (0, "table tasks already present, nothing to do on sqlite:///todo.db\n")


def test_demo_replaces_only_its_own_earlier_tasks(capsys: pytest.CaptureFixture[str]) -> None:
    """A second demo removes the first demo's tasks and leaves other users' tasks alone."""
    cli(capsys, "add", "--user", "alice", "keep me")
    assert cli(capsys, "demo")[0] == 0
    code, out, _ = cli(capsys, "demo")
    assert code == 0
    assert "table tasks is ready" in out
    assert "removed 2 task(s) left by an earlier demo" in out
    assert [t["title"] for t in cli_json(capsys, "list", "--user", "alice", "--json")] == [
        "keep me"
    ]
    assert len(cli_json(capsys, "list", "--user", "demo-bob", "--json")) == 1


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("add", "--user", "alice", "undecodable \udcff byte"), "invalid title: "),
        (("add", "--user", "alice", "ok", "--description", "\x1b[31m"), "invalid description: "),
        (("add", "--user", "alice\udcff", "ok"), "user_id must be text that UTF-8 can encode"),
        (("list", "--user", "\u3000alice"), "user_id must not start or end with whitespace"),
        (("done", "--user", "al\x00ice", "1"), "user_id must not contain control characters"),
        (("delete", "--user", "\ud800", "1"), "user_id must be text that UTF-8 can encode"),
    ],
)
def test_text_the_rules_refuse_is_one_clear_error(
    capsys: pytest.CaptureFixture[str], args: tuple[str, ...], named: str
) -> None:
    """Undecodable argv bytes (lone surrogates) and controls: exit 5, one line naming the field."""
    code, out, err = cli(capsys, *args)
    assert code == ExitCode.INVALID_INPUT
    assert out == ""
    [line] = err.splitlines()
    assert line.startswith("todo-db: error: invalid ")
    assert named in line
    assert cli_json(capsys, "list", "--user", "alice", "--json") == []


def _closing_hint(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    code, out, _ = cli(capsys, "demo", *args)
    assert code == 0
    last = out.splitlines()[-1]
    assert last.startswith("demo finished; try: ")
    return last.removeprefix("demo finished; try: ")


@pytest.fixture
def installed(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in ``todo-db`` script in ./env/bin, run as sys.argv[0]; PATH is the system's."""
    script = workdir / "env" / "bin" / "todo-db"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.setattr("sys.argv", [str(script), "demo"])
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.delenv("VIRTUAL_ENV", raising=False)
    return script


def test_demo_hint_names_a_program_off_path_by_its_path(
    installed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Run from a bin directory the shell does not search (nox, uv run), the hint gives the path."""
    assert _closing_hint(capsys) == "env/bin/todo-db list --user demo-alice"


def test_demo_hint_uses_the_bare_name_only_when_path_finds_this_program(
    installed: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """On PATH, the bare name; inside an active virtualenv (a tool's), the path again."""
    monkeypatch.setenv("PATH", f"{installed.parent}:/usr/bin:/bin")
    assert _closing_hint(capsys) == "todo-db list --user demo-alice"
    monkeypatch.setenv("VIRTUAL_ENV", str(installed.parent.parent))
    assert _closing_hint(capsys) == "env/bin/todo-db list --user demo-alice"


def test_demo_hint_repeats_the_database_url_but_never_a_password(
    installed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A --database-url given to the demo is in the hint; one with a password is only mentioned."""
    assert _closing_hint(capsys, "--database-url", "sqlite:///other.db") == (
        "env/bin/todo-db list --user demo-alice --database-url sqlite:///other.db"
    )


def test_demo_hint_for_a_program_in_the_working_directory_or_embedded(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """./todo-db for a script in the working directory; the bare name when main() is embedded."""
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setattr("sys.argv", [str(workdir / "todo-db"), "demo"])
    assert _closing_hint(capsys) == "./todo-db list --user demo-alice"
    monkeypatch.setattr("sys.argv", ["/srv/app/serve.py"])
    assert _closing_hint(capsys) == "todo-db list --user demo-alice"


def test_demo_hint_after_python_dash_m(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Run as ``python -m todo_backend``, the hint runs the same interpreter the same way."""
    monkeypatch.setattr("sys.argv", ["/somewhere/todo_backend/__main__.py", "demo"])
    monkeypatch.setattr("sys.executable", "/opt/py/bin/python3")
    assert _closing_hint(capsys) == "/opt/py/bin/python3 -m todo_backend list --user demo-alice"


# -- pure helpers -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "postgresql://u:p@ep-cool-name-123456-pooler.eu-central-1.aws.neon.tech/db",
            "pooled (Neon PgBouncer, transaction mode)",
        ),
        ("postgresql://u:p@ep-cool-name-123456.eu-central-1.aws.neon.tech/db", "direct"),
        ("postgresql://u:p@db.example.com/ep-x-pooler", "direct"),
        ("postgresql://u@127.0.0.1:5432/db", "direct"),
        ("postgresql://u@/db?host=/var/run/postgresql", "direct (Unix socket)"),
        ("sqlite:///todo.db", "embedded SQLite (todo.db)"),
        ("sqlite://", "embedded SQLite (in memory)"),
    ],
)
def test_describe_endpoint(url: str, expected: str) -> None:
    """Only a first DNS label containing -pooler makes an endpoint pooled."""
    assert describe_endpoint(make_url(url)) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("postgresql://u:pw@h/db", "postgresql://u:***@h/db"),
        ("'postgres://u:p@ss@h/db' (x)", "'postgres://u:***@h/db' (x)"),
        ("postgresql://:pw@h", "postgresql://:***@h"),
        ("host=h password=pw user=u", "host=h password=*** user=u"),
        ("postgresql://h/db?Password=pw&x=1", "postgresql://h/db?Password=***&x=1"),
        ("postgresql://u:***@h/db", "postgresql://u:***@h/db"),
        ("postgresql://USER:PASSWORD@HOST/DB", "postgresql://USER:PASSWORD@HOST/DB"),
        ("sqlite:///todo.db and user@example.com", "sqlite:///todo.db and user@example.com"),
    ],
)
def test_redact(text: str, expected: str) -> None:
    """Passwords in URLs and password= pairs become ***; the usage hint stays readable."""
    assert redact(text) == expected


def test_migrate_creates_then_reports_current(capsys: pytest.CaptureFixture[str]) -> None:
    """`migrate` upgrades a fresh database once; a second run and `--check` find it current."""
    code, out, _ = cli(capsys, "migrate")
    assert code == ExitCode.OK
    assert f"migrated from an empty schema to {HEAD}" in out
    code, out, _ = cli(capsys, "migrate")
    assert code == ExitCode.OK
    assert f"already at revision {HEAD}, nothing to do" in out
    code, out, _ = cli(capsys, "migrate", "--check")
    assert code == ExitCode.OK
    assert "identical to the models" in out


def test_schema_created_by_a_command_is_managed_by_migrations(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A database first touched by `add` is at the newest revision: nothing to migrate."""
    assert cli(capsys, "add", "--user", "alice", "first")[0] == ExitCode.OK
    code, out, _ = cli(capsys, "migrate", "--check")
    assert code == ExitCode.OK
    assert f"revision {HEAD}, newest {HEAD}" in out


def test_migrate_check_fails_for_a_database_without_history(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A schema made by init_db has no migration history: --check exits 7, migrate refuses."""
    from todo_backend.db import create_db_engine, init_db

    engine = create_db_engine(f"sqlite:///{workdir / 'todo.db'}")
    init_db(engine)
    engine.dispose()
    code, _, err = cli(capsys, "migrate", "--check")
    assert code == ExitCode.MIGRATION_NEEDED
    assert "no migration history" in err
    code, _, err = cli(capsys, "migrate")
    assert code == ExitCode.DATABASE_ERROR
    assert "stamp" in err


def test_migrate_opens_one_connection_and_a_transaction_per_revision(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`migrate` uses one connection: one transaction to look, then one per revision."""
    seen = {"engine_connect": 0, "begin": 0}

    def count(name: str) -> Callable[..., None]:
        def listener(*_: object) -> None:
            seen[name] += 1

        return listener

    listeners = [(name, count(name)) for name in seen]
    for name, listener in listeners:
        event.listen(Engine, name, listener)
    try:
        code, out, _ = cli(capsys, "migrate")
    finally:
        for name, listener in listeners:
            event.remove(Engine, name, listener)
    assert code == ExitCode.OK
    assert f"migrated from an empty schema to {HEAD}" in out
    # One transaction to read the revision, then one per revision (numbered from 0001).
    assert seen == {"engine_connect": 1, "begin": 1 + int(HEAD)}


def test_migrate_on_a_database_at_an_unknown_revision_fails_in_one_line(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Alembic's error for a revision this release does not ship is one line and exit 1."""
    assert cli(capsys, "migrate")[0] == ExitCode.OK
    with sqlite3.connect(workdir / "todo.db") as conn:
        conn.execute("update alembic_version set version_num = '0099'")
    conn.close()
    code, out, err = cli(capsys, "migrate")
    assert code == ExitCode.DATABASE_ERROR
    assert out == ""
    assert err == "todo-db: error: Can't locate revision identified by '0099'\n"
    code, _, err = cli(capsys, "migrate", "--check")
    assert code == ExitCode.MIGRATION_NEEDED
    assert "revision 0099, which this package does not ship" in err


@pytest.mark.parametrize("database_url", ["sqlite:///explicit.db", None])
def test_db_settings_apply_to_every_database_choice(
    monkeypatch: pytest.MonkeyPatch, database_url: str | None
) -> None:
    """DB_* tuning applies with --database-url and with the SQLite fallback alike."""
    monkeypatch.delenv("DATABASE_URL")
    monkeypatch.setenv("DB_CONNECT_TIMEOUT", "3")
    monkeypatch.setenv("DB_ECHO", "on")
    settings = resolve_settings(database_url)
    assert settings.connect_timeout == 3
    assert settings.echo is True
    assert settings.database_url == (database_url or "sqlite:///todo.db")
