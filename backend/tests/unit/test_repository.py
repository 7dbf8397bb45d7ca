"""TaskRepository on in-memory SQLite."""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

import pytest

import todo_backend
from tests.repository_contract import CONTENT_FIELDS, BoundToTheEngine, RepositoryContract
from todo_backend.models import TaskUpdate
from todo_backend.repository import TaskRepository


class TestRepositoryOnSQLite(RepositoryContract):
    """The shared repository contract, on SQLite."""


class TestRepositoryBoundToTheEngineOnSQLite(BoundToTheEngine, RepositoryContract):
    """The shared repository contract, on SQLite, the repositories bound to the engine."""


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


def test_the_repository_names_no_content_field() -> None:
    """Columns follow from the models: no repository module names a content field in code.

    ``complete`` is the one exception: the filter of ``list`` and ``count`` (an
    argument of the data contract). A keyword argument's name (``title=`` of a pydantic
    config) is a parameter of the callee, not a field, and is not counted.
    """
    package = Path(todo_backend.__file__).parent
    sources = [package / "repository_core.py", package / "repository.py"]
    sources += sorted((package / "aio").glob("*.py"))
    named = {field for field in CONTENT_FIELDS if field != "complete"}
    pattern = re.compile(rf"\b({'|'.join(named)})\b")
    found = []
    for source in sources:
        tokens = [
            token
            for token in tokenize.generate_tokens(io.StringIO(source.read_text()).readline)
            if token.type not in {tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT}
        ]
        found += [
            f"{source.name}:{token.start[0]}: {token.string}"
            for token, following in zip(tokens, [*tokens[1:], None], strict=True)
            if token.type in {tokenize.NAME, tokenize.STRING}
            and pattern.search(token.string)
            and not (token.type == tokenize.NAME and following and following.string == "=")
        ]
    assert found == []
