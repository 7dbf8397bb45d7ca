"""Exceptions raised by todo_backend.

Every error the package raises on purpose derives from one base, so a caller can
catch the whole family at once::

    TodoBackendError
    ├── ConfigurationError        settings (or engine options) cannot be used; fix them
    ├── DatabaseUnavailableError  the database cannot be reached; check the URL, TLS, network
    ├── DatabaseTimeoutError      a bounded wait ran out (pool, statement, lock, idle block)
    ├── SchemaMissingError        the database has no tasks table; run `todo-db migrate`
    └── migrate.MigrationError    a migration cannot run as asked; nothing was changed

A failed call inside ``TaskRepository.atomic()`` makes the block raise
``TodoBackendError`` itself at its end (the whole block was rolled back).

Invalid task data is reported with :class:`pydantic.ValidationError`, raised before
any SQL is sent. Messages never contain a password.
"""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
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


class SchemaMissingError(TodoBackendError):
    """A repository call found no ``tasks`` table: the database's schema was never created.

    Nothing was stored. The message says to run ``todo-db migrate`` against the
    database (``init_db(engine)`` in tests and throwaway databases).
    """
