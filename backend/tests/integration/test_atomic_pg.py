"""atomic() at its edges on PostgreSQL: a call cancelled on a row lock, a terminated block.

The contract (tests/repository_contract.py) checks the block's rules with injected
faults; here the faults are real. A call inside ``async with repo.atomic()`` waits on
a row another transaction holds and is cancelled (``asyncio.wait_for`` or
``Task.cancel``); the block's backend is terminated (``pg_terminate_backend``, as
Neon's suspend does) before the block ends with an error, so its ROLLBACK fails too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.async_face import AwaitedRepository, runner
from tests.integration.test_aio_reliability_pg import _repo, _until, async_engine
from tests.integration.test_reliability import _Outside, outside
from todo_backend.db import get_session
from todo_backend.errors import TodoBackendError
from todo_backend.models import TaskCreate, TaskUpdate
from todo_backend.repository import TaskRepository

__all__ = ["async_engine", "outside", "runner"]

ALICE = "alice"


@contextmanager
def _row_locked(observer: Engine, task_id: int) -> Iterator[None]:
    """Hold a row lock on task *task_id* in another transaction: writes to it queue."""
    with observer.connect() as conn:
        conn.execution_options(isolation_level="READ COMMITTED")
        with conn.begin():
            conn.execute(text("select id from tasks where id = :id for update"), {"id": task_id})
            yield


def _in_transaction(outside: _Outside) -> set[int]:
    """The backends of the app's database inside a transaction (an open atomic() block)."""
    with outside.admin.connect() as conn:
        return set(
            conn.execute(
                text(
                    "select pid from pg_stat_activity where datname = :db "
                    "and state like 'idle in transaction%' and pid <> pg_backend_pid()"
                ),
                {"db": outside.database},
            ).scalars()
        )


@pytest.mark.parametrize("how", ["wait_for", "cancel"])
def test_a_call_cancelled_on_a_locked_row_fails_the_block(
    how: str, runner: asyncio.Runner, async_engine: AsyncEngine, outside: _Outside
) -> None:
    """A call cancelled while it waits on a row lock fails its block; nothing is stored."""
    repo = _repo(runner, async_engine)
    locked = runner.run(repo.create(ALICE, TaskCreate(title="locked")))
    before = outside.rows(ALICE)
    seen: list[BaseException] = []

    async def update() -> object:
        return await repo.update(ALICE, locked.id or 0, TaskUpdate(title="never stored"))

    async def cancelled_call() -> None:
        if how == "wait_for":
            await asyncio.wait_for(update(), 0.2)
            return
        call = asyncio.ensure_future(update())
        await _until(lambda: bool(outside.waiting_on_lock()), "the UPDATE to queue")
        call.cancel()
        await call

    async def block() -> None:
        async with repo.atomic():
            await repo.create(ALICE, TaskCreate(title="first"))
            try:
                await cancelled_call()
            except (TimeoutError, asyncio.CancelledError) as err:
                seen.append(err)
            with pytest.raises(TodoBackendError, match="rolled back"):
                await repo.create(ALICE, TaskCreate(title="after the cancelled call"))

    with (
        _row_locked(outside.observer, locked.id or 0),
        pytest.raises(TodoBackendError, match="rolled back"),
    ):
        runner.run(block())
    expected = TimeoutError if how == "wait_for" else asyncio.CancelledError
    assert [type(err) for err in seen] == [expected]
    assert outside.rows(ALICE) == before
    assert runner.run(repo.count(ALICE)) == 1  # the session goes on after the block


@pytest.fixture(params=["sync", "async"])
def either_repo(
    request: pytest.FixtureRequest,
    engine: Engine,
    runner: asyncio.Runner,
    async_engine: AsyncEngine,
) -> TaskRepository | AwaitedRepository:
    """A repository of each face on the scratch database (the async one awaited per call)."""
    if request.param == "sync":
        return TaskRepository(next(get_session(engine)))
    return AwaitedRepository(_repo(runner, async_engine), runner)


@pytest.mark.parametrize("caught", [False, True], ids=["raised", "caught"])
def test_a_terminated_block_raises_the_callers_own_error(
    caught: bool, either_repo: TaskRepository | AwaitedRepository, outside: _Outside
) -> None:
    """When the block's backend dies before it ends with an error, the caller's error wins."""
    repo = either_repo
    repo.count(ALICE)  # schema and pool warm

    def block() -> None:
        with repo.atomic():
            repo.create(ALICE, TaskCreate(title="never stored"))
            killed = outside.terminate(_in_transaction(outside))
            assert len(killed) == 1
            if caught:
                with suppress(LookupError), repo.atomic():
                    raise LookupError("the caller's own error")
            else:
                raise LookupError("the caller's own error")

    expected: type[Exception] = TodoBackendError if caught else LookupError
    with pytest.raises(expected) as raised:
        block()
    notes = "\n".join(getattr(raised.value, "__notes__", []))
    assert "ROLLBACK failed too (the database connection was lost)" in notes
    assert outside.rows(ALICE) == []
    assert repo.count(ALICE) == 0  # the repository goes on, on a fresh connection
