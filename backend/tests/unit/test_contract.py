"""Data contract v1.0.0: the documented schema and public surface match the code."""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any, assert_type

import todo_backend
from todo_backend import (
    DatabaseHealth,
    Settings,
    Task,
    TaskCreate,
    TaskRead,
    TaskRepository,
    TaskUpdate,
    check_database,
    create_db_engine,
    get_session,
    init_db,
)

CONTRACT = Path("specs") / "002-database-setup" / "contracts" / "task-schema.md"

# The names the contract documents, nothing more: adding one is a contract change.
PUBLIC_SURFACE = frozenset(
    {
        "DESCRIPTION_MAX_LENGTH",
        "TITLE_MAX_LENGTH",
        "USER_ID_MAX_LENGTH",
        "ConfigurationError",
        "DatabaseConflictError",
        "DatabaseHealth",
        "DatabaseStatementError",
        "DatabaseTimeoutError",
        "DatabaseUnavailableError",
        "SchemaMissingError",
        "Settings",
        "Task",
        "TaskCreate",
        "TaskRead",
        "TaskRepository",
        "TaskUpdate",
        "TodoBackendError",
        "check_database",
        "create_db_engine",
        "get_session",
        "init_db",
        "load_settings",
        "wait_for_database",
    }
)


def _repo_root() -> Path:
    for parent in Path(__file__).resolve().parents:
        if (parent / "pyproject.toml").is_file():
            return parent
    raise AssertionError("no pyproject.toml above this test: cannot find the repo root")


def _contract_text() -> str:
    return (_repo_root() / CONTRACT).read_text(encoding="utf-8")


def _documented_schema() -> Any:
    blocks = re.findall(r"^```json\n(.*?)^```$", _contract_text(), flags=re.DOTALL | re.MULTILINE)
    assert len(blocks) == 1, f"{CONTRACT} must hold exactly one ```json block"
    return json.loads(blocks[0])


SHOW_SCHEMA = (
    'uv run python -c "import json; from todo_backend import TaskRead; '
    'print(json.dumps(TaskRead.model_json_schema(), indent=2))"'
)


def test_documented_task_schema_equals_taskread_json_schema() -> None:
    """The JSON Schema in the contract document is exactly TaskRead.model_json_schema()."""
    assert _documented_schema() == TaskRead.model_json_schema(), (
        f"TaskRead's JSON Schema changed: it is a contract change. Replace the ```json block "
        f"of {CONTRACT} with what `{SHOW_SCHEMA}` prints, describe the change there (an "
        "added optional field is a minor version: bump the version in its title and in "
        "todo_backend/__init__.py's docstring)"
    )


def _table_rows(text: str, heading: str) -> list[list[str]]:
    """Return the body rows of the first Markdown table under *heading*, as lists of cells."""
    section = text.split(f"\n{heading}\n", 1)[1]
    table: list[str] = []
    for line in section.splitlines():
        if line.startswith("|"):
            table.append(line)
        elif table or line.startswith("#"):
            break
    return [
        [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
        for line in table[2:]  # after the header and its --- line
    ]


def test_the_input_tables_document_every_content_field() -> None:
    """The contract's input table has one row per field of TaskCreate and TaskUpdate."""
    documented = [
        row[0].strip("`")
        for row in _table_rows(_contract_text(), "## Inputs: TaskCreate and TaskUpdate")
    ]
    fields = list(TaskCreate.model_fields)
    assert documented == fields, (
        f"{CONTRACT}: the table of 'Inputs: TaskCreate and TaskUpdate' documents {documented}, "
        f"the models have {fields}: add a row per new field (`{SHOW_SCHEMA}` shows its rules)"
    )
    assert list(TaskUpdate.model_fields) == fields


def test_all_is_exactly_the_documented_public_surface() -> None:
    """todo_backend.__all__ lists the documented names, each once, and no other."""
    assert len(todo_backend.__all__) == len(set(todo_backend.__all__))
    assert set(todo_backend.__all__) == PUBLIC_SURFACE


def test_every_exported_name_imports_and_is_documented() -> None:
    """Each exported name resolves on the package and appears in the contract document."""
    text = _contract_text()
    for name in todo_backend.__all__:
        assert getattr(todo_backend, name) is not None, name
        assert f"`{name}`" in text, f"{name} is exported but not documented in {CONTRACT}"


def test_no_public_name_is_left_out_of_all() -> None:
    """Every public attribute of the package other than its submodules is in __all__."""
    public = {
        name
        for name, value in vars(todo_backend).items()
        if not name.startswith("_") and not isinstance(value, ModuleType)
    }
    assert public == set(todo_backend.__all__)


def test_contract_version_is_the_one_the_package_declares() -> None:
    """The document's title and the package docstring name the same contract version."""
    title = _contract_text().splitlines()[0]
    version = re.search(r"contract (v\d+\.\d+\.\d+)", title, flags=re.IGNORECASE)
    assert version is not None, title
    docstring = " ".join((todo_backend.__doc__ or "").split())
    assert f"data contract {version.group(1)}" in docstring


def test_package_ships_its_type_information() -> None:
    """The package carries a PEP 561 py.typed marker, so callers' type checkers use its hints."""
    assert (Path(todo_backend.__file__).parent / "py.typed").is_file()


def test_public_api_types_from_the_user_side() -> None:
    """Used as a caller would, the public API has the documented types (checked by mypy)."""
    engine = create_db_engine(Settings(database_url="sqlite://"))
    try:
        init_db(engine)
        health = assert_type(check_database(engine), DatabaseHealth)
        assert health.ok
        sessions = get_session(engine)
        repo = TaskRepository(next(sessions))
        try:
            task = assert_type(repo.create("alice", TaskCreate(title="typed")), Task)
            task_id = assert_type(task.id, int | None)
            assert task_id is not None
            assert_type(repo.get("alice", task_id), Task | None)
            assert_type(repo.list("alice", complete=False, limit=10), list[Task])
            assert_type(repo.update("alice", task_id, TaskUpdate(complete=True)), Task | None)
            assert_type(repo.count("alice"), int)
            read = TaskRead.model_validate(task)
            assert_type(read.created_at, datetime)
            assert_type(read.description, str | None)
            assert read.model_dump(mode="json")["created_at"].endswith("Z")
            assert assert_type(repo.delete("alice", task_id), bool)
        finally:
            sessions.close()
    finally:
        engine.dispose()


def test_async_surface_is_documented() -> None:
    """todo_backend.aio exports the three documented names, and the contract names each."""
    import todo_backend.aio

    assert set(todo_backend.aio.__all__) == {
        "AsyncTaskRepository",
        "create_async_db_engine",
        "get_async_session",
    }
    text = _contract_text()
    assert all(f"`{name}(" in text for name in todo_backend.aio.__all__)
