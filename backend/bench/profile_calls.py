"""Where the CPU of one ``get`` and one ``list`` of 50 goes, at 0 ms RTT, on either face.

``python backend/bench/profile_calls.py [--face async|sync] [--calls 2000] [--top 25]``:
on a scratch database of the local server (``TEST_DATABASE_URL``), migrated to head
(row-level security on; ``--row-security off``: ``init_db``), times the repository's
``get`` and ``list(limit=50)``, bound to the engine as an API request's is, against
the same statements on one raw driver connection in autocommit (async: psycopg 3
``AsyncConnection`` with ``prepare_threshold=None``; sync: psycopg2) in CPU time of
this process per call, then profiles the repository calls with cProfile on the CPU
clock (waiting for the server costs nothing there) and prints the functions with the
most own time and the share of each library (by file path) in the profile.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

import psycopg
import psycopg2  # type: ignore[import-untyped]

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.burst import scratch_database
from bench.common import SQL_GET, SQL_LIST, make_schema
from todo_backend.aio import AsyncTaskRepository, create_async_db_engine
from todo_backend.config import normalize_database_url
from todo_backend.db import create_db_engine
from todo_backend.models import TaskCreate
from todo_backend.repository import TaskRepository

DEFAULT_URL: Final = "postgresql://postgres@127.0.0.1:5432/postgres"
USER: Final = "profiled"
_LIBRARIES: Final = (
    "todo_backend",
    "sqlalchemy",
    "sqlmodel",
    "psycopg2",
    "psycopg",
    "pydantic",
    "greenlet",
    "asyncio",
)


def _library(filename: str) -> str:
    for name in _LIBRARIES:
        if f"/{name}/" in filename:
            return name
    return "builtins" if filename.startswith("~") else "other"


async def _per_call(call: Callable[[], Awaitable[Any]], calls: int) -> float:
    """Return this process's CPU time per call of *call*, in microseconds (waits excluded)."""
    for _ in range(50):
        await call()
    started = time.process_time()
    for _ in range(calls):
        await call()
    return (time.process_time() - started) / calls * 1e6


@contextmanager
def _profiled(name: str, calls: int, top: int, sort: str) -> Iterator[None]:
    """Profile the block on the CPU clock (waits cost nothing) and print the result."""
    profiler = cProfile.Profile(time.process_time)
    profiler.enable()
    yield
    profiler.disable()
    _print_profile(name, profiler, calls, top, sort)


def _report(name: str, mine: float, theirs: float) -> None:
    print(
        f"{name}: CPU per call: repository {mine:.0f} us, raw driver {theirs:.0f} us, "
        f"{mine / theirs:.2f}x"
    )


def _print_profile(name: str, profiler: cProfile.Profile, calls: int, top: int, sort: str) -> None:
    stats = pstats.Stats(profiler)
    shares: dict[str, float] = defaultdict(float)
    total = 0.0
    for (filename, _line, _func), row in stats.stats.items():  # type: ignore[attr-defined]
        shares[_library(filename)] += row[2]
        total += row[2]
    print(f"  own CPU time by library ({name}, {calls} calls under cProfile):")
    for library, seconds in sorted(shares.items(), key=lambda kv: -kv[1]):
        print(f"    {library:13} {seconds / total:6.1%}")
    stats.sort_stats(sort).print_stats(top)


async def measure(url: str, calls: int, top: int, sort: str) -> None:
    """Time and profile get and list-50 on the repository and on raw psycopg."""
    engine = create_async_db_engine(url)
    raw = await psycopg.AsyncConnection.connect(
        url.replace("postgresql+psycopg2://", "postgresql://"),
        autocommit=True,
        prepare_threshold=None,
    )
    repo = AsyncTaskRepository(engine)  # bound to the engine, as an API request's is
    tasks = await repo.create_many(USER, [TaskCreate(title=f"t{i}") for i in range(200)])
    task_id = tasks[100].id or 0

    async def raw_get() -> Any:
        cur = await raw.execute(SQL_GET, (USER, task_id))
        return await cur.fetchone()

    async def raw_list() -> Any:
        cur = await raw.execute(SQL_LIST, (USER, 50))
        return await cur.fetchall()

    async def get() -> Any:
        return await repo.get(USER, task_id)

    async def list_50() -> Any:
        return await repo.list(USER, limit=50)

    for name, ours, floor in (("get", get, raw_get), ("list 50", list_50, raw_list)):
        _report(name, await _per_call(ours, calls), await _per_call(floor, calls))
        with _profiled(name, calls, top, sort):
            for _ in range(calls):
                await ours()
    await raw.close()
    await engine.dispose()


def measure_sync(url: str, calls: int, top: int, sort: str) -> None:
    """:func:`measure` for the sync face: ``TaskRepository`` against psycopg2."""
    engine = create_db_engine(url)
    raw = psycopg2.connect(url.replace("postgresql+psycopg2://", "postgresql://"))
    raw.autocommit = True
    cur = raw.cursor()
    repo = TaskRepository(engine)  # bound to the engine, as an API request's is
    tasks = repo.create_many(USER, [TaskCreate(title=f"t{i}") for i in range(200)])
    task_id = tasks[100].id or 0

    def raw_get() -> Any:
        cur.execute(SQL_GET, (USER, task_id))
        return cur.fetchone()

    def raw_list() -> Any:
        cur.execute(SQL_LIST, (USER, 50))
        return cur.fetchall()

    def get() -> Any:
        return repo.get(USER, task_id)

    def list_50() -> Any:
        return repo.list(USER, limit=50)

    def per_call(call: Callable[[], Any]) -> float:
        for _ in range(50):
            call()
        started = time.process_time()
        for _ in range(calls):
            call()
        return (time.process_time() - started) / calls * 1e6

    for name, ours, floor in (("get", get, raw_get), ("list 50", list_50, raw_list)):
        _report(name, per_call(ours), per_call(floor))
        with _profiled(name, calls, top, sort):
            for _ in range(calls):
                ours()
    raw.close()
    engine.dispose()


def main() -> None:
    """Create a scratch database, run the measurements, drop it."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--face", choices=("async", "sync"), default="async")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--sort", default="tottime", help="pstats order: tottime, cumulative")
    parser.add_argument("--row-security", choices=("on", "off"), default="on")
    args = parser.parse_args()
    server = normalize_database_url(os.environ.get("TEST_DATABASE_URL") or DEFAULT_URL)
    with scratch_database(server) as url:
        text_url = url.render_as_string(hide_password=False)
        schema = create_db_engine(text_url)
        make_schema(schema, args.row_security)
        schema.dispose()
        if args.face == "sync":
            measure_sync(text_url, args.calls, args.top, args.sort)
        else:
            asyncio.run(measure(text_url, args.calls, args.top, args.sort))


if __name__ == "__main__":
    main()
