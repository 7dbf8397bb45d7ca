"""Alembic migrations on PostgreSQL: direct, and through PgBouncer in transaction pool mode."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    Boolean,
    CheckConstraint,
    Column,
    Engine,
    Integer,
    String,
    Table,
    create_engine,
    inspect,
    text,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import IntegrityError, ProgrammingError
from sqlmodel import SQLModel

from tests.fix_servers import PgBouncer, PgBouncerFactory
from tests.migration_scripts import (
    HEAD,
    ONLINE_INDEX,
    SCRATCH,
    model_column,
    probe_checks,
    scripts_with,
)
from todo_backend import migrate
from todo_backend.db import CONNECTING_ROLE, create_db_engine, get_session, init_db
from todo_backend.models import TaskCreate
from todo_backend.repository import TaskRepository

_CATALOG = text(
    """
    select 'column' as kind, column_name || ' ' || data_type || ' '
           || coalesce(character_maximum_length::text, '') || ' ' || is_nullable || ' '
           || coalesce(column_default, '') as fact
      from information_schema.columns where table_schema = 'public' and table_name = 'tasks'
    union all
    select 'constraint', conname || ' ' || pg_get_constraintdef(oid)
      from pg_constraint where conrelid = to_regclass('public.tasks')
    union all
    select 'index', indexdef from pg_indexes where schemaname = 'public' and tablename = 'tasks'
    union all
    select 'sequence', sequence_name || ' ' || data_type
      from information_schema.sequences where sequence_schema = 'public'
    order by 1, 2
    """
)


@pytest.fixture
def url(scratch_url: URL) -> str:
    """The module's scratch database with an empty public schema for each test."""
    return _emptied_schema(scratch_url)


def _emptied_schema(database: URL) -> str:
    admin = create_engine(database, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    admin.dispose()
    return database.render_as_string(hide_password=False)


@pytest.fixture
def own_url(own_scratch_url: URL) -> str:
    """A database on our own cluster (for a PgBouncer of our own), its schema emptied."""
    return _emptied_schema(own_scratch_url)


@pytest.fixture
def engine(url: str) -> Iterator[Engine]:
    """The package's engine on the emptied scratch database, disposed afterwards."""
    engine = create_db_engine(url)
    yield engine
    engine.dispose()


def _through(bouncer: PgBouncer, url: str) -> str:
    """The URL of *url*'s database reached through *bouncer*."""
    database = make_url(url).database
    assert database is not None
    return bouncer.url(database).render_as_string(hide_password=False)


def _catalog(engine: Engine) -> list[tuple[str, str]]:
    with engine.connect() as conn:
        return [(str(kind), str(fact)) for kind, fact in conn.execute(_CATALOG)]


def _structure(engine: Engine) -> dict[str, dict[str, Any]]:
    with engine.connect() as conn:
        return migrate.schema_structure(conn)


def test_head_on_an_empty_database_is_exactly_the_models(url: str, engine: Engine) -> None:
    """The guard on PostgreSQL: fails when a model changes without a matching revision.

    An empty database upgraded to head must compare equal to ``SQLModel.metadata``
    (tables, columns, types, nullability, indexes, CHECK constraint names).
    """
    migrate.upgrade(url)
    with engine.connect() as conn:
        assert migrate.model_differences(conn) == []
    assert migrate.check(url).ok
    columns = {c["name"]: c for c in inspect(engine).get_columns("tasks")}
    assert str(columns["id"]["type"]) == "BIGINT"
    assert "nextval('tasks_id_seq'" in str(columns["id"]["default"])
    assert str(columns["created_at"]["type"]) == "TIMESTAMP"
    assert columns["created_at"]["type"].timezone is True  # type: ignore[attr-defined]
    assert {c["name"] for c in inspect(engine).get_check_constraints("tasks")} == {
        "ck_tasks_user_id_valid",
        "ck_tasks_title_valid",
        "ck_tasks_description_valid",
        "ck_tasks_user_id_text",
        "ck_tasks_title_text",
        "ck_tasks_description_text",
    }


def test_head_builds_the_same_catalog_as_init_db_which_can_be_stamped(
    url: str, engine: Engine
) -> None:
    """Columns, defaults, constraints, indexes, sequence: as init_db makes them; stamp is safe."""
    migrate.upgrade(url)
    migrated, structure = _catalog(engine), _structure(engine)
    migrate.downgrade(url, "base")
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE alembic_version"))

    init_db(engine)
    assert _catalog(engine) == migrated
    assert _structure(engine) == structure
    assert "tables but no migration history" in migrate.check(url).problems[0]
    with pytest.raises(migrate.MigrationError):
        migrate.upgrade(url)
    migrate.stamp(url, HEAD)
    migrate.upgrade(url)
    result = migrate.check(url)
    assert result.ok, result.problems
    assert result.current == HEAD


def test_round_trip_keeps_working_with_data(url: str, engine: Engine) -> None:
    """Upgrade, store tasks, downgrade to base (table and sequence gone), upgrade again."""
    migrate.upgrade(url)
    repo = TaskRepository(next(get_session(engine)))
    repo.create_many("alice", [TaskCreate(title="one"), TaskCreate(title="two")])
    assert repo.count("alice") == 2

    migrate.downgrade(url, "base")
    assert _catalog(engine) == []
    assert inspect(engine).get_table_names() == ["alembic_version"]

    migrate.upgrade(url)
    repo = TaskRepository(next(get_session(engine)))
    assert repo.create("alice", TaskCreate(title="again")).id == 1
    assert migrate.check(engine).ok


_RAW_INSERT = text(
    "insert into tasks (user_id, title, description, complete, created_at, updated_at) "
    "values (:user_id, :title, :description, false, now(), now())"
)
_VALIDATED = text(
    "select conname, convalidated from pg_constraint "
    "where conrelid = to_regclass('public.tasks') and conname like '%\\_text' order by conname"
)


def _rows(engine: Engine) -> list[tuple[object, ...]]:
    with engine.connect() as conn:
        return [tuple(row) for row in conn.execute(text("select * from tasks order by id"))]


def test_0002_upgrades_stored_tasks_and_names_the_rows_it_cannot_keep(
    url: str, engine: Engine
) -> None:
    """Rows breaking the character rules stop 0002, by id, changing nothing; then it applies.

    Among them the tab-padded user_id that 0001's trim() check let through. Rows are
    written and read with SQL of 0001's columns: the repository is for head.
    """
    migrate.upgrade(url, "0001")
    with engine.begin() as conn:
        conn.execute(_RAW_INSERT, {"user_id": "alice", "title": "one", "description": "a\tb\r\n"})
    kept = _rows(engine)
    broken: list[dict[str, str | None]] = [
        {"user_id": "\tbob", "title": "ok", "description": None},  # id 2
        {"user_id": "carol\u00a0", "title": "ok", "description": None},  # id 3
        {"user_id": "dave", "title": "ok", "description": "\x0b"},  # id 4
        *({"user_id": "erin", "title": f"bell\x07{i}", "description": None} for i in range(25)),
    ]
    with engine.begin() as conn:
        conn.execute(_RAW_INSERT, broken)
    before = _catalog(engine)

    with pytest.raises(migrate.MigrationError) as refused:
        migrate.upgrade(url, "0002")
    message = str(refused.value)
    assert "user_id (ck_tasks_user_id_text): task ids 2, 3;" in message
    shown = ", ".join(str(i) for i in range(5, 25))
    assert f"title (ck_tasks_title_text): task ids {shown} and 5 more;" in message
    assert "description (ck_tasks_description_text): task id 4." in message
    assert migrate.current_revision(url) == "0001"
    assert _catalog(engine) == before

    with engine.begin() as conn:
        conn.execute(text("delete from tasks where id > 1"))
    assert migrate.upgrade(url, "0002") == ("0001", "0002")
    assert _rows(engine) == kept
    with engine.connect() as conn:
        assert conn.execute(_VALIDATED).all() == [
            ("ck_tasks_description_text", True),
            ("ck_tasks_title_text", True),
            ("ck_tasks_user_id_text", True),
        ]
    with pytest.raises(IntegrityError, match="ck_tasks_user_id_text"), engine.begin() as conn:
        conn.execute(_RAW_INSERT, broken[0])

    migrate.downgrade(url, "0001")
    assert _catalog(engine) == before
    assert _rows(engine) == kept


def test_a_generated_revision_for_a_new_nullable_column_passes_as_written(
    url: str, engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The revision written from SQLite for a column added to the models runs here as well.

    It applies, check() is clean and the schema is the one init_db makes.
    """
    scripts_with(tmp_path, monkeypatch, "pass")
    with model_column(Column("added_in_a_test", Integer, nullable=True)):
        migrate.revision("add a column")
        assert migrate.upgrade(url).after == f"{int(HEAD) + 1:04d}"
        result = migrate.check(url)
        assert result.ok, result.problems
        structure = _structure(engine)
        migrate.downgrade(url, "base")
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE alembic_version"))
        init_db(engine)
        assert _structure(engine) == structure


def test_the_recipe_fields_generate_a_revision_that_runs_here_on_a_table_with_rows(
    url: str, engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An int, a bool with a default, a bounded str: added to a table with rows, checked clean."""
    scripts_with(tmp_path, monkeypatch, "pass")
    # Raw rows as the connecting role: at head, row security hides tasks from the rest.
    admin = engine.execution_options(**CONNECTING_ROLE)
    migrate.upgrade(url)
    raw = text(
        "insert into tasks (user_id, title, complete, created_at, updated_at) "
        "values ('a', 't', false, now(), now())"
    )
    with admin.begin() as conn:
        conn.execute(raw)
    with (
        model_column(Column("added_int", Integer, nullable=True)),
        model_column(Column("added_flag", Boolean, nullable=False, default=False)),
        model_column(Column("added_text", String(20), nullable=True)),
    ):
        migrate.revision("add the recipe's fields")
        migrate.upgrade(url)
        result = migrate.check(url)
        assert result.ok, result.problems
        with admin.begin() as conn:  # a writer that predates the columns still inserts
            conn.execute(raw)
            conn.execute(text("update tasks set added_int = 3000000000"))  # past INTEGER
            rows = conn.execute(text("select added_flag, added_int from tasks")).all()
        assert [tuple(row) for row in rows] == [(False, 3000000000)] * 2
        structure = _structure(engine)
        migrate.downgrade(url, "base")
        with admin.begin() as conn:
            conn.execute(text("DROP TABLE alembic_version"))
        init_db(engine)
        assert _structure(engine) == structure


def test_check_constraints_are_compared_by_meaning_and_written_into_revisions(
    url: str, engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL rewrites a CHECK's text; check() compares meaning, and revisions add CHECKs."""
    scripts_with(tmp_path, monkeypatch, "pass")
    migrate.upgrade(url)
    with probe_checks():
        missing = migrate.check(url).problems
        assert len(missing) == 2, missing
        migrate.revision("add checks")
        migrate.upgrade(url)
        result = migrate.check(url)
        assert result.ok, result.problems
        # DDL: as the connecting role (the application role does not own tasks).
        with engine.execution_options(**CONNECTING_ROLE).begin() as conn:
            conn.execute(text("ALTER TABLE tasks DROP CONSTRAINT ck_tasks_probe_short"))
            conn.execute(
                text(
                    "ALTER TABLE tasks ADD CONSTRAINT ck_tasks_probe_short "
                    "CHECK (length(title) < 151)"
                )
            )
        (changed,) = migrate.check(url).problems
        assert "check constraint ck_tasks_probe_short on tasks: database has" in changed
        assert "151" in changed


def test_a_generated_check_is_added_not_valid_then_validated_and_a_rerun_resumes(
    url: str, engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stored row breaking a new CHECK leaves it NOT VALID; after the fix a rerun validates it."""
    scripts_with(tmp_path, monkeypatch, "pass")
    # Raw rows as the connecting role: at head, row security hides tasks from the rest.
    admin = engine.execution_options(**CONNECTING_ROLE)
    migrate.upgrade(url)
    with admin.begin() as conn:
        conn.execute(
            text(
                "insert into tasks (user_id, title, complete, created_at, updated_at) "
                "values ('a', repeat('x', 160), false, now(), now())"
            )
        )
    validated = text(
        "select convalidated from pg_constraint where conname = 'ck_tasks_probe_short'"
    )
    with probe_checks():
        migrate.revision("add checks")
        with pytest.raises(migrate.MigrationError, match="break CHECK ck_tasks_probe_short"):
            migrate.upgrade(url)
        assert migrate.current_revision(url) == SCRATCH  # not recorded: a rerun runs it again
        with admin.begin() as conn:
            assert conn.execute(validated).scalar_one() is False  # added, NOT VALID
            conn.execute(text("update tasks set title = 'short'"))
        migrate.upgrade(url)  # the ADDs are skipped, the VALIDATEs run
        with admin.begin() as conn:
            assert conn.execute(validated).scalar_one() is True
        result = migrate.check(url)
        assert result.ok, result.problems


@pytest.mark.pgbouncer
def test_migrations_run_through_pgbouncer_in_transaction_mode(
    own_url: str, own_scratch_url: URL, pgbouncer: PgBouncerFactory
) -> None:
    """Upgrade, check, use, downgrade and re-upgrade through a one-connection transaction pool.

    Another client stays connected (idle) the whole time: with one server connection
    that only works because PgBouncer hands it out per transaction and the migration
    keeps nothing on the server session between its transactions.
    """
    bouncer = pgbouncer(own_scratch_url, pool_size=1)
    pooled = _through(bouncer, own_url)
    bystander = create_engine(pooled)
    with bystander.connect() as idle:
        idle.execute(text("select 1"))
        idle.commit()

        migrate.upgrade(pooled)
        assert migrate.check(pooled).ok
        engine = create_db_engine(pooled)
        repo = TaskRepository(next(get_session(engine)))
        assert repo.create("alice", TaskCreate(title="pooled")).id == 1
        engine.dispose()
        migrate.downgrade(pooled, "base")
        assert migrate.current_revision(pooled) is None
        migrate.upgrade(pooled)
        assert migrate.current_revision(pooled) == HEAD
        assert idle.execute(text("select count(*) from tasks")).scalar_one() == 0
    bystander.dispose()


@pytest.mark.pgbouncer
def test_a_failing_revision_through_pgbouncer_leaves_nothing_behind(
    own_url: str,
    own_scratch_url: URL,
    pgbouncer: PgBouncerFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A revision is one transaction: a failing revision rolls back its DDL too."""
    bouncer = pgbouncer(own_scratch_url, pool_size=1)
    pooled = _through(bouncer, own_url)
    migrate.upgrade(pooled)
    scripts_with(
        tmp_path,
        monkeypatch,
        """
        op.create_table("half_done", sa.Column("id", sa.Integer(), primary_key=True))
        op.add_column("tasks", sa.Column("not_in_the_models", sa.Integer(), nullable=True))
        op.execute("select no_such_function()")
        """,
    )
    with pytest.raises(migrate.MigrationError, match="no_such_function") as raised:
        migrate.upgrade(pooled)
    assert isinstance(raised.value.__cause__, ProgrammingError)
    engine = create_db_engine(own_url)
    assert "half_done" not in inspect(engine).get_table_names()
    assert "not_in_the_models" not in {c["name"] for c in inspect(engine).get_columns("tasks")}
    engine.dispose()
    assert migrate.current_revision(pooled) == HEAD


def test_tables_the_package_does_not_declare_are_left_alone(
    url: str, engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shared database's other tables, declared on SQLModel.metadata or not, change nothing.

    Upgrade runs on a fresh database that has them, check() is clean, and an
    autogenerated revision against the database neither drops nor creates them.
    """
    users = Table(
        "users",
        SQLModel.metadata,
        Column("id", Integer, primary_key=True),
        CheckConstraint("id > 0", name="ck_users_id_positive"),
    )
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE users (id integer PRIMARY KEY)"))
            conn.execute(text("CREATE TABLE legacy_audit (id bigserial PRIMARY KEY, note text)"))
        assert migrate.upgrade(url) == (None, HEAD)
        result = migrate.check(url)
        assert result.ok, result.problems
        scripts_with(tmp_path, monkeypatch, "pass")
        assert migrate.upgrade(url) == (HEAD, SCRATCH)
        source = migrate.revision("nothing to do", url_or_engine=url).read_text()
        assert "drop_table" not in source
        assert "create_table" not in source
    finally:
        SQLModel.metadata.remove(users)
    assert {"users", "legacy_audit", "tasks"} <= set(inspect(engine).get_table_names())


def test_a_callers_psycopg_3_engine_migrates_like_the_packages(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An engine on psycopg 3 (the async extra's driver, sync here) runs every command.

    psycopg 3 reads only the first result of a several-statement string, so each
    statement the runner sends is one statement; an index block included.
    """
    engine = create_engine(make_url(url).set(drivername="postgresql+psycopg"))
    try:
        assert migrate.upgrade(engine) == (None, HEAD)
        assert migrate.check(engine).ok
        scripts_with(
            tmp_path,
            monkeypatch,
            ONLINE_INDEX,
        )
        assert migrate.upgrade(engine) == (HEAD, SCRATCH)
        migrate.downgrade(engine, "base")
        assert migrate.current_revision(engine) is None
    finally:
        engine.dispose()
