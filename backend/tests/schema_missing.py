"""Every repository call on a database without the tasks table, for both faces.

Shared by the SQLite (unit) and PostgreSQL (integration) checks that such a call
raises :class:`~todo_backend.errors.SchemaMissingError` naming ``todo-db migrate``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from todo_backend.models import TaskCreate, TaskUpdate

__all__ = ["CALLS"]

# name -> a call on a repository (sync or async alike: the async one returns a coroutine).
CALLS: dict[str, Callable[[Any], Any]] = {
    "create": lambda repo: repo.create("alice", TaskCreate(title="t")),
    "create_many": lambda repo: repo.create_many("alice", [TaskCreate(title="t")] * 2),
    "get": lambda repo: repo.get("alice", 1),
    "list": lambda repo: repo.list("alice"),
    "update": lambda repo: repo.update("alice", 1, TaskUpdate(complete=True)),
    "delete": lambda repo: repo.delete("alice", 1),
    "count": lambda repo: repo.count("alice"),
}
