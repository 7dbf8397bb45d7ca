"""Load: many API threads through one engine with the default pool, as one API instance.

Forty threads share one engine (pool_size 5 + max_overflow 15): every call must
succeed, the final state must be exact, and the server must never see more than the
pool's 20 connections from the engine.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ParamSpec, TypeVar

import pytest
from sqlalchemy import Engine
from sqlalchemy.engine import URL
from sqlalchemy.pool import QueuePool

from tests.fix_servers import PeakSampler
from todo_backend.config import Settings
from todo_backend.db import get_session
from todo_backend.models import Task, TaskCreate, TaskUpdate
from todo_backend.repository import TaskRepository

pytestmark = pytest.mark.slow

THREADS = 40
USERS = 20  # two threads per user: their writes interleave on the same rows' index
ROUNDS = 8

_P = ParamSpec("_P")
_R = TypeVar("_R")


@dataclass
class _Worker:
    """One API thread: a mixed workload on its own tasks; remembers what must remain."""

    engine: Engine
    user: str
    number: int
    kept: dict[int, str] = field(default_factory=dict)
    completed: set[int] = field(default_factory=set)
    calls: Counter[str] = field(default_factory=Counter)
    errors: list[BaseException] = field(default_factory=list)

    def run(self, start: threading.Barrier) -> None:
        try:
            start.wait(timeout=30)
            self._work(TaskRepository(next(get_session(self.engine))))
        except BaseException as err:  # noqa: BLE001 - reported by the test
            self.errors.append(err)

    def _work(self, repo: TaskRepository) -> None:
        for round_ in range(ROUNDS):
            for n in range(2):
                title = f"w{self.number} r{round_} n{n}"
                task = self._call("create", repo.create, self.user, TaskCreate(title=title))
                self.kept[task.id or 0] = title
            oldest = min(self.kept)
            got = self._call("get", repo.get, self.user, oldest)
            assert isinstance(got, Task)
            assert got.title == self.kept[oldest]
            listed = self._call("list", repo.list, self.user, limit=10)
            assert {t.user_id for t in listed} == {self.user}
            toggled = self._call(
                "update",
                repo.update,
                self.user,
                oldest,
                TaskUpdate(complete=oldest not in self.completed),
            )
            assert isinstance(toggled, Task)
            self.completed ^= {oldest}
            if round_ % 2:
                newest = max(self.kept)
                assert self._call("delete", repo.delete, self.user, newest) is True
                del self.kept[newest]
                self.completed.discard(newest)
            assert self._call("count", repo.count, self.user) >= len(self.kept)

    def _call(
        self, name: str, method: Callable[_P, _R], /, *args: _P.args, **kwargs: _P.kwargs
    ) -> _R:
        self.calls[name] += 1
        return method(*args, **kwargs)


def test_forty_threads_through_the_default_pool(
    engine: Engine, admin_engine: Engine, scratch_url: URL
) -> None:
    """Forty threads get zero errors and exact counts, over at most 20 server connections."""
    defaults = Settings(database_url="sqlite://")
    assert (defaults.pool_size, defaults.max_overflow) == (5, 15)  # the pool under test...
    assert isinstance(engine.pool, QueuePool)
    assert engine.pool.size() == defaults.pool_size  # ...is the one this engine has
    workers = [_Worker(engine, f"user{i % USERS}", i) for i in range(THREADS)]
    start = threading.Barrier(THREADS)
    threads = [threading.Thread(target=w.run, args=(start,), daemon=True) for w in workers]
    with PeakSampler(
        admin_engine,
        "select count(*) from pg_stat_activity "
        "where application_name = 'todo-backend' and datname = :db",
        {"db": scratch_url.database},
    ) as sampler:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    assert [w.errors for w in workers] == [[] for _ in workers]
    assert 1 <= sampler.peak <= 20
    assert sampler.samples >= 10

    repo = TaskRepository(next(get_session(engine)))
    for number in range(USERS):
        user = f"user{number}"
        mine = [w for w in workers if w.user == user]
        kept = {task_id for w in mine for task_id in w.kept}
        completed = {task_id for w in mine for task_id in w.completed}
        stored = {t.id: t.title for t in repo.list(user, limit=100)}
        assert stored == {i: t for w in mine for i, t in w.kept.items()}
        assert repo.count(user) == len(kept) == 2 * (2 * ROUNDS - ROUNDS // 2)
        assert repo.count(user, complete=True) == len(completed)
    total = Counter[str]()
    for worker in workers:
        total.update(worker.calls)
    assert total["create"] == THREADS * ROUNDS * 2
