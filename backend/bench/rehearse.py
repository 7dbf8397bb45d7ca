"""Rehearse the revision chain on a big tasks table: time each revision, watch its locks.

``nox -s rehearse`` (or ``python backend/bench/rehearse.py --rows N``) creates a
scratch database on ``TEST_DATABASE_URL`` (default: the local server), applies
revision 0001, fills ``tasks`` with N rows (default 1,000,000; a few percent with a
description, none breaking a rule), then applies every later revision with
:func:`todo_backend.migrate.upgrade`, one at a time. While each runs, a watcher polls
``pg_locks`` every few milliseconds and records how long an ACCESS EXCLUSIVE lock on
``tasks`` stayed granted, and a prober times a one-row read of tasks, as the
application would. For comparison it also replays 0002's SQL the way it ran before
its commit point (one transaction: add NOT VALID, then validate) on a copy of the
table. Results go to ``docs/benchmarks/migrations.json`` and ``migrations.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final

from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError

from todo_backend import migrate
from todo_backend.config import load_migration_settings
from todo_backend.db import is_local_host

# Run as a script, this file's folder is on sys.path but its package is not.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import common

ROOT: Final = Path(__file__).resolve().parents[2]
OUT: Final = ROOT / "docs" / "benchmarks"
LOCAL_POSTGRES: Final = "postgresql://postgres@127.0.0.1:5432/postgres"
POLL_SECONDS: Final = 0.002

_EXCLUSIVE_ON_TASKS: Final = text(
    "select count(*) from pg_locks l join pg_class c on c.oid = l.relation "
    "where c.relname = 'tasks' and l.mode = 'AccessExclusiveLock' and l.granted "
    "and l.database = (select oid from pg_database where datname = current_database())"
)
_READ: Final = text("select id from tasks where user_id = 'user-7' limit 1")
_SEED: Final = text(
    "insert into tasks (user_id, title, description, complete, created_at, updated_at) "
    "select 'user-' || (g % 5000), 'task number ' || g, "
    "case when g % 20 = 0 then 'details of task ' || g || E'\\twith a tab' end, "
    "g % 3 = 0, now() - g * interval '1 second', now() "
    "from generate_series(1, :rows) as g"
)


@dataclass
class Watch:
    """What the watcher and prober saw while one step ran."""

    seconds: float = 0.0
    longest_exclusive_ms: float = 0.0
    exclusive_holds: int = 0
    polls: int = 0
    worst_read_ms: float = 0.0
    reads: int = 0


@dataclass
class Report:
    """The rehearsal's figures, as written to migrations.json."""

    rows: int
    server: str
    machine: str
    lock_timeout_s: float
    steps: dict[str, Watch] = field(default_factory=dict)
    chain_seconds: float = 0.0
    seed_seconds: float = 0.0


class Watcher:
    """Poll pg_locks and time one-row reads of tasks from two background threads."""

    def __init__(self, url: URL) -> None:
        self._locks = create_engine(url, isolation_level="AUTOCOMMIT")
        self._reads = create_engine(url, isolation_level="AUTOCOMMIT")
        self._stop = threading.Event()
        self.watch = Watch()

    def _poll_locks(self) -> None:
        held_since: float | None = None
        with self._locks.connect() as conn:
            while not self._stop.is_set():
                now = time.perf_counter()
                held = bool(conn.execute(_EXCLUSIVE_ON_TASKS).scalar_one())
                self.watch.polls += 1
                if held and held_since is None:
                    held_since = now
                    self.watch.exclusive_holds += 1
                elif not held and held_since is not None:
                    self._record(now - held_since)
                    held_since = None
                time.sleep(POLL_SECONDS)
            if held_since is not None:
                self._record(time.perf_counter() - held_since)

    def _record(self, seconds: float) -> None:
        self.watch.longest_exclusive_ms = max(self.watch.longest_exclusive_ms, seconds * 1000)

    def _probe(self) -> None:
        with self._reads.connect() as conn:
            while not self._stop.is_set():
                started = time.perf_counter()
                try:
                    conn.execute(_READ).all()
                except DBAPIError:  # no tasks table yet (before 0001 commits)
                    time.sleep(POLL_SECONDS)
                    continue
                elapsed = (time.perf_counter() - started) * 1000
                self.watch.worst_read_ms = max(self.watch.worst_read_ms, elapsed)
                self.watch.reads += 1
                time.sleep(POLL_SECONDS)

    @contextmanager
    def running(self) -> Iterator[Watch]:
        """Watch while the block runs; the block's own duration lands in ``seconds``."""
        threads = [
            threading.Thread(target=self._poll_locks, daemon=True),
            threading.Thread(target=self._probe, daemon=True),
        ]
        for thread in threads:
            thread.start()
        time.sleep(0.05)
        started = time.perf_counter()
        try:
            yield self.watch
        finally:
            self.watch.seconds = time.perf_counter() - started
            time.sleep(0.05)
            self._stop.set()
            for thread in threads:
                thread.join(30)
            self._locks.dispose()
            self._reads.dispose()


def scratch_database(server: URL) -> AbstractContextManager[URL]:
    """Create an empty database on *server* for the rehearsal; drop it afterwards."""
    return common.scratch_database(server, "todo_rehearse")


def _one_transaction_0002(engine: Engine, url: URL) -> Watch:
    """Replay 0002 as it ran before its commit point: ADD NOT VALID and VALIDATE in one go."""
    sql = migrate.upgrade_sql("postgresql://", "0001:0002")
    body = sql.split("-- Running upgrade 0001 -> 0002", 1)[1]
    body = body.split("UPDATE alembic_version", 1)[0]
    body = body.replace("COMMIT;", "").replace("BEGIN;", "")
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE tasks DROP CONSTRAINT ck_tasks_user_id_text")
        conn.exec_driver_sql("ALTER TABLE tasks DROP CONSTRAINT ck_tasks_title_text")
        conn.exec_driver_sql("ALTER TABLE tasks DROP CONSTRAINT ck_tasks_description_text")
    with Watcher(url).running() as watch, engine.begin() as conn:
        conn.exec_driver_sql(body)
    return watch


def rehearse(server: URL, rows: int) -> Report:
    """Run the rehearsal on a scratch database on *server* and return its figures."""
    lock_timeout = load_migration_settings().lock_timeout
    report = Report(
        rows=rows,
        server="",
        machine=f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        lock_timeout_s=lock_timeout,
    )
    script = ScriptDirectory.from_config(migrate.alembic_config())
    chain = [rev.revision for rev in reversed(list(script.walk_revisions()))]
    with scratch_database(server) as url:
        engine = create_engine(url)
        with engine.connect() as conn:
            report.server = str(conn.exec_driver_sql("show server_version").scalar_one())
        for index, revision in enumerate(chain):
            if index == 1:
                started = time.perf_counter()
                with engine.begin() as conn:
                    conn.execute(_SEED, {"rows": rows})
                with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                    conn.exec_driver_sql("VACUUM ANALYZE tasks")
                report.seed_seconds = time.perf_counter() - started
            with Watcher(url).running() as watch:
                migrate.upgrade(url, revision)
            report.steps[revision] = watch
            report.chain_seconds += watch.seconds
            print(
                f"{revision}: {watch.seconds:.2f} s, longest ACCESS EXCLUSIVE on tasks "
                f"{watch.longest_exclusive_ms:.1f} ms, worst read {watch.worst_read_ms:.1f} ms",
                flush=True,
            )
        if "0002" in chain:
            before = _one_transaction_0002(engine, url)
            report.steps["0002 as one transaction (before)"] = before
            print(
                f"0002 as one transaction: {before.seconds:.2f} s, longest ACCESS EXCLUSIVE "
                f"{before.longest_exclusive_ms:.1f} ms, worst read {before.worst_read_ms:.1f} ms",
                flush=True,
            )
        engine.dispose()
    return report


def write(report: Report) -> None:
    """Write migrations.json and migrations.md under docs/benchmarks."""
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "migrations.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    lines = [
        "# Migration rehearsal",
        "",
        f"`nox -s rehearse`: {report.rows:,} rows in tasks, PostgreSQL {report.server}, "
        f"{report.machine}; DB_MIGRATION_LOCK_TIMEOUT={report.lock_timeout_s:g} s. "
        f"Seeding took {report.seed_seconds:.1f} s (not in the chain).",
        "",
        "| step | time | longest ACCESS EXCLUSIVE on tasks | ACCESS EXCLUSIVE holds "
        "| worst one-row read meanwhile |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, watch in report.steps.items():
        lines.append(
            f"| {name} | {watch.seconds:.2f} s | {watch.longest_exclusive_ms:.1f} ms "
            f"| {watch.exclusive_holds} | {watch.worst_read_ms:.1f} ms |"
        )
    lines += [
        "",
        f"Whole chain (0001 on an empty table, then each revision on {report.rows:,} rows): "
        f"{report.chain_seconds:.2f} s.",
        "",
    ]
    (OUT / "migrations.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    """Run the rehearsal and record its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    server = make_url(os.environ.get("TEST_DATABASE_URL", LOCAL_POSTGRES))
    if not is_local_host(server) or not server.host or server.host.startswith("/"):
        parser.error("TEST_DATABASE_URL must name a server on this machine (127.0.0.1)")
    report = rehearse(server, args.rows)
    if not args.no_write:
        write(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
