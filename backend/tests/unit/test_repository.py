"""TaskRepository on in-memory SQLite."""

from __future__ import annotations

import pytest

from tests.repository_contract import RepositoryContract
from todo_backend.models import TaskUpdate
from todo_backend.repository import TaskRepository


class TestRepositoryOnSQLite(RepositoryContract):
    """The shared repository contract, on SQLite."""


def test_non_integer_ids_are_type_errors(repo: TaskRepository) -> None:
    """A task id must be an int; a string or bool is a TypeError, not a lookup."""
    for bad in ("1", 1.0, True):
        with pytest.raises(TypeError, match="task_id"):
            repo.get("alice", bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="task_id"):
            repo.update("alice", bad, TaskUpdate(title="x"))  # type: ignore[arg-type]


def test_list_argument_types_are_checked(repo: TaskRepository) -> None:
    """limit and complete of the wrong type are TypeErrors."""
    with pytest.raises(TypeError, match="limit"):
        repo.list("alice", limit="5")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="complete"):
        repo.list("alice", complete="yes")  # type: ignore[arg-type]
