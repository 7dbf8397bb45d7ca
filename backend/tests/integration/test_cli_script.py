"""The real ``todo-db`` console script in subprocesses, on SQLite files.

These run in the integration session: a process start costs most of a second
(importing SQLAlchemy and pydantic), too slow for the unit gate on three Pythons.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from tests.cli_runner import (
    FALLBACK_NOTE,
    SENTINEL,
    UNREACHABLE,
    Call,
    cli,
    cli_env,
    cli_json,
    error_lines,
    run_all,
    run_cli,
    run_json,
    use_workdir,
)
from todo_backend.cli import ExitCode


@pytest.fixture(autouse=True)
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory; in-process runs use ./todo.db through DATABASE_URL."""
    return use_workdir(tmp_path, monkeypatch)


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


def test_the_demos_closing_hint_works_from_where_the_demo_ran(workdir: Path) -> None:
    """The hint is a command line that runs, in a shell without the tool's bin on PATH."""
    shell = cli_env(PATH="/usr/bin:/bin")
    shell.pop("VIRTUAL_ENV", None)
    demo = run_cli("demo", cwd=workdir, env=shell)
    assert demo.returncode == 0, demo.stderr
    hint = demo.stdout.splitlines()[-1].removeprefix("demo finished; try: ")
    assert hint.endswith(" list --user demo-alice")
    listed = subprocess.run(
        [*shlex.split(hint), "--json"],
        cwd=workdir,
        env=shell,
        capture_output=True,
        text=True,
        check=False,
    )
    assert listed.returncode == 0, listed.stderr
    assert [task["title"] for task in json.loads(listed.stdout)] == ["Buy oat milk"]


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
