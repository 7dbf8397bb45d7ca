"""Tasks the repository builds from rows are the same objects the ORM would load."""

from __future__ import annotations

from sqlalchemy import Engine, inspect
from sqlmodel import Session

from todo_backend.models import Task, TaskCreate, TaskRead
from todo_backend.repository import TaskRepository


def _orm_loaded(engine: Engine, task_id: int) -> Task:
    with Session(engine) as session:
        loaded = session.get(Task, task_id)
        assert loaded is not None
        session.expunge(loaded)
    return loaded


def test_built_task_matches_an_orm_loaded_one(repo: TaskRepository, engine: Engine) -> None:
    """Values, pydantic state, identity key and detached status equal the ORM's own load."""
    built = repo.create("alice", TaskCreate(title="row", description="built from a row"))
    loaded = _orm_loaded(engine, built.id or 0)
    assert built == loaded
    assert TaskRead.model_validate(built) == TaskRead.model_validate(loaded)
    assert built.model_dump() == loaded.model_dump()
    assert built.model_fields_set == set(Task.model_fields)
    assert built.__pydantic_extra__ is None
    assert built.__pydantic_private__ is None
    built_state, loaded_state = inspect(built), inspect(loaded)
    assert built_state.key == loaded_state.key
    assert built_state.detached
    assert loaded_state.detached
    assert set(vars(built)) == set(vars(loaded))


def test_built_task_can_be_merged_into_a_session(repo: TaskRepository, engine: Engine) -> None:
    """A built task is a persistent row's snapshot: merging it updates, never inserts."""
    built = repo.create("alice", TaskCreate(title="merge me"))
    with Session(engine) as session:
        merged = session.merge(built)
        assert merged.id == built.id
        assert merged not in session.new
    assert repo.count("alice") == 1
