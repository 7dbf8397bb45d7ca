"""Alembic migrations on SQLite files: schema equals the models, round trips, stamping, check."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import produce_migrations, render_python_code
from alembic.runtime.migration import MigrationContext
from alembic.util.exc import CommandError
from sqlalchemy import (
    Boolean,
    CheckConstraint,
    Column,
    Engine,
    Integer,
    String,
    Table,
    event,
    inspect,
    text,
)
from sqlalchemy.engine import Row, make_url
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlmodel import SQLModel

from tests.migration_scripts import (
    HEAD,
    SCRATCH,
    model_column,
    probe_checks,
    scripts_with,
    tasks_table,
)
from todo_backend import migrate, migration_lint
from todo_backend.db import create_db_engine, get_session, init_db
from todo_backend.errors import ConfigurationError, DatabaseUnavailableError
from todo_backend.models import TaskCreate
from todo_backend.repository import TaskRepository


@pytest.fixture
def url(tmp_path: Path) -> str:
    """A URL for an SQLite file that does not exist yet."""
    return f"sqlite:///{tmp_path / 'todo.db'}"


@pytest.fixture
def engine(url: str) -> Iterator[Engine]:
    """The package's engine on the test's SQLite file, disposed afterwards."""
    engine = create_db_engine(url)
    yield engine
    engine.dispose()


def _schema(engine: Engine) -> list[tuple[str, str]]:
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "select name, sql from sqlite_master "
                "where name not like 'alembic%' and sql is not null order by name"
            )
        )
        # A table rebuilt the way SQLite documents (copy, drop, rename) has its new name
        # written quoted; the quotes change nothing else.
        return [
            (str(name), str(sql).replace(f'CREATE TABLE "{name}"', f"CREATE TABLE {name}", 1))
            for name, sql in rows
        ]


def test_head_on_an_empty_database_is_exactly_the_models(url: str, engine: Engine) -> None:
    """The guard: fails when a model changes without a revision that makes the same change.

    An empty database upgraded to head must compare equal to ``SQLModel.metadata``:
    tables, columns, types, nullability, indexes and named CHECK constraints (text
    included, which SQLite keeps verbatim). Change ``models.py`` without adding a
    revision and this test lists the difference.
    """
    migrate.upgrade(url)
    with engine.connect() as conn:
        assert migrate.model_differences(conn) == []
    assert migrate.check(url).ok
    assert migrate.current_revision(url) == HEAD


def _structure(engine: Engine) -> dict[str, dict[str, Any]]:
    with engine.connect() as conn:
        return migrate.schema_structure(conn)


def test_head_builds_the_same_schema_as_init_db(url: str, engine: Engine) -> None:
    """Migrations and init_db make the same columns, keys, indexes and CHECKs: stamping is honest.

    Compared by structure, not DDL text: a revision adds a column at the end of the
    table, init_db where the model declares it.
    """
    migrate.upgrade(engine)
    other = create_db_engine("sqlite://")
    init_db(other)
    assert _structure(engine) == _structure(other)
    declared = {str(c.name) for c in tasks_table().constraints if isinstance(c, CheckConstraint)}
    assert set(_structure(engine)["tasks"]["check constraints"]) == declared
    assert "ck_tasks_title_text" in declared
    assert "id INTEGER NOT NULL" in dict(_schema(engine))["tasks"]  # auto-increments
    other.dispose()


def test_the_structure_tells_schemas_apart(url: str, engine: Engine) -> None:
    """A changed condition, nullability, default or index is a different structure."""
    migrate.upgrade(engine)
    before = _structure(engine)
    for change in (
        "drop index ix_tasks_user_id_complete_id",
        "create index ix_tasks_user_id_complete_id on tasks (complete, user_id, id)",
        "alter table tasks add column extra integer default 3",
    ):
        with engine.begin() as conn:
            conn.execute(text(change))
        assert _structure(engine) != before, change
        before = _structure(engine)


def test_round_trip_keeps_working_with_data(url: str, engine: Engine) -> None:
    """Upgrade, store tasks, downgrade to base (all gone), upgrade again: tasks work."""
    migrate.upgrade(url)
    repo = TaskRepository(next(get_session(engine)))
    repo.create_many("alice", [TaskCreate(title="one"), TaskCreate(title="two")])
    assert repo.count("alice") == 2

    migrate.downgrade(url, "base")
    assert inspect(engine).get_table_names() == ["alembic_version"]
    assert migrate.current_revision(url) is None

    migrate.upgrade(url)
    repo = TaskRepository(next(get_session(engine)))
    assert repo.count("alice") == 0
    assert repo.create("alice", TaskCreate(title="again")).id == 1
    assert migrate.check(engine).ok


def test_a_database_made_by_init_db_is_stamped_then_upgraded(url: str, engine: Engine) -> None:
    """init_db's schema has no history until stamped; then upgrade is a no-op and check is clean."""
    init_db(engine)
    before = migrate.check(url)
    assert not before.ok
    assert "tables but no migration history" in before.problems[0]
    with pytest.raises(migrate.MigrationError, match="stamp REVISION"):
        migrate.upgrade(url)  # would fail half-way on "table tasks already exists"
    assert not inspect(engine).has_table("alembic_version")

    migrate.stamp(url, HEAD)
    migrate.upgrade(url)
    after = migrate.check(url)
    assert after.ok, after.problems
    assert (after.current, after.head) == (HEAD, HEAD)


_RAW_INSERT = text(
    "insert into tasks (id, user_id, title, description, complete, created_at, updated_at) "
    "values (:id, :user_id, :title, :description, 0, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
)


_RAW_ROW = {"id": 1, "user_id": "a", "title": "t", "description": None}


def _text_checks(engine: Engine) -> set[str]:
    names = {str(ck["name"]) for ck in inspect(engine).get_check_constraints("tasks")}
    return {name for name in names if name.endswith("_text")}


def _rows(engine: Engine) -> list[Row[object]]:
    with engine.connect() as conn:
        return list(conn.execute(text("select * from tasks order by id")))


def test_0002_upgrades_stored_tasks_and_names_the_rows_it_cannot_keep(
    url: str, engine: Engine
) -> None:
    """Rows breaking the character rules stop 0002, by id, changing nothing; then it applies.

    Rows are written and read with SQL of 0001's columns: the repository is for head.
    """
    migrate.upgrade(url, "0001")
    kept = [
        {"id": 1, "user_id": "alice", "title": "one", "description": "tab\tand\nlines"},
        {"id": 2, "user_id": "alice", "title": "two", "description": None},
    ]
    broken = [
        {"id": 3, "user_id": "alice", "title": "bell\x07", "description": None},
        {"id": 4, "user_id": "bob\u3000", "title": "ok", "description": None},
        {"id": 5, "user_id": "carol", "title": "ok", "description": "\x1b[31m"},
        {"id": 6, "user_id": "dave", "title": "nul\x00", "description": None},
    ]
    with engine.begin() as conn:
        conn.execute(_RAW_INSERT, kept)
    stored = _rows(engine)
    with engine.begin() as conn:
        conn.execute(_RAW_INSERT, broken)
    before = _schema(engine)

    with pytest.raises(migrate.MigrationError) as refused:
        migrate.upgrade(url, "0002")
    message = str(refused.value)
    assert "user_id (ck_tasks_user_id_text): task id 4;" in message
    assert "title (ck_tasks_title_text): task ids 3, 6;" in message
    assert "description (ck_tasks_description_text): task id 5." in message
    assert "Nothing was changed" in message
    assert migrate.current_revision(url) == "0001"
    assert _schema(engine) == before

    with engine.begin() as conn:
        conn.execute(text("delete from tasks where id > 2"))
    assert migrate.upgrade(url, "0002") == ("0001", "0002")
    assert _rows(engine) == stored  # ids, text and timestamps as they were
    assert _text_checks(engine) == {
        "ck_tasks_user_id_text",
        "ck_tasks_title_text",
        "ck_tasks_description_text",
    }
    with pytest.raises(IntegrityError, match="ck_tasks_title_text"), engine.begin() as conn:
        conn.execute(_RAW_INSERT, broken[0])

    migrate.downgrade(url, "0001")
    assert _text_checks(engine) == set()
    assert _schema(engine) == before  # 0001's table again, with the rows kept
    assert _rows(engine) == stored


def test_0002_renders_offline_for_each_database() -> None:
    """The reviewed SQL: NOT VALID then VALIDATE on PostgreSQL, a table rebuild on SQLite."""
    pg = migrate.upgrade_sql("postgresql://")
    added = pg.index("ADD CONSTRAINT ck_tasks_title_text CHECK (title !~ ")
    assert pg.index("NOT VALID", added) < pg.index("VALIDATE CONSTRAINT ck_tasks_title_text")
    engine = create_db_engine("sqlite://")
    lite = migrate.upgrade_sql(engine)
    engine.dispose()
    assert "INSERT INTO _tasks_rebuilt" in lite
    assert "ALTER TABLE _tasks_rebuilt RENAME TO tasks" in lite


def test_check_reports_an_empty_database_and_one_behind_head(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No history, then behind head: each is one problem naming the fix."""
    assert migrate.check(url).problems == (
        f"the database has no migration history; head is {HEAD}: run `todo-db migrate`",
    )
    migrate.upgrade(url)
    scripts_with(tmp_path, monkeypatch, "pass")
    result = migrate.check(url)
    assert (result.current, result.head) == (HEAD, SCRATCH)
    assert result.problems == (
        f"the database is at revision {HEAD}, behind head {SCRATCH}: run `todo-db migrate`",
    )


def test_check_reports_a_revision_this_package_does_not_ship(url: str, engine: Engine) -> None:
    """A database migrated by a newer release is reported, not silently accepted."""
    migrate.upgrade(url)
    with engine.begin() as conn:
        conn.execute(text("update alembic_version set version_num = '0099'"))
    (problem,) = migrate.check(url).problems
    assert "revision 0099, which this package does not ship" in problem


def test_check_reports_schema_drift_from_the_models(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A revision that strays from the models: extra column, lost index, changed CHECK.

    Also shows batch mode on SQLite keeping the CHECK constraints it did not touch.
    """
    scripts_with(
        tmp_path,
        monkeypatch,
        """
        op.drop_index("ix_tasks_user_id_id", table_name="tasks")
        with op.batch_alter_table("tasks") as batch:
            batch.add_column(sa.Column("not_in_the_models", sa.Integer(), nullable=True))
            batch.drop_constraint("ck_tasks_title_valid", type_="check")
            batch.create_check_constraint(
                "ck_tasks_title_valid", "length(trim(title)) BETWEEN 1 AND 300"
            )
        """,
    )
    migrate.upgrade(url)
    result = migrate.check(url)
    assert (result.current, result.head) == (SCRATCH, SCRATCH)
    assert set(result.problems) == {
        "models differ from the migrations: index ix_tasks_user_id_id on tasks: "
        "declared by the models, missing in the database",
        "models differ from the migrations: column tasks.not_in_the_models: "
        "in the database, not in the models",
        "models differ from the migrations: check constraint ck_tasks_title_valid on tasks: "
        "database has 'length(trim(title)) BETWEEN 1 AND 300', "
        "models have 'length(trim(title)) BETWEEN 1 AND 200'",
    }


def test_check_reports_a_changed_column_type(url: str, engine: Engine) -> None:
    """compare_type is on: a column whose type differs from the model is reported."""
    migrate.upgrade(url)
    with engine.begin() as conn:
        conn.execute(text("drop index ix_tasks_user_id_complete_id"))
        conn.execute(text("alter table tasks drop column complete"))
        conn.execute(text("alter table tasks add column complete varchar(5) not null default 'n'"))
        conn.execute(
            text("create index ix_tasks_user_id_complete_id on tasks (user_id, complete, id)")
        )
    (problem,) = migrate.check(url).problems
    assert problem.startswith("models differ from the migrations: column tasks.complete type:")


def test_a_failing_revision_leaves_nothing_behind(
    url: str, engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upgrade is one transaction, DDL included: a failure rolls every statement back."""
    migrate.upgrade(url)
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
    assert "half_done" not in inspect(engine).get_table_names()
    assert migrate.current_revision(url) == HEAD
    assert isinstance(raised.value.__cause__, OperationalError)


def test_a_failing_revision_is_a_clean_error_naming_the_revision_and_what_to_do(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A revision's SQL error is MigrationError: the server's first line, no SQL, what to do."""
    migrate.upgrade(url)
    scripts_with(
        tmp_path, monkeypatch, "op.execute(sa.text(\"select no_such_function('secret-ish')\"))"
    )
    with pytest.raises(migrate.MigrationError) as raised:
        migrate.upgrade(url)
    message = str(raised.value)
    assert message.startswith(f"revision {SCRATCH} failed: no such function: no_such_function.")
    assert "run the migration again" in message
    assert "secret-ish" not in message
    assert "[SQL" not in message
    assert isinstance(raised.value.__cause__, OperationalError)

    assert migrate.main(["upgrade", "--url", url]) == 1
    err = capsys.readouterr().err
    assert f"error: revision {SCRATCH} failed: no such function" in err
    assert "Traceback" not in err
    assert "[SQL" not in err


def test_autogenerate_renders_plain_sqlalchemy_types(engine: Engine) -> None:
    """New revisions say sa.String/sa.DateTime(timezone=True), never sqlmodel's types."""
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts=migrate.context_options())
        ops = produce_migrations(context, SQLModel.metadata).upgrade_ops
    assert ops is not None
    code = render_python_code(ops, render_item=migrate.render_item)
    assert "sqlmodel" not in code
    assert "sa.String(length=200)" in code
    assert "sa.DateTime(timezone=True)" in code
    assert "sa.BigInteger().with_variant(sa.Integer(), 'sqlite')" in code


def test_revision_autogenerates_the_next_numbered_file(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """revision() writes the next number from the drift of a scratch revision; check() is clean."""
    scripts_with(
        tmp_path,
        monkeypatch,
        """
        op.drop_index("ix_tasks_user_id_id", table_name="tasks")
        with op.batch_alter_table("tasks") as batch:
            batch.add_column(sa.Column("not_in_the_models", sa.Integer(), nullable=True))
        """,
    )
    path = migrate.revision("Undo the test's drift.")
    number = f"{int(HEAD) + 1:04d}"
    assert path == tmp_path / "migrations" / "versions" / f"{number}_undo_the_test_s_drift.py"
    source = path.read_text()
    assert f"Revision ID: {number}\nRevises: {SCRATCH}\n" in source
    assert "with op.batch_alter_table(" in source
    assert "sqlmodel" not in source
    compile(source, str(path), "exec")

    migrate.upgrade(url)
    assert migrate.check(url).ok


def test_a_generated_revision_for_a_new_nullable_column_passes_as_written(
    url: str, engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A column added to the models: its generated revision applies, checks clean, is init_db's."""
    scripts_with(tmp_path, monkeypatch, "pass")
    with model_column(Column("added_in_a_test", Integer, nullable=True)):
        source = migrate.revision("add a column").read_text()
        assert "add_column" in source
        assert migrate.upgrade(url).after == f"{int(HEAD) + 1:04d}"
        result = migrate.check(url)
        assert result.ok, result.problems
        other = create_db_engine("sqlite://")
        init_db(other)
        assert _structure(engine) == _structure(other)
        other.dispose()
        migrate.downgrade(url, "-1")
        assert "added_in_a_test" not in {c["name"] for c in inspect(engine).get_columns("tasks")}


def test_revision_prints_no_lint_complaint_about_lines_it_formats(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """`migrate revision` formats before it lints: a long generated line draws no E501."""
    scripts_with(tmp_path, monkeypatch, "pass")
    long_name = "a_rather_long_column_name_added_in_a_test_to_make_the_lines_long"
    with model_column(Column(long_name, Integer, nullable=True)):
        assert migrate.main(["revision", "-m", "add a long column"]) == 0
    out, err = capfd.readouterr()
    assert "E501" not in out + err
    assert "wrote " in out


def test_the_recipe_fields_generate_a_revision_that_passes_the_lint_on_a_table_with_rows(
    url: str, engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An int, a bool with a default, a bounded str: the revision lints clean and runs on rows."""
    scripts = scripts_with(tmp_path, monkeypatch, "pass")
    migrate.upgrade(url)
    with engine.begin() as conn:
        conn.execute(_RAW_INSERT, {"id": 1, "user_id": "a", "title": "t", "description": None})
    with (
        model_column(Column("added_int", Integer, nullable=True)),
        model_column(Column("added_flag", Boolean, nullable=False, default=False)),
        model_column(Column("added_text", String(20), nullable=True)),
    ):
        source = migrate.revision("add the recipe's fields").read_text()
        assert "sa.BigInteger()" in source
        # Quoted either way: ruff formats the revision only where it is installed.
        assert re.search(r"server_default=[\"']0[\"']", source)
        # Added in place on SQLite (no table rebuild), so it renders offline too.
        assert "ALTER TABLE tasks ADD COLUMN added_flag BOOLEAN DEFAULT '0' NOT NULL" in (
            migrate.upgrade_sql("sqlite://")
        )
        findings = migration_lint.lint_revisions(scripts)
        assert findings == [], [str(finding) for finding in findings]
        migrate.upgrade(url)
        result = migrate.check(url)
        assert result.ok, result.problems
        with engine.begin() as conn:  # a writer that predates the columns still inserts
            conn.execute(_RAW_INSERT, {"id": 2, "user_id": "a", "title": "u", "description": None})
            rows = conn.execute(text("select added_flag from tasks order by id")).scalars().all()
        assert rows == [False, False]
        other = create_db_engine("sqlite://")
        init_db(other)
        assert _structure(engine) == _structure(other)
        other.dispose()


def test_check_constraints_the_models_add_are_written_into_new_revisions(
    url: str, engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Autogenerate ignores CHECKs; revision() adds them, one text or one per database."""
    scripts = scripts_with(tmp_path, monkeypatch, "pass")
    migrate.upgrade(url)
    with probe_checks():
        problems = migrate.check(url).problems
        assert any("ck_tasks_probe_short on tasks: declared by the models" in p for p in problems)
        assert any("`python -m todo_backend.migrate revision" in p for p in problems)
        source = migrate.revision("add checks").read_text()
        assert "add_check(batch_op, " in source  # NOT VALID on PostgreSQL
        assert re.search(r"validate_checks\([\"']tasks[\"'], \[", source)  # after a commit point
        assert "'length(title) < 150'" in source or '"length(title) < 150"' in source
        assert "[op.get_context().dialect.name]" in source  # the per-database condition
        findings = migration_lint.lint_revisions(scripts)
        assert findings == [], [str(finding) for finding in findings]
        postgresql_sql = migrate.upgrade_sql("postgresql://", f"{SCRATCH}:head")
        added = postgresql_sql.index("ADD CONSTRAINT ck_tasks_probe_short CHECK")
        validated = postgresql_sql.index("VALIDATE CONSTRAINT ck_tasks_probe_short")
        assert "NOT VALID" in postgresql_sql[added:validated]
        assert "COMMIT" in postgresql_sql[added:validated]
        migrate.upgrade(url)
        result = migrate.check(url)
        assert result.ok, result.problems
        for title in ("x" * 160, "tilde~"):
            with pytest.raises(IntegrityError, match="ck_tasks_probe"), engine.begin() as conn:
                conn.execute(
                    _RAW_INSERT, {"id": 1, "user_id": "a", "title": title, "description": None}
                )
        migrate.downgrade(url, "-1")
        assert not {"ck_tasks_probe_short", "ck_tasks_probe_text"} & {
            str(ck["name"]) for ck in inspect(engine).get_check_constraints("tasks")
        }
        assert migrate.check(url).problems  # the models have them, the database does not


def test_a_check_changed_by_a_revision_is_restored_by_the_next_one(
    url: str, engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CHECK whose condition strayed is dropped and added again as the models state it."""
    scripts_with(
        tmp_path,
        monkeypatch,
        """
        with op.batch_alter_table("tasks") as batch:
            batch.drop_constraint("ck_tasks_title_valid", type_="check")
            batch.create_check_constraint(
                "ck_tasks_title_valid", "length(trim(title)) BETWEEN 1 AND 300"
            )
            batch.create_check_constraint("ck_tasks_not_in_the_models", "id > 0")
        """,
    )
    migrate.upgrade(url)
    assert len(migrate.check(url).problems) == 2
    source = migrate.revision("restore the checks").read_text()
    upgrade, downgrade = source.split("def downgrade()")
    assert upgrade.count("drop_constraint(") == 2
    assert "BETWEEN 1 AND 200" in upgrade
    assert "BETWEEN 1 AND 300" in downgrade
    assert "id > 0" in downgrade
    migrate.upgrade(url)
    result = migrate.check(url)
    assert result.ok, result.problems
    migrate.downgrade(url, "-1")
    checks = {ck["name"]: ck["sqltext"] for ck in inspect(engine).get_check_constraints("tasks")}
    assert "BETWEEN 1 AND 300" in str(checks["ck_tasks_title_valid"])
    assert "ck_tasks_not_in_the_models" in checks


def test_an_empty_revision_is_a_typed_skeleton(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """revision(autogenerate=False) needs no database and writes pass bodies."""
    scripts_with(tmp_path, monkeypatch, "pass")
    path = migrate.revision("backfill", autogenerate=False, rev_id="0042")
    source = path.read_text()
    assert source.startswith('"""Backfill.\n')
    assert "def upgrade() -> None:" in source
    assert source.count("    pass\n") == 2


def test_database_url_is_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str, engine: Engine
) -> None:
    """Without an argument, the functions migrate DATABASE_URL via load_settings()."""
    monkeypatch.chdir(tmp_path)  # no stray .env
    monkeypatch.setenv("DATABASE_URL", url)
    migrate.upgrade()
    assert migrate.current_revision() == HEAD
    assert inspect(engine).has_table("tasks")


def test_the_command_line(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """python -m todo_backend.migrate: check fails on an empty database, passes after upgrade."""
    assert migrate.main(["check", "--url", url]) == 1
    assert "no migration history" in capsys.readouterr().err
    assert migrate.main(["upgrade", "--url", url]) == 0
    assert migrate.main(["current", "--url", url]) == 0
    assert capsys.readouterr().out == f"{HEAD}\n"
    assert migrate.main(["check", "--url", url]) == 0
    assert capsys.readouterr().out == f"at revision {HEAD}, head {HEAD}: ok\n"
    assert migrate.main(["downgrade", "base", "--url", url]) == 0
    assert migrate.main(["stamp", HEAD, "--url", url]) == 0
    assert migrate.main(["sql", "--url", "postgresql://"]) == 0
    assert "id BIGSERIAL NOT NULL" in capsys.readouterr().out
    assert migrate.main(["stamp", "base", "--url", url]) == 0
    init_db_engine = create_db_engine(url)
    init_db(init_db_engine)
    init_db_engine.dispose()
    assert migrate.main(["upgrade", "--url", url]) == 1
    assert capsys.readouterr().err.startswith("error: the database has tables but no migration")


def test_upgrade_sql_renders_without_connecting() -> None:
    """upgrade_sql needs only a dialect: the reviewed script for PostgreSQL and SQLite."""
    pg = migrate.upgrade_sql("postgresql://")
    assert "CREATE INDEX ix_tasks_user_id_complete_id ON tasks (user_id, complete, id)" in pg
    assert "TIMESTAMP WITH TIME ZONE" in pg
    assert pg.startswith("BEGIN;")
    assert pg.rstrip().endswith("COMMIT;")
    engine = create_db_engine("sqlite://")
    assert "id INTEGER NOT NULL" in migrate.upgrade_sql(engine)
    engine.dispose()


# -- tables the package does not declare ----------------------------------------------


@pytest.fixture
def users_table() -> Iterator[Table]:
    """A ``users`` table on SQLModel.metadata, as a later stage's models would declare it."""
    table = Table(
        "users",
        SQLModel.metadata,
        Column("id", Integer, primary_key=True),
        Column("email", String(320), nullable=False),
        CheckConstraint("length(email) > 0", name="ck_users_email_valid"),
    )
    yield table
    SQLModel.metadata.remove(table)


def _add_foreign_tables(engine: Engine) -> None:
    """Create ``users`` (without its CHECK) and ``legacy_audit``, which no model declares."""
    with engine.begin() as conn:
        conn.execute(text("create table users (id integer primary key, email varchar(320))"))
        conn.execute(text("create table legacy_audit (id integer primary key, note text)"))


def test_package_tables_are_those_of_todo_backend_models(users_table: Table) -> None:
    """Only the tables todo_backend.models declares are the package's, not all of the metadata."""
    assert users_table in SQLModel.metadata.sorted_tables
    assert migrate.package_tables() == (SQLModel.metadata.tables["tasks"],)


def test_check_ignores_tables_the_package_does_not_declare(
    url: str, engine: Engine, users_table: Table
) -> None:
    """Another stage's table, declared or not, and its CHECK constraints are no problem."""
    migrate.upgrade(url)
    _add_foreign_tables(engine)
    result = migrate.check(url)
    assert result.ok, result.problems
    with engine.connect() as conn:
        assert migrate.model_differences(conn) == []


def test_upgrade_works_on_a_fresh_database_with_other_tables(
    url: str, engine: Engine, users_table: Table
) -> None:
    """Tables the package does not declare are not "tables without history": upgrade runs."""
    _add_foreign_tables(engine)
    assert migrate.check(url).problems == (
        f"the database has no migration history; head is {HEAD}: run `todo-db migrate`",
    )
    migrate.upgrade(url)
    assert migrate.check(url).ok
    assert {"users", "legacy_audit", "tasks"} <= set(inspect(engine).get_table_names())


def test_autogenerate_leaves_other_tables_alone(
    url: str, engine: Engine, users_table: Table, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """revision(url_or_engine=URL) neither drops undeclared tables nor creates other stages'."""
    scripts_with(tmp_path, monkeypatch, "pass")
    migrate.upgrade(url)
    _add_foreign_tables(engine)
    with engine.begin() as conn:
        conn.execute(text("drop table users"))  # declared, yet not this package's to create
    source = migrate.revision("nothing to do", url_or_engine=url).read_text()
    assert "drop_table" not in source
    assert "create_table" not in source
    assert source.count("    pass\n") == 2


# -- alembic's errors, offline URLs, what upgrade reports -----------------------------


def test_alembic_command_errors_become_migration_errors(
    url: str, engine: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    """Unknown revisions, asked for or found in the database, fail as MigrationError, one line."""
    migrate.upgrade(url)
    with pytest.raises(migrate.MigrationError, match="'0042'") as raised:
        migrate.stamp(url, "0042")
    assert isinstance(raised.value.__cause__, CommandError)
    assert migrate.main(["downgrade", "0042", "--url", url]) == 1
    with engine.begin() as conn:
        conn.execute(text("update alembic_version set version_num = '0099'"))
    with pytest.raises(migrate.MigrationError, match="'0099'"):
        migrate.upgrade(url)
    assert migrate.main(["upgrade", "--url", url]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "error: Can't locate revision identified by '0042'",
        "error: Can't locate revision identified by '0099'",
    ]


def test_upgrade_sql_normalises_the_url_as_the_package_does(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """postgres:// (Heroku, Neon consoles) renders PostgreSQL SQL offline, as a str or a URL."""
    for database in (
        "postgres://",
        "postgres://u:pw@db.example.com/todo?sslmode=require",
        make_url("postgres://u@db.example.com/todo"),
    ):
        assert "id BIGSERIAL NOT NULL" in migrate.upgrade_sql(database)
    assert migrate.main(["sql", "--url", "postgres://u@db.example.com/todo"]) == 0
    assert "id BIGSERIAL NOT NULL" in capsys.readouterr().out
    with pytest.raises(ConfigurationError, match="'mysql' is not supported"):
        migrate.upgrade_sql("mysql://")


def test_upgrade_returns_the_revisions_it_saw_in_one_connection(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """upgrade() says where the database was and is, from its one connection and transaction."""
    opened: list[object] = []
    event.listen(engine, "engine_connect", opened.append)
    assert migrate.upgrade(engine) == (None, HEAD)
    assert migrate.upgrade(engine) == (HEAD, HEAD)
    scripts_with(tmp_path, monkeypatch, "pass")
    result = migrate.upgrade(engine)
    assert (result.before, result.after) == (HEAD, SCRATCH)
    assert len(opened) == 3


@pytest.mark.parametrize(
    "command",
    [
        migrate.upgrade,
        lambda url: migrate.downgrade(url, "base"),
        migrate.current_revision,
        migrate.stamp,
        migrate.check,
    ],
    ids=["upgrade", "downgrade", "current_revision", "stamp", "check"],
)
def test_a_database_that_cannot_be_reached_is_a_typed_error_without_the_password(
    command: Any,
) -> None:
    """No raw driver error from the migration API: what failed and what to do, no password."""
    url = "postgresql://someone:not-a-real-secret@127.0.0.1:1/todo?connect_timeout=2"
    with pytest.raises(DatabaseUnavailableError, match="cannot connect to the database") as raised:
        command(url)
    assert "todo-db check" in str(raised.value)
    assert "not-a-real-secret" not in str(raised.value)
    assert isinstance(raised.value.__cause__, OperationalError)
