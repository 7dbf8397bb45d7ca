"""The todo-db command-line tool on SQLite.

The real console script runs in a temporary directory for what only a process can
show (exit status, stderr, the fallback database file, ``.env`` in the working
directory); the rest calls ``main([...])`` in-process, which is faster and measured
reliably by coverage.
"""

from __future__ import annotations

import json
import os
import sqlite3
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from tests.cli_runner import (
    FALLBACK_NOTE,
    SENTINEL,
    Call,
    cli_env,
    error_lines,
    run_all,
    run_cli,
    run_json,
)
from todo_backend import __version__
from todo_backend.cli import ExitCode, describe_endpoint, main, redact

UNREACHABLE = f"postgresql://u:{SENTINEL}@127.0.0.1:1/db"  # port 1 refuses at once


@pytest.fixture(autouse=True)
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory; in-process runs use ./todo.db through DATABASE_URL.

    Setting DATABASE_URL keeps the fallback note out of stderr in tests about other
    things; the subprocesses get an environment without it (see cli_env).
    """
    monkeypatch.chdir(tmp_path)
    for name in [name for name in os.environ if name.startswith("DB_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("DATABASE_URL", "sqlite:///todo.db")
    return tmp_path


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``main(args)`` in-process; return the exit status, stdout and stderr."""
    code = main(list(args))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def cli_json(capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    """Run ``main(args)`` with ``--json`` output; require success and parse stdout."""
    code, out, err = cli(capsys, *args)
    assert code == ExitCode.OK, err
    return json.loads(out)


# -- the real console script -----------------------------------------------------------


def test_demo_runs_on_the_fallback_file_and_leaves_it_usable(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`todo-db demo` with no DATABASE_URL says so once, shows isolation, and leaves ./todo.db."""
    result = run_cli("demo", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [f"todo-db: {FALLBACK_NOTE}"]
    out = result.stdout
    assert "table tasks created" in out
    assert "demo-alice's tasks:" in out
    assert "demo-bob's tasks:" in out
    assert "Walk the dog" in out
    assert "demo-alice completes task 1 and deletes task 2" in out
    assert out.count("no task 1 for user demo-bob") == 5
    assert "ALLOWED" not in out
    assert "demo-alice's task 1 afterwards: unchanged" in out
    assert (workdir / "todo.db").is_file()
    tasks = cli_json(capsys, "list", "--user", "demo-alice", "--json")
    assert [(t["id"], t["title"], t["complete"]) for t in tasks] == [(1, "Buy oat milk", True)]


def test_task_lifecycle_with_database_url_from_dotenv(workdir: Path) -> None:
    """add, list and done work without `init` on the DATABASE_URL of ./.env, in TaskRead JSON."""
    (workdir / ".env").write_text("DATABASE_URL=sqlite:///tasks.db\n")
    added_run = run_cli(
        *("add", "--user", "alice", "Buy milk", "--description", "2 litres", "--json"),
        cwd=workdir,
    )
    assert added_run.returncode == 0, added_run.stderr
    assert added_run.stderr == ""  # no fallback note: .env named the database
    assert (workdir / "tasks.db").is_file()
    assert not (workdir / "todo.db").exists()
    added = json.loads(added_run.stdout)
    assert added["id"] == 1
    assert added["user_id"] == "alice"
    assert added["title"] == "Buy milk"
    assert added["description"] == "2 litres"
    assert added["complete"] is False
    assert added["created_at"].endswith("Z")
    created = datetime.fromisoformat(added["created_at"])
    assert created.utcoffset() == timedelta(0)

    assert run_json("list", "--user", "alice", "--json", cwd=workdir, module=True) == [added]

    done = run_json("done", "--user", "alice", "1", "--json", cwd=workdir)
    assert done["complete"] is True
    assert done["created_at"] == added["created_at"]
    assert datetime.fromisoformat(done["updated_at"]) >= created


def test_database_url_after_the_subcommand_and_isolation(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--database-url after the command beats DATABASE_URL; bob cannot delete alice's task."""
    assert cli(capsys, "add", "--user", "alice", "private")[0] == ExitCode.OK
    env = cli_env(DATABASE_URL=UNREACHABLE)  # would exit 4 if it were used
    result = run_cli(
        "delete", "--user", "bob", "1", "--database-url", "sqlite:///todo.db", cwd=workdir, env=env
    )
    assert result.returncode == ExitCode.NOT_FOUND
    assert result.stderr == "todo-db: error: no task 1 for user bob\n"
    assert result.stdout == ""
    [task] = cli_json(capsys, "list", "--user", "alice", "--json")
    assert task["title"] == "private"


def test_every_failure_is_one_masked_line_and_its_exit_code(tmp_path: Path) -> None:
    """Failures exit with their documented code, one masked line per error, no traceback."""
    dirs = {name: tmp_path / name for name in ("check", "usage", "config", "invalid", "pipe")}
    for path in dirs.values():
        path.mkdir()
    check, usage, config, invalid, pipe = run_all(
        [
            Call(["check", "--database-url", UNREACHABLE], dirs["check"]),
            Call(["list", "--user", "a", f"--bogus={UNREACHABLE}"], dirs["usage"]),
            Call(
                ["list", "--user", "a"],
                dirs["config"],
                env=cli_env(DATABASE_URL=f"postgresql://u:{SENTINEL}@/db"),
            ),
            Call(["add", "--user", "alice", " ", "--description", "bell\a"], dirs["invalid"]),
            Call(["demo"], dirs["pipe"], close_stdout=True),
        ]
    )
    for result in (check, usage, config, invalid, pipe):
        assert SENTINEL not in (result.stdout or "") + result.stderr

    assert check.returncode == ExitCode.UNAVAILABLE
    assert "database:  postgresql+psycopg2://u:***@127.0.0.1:1/db" in check.stdout
    assert "reachable: no" in check.stdout
    assert "endpoint:  direct" in check.stdout
    [line] = error_lines(check)
    assert "Connection refused" in line
    assert "Check the host and port (127.0.0.1:1)" in line

    assert usage.returncode == ExitCode.USAGE
    assert "unrecognized arguments: --bogus=postgresql://u:***@127.0.0.1:1/db" in usage.stderr

    assert config.returncode == ExitCode.CONFIGURATION
    [line] = config.stderr.splitlines()  # no fallback note: a malformed URL is no URL
    assert line.startswith("todo-db: error: DATABASE_URL postgresql://u:***@/db names no host")
    assert not (dirs["config"] / "todo.db").exists()

    assert invalid.returncode == ExitCode.INVALID_INPUT
    lines = error_lines(invalid)
    assert [line.split(":")[2].strip() for line in lines] == [
        "invalid title",
        "invalid description",
    ]
    assert "control characters (found U+0007 at position 4)" in lines[1]
    assert "input_value" not in invalid.stderr
    assert invalid.stdout == ""

    assert pipe.returncode == ExitCode.OUTPUT_CLOSED
    assert "BrokenPipeError" not in pipe.stderr


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
    assert set(added) == {
        "id",
        "user_id",
        "title",
        "description",
        "complete",
        "created_at",
        "updated_at",
    }
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
        "todo-db: error: DB_POOL_SIZE must be an integer, got 'many'\n",
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
    assert err.startswith("todo-db: error: the database refused the statement: no such column")
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
    assert "database:  postgresql+psycopg2://u@127.0.0.1:1/db?password=***" in out


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
