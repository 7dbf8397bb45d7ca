"""TaskRepository on in-memory SQLite."""

from __future__ import annotations

import contextvars
import io
import re
import threading
import tokenize
from pathlib import Path

import pytest
from sqlalchemy import Engine

import todo_backend
from tests.repository_contract import CONTENT_FIELDS, BoundToTheEngine, RepositoryContract
from todo_backend import repository_core as core
from todo_backend.db import create_db_engine, init_db
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


def test_a_block_left_in_another_context_than_it_was_entered_is_no_error(
    sqlite_engine: Engine,
) -> None:
    """Handing a block between tasks must not turn its end into a ValueError."""
    repo = TaskRepository(sqlite_engine)
    block = core.in_block(repo, object())
    contextvars.copy_context().run(block.__enter__)
    block.__exit__(None, None, None)  # here, not in the context it was entered in
    assert core.block_session(repo) is None


def test_a_thread_sharing_an_engine_bound_repository_stays_out_of_anothers_block(
    tmp_path: Path,
) -> None:
    """A call from another thread while a block is open autocommits on its own."""
    engine = create_db_engine(f"sqlite:///{tmp_path / 'tasks.db'}")
    init_db(engine)
    repo = TaskRepository(engine)
    seen: list[object] = []
    try:
        with repo.atomic():
            worker = threading.Thread(target=lambda: seen.append(core.block_session(repo)))
            worker.start()
            worker.join()
            assert core.block_session(repo) is not None
        assert seen == [None]
    finally:
        engine.dispose()
