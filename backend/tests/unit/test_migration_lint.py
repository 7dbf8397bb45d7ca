"""squawk over every revision's PostgreSQL SQL: the real ones pass, planted unsafe ones fail."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest

from todo_backend import migrate, migration_lint

# Scratch revision ids: never a real revision's four-digit number.
PLANTED_ID = "scratch_unsafe"


def plant(tmp_path: Path, upgrade_body: str, exclude: dict[str, str] | None = None) -> Path:
    """Copy the package's scripts into *tmp_path* with one more revision on top; return the copy.

    The revision revises the current head and runs *upgrade_body* (statements using
    ``op`` and ``sa``); *exclude* becomes its ``squawk_exclude``.
    """
    scripts = tmp_path / "migrations"
    shutil.copytree(migrate.MIGRATIONS_DIR, scripts, ignore=shutil.ignore_patterns("__pycache__"))
    body = textwrap.indent(textwrap.dedent(upgrade_body).strip(), "    ")
    (scripts / "versions" / f"{PLANTED_ID}.py").write_text(
        '"""A revision planted by a test."""\n\n'
        "import sqlalchemy as sa\nfrom alembic import op\n\n"
        f"revision = {PLANTED_ID!r}\ndown_revision = {migrate.head_revision()!r}\n"
        "branch_labels = None\ndepends_on = None\n"
        f"squawk_exclude = {exclude or {}!r}\n\n\n"
        f"def upgrade() -> None:\n{body}\n\n\n"
        "def downgrade() -> None:\n    pass\n"
    )
    return scripts


def test_the_shipped_revisions_pass() -> None:
    """Every revision the package ships passes squawk (with its stated exclusions)."""
    assert migration_lint.lint_revisions() == []


@pytest.mark.parametrize(
    ("body", "rule"),
    [
        (
            'op.create_index("ix_tasks_title", "tasks", ["title"])',
            "require-concurrent-index-creation",
        ),
        (
            'op.add_column("tasks", sa.Column("rank", sa.BigInteger(), nullable=False))',
            "adding-required-field",
        ),
        ('op.alter_column("tasks", "title", type_=sa.Text())', "changing-column-type"),
        (
            'op.create_check_constraint("ck_tasks_title_short", "tasks", "length(title) < 100")',
            "constraint-missing-not-valid",
        ),
    ],
    ids=["plain-index", "not-null-without-default", "type-change", "check-without-not-valid"],
)
def test_a_planted_unsafe_revision_is_named_with_its_rule(
    tmp_path: Path, body: str, rule: str
) -> None:
    """A revision that would lock a live table fails the lint, named with squawk's rule."""
    findings = migration_lint.lint_revisions(plant(tmp_path, body))
    assert {(f.revision, f.rule) for f in findings} == {(PLANTED_ID, rule)}
    assert str(findings[0]).startswith(f"revision {PLANTED_ID}: {rule} (line ")


def test_the_online_forms_of_the_same_changes_pass(tmp_path: Path) -> None:
    """The safe forms (concurrent index, column with default, NOT VALID check) pass.

    Once a revision commits part way (``outside_transaction``, ``commit_point``) squawk
    also wants each statement safe to rerun; ``ADD CONSTRAINT`` has no ``IF NOT
    EXISTS``, so such a revision checks first and says so, as 0002 does.
    """
    body = """
        from todo_backend.migrate import commit_point, outside_transaction

        with outside_transaction():
            op.create_index(
                "ix_tasks_title", "tasks", ["title"],
                postgresql_concurrently=True, if_not_exists=True,
            )
        op.add_column(
            "tasks",
            sa.Column("rank", sa.BigInteger(), nullable=False, server_default="0"),
        )
        op.execute(
            "ALTER TABLE tasks ADD CONSTRAINT ck_tasks_title_short"
            " CHECK (length(title) < 100) NOT VALID"
        )
        commit_point()
        op.execute("ALTER TABLE tasks VALIDATE CONSTRAINT ck_tasks_title_short")
    """
    reason = {"prefer-robust-stmts": "the test's constraint is new"}
    assert migration_lint.lint_revisions(plant(tmp_path, body, reason)) == []


def test_a_revision_may_exclude_a_rule_it_states_a_reason_for(tmp_path: Path) -> None:
    """A rule in the revision's own squawk_exclude is not reported for it."""
    scripts = plant(
        tmp_path,
        'op.create_index("ix_tasks_title", "tasks", ["title"])',
        exclude={"require-concurrent-index-creation": "a test says so"},
    )
    assert migration_lint.lint_revisions(scripts) == []


def test_the_command_exits_1_naming_the_revision_and_rule(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`python -m todo_backend.migration_lint DIR` fails with one line per finding."""
    scripts = plant(tmp_path, 'op.alter_column("tasks", "title", type_=sa.Text())')
    assert migration_lint.main([str(scripts)]) == 1
    err = capsys.readouterr().err
    assert f"revision {PLANTED_ID}: changing-column-type" in err
    assert migration_lint.main([]) == 0
    assert capsys.readouterr().out == "squawk: every revision passes\n"
