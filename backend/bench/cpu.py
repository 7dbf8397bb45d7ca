"""Per-call cost at 0 ms RTT, both faces: the repository against the raw driver.

``nox -s bench -- --cpu`` (or ``python backend/bench/cpu.py``): on a scratch database
of the local server (``TEST_DATABASE_URL``), migrated to head (row-level security on;
``--row-security off`` for ``init_db``), each operation (create, get, list 50, update,
delete) runs interleaved call by call on three sides, for each face:

- ``repository``: ``TaskRepository`` / ``AsyncTaskRepository`` bound to the package's
  engine, as an API uses them;
- ``floor``: the same statements on one raw connection in autocommit (psycopg2;
  psycopg 3 async with ``prepare_threshold=None``), nothing in front of them: the
  issue's floor;
- ``floor + prefix``: the floor sending, in the same message, the bounds, role and
  owner ``set_config`` statement the package sends: the same server work, so the
  ratio to it is the client-side layer alone.

Each call records wall time (median) and this thread's CPU time (mean: the clock
ticks coarsely). Results go to ``docs/benchmarks/cpu.md`` and ``cpu.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import psycopg
import psycopg2  # type: ignore[import-untyped]
from sqlalchemy import Engine
from sqlalchemy.engine import URL

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (
    LIST_USER,
    OPS,
    SQL_DELETE,
    SQL_GET,
    SQL_INSERT,
    SQL_LIST,
    SQL_UPDATE,
    WORK_USER,
    check,
    make_schema,
    scratch_database,
    write_report,
)
from todo_backend.aio import AsyncTaskRepository, create_async_db_engine
from todo_backend.config import normalize_database_url
from todo_backend.db import USER_SETTING, create_db_engine, direct_use, is_local_host
from todo_backend.models import TaskCreate, TaskUpdate
from todo_backend.repository import TaskRepository

DEFAULT_URL: Final = "postgresql://postgres@127.0.0.1:5432/postgres"
OUT_DIR: Final = Path(__file__).resolve().parents[2] / "docs" / "benchmarks"
SIDES: Final = ("repository", "floor", "floor + prefix")
NEW: Final = TaskCreate(title="benchmark task", description="created by the benchmark")
CHANGE: Final = TaskUpdate(title="benchmark task, renamed", complete=True)
_PARAMS: Final[dict[str, Callable[[int], tuple[Any, ...]]]] = {
    "create": lambda _id: (WORK_USER, NEW.title, NEW.description, False, *[_now()] * 2),
    "get": lambda task_id: (WORK_USER, task_id),
    "list": lambda _id: (LIST_USER, 50),
    "update": lambda task_id: (CHANGE.title, True, _now(), WORK_USER, task_id),
    "delete": lambda task_id: (WORK_USER, task_id),
}
_SQL: Final = {
    "create": SQL_INSERT,
    "get": SQL_GET,
    "list": SQL_LIST,
    "update": SQL_UPDATE,
    "delete": SQL_DELETE,
}


def _now() -> datetime:
    return datetime.now(UTC)


class Timings:
    """Wall and CPU seconds of each call, by face, operation and side."""

    def __init__(self) -> None:
        self.wall: dict[str, list[float]] = {}
        self.cpu: dict[str, list[float]] = {}

    def add(self, key: str, wall: float, cpu: float) -> None:
        """Record one call under *key*."""
        self.wall.setdefault(key, []).append(wall)
        self.cpu.setdefault(key, []).append(cpu)

    def summary(self, key: str) -> dict[str, float]:
        """Median wall and mean CPU, in microseconds."""
        return {
            "wall_us": statistics.median(self.wall[key]) * 1e6,
            "cpu_us": statistics.fmean(self.cpu[key]) * 1e6,
        }


def _prefix(engine: Engine) -> str:
    """Return the statement the package sends in front of a call, the owner a %s parameter."""
    use = direct_use(engine)
    if use is None:
        raise RuntimeError("the benchmark's engine must be the package's PostgreSQL engine")
    return f"{use.prefixes.head}set_config('{USER_SETTING}', %s, true); "


def _seed(engine: Engine) -> None:
    repo = TaskRepository(engine)
    repo.create_many(LIST_USER, [TaskCreate(title=f"list task {n}") for n in range(200)])


def run_sync(engine: Engine, connect: dict[str, Any], rounds: int, out: Timings) -> None:
    """Time the sync face: the repository and both floors, interleaved call by call."""
    repo = TaskRepository(engine)
    raw = psycopg2.connect(**connect)
    raw.autocommit = True
    cur = raw.cursor()
    prefix = _prefix(engine)
    ids = {"repository": 0, "floor": 0, "floor + prefix": 0}

    def repository(op: str) -> None:
        if op == "create":
            ids["repository"] = repo.create(WORK_USER, NEW).id or 0
        elif op == "get":
            check(repo.get(WORK_USER, ids["repository"]) is not None, "get")
        elif op == "list":
            check(len(repo.list(LIST_USER, limit=50)) == 50, "list")
        elif op == "update":
            check(repo.update(WORK_USER, ids["repository"], CHANGE) is not None, "update")
        else:
            check(repo.delete(WORK_USER, ids["repository"]), "delete")

    def floor(side: str, op: str) -> None:
        params = _PARAMS[op](ids[side])
        owner = params[3] if op == "update" else params[0]
        if side == "floor":
            cur.execute(_SQL[op], params)
        else:
            cur.execute(prefix + _SQL[op], (owner, *params))
        if op == "create":
            ids[side] = cur.fetchone()[0]
        elif op == "delete":
            check(cur.rowcount == 1, "raw delete")
        else:
            check(bool(cur.fetchall()), f"raw {op}")

    try:
        _interleave(rounds, out, "sync", repository, floor)
    finally:
        raw.close()


def _schedule(rounds: int) -> Iterator[tuple[bool, str, str]]:
    """Yield (kept, operation, side) in the order the calls are made.

    A warm-up first (not kept), then *rounds* rounds: each operation on every side,
    the sides' order alternating from one round to the next.
    """
    warmup = max(20, rounds // 20)
    for i in range(warmup + rounds):
        for op in OPS:
            for side in SIDES if i % 2 == 0 else SIDES[::-1]:
                yield i >= warmup, op, side


def _interleave(
    rounds: int,
    out: Timings,
    face: str,
    repository: Callable[[str], None],
    floor: Callable[[str, str], None],
) -> None:
    for kept, op, side in _schedule(rounds):
        wall, cpu = time.perf_counter(), time.thread_time()
        if side == "repository":
            repository(op)
        else:
            floor(side, op)
        if kept:
            out.add(f"{face}/{op}/{side}", time.perf_counter() - wall, time.thread_time() - cpu)


async def run_async(url: URL, connect: dict[str, Any], rounds: int, out: Timings) -> None:
    """Time the async face: the repository and both floors, interleaved call by call."""
    engine = create_async_db_engine(url.render_as_string(hide_password=False))
    repo = AsyncTaskRepository(engine)
    conn = await psycopg.AsyncConnection.connect(**connect, autocommit=True, prepare_threshold=None)
    cur = conn.cursor()
    prefixed = psycopg.AsyncClientCursor(conn)
    prefix = _prefix(engine.sync_engine)
    ids = {"repository": 0, "floor": 0, "floor + prefix": 0}

    async def repository(op: str) -> None:
        if op == "create":
            ids["repository"] = (await repo.create(WORK_USER, NEW)).id or 0
        elif op == "get":
            check(await repo.get(WORK_USER, ids["repository"]) is not None, "get")
        elif op == "list":
            check(len(await repo.list(LIST_USER, limit=50)) == 50, "list")
        elif op == "update":
            check(await repo.update(WORK_USER, ids["repository"], CHANGE) is not None, "update")
        else:
            check(await repo.delete(WORK_USER, ids["repository"]), "delete")

    async def floor(side: str, op: str) -> None:
        params = _PARAMS[op](ids[side])
        owner = params[3] if op == "update" else params[0]
        if side == "floor":
            await cur.execute(_SQL[op], params)
        else:
            # Two statements in one message need client-side binding (one simple query).
            await prefixed.execute(prefix + _SQL[op], (owner, *params))
            while prefixed.nextset():
                pass
        used = cur if side == "floor" else prefixed
        if op == "create":
            row = await used.fetchone()
            ids[side] = row[0] if row else 0
        elif op == "delete":
            check(used.rowcount == 1, "raw async delete")
        else:
            check(bool(await used.fetchall()), f"raw async {op}")

    try:
        for kept, op, side in _schedule(rounds):
            wall, cpu = time.perf_counter(), time.thread_time()
            if side == "repository":
                await repository(op)
            else:
                await floor(side, op)
            if kept:
                out.add(f"async/{op}/{side}", time.perf_counter() - wall, time.thread_time() - cpu)
    finally:
        await conn.close()
        await engine.dispose()


def report(results: dict[str, Any]) -> str:
    """Render *results* as Markdown."""
    meta = results["meta"]
    lines = [
        "# Per-call cost at 0 ms RTT: the repository against the raw driver",
        "",
        f"{meta['date']}, Python {meta['python']}, {meta['machine']}, load average "
        f"{meta['load_before']:.2f} before and {meta['load_after']:.2f} after; row-level "
        f"security {meta['row_security']}; {meta['rounds']} interleaved rounds per face. "
        "Wall: median per call, server included (on this machine). CPU: this thread's CPU "
        "per call (mean), the client alone. `floor + prefix` sends the package's bounds, "
        "role and owner `set_config` statement in front, in the same message: the ratio "
        "to it is the layer's own cost; the ratio to `floor` adds the server's work for "
        "the bounds and row-level security.",
        "",
        "| face | operation | repository wall / CPU µs | floor wall / CPU µs "
        "| floor + prefix wall / CPU µs | wall ratio to floor (to floor + prefix) "
        "| CPU ratio to floor (to floor + prefix) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for face in ("sync", "async"):
        for op in OPS:
            repo, floor, prefixed = (results[face][op][side] for side in SIDES)
            lines.append(
                f"| {face} | {op} | {repo['wall_us']:.0f} / {repo['cpu_us']:.0f} "
                f"| {floor['wall_us']:.0f} / {floor['cpu_us']:.0f} "
                f"| {prefixed['wall_us']:.0f} / {prefixed['cpu_us']:.0f} "
                f"| {repo['wall_us'] / floor['wall_us']:.2f}x "
                f"({repo['wall_us'] / prefixed['wall_us']:.2f}x) "
                f"| {repo['cpu_us'] / floor['cpu_us']:.2f}x "
                f"({repo['cpu_us'] / prefixed['cpu_us']:.2f}x) |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run both faces, print the report and write it to the output folder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=2000, help="interleaved rounds per face")
    parser.add_argument("--row-security", choices=("on", "off"), default="on")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="report folder")
    args = parser.parse_args(argv)
    server = normalize_database_url(os.environ.get("TEST_DATABASE_URL") or DEFAULT_URL)
    if not is_local_host(server):
        raise SystemExit("the CPU benchmark only runs against a server on this machine")
    load_before = os.getloadavg()[0]
    timings = Timings()
    with scratch_database(server, "todo_cpu") as url:
        engine = create_db_engine(url.render_as_string(hide_password=False))
        try:
            make_schema(engine, args.row_security)
            _seed(engine)
            connect = {
                "host": url.host,
                "port": url.port or 5432,
                "user": url.username,
                "password": url.password,
                "dbname": url.database,
            }
            gc.collect()
            run_sync(engine, connect, args.rounds, timings)
            asyncio.run(run_async(url, connect, args.rounds, timings))
        finally:
            engine.dispose()
    results: dict[str, Any] = {
        "meta": {
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "python": platform.python_version(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "load_before": load_before,
            "load_after": os.getloadavg()[0],
            "row_security": args.row_security,
            "rounds": args.rounds,
        }
    }
    for face in ("sync", "async"):
        results[face] = {
            op: {side: timings.summary(f"{face}/{op}/{side}") for side in SIDES} for op in OPS
        }
    write_report(args.out, "cpu", report(results), results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
