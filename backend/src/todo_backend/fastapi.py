"""FastAPI glue for :mod:`todo_backend.aio` (extra ``todo-backend[fastapi]``): right by default.

Four pieces, each usable alone::

    engine = create_async_db_engine(load_settings())
    Tasks = Annotated[AsyncTaskRepository, Depends(repository_dependency(engine))]
    app = FastAPI(lifespan=lifespan(engine))
    add_error_handlers(app)

- :func:`session_dependency` / :func:`repository_dependency` turn an engine into a
  FastAPI dependency: one session (or repository) per request, closed after it.
  (:func:`~todo_backend.aio.get_async_session` takes the engine as an argument, which
  FastAPI cannot supply, so it is not a dependency by itself.)
- :func:`lifespan` disposes of the engine's pool when the application shuts down.
- :func:`add_error_handlers` answers the package's errors with the right status and
  a message meant for API clients: invalid data (``pydantic.ValidationError``, e.g. a
  bad user id or a ``limit`` outside 1..100) is 422, a bound that ran out
  (``DatabaseTimeoutError``) and a deadlock or serialization failure
  (``DatabaseConflictError``) are 503 with ``Retry-After``, an unreachable database or
  a lost connection (``DatabaseUnavailableError``) is 503, any other
  ``TodoBackendError`` (a missing schema, a failed ``atomic()`` block) is 500. The
  full message goes to the log, never to the client: no host, user or URL leaves
  the server (messages never hold a password in the first place).
"""

from __future__ import annotations

import importlib

# Fail at import, with the fix, rather than with a bare ModuleNotFoundError.
try:
    importlib.import_module("fastapi")
except ImportError as _missing:
    raise ImportError(
        'todo_backend.fastapi needs the fastapi extra: pip install "todo-backend[fastapi]"'
    ) from _missing

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Final

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel.ext.asyncio.session import AsyncSession

from todo_backend.aio import AsyncTaskRepository
from todo_backend.errors import (
    DatabaseConflictError,
    DatabaseTimeoutError,
    DatabaseUnavailableError,
    TodoBackendError,
)

__all__ = [
    "add_error_handlers",
    "lifespan",
    "repository_dependency",
    "session_dependency",
]

logger = logging.getLogger(__name__)

RETRY_AFTER_SECONDS: Final = 1
_TIMEOUT_DETAIL: Final = (
    "the database did not answer within its time bounds; nothing of the request was "
    "stored. Retry later."
)
_UNAVAILABLE_DETAIL: Final = (
    "the database is unavailable. Retry later; a write whose connection was lost may "
    "have been applied, so read before repeating it."
)
_CONFLICT_DETAIL: Final = (
    "the request collided with another one on the same data; nothing of it was stored. Repeat it."
)
_INTERNAL_DETAIL: Final = "internal server error"


def session_dependency(engine: AsyncEngine) -> Callable[[], AsyncIterator[AsyncSession]]:
    """Return a FastAPI dependency yielding one ``AsyncSession`` on *engine* per request.

    Use it as ``Depends(session_dependency(engine))``; the session is closed when the
    request is done and keeps objects readable after commit (``expire_on_commit=False``),
    like :func:`~todo_backend.aio.get_async_session`.
    """

    async def session() -> AsyncIterator[AsyncSession]:
        async with AsyncSession(engine, expire_on_commit=False) as opened:
            yield opened

    return session


def repository_dependency(engine: AsyncEngine) -> Callable[[], AsyncIterator[AsyncTaskRepository]]:
    """Return a FastAPI dependency yielding an :class:`AsyncTaskRepository` per request.

    Use it as ``Depends(repository_dependency(engine))``: the repository's session is
    one per request, closed when the request is done.
    """

    async def repository() -> AsyncIterator[AsyncTaskRepository]:
        async with AsyncSession(engine, expire_on_commit=False) as opened:
            yield AsyncTaskRepository(opened)

    return repository


def lifespan(engine: AsyncEngine) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """Return a FastAPI ``lifespan`` that disposes of *engine* when the application stops.

    ``FastAPI(lifespan=lifespan(engine))`` closes the pooled connections at shutdown
    instead of leaving them for the server to time out.
    """

    @asynccontextmanager
    async def run(_app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await engine.dispose()

    return run


def add_error_handlers(app: FastAPI, *, retry_after: int = RETRY_AFTER_SECONDS) -> None:
    """Answer the package's errors on *app* with 422, 503 or 500 and a client-safe message.

    ``pydantic.ValidationError`` becomes 422 with the field errors (type, location and
    message, as FastAPI reports request errors, without the input); ``DatabaseTimeoutError``
    503 with ``Retry-After: retry_after`` and the ``bound`` that ran out;
    ``DatabaseConflictError`` (nothing stored, safe to repeat) 503 with ``Retry-After``;
    ``DatabaseUnavailableError`` 503; any other ``TodoBackendError`` 500. The error's
    own message is logged, never sent.
    """
    app.add_exception_handler(ValidationError, _invalid)  # type: ignore[arg-type]

    async def timed_out(_request: Request, err: DatabaseTimeoutError) -> JSONResponse:
        logger.warning("database bound ran out (%s): %s", err.bound, err)
        return JSONResponse(
            {"detail": _TIMEOUT_DETAIL, "bound": err.bound},
            status_code=503,
            headers={"Retry-After": str(retry_after)},
        )

    async def conflicted(_request: Request, err: DatabaseConflictError) -> JSONResponse:
        logger.warning("transaction aborted by a conflict (%s): %s", err.sqlstate, err)
        return JSONResponse(
            {"detail": _CONFLICT_DETAIL},
            status_code=503,
            headers={"Retry-After": str(retry_after)},
        )

    app.add_exception_handler(DatabaseTimeoutError, timed_out)  # type: ignore[arg-type]
    app.add_exception_handler(DatabaseConflictError, conflicted)  # type: ignore[arg-type]
    app.add_exception_handler(DatabaseUnavailableError, _unavailable)  # type: ignore[arg-type]
    app.add_exception_handler(TodoBackendError, _failed)  # type: ignore[arg-type]


async def _invalid(_request: Request, err: ValidationError) -> JSONResponse:
    errors = [
        {"type": e["type"], "loc": list(e["loc"]), "msg": e["msg"]}
        for e in err.errors(include_url=False, include_context=False, include_input=False)
    ]
    return JSONResponse({"detail": errors}, status_code=422)


async def _unavailable(_request: Request, err: DatabaseUnavailableError) -> JSONResponse:
    logger.error("database unavailable: %s", err)
    return JSONResponse({"detail": _UNAVAILABLE_DETAIL}, status_code=503)


async def _failed(_request: Request, err: TodoBackendError) -> JSONResponse:
    logger.error("%s: %s", type(err).__name__, err)
    return JSONResponse({"detail": _INTERNAL_DETAIL}, status_code=500)
