"""Row-level security, the second wall: PostgreSQL keeps users apart for any SQL sent.

On the server under test (any TEST_DATABASE_URL: local, a non-superuser, the Neon
stand-in), on databases migrated to head.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from pydantic import ValidationError
from sqlalchemy import Engine, text, update
from sqlalchemy.engine import URL
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import Session, select

from tests.integration.databases import engine_with_schema, fresh_database
from tests.integration.row_security import COUNT, INSERT, SEE, migrated_engine, raw_rows
from todo_backend import TaskCreate, TaskRepository, TaskUpdate, user_scope
from todo_backend.aio import create_async_db_engine
from todo_backend.aio import user_scope as async_user_scope
from todo_backend.db import CONNECTING_ROLE, check_database
from todo_backend.models import Task

ALICE, BOB = "alice", "bob"


@pytest.fixture(scope="module")
def module_rls_engine(admin_url: URL) -> Iterator[Engine]:
    """The package's engine on a database of the server under test migrated to head."""
    with migrated_engine(admin_url) as engine:
        yield engine


@pytest.fixture
def rls_engine(module_rls_engine: Engine) -> Engine:
    """``module_rls_engine`` with alice's two tasks and bob's one, made by the repository."""
    with Session(module_rls_engine) as session:
        with user_scope(session, ALICE):
            session.execute(text("DELETE FROM tasks"))
        with user_scope(session, BOB):
            session.execute(text("DELETE FROM tasks"))
        session.commit()
        repo = TaskRepository(session)
        repo.create(ALICE, TaskCreate(title="a1"))
        repo.create(ALICE, TaskCreate(title="a2"))
        repo.create(BOB, TaskCreate(title="b1"))
    return module_rls_engine


def test_unscoped_raw_sql_sees_and_changes_no_task(rls_engine: Engine) -> None:
    """Without a scope, raw SQL through the engine reads no row and changes none."""
    with rls_engine.begin() as conn:
        assert conn.execute(COUNT).scalar_one() == 0
        assert conn.execute(text("UPDATE tasks SET title = 'x'")).rowcount == 0
        assert conn.execute(text("DELETE FROM tasks")).rowcount == 0
    with rls_engine.connect() as conn:
        autocommit = conn.execution_options(isolation_level="AUTOCOMMIT")
        assert autocommit.execute(COUNT).scalar_one() == 0
        assert autocommit.execute(text("UPDATE tasks SET title = 'x'")).rowcount == 0
    with Session(rls_engine) as session:
        assert session.exec(select(Task)).all() == []
        assert raw_rows(session) == []
    repo = TaskRepository(Session(rls_engine))
    assert [t.title for t in repo.list(ALICE)] == ["a2", "a1"]
    assert [t.title for t in repo.list(BOB)] == ["b1"]


def test_unscoped_raw_insert_is_refused(rls_engine: Engine) -> None:
    """An INSERT outside any scope is refused by the policy: no user, no row."""
    with (
        pytest.raises(ProgrammingError, match="row-level security"),
        rls_engine.begin() as conn,
    ):
        conn.execute(INSERT, {"user_id": ALICE, "title": "sneaked"})
    assert TaskRepository(Session(rls_engine)).count(ALICE) == 2


def test_user_scope_gives_exactly_one_users_rows(rls_engine: Engine) -> None:
    """Inside user_scope, raw SQL and ORM queries read and write only that user's tasks."""
    with Session(rls_engine) as session:
        with user_scope(session, ALICE):
            assert raw_rows(session) == [(ALICE, "a1"), (ALICE, "a2")]
            assert {t.title for t in session.exec(select(Task)).all()} == {"a1", "a2"}
            changed = session.execute(update(Task).values(title="mine"))
            assert changed.rowcount == 2  # type: ignore[attr-defined]
            session.execute(INSERT, {"user_id": ALICE, "title": "a3"})
            session.commit()  # the scope outlives the commit
            assert session.execute(COUNT).scalar_one() == 3
        assert raw_rows(session) == []
        with user_scope(session, BOB):
            assert raw_rows(session) == [(BOB, "b1")]
            session.execute(text("DELETE FROM tasks"))
            assert raw_rows(session) == []
        session.commit()
    repo = TaskRepository(Session(rls_engine))
    assert [t.title for t in repo.list(ALICE)] == ["a3", "mine", "mine"]
    assert repo.count(BOB) == 0


def test_user_scope_refuses_another_users_row(rls_engine: Engine) -> None:
    """An INSERT or UPDATE that would give a row to another user fails with ProgrammingError."""
    with Session(rls_engine) as session, user_scope(session, ALICE):
        with pytest.raises(ProgrammingError, match="row-level security"):
            session.execute(INSERT, {"user_id": BOB, "title": "for bob"})
        session.rollback()
        with pytest.raises(ProgrammingError, match="row-level security"):
            session.execute(text("UPDATE tasks SET user_id = 'bob'"))
        session.rollback()
    assert TaskRepository(Session(rls_engine)).count(BOB) == 1


def test_user_scope_validates_the_user_id(rls_engine: Engine) -> None:
    """A user_id the repository would refuse is refused by user_scope too, before any SQL."""
    with Session(rls_engine) as session:
        for bad in ("", " alice", "a" * 256, "al\x00ice"):
            with pytest.raises(ValidationError), user_scope(session, bad):
                pass  # pragma: no cover - never entered


def test_scopes_nest_and_repository_calls_keep_their_owner(rls_engine: Engine) -> None:
    """A nested scope ends back in the outer one; a repository call inside uses its own user."""
    with Session(rls_engine) as session:
        repo = TaskRepository(session)
        with user_scope(session, ALICE):
            assert session.execute(COUNT).scalar_one() == 2
            with user_scope(session, BOB):
                assert raw_rows(session) == [(BOB, "b1")]
            assert session.execute(COUNT).scalar_one() == 2
            # In the session's transaction: the call runs as bob, the next raw SQL as alice.
            assert [t.title for t in repo.list(BOB)] == ["b1"]
            assert session.execute(COUNT).scalar_one() == 2
        assert session.execute(COUNT).scalar_one() == 0


def test_a_scope_entered_mid_transaction_applies_to_the_next_statement(
    rls_engine: Engine,
) -> None:
    """Entering and leaving a scope inside an open transaction switches the user in it."""
    with Session(rls_engine) as session:
        assert session.execute(COUNT).scalar_one() == 0  # the transaction is open now
        with user_scope(session, BOB):
            assert session.execute(COUNT).scalar_one() == 1
        assert session.execute(COUNT).scalar_one() == 0
        session.commit()


def test_rollback_to_savepoint_restores_the_right_user(rls_engine: Engine) -> None:
    """After ROLLBACK TO SAVEPOINT undid a user switch, the next statement sets it again."""
    with Session(rls_engine) as session:
        repo = TaskRepository(session)
        with user_scope(session, ALICE):
            assert session.execute(COUNT).scalar_one() == 2
            savepoint = session.begin_nested()
            assert repo.count(BOB) == 1  # switches the transaction's user to bob
            savepoint.rollback()  # the server's setting is alice's again
            assert repo.count(BOB) == 1
            assert session.execute(COUNT).scalar_one() == 2


def test_async_user_scope(rls_engine: Engine) -> None:
    """The async face: unscoped raw SQL sees nothing, a scope sees exactly its user's tasks."""

    async def body() -> None:
        engine = create_async_db_engine(rls_engine.url.render_as_string(hide_password=False))
        try:
            async with AsyncSession(engine) as session:
                assert (await session.execute(COUNT)).scalar_one() == 0
                async with async_user_scope(session, ALICE):
                    rows = (await session.execute(SEE)).all()
                    assert [tuple(r) for r in rows] == [(ALICE, "a1"), (ALICE, "a2")]
                    with pytest.raises(ProgrammingError, match="row-level security"):
                        await session.execute(INSERT, {"user_id": BOB, "title": "x"})
                    await session.rollback()
                    await session.execute(INSERT, {"user_id": ALICE, "title": "a3"})
                    await session.commit()
                    assert (await session.execute(COUNT)).scalar_one() == 3
                assert (await session.execute(COUNT)).scalar_one() == 0
                async with engine.connect() as conn:
                    ac = await conn.execution_options(isolation_level="AUTOCOMMIT")
                    assert (await ac.execute(COUNT)).scalar_one() == 0
        finally:
            await engine.dispose()

    asyncio.run(body())


def test_check_reports_row_security(rls_engine: Engine, admin_url: URL) -> None:
    """check_database says forced on a migrated database and off on one made by init_db."""
    health = check_database(rls_engine)
    assert health.ok
    assert health.row_security == "forced"
    with fresh_database(admin_url) as url, engine_with_schema(url) as plain:
        plain_health = check_database(plain)
        assert plain_health.row_security == "off"
        # A database without the policy works as before, as the connecting role.
        repo = TaskRepository(Session(plain))
        repo.create(ALICE, TaskCreate(title="x"))
        with plain.begin() as conn:
            assert conn.execute(COUNT).scalar_one() == 1


def test_check_warns_when_the_connecting_role_bypasses_row_security(rls_engine: Engine) -> None:
    """A superuser or BYPASSRLS connecting role is named in a warning, and only then."""
    with rls_engine.connect() as conn:
        bypasses = conn.execute(
            text("SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user"),
            execution_options=CONNECTING_ROLE,
        ).scalar_one()
    warnings = check_database(rls_engine).warnings
    assert any("bypasses row-level security" in w for w in warnings) is bool(bypasses)


def test_admin_paths_run_as_the_connecting_role(rls_engine: Engine) -> None:
    """CONNECTING_ROLE statements run as the login role; the application's as todo_app."""
    with rls_engine.connect() as conn:
        login = conn.execute(text("SELECT session_user"), execution_options=CONNECTING_ROLE)
        current = conn.execute(text("SELECT current_user"), execution_options=CONNECTING_ROLE)
        assert current.scalar_one() == login.scalar_one()
    with rls_engine.connect() as conn:
        assert conn.execute(text("SELECT current_user")).scalar_one() == "todo_app"


def test_the_policy_is_served_by_the_user_id_index(module_rls_engine: Engine) -> None:
    """EXPLAIN: the policy's user condition is an index condition on (user_id, id), read once."""
    with Session(module_rls_engine) as session:
        with user_scope(session, "old"):
            session.execute(
                text(
                    "INSERT INTO tasks (user_id, title, complete, created_at, updated_at) "
                    "SELECT 'old', 't', false, now(), now() FROM generate_series(1, 20000)"
                )
            )
        session.commit()
        for user in ("u1", "u2", "u3"):
            with user_scope(session, user):
                session.execute(
                    text(
                        "INSERT INTO tasks (user_id, title, complete, created_at, updated_at) "
                        "SELECT :u, 't', false, now(), now() FROM generate_series(1, 200)"
                    ),
                    {"u": user},
                )
        session.commit()
    with module_rls_engine.connect() as conn:
        conn.execute(text("ANALYZE tasks"), execution_options=CONNECTING_ROLE)
        conn.commit()
    with Session(module_rls_engine) as session, user_scope(session, "u1"):
        for query in (
            "SELECT * FROM tasks ORDER BY id DESC LIMIT 50",
            "SELECT count(*) FROM tasks",
            "SELECT * FROM tasks WHERE user_id = 'u1' ORDER BY id DESC LIMIT 50",
        ):
            plan = "\n".join(
                str(line)
                for line in session.execute(text("EXPLAIN (COSTS OFF) " + query)).scalars()
            )
            assert "InitPlan" in plan, plan
            assert "ix_tasks_user_id" in plan, plan
            assert "Seq Scan" not in plan, plan
            assert "tasks_pkey" not in plan, plan
        session.rollback()
        with user_scope(session, "old"):
            assert session.execute(COUNT).scalar_one() == 20000
            session.execute(text("DELETE FROM tasks"))
        for user in ("u1", "u2", "u3"):
            with user_scope(session, user):
                session.execute(text("DELETE FROM tasks"))
        session.commit()


def test_repository_is_unchanged_for_its_callers(rls_engine: Engine) -> None:
    """Every repository method works under the policy, each user seeing only their tasks."""
    repo = TaskRepository(Session(rls_engine))
    task = repo.create(ALICE, TaskCreate(title="new"))
    assert repo.get(ALICE, task.id or 0) == task
    assert repo.get(BOB, task.id or 0) is None
    assert repo.update(BOB, task.id or 0, TaskUpdate(title="stolen")) is None
    assert repo.delete(BOB, task.id or 0) is False
    assert repo.update(ALICE, task.id or 0, TaskUpdate(complete=True)) is not None
    assert repo.count(ALICE, complete=True) == 1
    assert len(repo.create_many(BOB, [TaskCreate(title=f"m{i}") for i in range(3)])) == 3
    with repo.atomic():
        repo.create(ALICE, TaskCreate(title="in block"))
        repo.create(BOB, TaskCreate(title="in block"))
    assert (repo.count(ALICE), repo.count(BOB)) == (4, 5)
    assert repo.delete(ALICE, task.id or 0) is True


@pytest.mark.parametrize("user_id", ["o'brien", "100%", "back\\slash", "ünï 𝄞"])
def test_any_valid_user_id_scopes_exactly(rls_engine: Engine, user_id: str) -> None:
    """Quotes, percent signs, backslashes and non-ASCII in a user id scope exactly that user."""
    repo = TaskRepository(Session(rls_engine))
    task = repo.create(user_id, TaskCreate(title="odd"))
    assert repo.get(user_id, task.id or 0) == task
    with Session(rls_engine) as session, user_scope(session, user_id):
        assert raw_rows(session) == [(user_id, "odd")]
        session.execute(text("DELETE FROM tasks"))
        session.commit()
    assert repo.count(ALICE) == 2
