"""Run ``todo-db`` in-process or as the real console script, for the CLI tests.

``tests/unit/test_cli.py`` (in-process, SQLite), ``tests/integration/test_cli_script.py``
(the console script on SQLite files) and ``tests/integration/test_cli_pg.py``
(PostgreSQL) share these helpers. Every run gets an explicit environment without
``DATABASE_URL`` or ``DB_*`` variables unless the test sets them, and every run is
checked for a traceback on stderr: no error path of the tool may show one.
Independent runs can be started together (:func:`run_all`): most of a run's time is
importing SQLAlchemy, which overlaps well.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from todo_backend.cli import ExitCode, main

# The console script installed next to the interpreter running the tests.
TODO_DB = Path(sys.executable).with_name("todo-db")
SENTINEL = "S3cretSentinel"
UNREACHABLE = f"postgresql://u:{SENTINEL}@127.0.0.1:1/db"  # port 1 refuses at once
FALLBACK_NOTE = "no DATABASE_URL set; using the embedded SQLite database ./todo.db"


def cli_env(**variables: str) -> dict[str, str]:
    """Return this process's environment without database settings, plus *variables*.

    The copy keeps coverage's own variables, so a run under ``coverage run`` measures
    the subprocess too.
    """
    env = {
        name: value
        for name, value in os.environ.items()
        if name != "DATABASE_URL" and not name.startswith("DB_")
    }
    env.update(variables)
    return env


@dataclass(frozen=True)
class Call:
    """One run of the tool: arguments, working directory, environment, entry point.

    ``env=None`` means :func:`cli_env` without additions; ``module=True`` runs
    ``python -m todo_backend`` instead of the ``todo-db`` console script;
    ``close_stdout=True`` closes the reading end of stdout at once, like ``| head -0``.
    """

    args: Sequence[str]
    cwd: Path
    env: dict[str, str] | None = None
    module: bool = False
    close_stdout: bool = False

    def command(self) -> list[str]:
        """The argv to execute."""
        if self.module:
            return [sys.executable, "-m", "todo_backend", *self.args]
        assert TODO_DB.is_file(), f"{TODO_DB} is missing: install the project (uv sync)"
        return [str(TODO_DB), *self.args]


def run_all(calls: Sequence[Call]) -> list[subprocess.CompletedProcess[str]]:
    """Start every call at once, wait for all, and return their results in order.

    Fails the test if any stderr holds a traceback.
    """
    procs = [
        subprocess.Popen(
            call.command(),
            cwd=call.cwd,
            env=cli_env() if call.env is None else call.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for call in calls
    ]
    for call, proc in zip(calls, procs, strict=True):
        if call.close_stdout and proc.stdout is not None:
            proc.stdout.close()  # every write of the child now hits a closed pipe
    results = []
    for proc in procs:
        out, err = proc.communicate()
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    for result in results:
        assert "Traceback" not in result.stderr, result.stderr
    return results


def run_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, module: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run ``todo-db ARGS`` (or ``python -m todo_backend ARGS``) in *cwd*; return the result."""
    [result] = run_all([Call(args, cwd, env, module)])
    return result


def run_json(*args: str, cwd: Path, env: dict[str, str] | None = None, module: bool = False) -> Any:
    """Run ``todo-db ARGS``, require exit status 0, and return its stdout parsed as JSON."""
    result = run_cli(*args, cwd=cwd, env=env, module=module)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    """Return the ``todo-db: error:`` lines of *result*'s stderr."""
    return [line for line in result.stderr.splitlines() if line.startswith("todo-db: error:")]


def use_workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Make *tmp_path* the working directory, with ``DATABASE_URL=sqlite:///todo.db``.

    Setting DATABASE_URL keeps the fallback note out of stderr in tests about other
    things; the subprocesses get an environment without it (see :func:`cli_env`).
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
