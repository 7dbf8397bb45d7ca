"""FastAPI glue for :mod:`todo_backend.aio` (extra ``todo-backend[fastapi]``): right by default.

Four pieces, each usable alone::

    engine = create_async_db_engine(load_settings())
    Tasks = Annotated[AsyncTaskRepository, Depends(repository_dependency(engine))]
    app = FastAPI(lifespan=lifespan(engine))
    add_error_handlers(app)

- :func:`repository_dependency` and :func:`session_dependency` turn an engine into
  a FastAPI dependency: the engine's repository for every request (nothing to
  close; ``app.dependency_overrides`` can swap it), or one session per request,
  closed after it. An app that never swaps it can use one module-level
  ``AsyncTaskRepository(engine)`` instead, as the README's service does, and save
  FastAPI's solving of the dependency (about a twentieth of a GET's CPU).
  (:func:`~todo_backend.aio.get_async_session` takes the engine as an argument, which
  FastAPI cannot supply, so it is not a dependency by itself.)
- :func:`lifespan` disposes of the engine's pool when the application shuts down
  (and keeps Python's full collections off the startup objects: ``gc.freeze()``).
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

import gc
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
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


def repository_dependency(engine: AsyncEngine) -> Callable[[], Awaitable[AsyncTaskRepository]]:
    """Return a FastAPI dependency giving each request an :class:`AsyncTaskRepository`.

    Use it as ``Depends(repository_dependency(engine))``. The repository is bound to
    *engine*: each call borrows a pooled connection for its one statement, and an
    ``atomic()`` block opens a session for its own duration, so a request holds
    nothing between calls and there is nothing to close after it. Every request gets
    the same one: it holds no request's state (an open block belongs to the task that
    opened it). A plain coroutine, not a generator: FastAPI runs it without an exit
    stack (a quarter of a simple request's dependency time).
    """
    shared = AsyncTaskRepository(engine)

    async def repository() -> AsyncTaskRepository:
        return shared

    return repository


def lifespan(
    engine: AsyncEngine, *, freeze_gc: bool = True
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """Return a FastAPI ``lifespan`` that disposes of *engine* when the application stops.

    ``FastAPI(lifespan=lifespan(engine))`` closes the pooled connections at shutdown
    instead of leaving them for the server to time out.

    With *freeze_gc* (the default), it also collects and then freezes the objects
    that exist at startup (``gc.freeze()``: modules, models, routes), and unfreezes
    them at shutdown. Python's full collections then skip those hundreds of thousands
    of long-lived objects: measured under load, they had taken 65-85 ms about once a
    second, every request waiting meanwhile (the p99 of a simple GET fell from
    88-99 ms to 31 ms; ``docs/benchmarks/http.md``). Garbage made after startup is
    collected as before. Several apps in one process share the freeze: the last to
    stop unfreezes, unless the heap held frozen objects before the first started (a
    pre-fork server's own ``gc.freeze()``; Python 3.12 itself starts with a few),
    which are left frozen, with the apps' startup objects. Pass ``freeze_gc=False`` if
    the process manages its collector itself.
    """

    @asynccontextmanager
    async def run(_app: FastAPI) -> AsyncIterator[None]:
        if freeze_gc:
            _freeze()
        try:
            yield
        finally:
            try:
                await engine.dispose()
            finally:
                if freeze_gc:
                    _unfreeze()

    return run


# Lifespans running in this process that froze the heap: the last one to stop
# unfreezes it, so that an app stopping never undoes another's freeze. A heap the
# process froze itself before any of them (a pre-fork server) stays frozen.
_freezes = 0
_frozen_before = False
_freeze_lock = threading.Lock()


def _freeze() -> None:
    global _freezes, _frozen_before  # noqa: PLW0603 - one count per process, as the heap is
    with _freeze_lock:
        if _freezes == 0:
            _frozen_before = gc.get_freeze_count() > 0
            gc.collect()
            gc.freeze()
        _freezes += 1


def _unfreeze() -> None:
    global _freezes  # noqa: PLW0603
    with _freeze_lock:
        _freezes -= 1
        if _freezes == 0 and not _frozen_before:
            gc.unfreeze()


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
