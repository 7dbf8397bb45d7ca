"""create_many on PostgreSQL: batches fed by unnest keep the input order and every value."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from todo_backend.models import TaskCreate, TaskRead, utc_now
from todo_backend.repository import TaskRepository
from todo_backend.repository_core import _INSERT_BATCH

ALICE = "alice"


def _items(n: int) -> list[TaskCreate]:
    return [
        TaskCreate(
            title=f"t{i} \u00e9\U0001f600",
            description=None if i % 3 else f"line one\nline two {i}",
            complete=i % 2 == 0,
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("batches", [1, 3])
def test_tasks_come_back_in_input_order_as_stored(
    batches: int, repo: TaskRepository, engine: Engine
) -> None:
    """Across one or several batches the returned tasks follow the input and equal get()."""
    size = engine.dialect.insertmanyvalues_page_size
    items = _items(size * (batches - 1) + 7)
    created = repo.create_many(ALICE, items)
    assert [(t.title, t.description, t.complete) for t in created] == [
        (i.title, i.description, i.complete) for i in items
    ]
    ids = [t.id or 0 for t in created]
    assert ids == sorted(ids)
    for task in (created[0], created[len(created) // 2], created[-1]):
        stored = repo.get(ALICE, task.id or 0)
        assert stored is not None
        assert TaskRead.model_validate(stored) == TaskRead.model_validate(task)


def test_a_batch_without_any_description_is_stored(repo: TaskRepository) -> None:
    """An all-NULL description array is typed by the statement, not guessed by the server."""
    created = repo.create_many(ALICE, [TaskCreate(title=f"n{i}") for i in range(3)])
    assert [t.description for t in created] == [None, None, None]
    assert repo.count(ALICE) == 3


def test_an_over_long_title_is_refused_not_truncated(repo: TaskRepository, engine: Engine) -> None:
    """Input that skipped validation is refused, and the batch statement never truncates."""
    too_long = TaskCreate.model_construct(title="x" * 201, description=None, complete=False)
    with pytest.raises(ValidationError):
        repo.create_many(ALICE, [TaskCreate(title="fine"), too_long])
    assert repo.count(ALICE) == 0
    # The statement itself, fed directly: its unsized array cast must not cut the title.
    row = TaskCreate(title="fine").model_dump() | {"title": "x" * 201}
    batch = {"owner": ALICE, "now": utc_now()} | {f"batch_{k}": [v] for k, v in row.items()}
    with engine.connect() as conn, pytest.raises(DBAPIError, match="too long"):
        conn.execute(_INSERT_BATCH, batch)
    assert repo.count(ALICE) == 0
