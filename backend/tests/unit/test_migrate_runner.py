"""The revision runner on SQLite and offline: steps per revision, online blocks, rendered SQL."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import inspect
from sqlalchemy.exc import OperationalError

from tests.migration_scripts import HEAD, ONLINE_INDEX, SCRATCH, scripts_with
from todo_backend import migrate
from todo_backend.db import create_db_engine


@pytest.fixture
def url(tmp_path: Path) -> str:
    """A URL for an SQLite file that does not exist yet."""
    return f"sqlite:///{tmp_path / 'todo.db'}"


def test_an_online_index_revision_is_a_plain_index_build_on_sqlite(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """outside_transaction() with a concurrent index builds it in the transaction on SQLite."""
    scripts_with(
        tmp_path,
        monkeypatch,
        ONLINE_INDEX,
    )
    assert migrate.upgrade(url) == (None, SCRATCH)
    engine = create_db_engine(url)
    assert "ix_tasks_title" in {ix["name"] for ix in inspect(engine).get_indexes("tasks")}
    engine.dispose()


def test_a_failing_revision_keeps_the_revisions_before_it(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each revision is one transaction: a failing one keeps those before it, nothing of its own."""
    scripts_with(
        tmp_path,
        monkeypatch,
        """
        op.create_table("half_done", sa.Column("id", sa.Integer(), primary_key=True))
        op.execute("select no_such_function()")
        """,
    )
    with pytest.raises(migrate.MigrationError, match="no_such_function") as raised:
        migrate.upgrade(url)
    assert isinstance(raised.value.__cause__, OperationalError)
    assert migrate.current_revision(url) == HEAD
    engine = create_db_engine(url)
    assert "half_done" not in inspect(engine).get_table_names()
    engine.dispose()


def test_offline_sql_shows_the_lock_bound_and_0002s_commit_point(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`migrate sql` starts each PostgreSQL transaction with the lock bound; 0002 has two."""
    monkeypatch.setenv("DB_MIGRATION_LOCK_TIMEOUT", "2.5")
    sql = migrate.upgrade_sql("postgresql://", "0001:0002")
    transactions = sql.split("BEGIN;")[1:]
    assert len(transactions) == 2
    assert all(part.lstrip().startswith("SET LOCAL lock_timeout = 2500;") for part in transactions)
    first, second = transactions
    assert first.count("NOT VALID") == 3
    assert "VALIDATE" not in first
    assert second.count("VALIDATE CONSTRAINT") == 3
    assert "UPDATE alembic_version" in second
    assert "lock_timeout" not in migrate.upgrade_sql("sqlite://", "0001:0002")


def test_a_concurrent_block_renders_outside_any_transaction_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offline, outside_transaction() closes the transaction before the block, reopens after."""
    scripts_with(
        tmp_path,
        monkeypatch,
        """
        from todo_backend.migrate import outside_transaction

        with outside_transaction():
            op.create_index(
                "ix_tasks_title", "tasks", ["title"], postgresql_concurrently=True
            )
        """,
    )
    sql = migrate.upgrade_sql("postgresql://", f"{HEAD}:{SCRATCH}")
    before, after = sql.split("CREATE INDEX CONCURRENTLY ix_tasks_title ON tasks (title);")
    assert before.rstrip().endswith("COMMIT;")
    assert after.lstrip().startswith("BEGIN;\n\nSET LOCAL lock_timeout")
    assert "UPDATE alembic_version" in after
