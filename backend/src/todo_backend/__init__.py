"""todo_backend: the typed data layer of the todo application.

Configuration (:mod:`todo_backend.config`) feeds the engine and sessions
(:mod:`todo_backend.db`), which the user-scoped repository
(:mod:`todo_backend.repository`) uses to store :class:`Task` rows
(:mod:`todo_backend.models`). This module re-exports the public surface, data
contract v1.0.0.
"""

from todo_backend.config import Settings, load_settings
from todo_backend.db import (
    DatabaseHealth,
    check_database,
    create_db_engine,
    get_session,
    init_db,
    wait_for_database,
)
from todo_backend.errors import (
    ConfigurationError,
    DatabaseConflictError,
    DatabaseStatementError,
    DatabaseTimeoutError,
    DatabaseUnavailableError,
    SchemaMissingError,
    TodoBackendError,
)
from todo_backend.models import (
    DESCRIPTION_MAX_LENGTH,
    TITLE_MAX_LENGTH,
    USER_ID_MAX_LENGTH,
    Task,
    TaskCreate,
    TaskRead,
    TaskUpdate,
)
from todo_backend.repository import TaskRepository

__all__ = [
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
]
__version__ = "1.0.0"
