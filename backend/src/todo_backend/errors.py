"""Exceptions raised by todo_backend.

Every error the package raises on purpose derives from one base, so a caller can
catch the whole family at once::

    TodoBackendError
    ├── ConfigurationError        settings (or engine options) cannot be used; fix them
    ├── DatabaseUnavailableError  the database cannot be reached; check the URL, TLS, network
    ├── DatabaseTimeoutError      a bounded wait ran out (pool, statement, lock, idle block)
    ├── DatabaseConflictError     a deadlock or serialization failure; nothing stored, retry
    ├── DatabaseStatementError    any other database error; carries its SQLSTATE
    ├── SchemaMissingError        no tasks table, or one behind the code; run `todo-db migrate`
    └── migrate.MigrationError    a migration cannot run as asked; nothing was changed

No error of the database driver or SQLAlchemy reaches a repository caller: each is
one of these, with the original as its ``__cause__``.

A failed call inside ``TaskRepository.atomic()`` makes the block raise
``TodoBackendError`` itself at its end (the whole block was rolled back).

Invalid task data is reported with :class:`pydantic.ValidationError`, raised before
any SQL is sent. Messages never contain a password.
"""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "DatabaseConflictError",
    "DatabaseStatementError",
    "DatabaseTimeoutError",
    "DatabaseUnavailableError",
    "SchemaMissingError",
    "TodoBackendError",
]


class TodoBackendError(Exception):
    """Base of every error todo_backend raises deliberately."""


class ConfigurationError(TodoBackendError):
    """The settings cannot be used: a variable is missing, blank or malformed.

    Also raised for engine options the package cannot honour safely (read-only or
    deferrable with AUTOCOMMIT on the sync engine). The message names the variable or
    option and says how to fix it; it never repeats a password.
    """


class DatabaseUnavailableError(TodoBackendError):
    """The database did not answer after the allowed attempts.

    The message names the host and port (never the password) and lists what to check:
    the URL, ``sslmode``, a suspended Neon compute still waking up, the network.
    """


class DatabaseTimeoutError(TodoBackendError):
    """A call ran into one of the engine's bounds on waiting, and nothing of it was stored.

    Raised when no pooled connection became free within ``DB_POOL_TIMEOUT`` (nothing
    was sent), or when the server cancelled the statement at ``DB_STATEMENT_TIMEOUT``
    or ``DB_LOCK_TIMEOUT``, or ended an ``atomic()`` block left idle longer than
    ``DB_IDLE_IN_TRANSACTION_TIMEOUT`` (the server rolled it back). ``bound`` names the
    setting that was hit; the message says what to do next. Safe to retry.
    """

    def __init__(self, message: str, *, bound: str = "") -> None:
        super().__init__(message)
        self.bound = bound

    def __reduce__(self) -> tuple[type[DatabaseTimeoutError], tuple[str], dict[str, str]]:
        # Keeps ``bound`` when the error crosses a process boundary (pickle).
        return type(self), (str(self),), {"bound": self.bound}


class DatabaseConflictError(TodoBackendError):
    """The server aborted the call's transaction to resolve a conflict; nothing was stored.

    Raised for a deadlock (SQLSTATE ``40P01``: two transactions waited for each other's
    rows, and the server rolled one back) and a serialization failure (``40001``).
    Nothing of the call, or of the ``atomic()`` block or the caller's transaction it ran
    in, was stored: repeat the call, or the whole block. ``sqlstate`` holds the code.
    """

    def __init__(self, message: str, *, sqlstate: str = "") -> None:
        super().__init__(message)
        self.sqlstate = sqlstate

    def __reduce__(self) -> tuple[type[DatabaseConflictError], tuple[str], dict[str, str]]:
        # Keeps ``sqlstate`` when the error crosses a process boundary (pickle).
        return type(self), (str(self),), {"sqlstate": self.sqlstate}


class DatabaseStatementError(TodoBackendError):
    """The database refused or failed a statement for a reason no other error names.

    A bug, a schema that differs from the package's, or a server fault. The message
    holds the SQLSTATE and the first line of the server's message (never the SQL
    parameters, never a password); ``sqlstate`` holds the code ("" when the database
    gives none, as SQLite does); the driver's error is the ``__cause__``.
    """

    def __init__(self, message: str, *, sqlstate: str = "") -> None:
        super().__init__(message)
        self.sqlstate = sqlstate

    def __reduce__(self) -> tuple[type[DatabaseStatementError], tuple[str], dict[str, str]]:
        # Keeps ``sqlstate`` when the error crosses a process boundary (pickle).
        return type(self), (str(self),), {"sqlstate": self.sqlstate}


class SchemaMissingError(TodoBackendError):
    """A repository call found no ``tasks`` table, or one without a column the models declare.

    The database's schema was never created, or it is behind the code (a release
    that added a field, deployed before its revision ran). Nothing was stored. The
    message says to run ``todo-db migrate`` against the database (``init_db(engine)``
    in tests and throwaway databases).
    """
