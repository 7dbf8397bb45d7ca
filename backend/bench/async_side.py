"""The async part of the benchmark: AsyncTaskRepository against raw psycopg 3 async.

1. create, get, list (50), update, delete through ``AsyncTaskRepository`` versus the
   same statements on one raw ``psycopg.AsyncConnection`` in autocommit with
   ``prepare_threshold=None`` (the one-round-trip floor of the async driver), both
   through the latency proxy, interleaved call by call as in the sync part.
2. Throughput of 200 concurrent ``list`` calls, each on its own session as one API
   request makes it: 200 coroutines on the async repository versus 20 threads on the
   sync repository, each side over its engine's default pool (20 connections),
   through the proxy.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, Final

import psycopg
from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine

from bench import common
from bench.common import LIST_USER, WORK_USER, Samples
from bench.common import check as _check
from bench.proxy import ProxyHandle
from todo_backend.aio import AsyncTaskRepository, create_async_db_engine, get_async_session
from todo_backend.db import get_session
from todo_backend.models import TaskCreate, TaskUpdate
from todo_backend.repository import TaskRepository

__all__ = ["CONCURRENT_CALLS", "THREADS", "run_async_operations", "run_throughput"]

CONCURRENT_CALLS: Final = 200
THREADS: Final = 20


class AsyncRepositorySide:
    """The five operations through AsyncTaskRepository, on a session from get_async_session."""

    def __init__(self, repo: AsyncTaskRepository) -> None:
        self.repo = repo
        self.new = TaskCreate(title="benchmark task", description="created by the benchmark")
        self.change = TaskUpdate(title="benchmark task, renamed", complete=True)
        self.task_id = 0

    async def create(self) -> None:
        """Insert one task and remember its id."""
        self.task_id = (await self.repo.create(WORK_USER, self.new)).id or 0

    async def get(self) -> None:
        """Read the remembered task."""
        _check(await self.repo.get(WORK_USER, self.task_id) is not None, "async get")

    async def list(self) -> None:
        """Read the newest 50 tasks of the list user."""
        _check(len(await self.repo.list(LIST_USER, limit=50)) == 50, "async list")

    async def update(self) -> None:
        """Rename and complete the remembered task."""
        _check(await self.repo.update(WORK_USER, self.task_id, self.change) is not None, "update")

    async def delete(self) -> None:
        """Delete the remembered task."""
        _check(await self.repo.delete(WORK_USER, self.task_id), "async delete")


class RawAsyncSide:
    """The same statements on one raw psycopg 3 AsyncConnection in autocommit: the floor."""

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self.cur = conn.cursor()
        self.task_id = 0

    async def create(self) -> None:
        """Insert one task and remember its id."""
        now = datetime.now(UTC)
        params = (WORK_USER, "benchmark task", "created by the benchmark", False, now, now)
        await self.cur.execute(common.SQL_INSERT, params)
        row = await self.cur.fetchone()
        self.task_id = row[0] if row else 0

    async def get(self) -> None:
        """Read the remembered task."""
        await self.cur.execute(common.SQL_GET, (WORK_USER, self.task_id))
        _check(await self.cur.fetchone() is not None, "raw async get")

    async def list(self) -> None:
        """Read the newest 50 tasks of the list user."""
        await self.cur.execute(common.SQL_LIST, (LIST_USER, 50))
        _check(len(await self.cur.fetchall()) == 50, "raw async list")

    async def update(self) -> None:
        """Rename and complete the remembered task."""
        now = datetime.now(UTC)
        params = ("benchmark task, renamed", True, now, WORK_USER, self.task_id)
        await self.cur.execute(common.SQL_UPDATE, params)
        _check(await self.cur.fetchone() is not None, "raw async update")

    async def delete(self) -> None:
        """Delete the remembered task."""
        await self.cur.execute(common.SQL_DELETE, (WORK_USER, self.task_id))
        _check(self.cur.rowcount == 1, "raw async delete")


async def _timed(samples: Samples, call: Callable[[], Awaitable[None]], proxy: ProxyHandle) -> None:
    before = proxy.bursts()
    started = time.perf_counter()
    await call()
    elapsed = time.perf_counter() - started
    samples.add(elapsed, proxy.bursts() - before)


async def _operations(
    url: str, connect: dict[str, Any], iterations: int, proxy: ProxyHandle
) -> dict[str, dict[str, Samples]]:
    engine = create_async_db_engine(url)
    conn = await psycopg.AsyncConnection.connect(**connect, autocommit=True, prepare_threshold=None)
    results = {op: {"repository": Samples(), "raw": Samples()} for op in common.OPS}
    try:
        async for session in get_async_session(engine):
            repo, raw = AsyncRepositorySide(AsyncTaskRepository(session)), RawAsyncSide(conn)
            warmup = max(10, iterations // 20)
            for i in range(warmup + iterations):
                sides = (("repository", repo), ("raw", raw))
                for op in common.OPS:
                    for key, side in sides if i % 2 == 0 else sides[::-1]:
                        samples = results[op][key] if i >= warmup else Samples()
                        await _timed(samples, getattr(side, op), proxy)
    finally:
        await conn.close()
        await engine.dispose()
    return results


def run_async_operations(
    url: str, connect: dict[str, Any], iterations: int, proxy: ProxyHandle
) -> dict[str, dict[str, Samples]]:
    """Time every operation on the async repository and on raw psycopg 3, interleaved."""
    return asyncio.run(_operations(url, connect, iterations, proxy))


async def _async_wave(engine: AsyncEngine) -> float:
    async def one() -> None:
        async for session in get_async_session(engine):
            _check(len(await AsyncTaskRepository(session).list(LIST_USER)) == 50, "async wave")

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(CONCURRENT_CALLS)))
    return time.perf_counter() - started


def _sync_wave(engine: Engine, pool: ThreadPoolExecutor) -> float:
    def one(_: int) -> None:
        for session in get_session(engine):
            _check(len(TaskRepository(session).list(LIST_USER)) == 50, "sync wave")

    started = time.perf_counter()
    list(pool.map(one, range(CONCURRENT_CALLS)))
    return time.perf_counter() - started


async def _throughput(url: str, sync_engine: Engine, rounds: int) -> dict[str, list[float]]:
    engine = create_async_db_engine(url)
    waves: dict[str, list[float]] = {"async": [], "sync": []}
    loop = asyncio.get_running_loop()
    try:
        with ThreadPoolExecutor(THREADS) as pool:
            for i in range(rounds + 1):  # the first round of each side opens the pools
                # The sides take turns going first; neither runs while the other does.
                for side in ("async", "sync") if i % 2 == 0 else ("sync", "async"):
                    if side == "async":
                        seconds = await _async_wave(engine)
                    else:
                        seconds = await loop.run_in_executor(None, _sync_wave, sync_engine, pool)
                    if i:
                        waves[side].append(seconds)
    finally:
        await engine.dispose()
    return waves


def run_throughput(url: str, sync_engine: Engine, rounds: int) -> dict[str, Any]:
    """Time waves of 200 concurrent list calls: async coroutines versus 20 sync threads."""
    waves = asyncio.run(_throughput(url, sync_engine, rounds))
    out: dict[str, Any] = {"calls": CONCURRENT_CALLS, "threads": THREADS, "rounds": rounds}
    for key, seconds in waves.items():
        median = statistics.median(seconds)
        out[key] = {"median_s": median, "calls_per_s": CONCURRENT_CALLS / median}
    out["ratio"] = out["async"]["calls_per_s"] / out["sync"]["calls_per_s"]
    return out
