"""Lint every revision's PostgreSQL SQL with squawk, one revision at a time.

A revision is rendered with Alembic's offline mode (what ``python -m
todo_backend.migrate sql PREV:REV --url postgresql://`` prints: the runner's
``SET LOCAL lock_timeout``, its DDL, the ``alembic_version`` update) and handed to
squawk, a linter for PostgreSQL migrations, which knows which statements lock a live
table: a plain ``CREATE INDEX`` on an existing table, a ``NOT NULL`` column without a
default, a column type change, a constraint added without ``NOT VALID``, and more.
``nox -s lint`` runs ``python -m todo_backend.migration_lint``; every finding names
its revision and squawk's rule.

A revision that must break a rule says so itself, next to its code::

    squawk_exclude = {"prefer-text-field": "why this revision may break it"}

:data:`EXCLUDED_EVERYWHERE` lists the rules no revision is held to, each with why.
squawk comes from the ``squawk-cli`` package (the ``lint`` and ``test`` groups).
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from alembic import command
from alembic.script import Script, ScriptDirectory

from todo_backend import migrate
from todo_backend.errors import TodoBackendError

__all__ = ["EXCLUDED_EVERYWHERE", "Finding", "lint_revisions", "main", "revision_sql"]

EXCLUDED_EVERYWHERE: Final[Mapping[str, str]] = {
    "require-statement-timeout": (
        "a migration statement may legitimately run long (a validating scan); what "
        "must stay short is the wait for a lock, which the runner's lock_timeout bounds"
    ),
    "prefer-text-field": (
        "VARCHAR(n) is how the schema bounds a text's length in raw SQL (data contract "
        "v1.0.0); a str field with max_length is generated so, and adding such a column "
        "takes no table rewrite (only widening or narrowing n would, and squawk flags that)"
    ),
}
"""Rules squawk applies by default that no revision is held to, and why."""

PG_VERSION: Final = "15.0"
"""The oldest PostgreSQL the package supports (squawk's advice depends on it)."""


class SquawkNotFoundError(TodoBackendError):
    """The ``squawk`` executable is not installed; install the ``lint`` group."""


@dataclass(frozen=True, slots=True)
class Finding:
    """One rule a revision's SQL breaks: the revision, squawk's rule, where, and why."""

    revision: str
    rule: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"revision {self.revision}: {self.rule} (line {self.line}): {self.message}"


def _scripts(directory: Path) -> ScriptDirectory:
    config = migrate.alembic_config("postgresql://")
    config.set_main_option("script_location", str(directory))
    return ScriptDirectory.from_config(config)


def revision_sql(script: Script, directory: Path | None = None) -> str:
    """Return the PostgreSQL SQL of *script*'s upgrade alone, rendered offline."""
    config = migrate.alembic_config("postgresql://")
    config.set_main_option("script_location", str(directory or migrate.MIGRATIONS_DIR))
    down = script.down_revision
    if isinstance(down, tuple | list):  # a merge point: render from its first parent
        down = down[0] if down else None
    buffer = io.StringIO()
    config.output_buffer = buffer
    command.upgrade(config, f"{down or 'base'}:{script.revision}", sql=True)
    return buffer.getvalue()


def _squawk() -> str:
    found = shutil.which("squawk") or shutil.which("squawk", path=str(Path(sys.executable).parent))
    if found is None:
        raise SquawkNotFoundError(
            "squawk is not installed: run `uv sync --locked` (it comes with the lint group)"
        )
    return found


def lint_revisions(directory: Path | None = None) -> list[Finding]:
    """Lint each revision in *directory* (default: the package's migrations) with squawk.

    Each revision is rendered on its own and checked with squawk's default rules,
    less :data:`EXCLUDED_EVERYWHERE` and the revision's own ``squawk_exclude``.
    Returns every finding, oldest revision first; an empty list means all pass.
    """
    directory = directory or migrate.MIGRATIONS_DIR
    squawk = _squawk()
    scripts = _scripts(directory)
    findings: list[Finding] = []
    with tempfile.TemporaryDirectory(prefix="squawk-") as tmp:
        for script in reversed(list(scripts.walk_revisions())):
            path = Path(tmp) / f"{script.revision}.sql"
            path.write_text(revision_sql(script, directory), encoding="utf-8")
            own: Mapping[str, str] = getattr(script.module, "squawk_exclude", {})
            excluded = sorted({*EXCLUDED_EVERYWHERE, *own})
            findings.extend(_run(squawk, script.revision, path, excluded))
    return findings


def _run(squawk: str, revision: str, path: Path, excluded: Sequence[str]) -> list[Finding]:
    args = [squawk, "--reporter", "json", f"--pg-version={PG_VERSION}", str(path)]
    if excluded:
        args.insert(1, f"--exclude={','.join(excluded)}")
    done = subprocess.run(args, capture_output=True, text=True, check=False)  # noqa: S603
    try:
        reported = json.loads(done.stdout or "[]")
    except json.JSONDecodeError as err:  # pragma: no cover - squawk's output changed
        raise RuntimeError(f"squawk said: {done.stdout}{done.stderr}") from err
    return [
        Finding(revision, str(item["rule_name"]), int(item["line"]), str(item["message"]))
        for item in reported
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``python -m todo_backend.migration_lint [DIR]``: 1 and one line per finding, or 0."""
    args = list(sys.argv[1:] if argv is None else argv)
    directory = Path(args[0]) if args else None
    try:
        findings = lint_revisions(directory)
    except TodoBackendError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for finding in findings:
        print(finding, file=sys.stderr)
    if findings:
        print(
            f"squawk: {len(findings)} finding(s); make the revision safe for a live table, "
            "or add the rule to its squawk_exclude with the reason",
            file=sys.stderr,
        )
        return 1
    print("squawk: every revision passes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
