"""Property: no sequence of scoped and unscoped raw statements crosses users (PostgreSQL)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import ProgrammingError
from sqlmodel import Session

from tests.integration.row_security import INSERT, migrated_engine
from todo_backend import TaskRepository, user_scope

USERS = ("ann", "ben", "cy")
_INSERT_RETURNING = text(str(INSERT) + " RETURNING id")


@dataclass(frozen=True)
class Op:
    """One raw statement: what it does, as whom (None: unscoped), on whose behalf."""

    kind: str  # select | update | delete | insert | repo
    scope: str | None
    target: str  # the row owner an insert names; the user a repository call is for
    pick: int  # which known id a delete aims at


_OPS = st.builds(
    Op,
    kind=st.sampled_from(("select", "update", "delete", "insert", "repo")),
    scope=st.none() | st.sampled_from(USERS),
    target=st.sampled_from(USERS),
    pick=st.integers(0, 50),
)


@pytest.fixture(scope="module")
def property_engine(admin_url: URL) -> Iterator[Engine]:
    """The package's engine on a database migrated to head, for the property test."""
    with migrated_engine(admin_url) as engine:
        yield engine


def _clear(engine: Engine) -> None:
    with Session(engine) as session:
        for user in USERS:
            with user_scope(session, user):
                session.execute(text("DELETE FROM tasks"))
        session.commit()


def _run(session: Session, op: Op, model: dict[int, tuple[str, str]], n: int) -> None:
    """Run *op* in *session*'s transaction; check its outcome against *model*, update it."""
    mine = {i: row for i, row in model.items() if row[0] == op.scope}
    if op.kind == "select":
        rows = session.execute(text("SELECT id, user_id, title FROM tasks")).all()
        assert {r.id: (r.user_id, r.title) for r in rows} == mine
    elif op.kind == "update":
        title = f"t{n}"
        changed = session.execute(text("UPDATE tasks SET title = :t RETURNING id"), {"t": title})
        assert set(changed.scalars()) == set(mine)
        model.update({i: (row[0], title) for i, row in mine.items()})
    elif op.kind == "delete":
        ids = sorted(model)
        victim = ids[op.pick % len(ids)] if ids else 0
        gone = session.execute(
            text("DELETE FROM tasks WHERE id = :id RETURNING id"), {"id": victim}
        )
        assert list(gone.scalars()) == ([victim] if victim in mine else [])
        if victim in mine:
            del model[victim]
    elif op.kind == "insert":
        savepoint = session.begin_nested()
        try:
            made = session.execute(
                _INSERT_RETURNING, {"user_id": op.target, "title": f"i{n}"}
            ).scalar_one()
        except ProgrammingError:
            savepoint.rollback()
            assert op.scope != op.target
        else:
            savepoint.commit()
            assert op.scope == op.target
            model[made] = (op.target, f"i{n}")
    else:
        expected = sorted((i for i, row in model.items() if row[0] == op.target), reverse=True)
        got = [t.id for t in TaskRepository(session).list(op.target, limit=100)]
        assert got == expected


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=st.lists(st.tuples(_OPS, st.booleans()), min_size=1, max_size=25))
def test_no_statement_sequence_crosses_users(
    property_engine: Engine, ops: list[tuple[Op, bool]]
) -> None:
    """Scoped and unscoped raw statements by several users only ever touch the scope's rows."""
    _clear(property_engine)
    model: dict[int, tuple[str, str]] = {}
    with Session(property_engine) as session:
        for n, (op, commit) in enumerate(ops):
            if op.scope is None:
                _run(session, op, model, n)
            else:
                with user_scope(session, op.scope):
                    _run(session, op, model, n)
            if commit:
                session.commit()
        session.commit()
    # What each user's scope sees afterwards, on fresh transactions, is the model.
    with Session(property_engine) as session:
        for user in (*USERS, None):
            expected = {i: row for i, row in model.items() if row[0] == user}
            if user is None:
                rows = session.execute(text("SELECT id, user_id, title FROM tasks")).all()
            else:
                with user_scope(session, user):
                    rows = session.execute(text("SELECT id, user_id, title FROM tasks")).all()
            assert {r.id: (r.user_id, r.title) for r in rows} == expected
