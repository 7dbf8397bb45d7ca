"""Benchmark TaskRepository against raw psycopg2 over a simulated Neon link.

Run with ``nox -s bench`` or ``python backend/bench/run.py [--delay-ms 2.5]``;
``nox -s bench -- --http`` runs the HTTP benchmark (``http_bench.py``) instead, and
``-- --cpu`` the per-call cost at 0 ms RTT of both faces (``cpu.py``), and
``-- --instructions`` the HTTP services' instructions per request (``instructions.py``,
under valgrind). It needs
the PostgreSQL server named by ``TEST_DATABASE_URL`` (default: the local one) and only
ever connects to this machine. The benchmark creates a scratch database, drops it at
the end, and writes ``results.md``, ``results.json`` and ``results.png`` to
``docs/benchmarks/`` (``--out`` to change).

What it measures, each as the median of many interleaved calls (the repository and
the floor alternate call by call, so drift on a busy machine hits both alike):

1. create, get, list (50), update, delete through the repository versus the same
   statements on a raw psycopg2 connection in autocommit (the one-round-trip floor),
   both through a latency-injecting proxy (default 2.5 ms each way: 5 ms RTT). The
   proxy counts round trips per call.
2. The same at zero added latency, connected directly: the repository's CPU overhead.
3. ``create_many`` of 5,000 tasks versus ``psycopg2.extras.execute_values``.
4. The newest-50 list of one user (200 tasks) at 10,000 and 1,000,000 total rows.
5. ``AsyncTaskRepository`` against raw psycopg 3 async over the same proxy, and the
   throughput of 200 concurrent ``list`` calls: async coroutines versus the sync
   repository on 20 threads (``async_side.py``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import psycopg
import psycopg2  # type: ignore[import-untyped]
import psycopg2.extras  # type: ignore[import-untyped]
import sqlalchemy
from sqlalchemy import Engine
from sqlalchemy.engine import URL
from sqlmodel import Session

from todo_backend.config import normalize_database_url
from todo_backend.db import create_db_engine, get_session, is_local_host
from todo_backend.models import TaskCreate, TaskUpdate
from todo_backend.repository import TaskRepository

# Run as a script, this file's folder is on sys.path but its package is not.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.async_side import run_async_operations, run_throughput
from bench.common import (
    BULK_USER,
    LIST_USER,
    OPS,
    SQL_BULK,
    SQL_DELETE,
    SQL_GET,
    SQL_INSERT,
    SQL_LIST,
    SQL_UPDATE,
    WORK_USER,
    Samples,
    make_schema,
)
from bench.common import check as _check
from bench.proxy import ProxyHandle, start_proxy

DEFAULT_URL: Final = "postgresql://postgres@127.0.0.1:5432/postgres"
OUT_DIR: Final = Path(__file__).resolve().parents[2] / "docs" / "benchmarks"
SCALE_USER: Final = "scale-7"
SCALE_TASKS_PER_USER: Final = 200

# The issue's targets: maximum ratio of repository median to floor median.
TARGETS: Final[dict[str, dict[str, float]]] = {
    "latency": {"create": 1.25, "get": 1.25, "list": 1.30, "update": 1.25, "delete": 1.25},
    "zero": {"create": 3.0, "get": 3.0, "list": 4.0, "update": 3.0, "delete": 3.0},
    "bulk": {"zero": 2.0},
    "scale": {"repository": 1.5},
}

# -- measurement -----------------------------------------------------------------


def _timed(samples: Samples, call: Callable[[], object], proxy: ProxyHandle | None) -> None:
    before = proxy.bursts() if proxy else 0
    started = time.perf_counter()
    call()
    elapsed = time.perf_counter() - started
    samples.add(elapsed, proxy.bursts() - before if proxy else -1)


# -- the two sides -----------------------------------------------------------------


class RepositorySide:
    """The five operations through TaskRepository, on a session from get_session."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = get_session(engine)
        self.repo = TaskRepository(next(self._sessions))
        self.new = TaskCreate(title="benchmark task", description="created by the benchmark")
        self.change = TaskUpdate(title="benchmark task, renamed", complete=True)
        self.task_id = 0

    def create(self) -> None:
        """Insert one task and remember its id."""
        self.task_id = self.repo.create(WORK_USER, self.new).id or 0

    def get(self) -> None:
        """Read the remembered task."""
        _check(self.repo.get(WORK_USER, self.task_id) is not None, "get found the task")

    def list(self) -> None:
        """Read the newest 50 tasks of the list user."""
        _check(len(self.repo.list(LIST_USER, limit=50)) == 50, "list returned 50 tasks")

    def update(self) -> None:
        """Rename and complete the remembered task."""
        _check(self.repo.update(WORK_USER, self.task_id, self.change) is not None, "update")

    def delete(self) -> None:
        """Delete the remembered task."""
        _check(self.repo.delete(WORK_USER, self.task_id), "delete removed the task")

    def get_with_new_session(self) -> None:
        """Read a task the way one API request would: a fresh session for the call."""
        for session in get_session(self.engine):
            _check(TaskRepository(session).get(WORK_USER, self.task_id) is not None, "get")

    def close(self) -> None:
        """Close the session."""
        self._sessions.close()


class RawSide:
    """The same statements on one raw psycopg2 connection in autocommit: the floor."""

    def __init__(self, connect: dict[str, Any]) -> None:
        self.conn = psycopg2.connect(**connect)
        self.conn.autocommit = True
        self.cur = self.conn.cursor()
        self.task_id = 0

    def create(self) -> None:
        """Insert one task and remember its id."""
        now = datetime.now(UTC)
        self.cur.execute(
            SQL_INSERT,
            (WORK_USER, "benchmark task", "created by the benchmark", False, now, now),
        )
        self.task_id = self.cur.fetchone()[0]

    def get(self) -> None:
        """Read the remembered task."""
        self.cur.execute(SQL_GET, (WORK_USER, self.task_id))
        _check(self.cur.fetchone() is not None, "raw get found the task")

    def list(self) -> None:
        """Read the newest 50 tasks of the list user."""
        self.cur.execute(SQL_LIST, (LIST_USER, 50))
        _check(len(self.cur.fetchall()) == 50, "raw list returned 50 rows")

    def update(self) -> None:
        """Rename and complete the remembered task."""
        now = datetime.now(UTC)
        self.cur.execute(
            SQL_UPDATE, ("benchmark task, renamed", True, now, WORK_USER, self.task_id)
        )
        _check(self.cur.fetchone() is not None, "raw update")

    def delete(self) -> None:
        """Delete the remembered task."""
        self.cur.execute(SQL_DELETE, (WORK_USER, self.task_id))
        _check(self.cur.rowcount == 1, "raw delete removed the row")

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()


def run_operations(
    repo: RepositorySide,
    raw: RawSide,
    iterations: int,
    proxy: ProxyHandle | None,
    *,
    fresh_session: bool = False,
) -> dict[str, dict[str, Samples]]:
    """Time every operation on both sides, alternating which side goes first."""
    results = {op: {"repository": Samples(), "raw": Samples()} for op in OPS}
    if fresh_session:
        results["get, new session per call"] = {"repository": Samples()}
    warmup = max(10, iterations // 20)
    for i in range(warmup + iterations):
        sides: tuple[RepositorySide | RawSide, ...] = (repo, raw) if i % 2 == 0 else (raw, repo)
        keep = i >= warmup
        for op in OPS:
            for side in sides:
                key = "repository" if side is repo else "raw"
                samples = results[op][key] if keep else Samples()
                _timed(samples, getattr(side, op), proxy)
            if op == "get" and fresh_session:
                samples = results["get, new session per call"]["repository"] if keep else Samples()
                _timed(samples, repo.get_with_new_session, proxy)
    return results


# -- create_many -----------------------------------------------------------------------


def run_bulk(
    engine: Engine,
    connect: dict[str, Any],
    *,
    cleanup: Any,
    rows: int,
    repeats: int,
    proxy: ProxyHandle | None,
) -> dict[str, Samples]:
    """Time create_many(rows) against execute_values doing the same work.

    Equal work: the same rows, every column returned (the repository returns full
    tasks), the same batch size (the engine's insertmanyvalues page size, which the
    repository batches by), all batches in one transaction.
    """
    items = [TaskCreate(title=f"bulk task {i}", complete=i % 2 == 0) for i in range(rows)]
    page = engine.dialect.insertmanyvalues_page_size
    sessions = get_session(engine)
    repo = TaskRepository(next(sessions))
    conn = psycopg2.connect(**connect)
    cur = conn.cursor()

    def with_repository() -> None:
        _check(len(repo.create_many(BULK_USER, items)) == rows, "create_many")

    def with_execute_values() -> None:
        now = datetime.now(UTC)
        args = [(BULK_USER, t.title, t.description, t.complete, now, now) for t in items]
        got = psycopg2.extras.execute_values(cur, SQL_BULK, args, page_size=page, fetch=True)
        conn.commit()
        _check(len(got) == rows, "execute_values")

    results = {"repository": Samples(), "raw": Samples()}
    try:
        for i in range(repeats + 1):
            calls = [("repository", with_repository), ("raw", with_execute_values)]
            for key, call in calls if i % 2 == 0 else calls[::-1]:
                _timed(results[key] if i else Samples(), call, proxy)
                cleanup.execute("DELETE FROM tasks WHERE user_id = %s", (BULK_USER,))
    finally:
        sessions.close()
        conn.close()
    return results


# -- newest 50 at scale -------------------------------------------------------------------


def load_rows(cur: Any, total: int) -> float:
    """Replace the table's rows with *total* rows, 200 per user; return seconds taken.

    The secondary indexes are dropped for the load and rebuilt from their recorded
    definitions, which is several times faster than maintaining them row by row.
    """
    started = time.perf_counter()
    cur.execute("TRUNCATE tasks RESTART IDENTITY")
    cur.execute(
        "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'tasks' AND indexname "
        "NOT IN (SELECT conname FROM pg_constraint WHERE conrelid = 'tasks'::regclass)"
    )
    indexes = cur.fetchall()
    for name, _ in indexes:
        cur.execute(f'DROP INDEX "{name}"')
    users = total // SCALE_TASKS_PER_USER
    # User of row g is g mod users: every user's tasks are spread over the whole table.
    cur.execute(
        "INSERT INTO tasks (user_id, title, description, complete, created_at, updated_at) "
        "SELECT 'scale-' || (g %% %s), 'task ' || g, NULL, g %% 3 = 0, "
        "now() - make_interval(secs => %s - g), now() - make_interval(secs => %s - g) "
        "FROM generate_series(1, %s) AS g",
        (users, total, total, total),
    )
    for _, definition in indexes:
        cur.execute(definition)
    cur.execute("VACUUM ANALYZE tasks")
    return time.perf_counter() - started


def explain_list(cur: Any) -> dict[str, Any]:
    """Return the plan essentials of the newest-50 query for the scale user."""
    cur.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + SQL_LIST, (SCALE_USER, 50))
    plan = cur.fetchone()[0][0]
    node = plan["Plan"]
    while node.get("Plans") and node["Node Type"] == "Limit":
        node = node["Plans"][0]
    return {
        "node": node["Node Type"],
        "index": node.get("Index Name"),
        "execution_ms": plan["Execution Time"],
        "planning_ms": plan["Planning Time"],
        "shared_hit_blocks": node.get("Shared Hit Blocks", 0),
        "shared_read_blocks": node.get("Shared Read Blocks", 0),
    }


def run_scale(
    tables: list[tuple[int, Engine, dict[str, Any], Any]], iterations: int
) -> dict[str, Any]:
    """Load each database's table to its size, then time the newest-50 list on all.

    *tables* holds (rows, engine, psycopg2 connect arguments, admin cursor) per
    database. The calls of every size and side are interleaved, so the server's
    background work after a load (checkpoints, autovacuum) hits all of them alike.
    """
    out: dict[str, dict[str, Any]] = {}
    calls: list[tuple[str, str, Callable[[], None]]] = []
    closers: list[Callable[[], object]] = []
    try:
        for rows, engine, connect, admin in tables:
            out[str(rows)] = {"load_seconds": load_rows(admin, rows)}
            sessions = get_session(engine)
            closers.append(sessions.close)
            conn = psycopg2.connect(**connect)
            closers.append(conn.close)
            conn.autocommit = True
            calls.append((str(rows), "repository", _repository_list(next(sessions))))
            calls.append((str(rows), "raw", _raw_list(conn.cursor())))
        samples = {(size, key): Samples() for size, key, _ in calls}
        for i in range(iterations + 20):
            for size, key, call in calls if i % 2 == 0 else calls[::-1]:
                _timed(samples[size, key] if i >= 20 else Samples(), call, None)
        for rows, _, _, admin in tables:
            out[str(rows)]["plan"] = explain_list(admin)
            for key in ("repository", "raw"):
                out[str(rows)][key] = samples[str(rows), key].summary()
    finally:
        for close in closers:
            close()
    return out


def _repository_list(session: Session) -> Callable[[], None]:
    repo = TaskRepository(session)

    def call() -> None:
        _check(len(repo.list(SCALE_USER, limit=50)) == 50, "scale list")

    return call


def _raw_list(cur: Any) -> Callable[[], None]:
    def call() -> None:
        cur.execute(SQL_LIST, (SCALE_USER, 50))
        _check(len(cur.fetchall()) == 50, "raw scale list")

    return call


# -- set-up ------------------------------------------------------------------------------


@dataclass
class Target:
    """Where the benchmark connects: the server, and the scratch database on it."""

    url: URL
    database: str

    def connect_args(self, port: int | None = None) -> dict[str, Any]:
        """Return psycopg2.connect() arguments for the scratch database."""
        args: dict[str, Any] = {
            "host": self.url.host or "127.0.0.1",
            "port": port or self.url.port or 5432,
            "user": self.url.username,
            "dbname": self.database,
            "application_name": "todo-bench-raw",
        }
        if self.url.password:
            args["password"] = self.url.password
        return args

    def url_text(self, port: int | None = None) -> str:
        """Return the URL of the scratch database (through *port*), password included."""
        url = self.url.set(database=self.database)
        if port:
            url = url.set(host="127.0.0.1", port=port)
        return url.render_as_string(hide_password=False)

    def engine(self, port: int | None = None) -> Engine:
        """Return the package's engine on the scratch database (through *port*)."""
        return create_db_engine(self.url_text(port))


def _resolve_target(raw_url: str) -> URL:
    url = normalize_database_url(raw_url)
    if url.get_backend_name() != "postgresql":
        sys.exit("the benchmark needs PostgreSQL: set TEST_DATABASE_URL to a postgresql:// URL")
    if not is_local_host(url) or not url.host or url.host.startswith("/"):
        sys.exit("the benchmark only runs against a PostgreSQL server on this machine, over TCP")
    return url


def _admin(url: URL, database: str | None = None) -> Any:
    args = Target(url, database or url.database or "postgres").connect_args()
    args["application_name"] = "todo-bench-admin"
    conn = psycopg2.connect(**args)
    conn.autocommit = True
    return conn


@contextmanager
def scratch_database(url: URL) -> Iterator[str]:
    """Create a uniquely named database for the run and drop it afterwards."""
    name = f"todo_bench_{uuid.uuid4().hex[:12]}"
    admin = _admin(url)
    try:
        admin.cursor().execute(f'CREATE DATABASE "{name}"')
        yield name
    finally:
        admin.cursor().execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def _seed_list_user(cur: Any) -> None:
    cur.execute(
        "INSERT INTO tasks (user_id, title, description, complete, created_at, updated_at) "
        "SELECT %s, 'listed task ' || g, 'seeded for the list benchmark', g %% 2 = 0, "
        "now(), now() FROM generate_series(1, 200) AS g",
        (LIST_USER,),
    )
    cur.execute("VACUUM ANALYZE tasks")


def _ratio(repo: dict[str, Any], raw: dict[str, Any]) -> float:
    return float(repo["median_us"] / raw["median_us"])


def _compare(
    samples: dict[str, dict[str, Samples]], targets: dict[str, float]
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for op, sides in samples.items():
        row: dict[str, Any] = {key: s.summary() for key, s in sides.items()}
        raw = row.get("raw") or out.get(op.split(",")[0], {}).get("raw")
        if raw:
            row["ratio"] = _ratio(row["repository"], raw)
        if op in targets:
            row["target"] = targets[op]
            row["met"] = row["ratio"] <= targets[op]
        out[op] = row
    return out


def run_all(args: argparse.Namespace, target: Target, proxy: ProxyHandle) -> dict[str, Any]:
    """Run every part of the benchmark and return the results as plain data."""
    direct = target.engine()
    make_schema(direct, args.row_security)
    admin_conn = _admin(target.url, target.database)
    admin = admin_conn.cursor()
    _seed_list_user(admin)
    results: dict[str, Any] = {}
    try:
        gc.collect()
        print(f"[1/4] five operations over the proxy ({args.iterations} iterations)", flush=True)
        proxied = target.engine(proxy.port)
        repo, raw = RepositorySide(proxied), RawSide(target.connect_args(proxy.port))
        latency = run_operations(repo, raw, args.iterations, proxy)
        repo.close()
        raw.close()
        bulk_latency = run_bulk(
            proxied,
            target.connect_args(proxy.port),
            cleanup=admin,
            rows=args.bulk_rows,
            repeats=args.bulk_repeats_latency,
            proxy=proxy,
        )
        lateness = sorted(proxy.lateness_us())
        proxied.dispose()
        results["latency"] = {
            "one_way_delay_ms": proxy.delay * 1000,
            "iterations": args.iterations,
            "proxy_lateness_us": {
                "median": statistics.median(lateness),
                "p99": lateness[(len(lateness) * 99) // 100],
                "samples": len(lateness),
            },
            "ops": _compare(latency, TARGETS["latency"]),
        }

        results.update(_async_part(args, target, proxy))

        gc.collect()
        print(f"[2/4] five operations, direct ({args.zero_iterations} iterations)", flush=True)
        repo, raw = RepositorySide(direct), RawSide(target.connect_args())
        zero = run_operations(repo, raw, args.zero_iterations, None, fresh_session=True)
        repo.close()
        raw.close()
        results["zero"] = {
            "connection": "direct (no proxy)",
            "iterations": args.zero_iterations,
            "ops": _compare(zero, TARGETS["zero"]),
        }

        gc.collect()
        print(f"[3/4] create_many({args.bulk_rows}) vs execute_values", flush=True)
        bulk_zero = run_bulk(
            direct,
            target.connect_args(),
            cleanup=admin,
            rows=args.bulk_rows,
            repeats=args.bulk_repeats,
            proxy=None,
        )
        results["bulk"] = {
            "rows": args.bulk_rows,
            "page_size": direct.dialect.insertmanyvalues_page_size,
            **_compare(
                {"zero": bulk_zero, "latency": bulk_latency}, {"zero": TARGETS["bulk"]["zero"]}
            ),
        }

        results["scale"] = _scale_part(args, target, direct, admin)
    finally:
        admin_conn.close()
        direct.dispose()
    return results


def _async_part(args: argparse.Namespace, target: Target, proxy: ProxyHandle) -> dict[str, Any]:
    """Time the async repository against raw psycopg 3, and 200 concurrent list calls."""
    gc.collect()
    print(f"[async 1/2] five awaited operations over the proxy ({args.iterations})", flush=True)
    url = target.url_text(proxy.port)
    ops = run_async_operations(url, target.connect_args(proxy.port), args.iterations, proxy)
    gc.collect()
    print(f"[async 2/2] {args.throughput_rounds} waves of 200 concurrent list calls", flush=True)
    sync_engine = target.engine(proxy.port)
    try:
        throughput = run_throughput(url, sync_engine, args.throughput_rounds)
    finally:
        sync_engine.dispose()
    return {
        "async_latency": {
            "one_way_delay_ms": proxy.delay * 1000,
            "iterations": args.iterations,
            "ops": _compare(ops, TARGETS["latency"]),
        },
        "throughput": throughput,
    }


def _scale_part(
    args: argparse.Namespace, target: Target, direct: Engine, admin: Any
) -> dict[str, Any]:
    """Time the newest-50 list at 10,000 rows (this database) and at --scale-rows."""
    sizes = [10_000, args.scale_rows]
    gc.collect()
    print(f"[4/4] newest 50 at {sizes[0]:,} and {sizes[1]:,} rows", flush=True)
    # The large table lives in a second scratch database, so both sizes can be
    # timed side by side.
    with scratch_database(target.url) as name:
        large_db = Target(target.url, name)
        large_engine = large_db.engine()
        make_schema(large_engine, args.row_security)
        large_admin = _admin(target.url, name)
        try:
            scale = run_scale(
                [
                    (sizes[0], direct, target.connect_args(), admin),
                    (sizes[1], large_engine, large_db.connect_args(), large_admin.cursor()),
                ],
                args.scale_iterations,
            )
        finally:
            large_admin.close()
            large_engine.dispose()
    small, large = (scale[str(n)] for n in sizes)
    ratio = large["repository"]["median_us"] / small["repository"]["median_us"]
    return {
        "tasks_per_user": SCALE_TASKS_PER_USER,
        "iterations": args.scale_iterations,
        "sizes": scale,
        "ratio": ratio,
        "raw_ratio": large["raw"]["median_us"] / small["raw"]["median_us"],
        "target": TARGETS["scale"]["repository"],
        "met": ratio <= TARGETS["scale"]["repository"],
    }


# -- report ----------------------------------------------------------------------------------


def _sizes_label(scale: dict[str, Any]) -> str:
    small, large = (int(n) for n in scale["sizes"])
    return f"{_count_label(large)} / {_count_label(small)} rows"


def _count_label(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k"


def _fmt_us(us: float) -> str:
    return f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.0f} µs"


def _fmt_trips(row: dict[str, Any]) -> str:
    trips = [row.get(k, {}).get("round_trips") for k in ("repository", "raw")]
    if trips[0] is None:
        return "-"
    return " / ".join("-" if t is None else _one_trips(t) for t in trips)


def _one_trips(t: dict[str, int]) -> str:
    return str(t["median"]) if t["min"] == t["max"] else f"{t['median']} ({t['min']}-{t['max']})"


def _met(row: dict[str, Any]) -> str:
    if "met" not in row:
        return "info"
    return "**met**" if row["met"] else "**MISSED**"


def _ops_table(ops: dict[str, dict[str, Any]], trips: bool) -> list[str]:
    head = "| operation | repository median | floor median | ratio | target | result |"
    lines = [head + (" round trips (repo / floor) |" if trips else "")]
    lines.append("|---|---:|---:|---:|---:|---|" + ("---|" if trips else ""))
    for op, row in ops.items():
        floor = row.get("raw") or ops[op.split(",")[0]]["raw"]
        cells = [
            op,
            _fmt_us(row["repository"]["median_us"]),
            _fmt_us(floor["median_us"]),
            f"{row['ratio']:.2f}x",
            f"≤ {row['target']:.2f}x" if "target" in row else "-",
            _met(row),
        ]
        if trips:
            cells.append(_fmt_trips(row))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_markdown(results: dict[str, Any]) -> str:
    """Render the results as the markdown report."""
    meta = results["meta"]
    lat, zero, bulk, scale = (results[k] for k in ("latency", "zero", "bulk", "scale"))
    late = lat["proxy_lateness_us"]
    out = [
        "# Benchmark results" + (" (quick smoke run: not a result)" if meta["quick"] else ""),
        "",
        f"Run {meta['started']} on {meta['cpus']} CPUs ({meta['machine']}); load average "
        f"{meta['load_before']:.2f} before, {meta['load_after']:.2f} after. Python "
        f"{meta['python']}, SQLAlchemy {meta['sqlalchemy']}, psycopg2 {meta['psycopg2']}, "
        f"psycopg {meta['psycopg']}, "
        f"PostgreSQL {meta['postgresql']}. Row-level security "
        f"{meta.get('row_security', 'off')}. Wall time {meta['seconds']:.0f} s. Medians; "
        "the floor is raw psycopg2 in autocommit running the same statements.",
        "",
        f"## Simulated Neon link: {2 * lat['one_way_delay_ms']:.1f} ms RTT",
        "",
        f"{lat['iterations']} interleaved iterations through the latency proxy "
        f"({lat['one_way_delay_ms']:.2f} ms each way; chunks left the proxy a median "
        f"{late['median']:.0f} µs after their due time, p99 {late['p99']:.0f} µs). Round trips "
        "are client-to-server bursts counted by the proxy for each call.",
        "",
        *_ops_table(lat["ops"], trips=True),
        "",
        "## Zero added latency: CPU overhead",
        "",
        f"{zero['iterations']} interleaved iterations, connected directly to the server "
        "(no proxy). The last row opens a new session for the call, as one API request does.",
        "",
        *_ops_table(zero["ops"], trips=False),
        "",
        f"## create_many({bulk['rows']:,}) vs execute_values",
        "",
        "Equal work: the same rows, every column returned (`RETURNING` all seven, as the "
        f"repository returns full tasks), batches of {bulk['page_size']} rows (the engine's "
        "insertmanyvalues page size), all batches in one transaction committed at the end. "
        "A repository batch is one `INSERT ... SELECT FROM unnest(...)` with three array "
        "parameters; an execute_values batch is a multi-row `VALUES` list. The repository "
        "also sorts each batch's rows back into input order and builds Task objects.",
        "",
        "| link | create_many | execute_values | ratio | target | result | round trips |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for key, label in (
        ("zero", "direct"),
        ("latency", f"{2 * lat['one_way_delay_ms']:.0f} ms RTT"),
    ):
        row = bulk[key]
        out.append(
            f"| {label} | {_fmt_us(row['repository']['median_us'])} | "
            f"{_fmt_us(row['raw']['median_us'])} | {row['ratio']:.2f}x | "
            + (f"≤ {row['target']:.2f}x" if "target" in row else "-")
            + f" | {_met(row)} | {_fmt_trips(row)} |"
        )
    out += _async_markdown(results)
    out += [
        "",
        "## Newest 50 of one user as the table grows",
        "",
        f"Every user has {scale['tasks_per_user']} tasks spread over the whole table; the "
        "listed user is the same at both sizes. Each size is a table in its own scratch "
        f"database, and the {scale['iterations']} calls per size and side are interleaved "
        "across sizes and sides (direct connection). Tables are loaded with "
        "`generate_series`, indexes rebuilt, then `VACUUM ANALYZE`.",
        "",
        "| table rows | repository | raw | plan (EXPLAIN ANALYZE) | buffers hit / read |",
        "|---:|---:|---:|---|---:|",
    ]
    for size, row in scale["sizes"].items():
        plan = row["plan"]
        out.append(
            f"| {int(size):,} | {_fmt_us(row['repository']['median_us'])} | "
            f"{_fmt_us(row['raw']['median_us'])} | {plan['node']} on `{plan['index']}`, "
            f"{plan['execution_ms']:.3f} ms | {plan['shared_hit_blocks']} / "
            f"{plan['shared_read_blocks']} |"
        )
    out += [
        "",
        f"Repository {_sizes_label(scale)}: **{scale['ratio']:.2f}x** "
        f"(target ≤ {scale['target']:.2f}x: {'met' if scale['met'] else 'MISSED'}); "
        f"raw psycopg2: {scale['raw_ratio']:.2f}x.",
        "",
        "![benchmark chart](results.png)",
        "",
    ]
    return "\n".join(out)


def _async_markdown(results: dict[str, Any]) -> list[str]:
    lat, wave = results["async_latency"], results["throughput"]
    return [
        "",
        f"## Async: AsyncTaskRepository vs raw psycopg 3, {2 * lat['one_way_delay_ms']:.1f} ms RTT",
        "",
        f"{lat['iterations']} interleaved iterations through the same proxy. The floor is one "
        "raw `psycopg.AsyncConnection` in autocommit (`prepare_threshold=None`, as the "
        "engine sets it) running the same statements.",
        "",
        *_ops_table(lat["ops"], trips=True),
        "",
        f"## Throughput: {wave['calls']} concurrent list calls, {2 * lat['one_way_delay_ms']:.1f}"
        " ms RTT",
        "",
        f"Each call opens its own session (one API request). Async: {wave['calls']} coroutines "
        f"on one event loop; sync: the same calls on {wave['threads']} threads. Both over "
        f"their engine's default pool (20 connections); median of {wave['rounds']} waves.",
        "",
        "| side | wave of calls | calls per second |",
        "|---|---:|---:|",
        f"| async repository, {wave['calls']} coroutines | "
        f"{wave['async']['median_s'] * 1000:.0f} ms | {wave['async']['calls_per_s']:.0f} |",
        f"| sync repository, {wave['threads']} threads | "
        f"{wave['sync']['median_s'] * 1000:.0f} ms | {wave['sync']['calls_per_s']:.0f} |",
        "",
        f"Async / sync throughput: **{wave['ratio']:.2f}x**.",
    ]


def _bars(ax: Any, groups: list[str], series: dict[str, list[float]], unit: str) -> None:
    # Two series side by side per group; the first over the second, as a ratio on top.
    width = 0.8 / len(series)
    for n, (label, values) in enumerate(series.items()):
        xs = [i + (n - (len(series) - 1) / 2) * width for i in range(len(groups))]
        ax.bar(xs, values, width, label=label)
    first, second = series.values()
    for i, (a, b) in enumerate(zip(first, second, strict=True)):
        ax.annotate(f"{a / b:.2f}x", (i, max(a, b)), ha="center", va="bottom", fontsize=9)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(unit)
    ax.set_ylim(0, 1.3 * max(max(v) for v in series.values()))
    ax.legend(loc="upper left", ncols=2, frameon=False)


def render_chart(results: dict[str, Any], path: Path) -> None:
    """Draw the four comparisons into one PNG."""
    # Imported only now, after the timing: matplotlib nearly doubles the objects the
    # garbage collector walks, which would slow the object-heavy repository side more
    # than the raw side.
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    fig = Figure(figsize=(12, 12.5), layout="constrained")
    FigureCanvasAgg(fig)
    (a, b), (c, d), (e, f) = fig.subplots(3, 2)
    rtt = 2 * results["latency"]["one_way_delay_ms"]
    for ax, key, scale, unit, title in (
        (a, "latency", 1000, "ms", f"Median per operation, {rtt:.0f} ms RTT"),
        (b, "zero", 1, "µs", "Median per operation, zero added latency"),
    ):
        ops = results[key]["ops"]
        _bars(
            ax,
            list(OPS),
            {
                "repository": [ops[op]["repository"]["median_us"] / scale for op in OPS],
                "raw psycopg2": [ops[op]["raw"]["median_us"] / scale for op in OPS],
            },
            unit,
        )
        ax.set_title(title)
    a.axhline(rtt, color="grey", linestyle=":", linewidth=1)
    bulk = results["bulk"]
    _bars(
        c,
        ["direct", f"{rtt:.0f} ms RTT"],
        {
            "create_many": [bulk[k]["repository"]["median_us"] / 1000 for k in ("zero", "latency")],
            "execute_values": [bulk[k]["raw"]["median_us"] / 1000 for k in ("zero", "latency")],
        },
        "ms",
    )
    c.set_title(f"Insert {bulk['rows']:,} tasks")
    sizes = results["scale"]["sizes"]
    _bars(
        d,
        [f"{int(n):,} rows" for n in sizes],
        {
            "repository": [row["repository"]["median_us"] for row in sizes.values()],
            "raw psycopg2": [row["raw"]["median_us"] for row in sizes.values()],
        },
        "µs",
    )
    scale = results["scale"]
    d.set_title(
        f"Newest 50, direct ({_sizes_label(scale)}: "
        f"repository {scale['ratio']:.2f}x, raw {scale['raw_ratio']:.2f}x)"
    )
    _async_chart(results, e, f)
    fig.savefig(path, dpi=110)


def _async_chart(results: dict[str, Any], latency: Any, waves: Any) -> None:
    rtt = 2 * results["async_latency"]["one_way_delay_ms"]
    ops = results["async_latency"]["ops"]
    _bars(
        latency,
        list(OPS),
        {
            "AsyncTaskRepository": [ops[op]["repository"]["median_us"] / 1000 for op in OPS],
            "raw psycopg 3 async": [ops[op]["raw"]["median_us"] / 1000 for op in OPS],
        },
        "ms",
    )
    latency.axhline(rtt, color="grey", linestyle=":", linewidth=1)
    latency.set_title(f"Async median per operation, {rtt:.0f} ms RTT")
    wave = results["throughput"]
    _bars(
        waves,
        [f"{wave['calls']} concurrent list calls"],
        {
            "async, coroutines": [wave["async"]["calls_per_s"]],
            f"sync, {wave['threads']} threads": [wave["sync"]["calls_per_s"]],
        },
        "calls per second",
    )
    waves.set_title(f"Throughput, {rtt:.0f} ms RTT, default pool of 20")


def _server_version(url: URL) -> str:
    conn = _admin(url)
    try:
        cur = conn.cursor()
        cur.execute("SHOW server_version")
        return str(cur.fetchone()[0])
    finally:
        conn.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--delay-ms", type=float, default=2.5, help="one-way delay (2.5)")
    parser.add_argument("--iterations", type=int, default=300, help="calls per op, proxied")
    parser.add_argument("--zero-iterations", type=int, default=2000, help="calls per op, direct")
    parser.add_argument("--bulk-rows", type=int, default=5000)
    parser.add_argument("--bulk-repeats", type=int, default=15, help="create_many runs, direct")
    parser.add_argument("--bulk-repeats-latency", type=int, default=5, help="... proxied")
    parser.add_argument("--scale-rows", type=int, default=1_000_000)
    parser.add_argument("--scale-iterations", type=int, default=500)
    parser.add_argument("--throughput-rounds", type=int, default=9, help="waves of 200 lists")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="report folder")
    parser.add_argument("--quick", action="store_true", help="a fast smoke run, not a result")
    parser.add_argument(
        "--row-security",
        choices=("on", "off"),
        default="on",
        help="on: databases migrated to head, the policy in force (default); off: init_db",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.iterations, args.zero_iterations, args.bulk_repeats = 30, 200, 2
        args.bulk_repeats_latency, args.scale_rows, args.scale_iterations = 1, 100_000, 50
        args.throughput_rounds = 2
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the report and write it to the output folder.

    ``--http`` runs the HTTP benchmark instead (``http_bench.py``; its own options), and
    ``--cpu`` the per-call cost at 0 ms RTT on both faces (``cpu.py``), and
    ``--instructions`` the HTTP services' instructions per request (``instructions.py``).
    """
    argv = sys.argv[1:] if argv is None else argv
    if "--http" in argv:
        from bench.http_bench import main as http_main  # noqa: PLC0415 - its own dependencies

        return http_main([arg for arg in argv if arg != "--http"])
    if "--cpu" in argv:
        from bench.cpu import main as cpu_main  # noqa: PLC0415 - a part of its own

        return cpu_main([arg for arg in argv if arg != "--cpu"])
    if "--instructions" in argv:
        from bench.instructions import main as count_main  # noqa: PLC0415 - a part of its own

        return count_main([arg for arg in argv if arg != "--instructions"])
    args = parse_args(argv)
    url = _resolve_target(os.environ.get("TEST_DATABASE_URL") or DEFAULT_URL)
    started = time.time()
    meta: dict[str, Any] = {
        "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "machine": f"{platform.system()} {platform.machine()}",
        "python": platform.python_version(),
        "sqlalchemy": sqlalchemy.__version__,
        "psycopg2": psycopg2.__version__.split()[0],
        "psycopg": psycopg.__version__,
        "postgresql": _server_version(url),
        "load_before": os.getloadavg()[0],
        "quick": args.quick,
        "row_security": args.row_security,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    proxy = start_proxy(url.host or "127.0.0.1", url.port or 5432, args.delay_ms / 1000)
    try:
        with scratch_database(url) as name:
            results = run_all(args, Target(url, name), proxy)
    finally:
        proxy.stop()
    meta["load_after"] = os.getloadavg()[0]
    meta["seconds"] = time.time() - started
    results = {"meta": meta, **results}
    report = render_markdown(results)
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(report, encoding="utf-8")
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    render_chart(results, args.out / "results.png")
    print(f"wrote {args.out}/results.md, results.json and results.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
