"""Scale benchmark: every repository call at 10k and 1M tasks (10M with --ten-million).

Run with ``nox -s scale`` or ``python backend/bench/scale.py [--ten-million]``. It
needs the PostgreSQL server named by ``TEST_DATABASE_URL`` (default: the local one),
only ever connects to this machine, builds each size in a scratch database of its own
(dropped at the end) and writes ``results.md``, ``results.json`` and ``results.png``
to ``docs/benchmarks/scale/`` (``--out`` to change). Not part of CI: a 1M table takes
about a minute to build and the figures need a quiet machine.

The distribution, built server-side with generate_series: a skewed owner holds the
oldest tenth of the rows (a bulk import, an early power user), everyone else ~100
tasks. Per size and owner (the skewed one, and normal ones picked at random per
call) it times get, the newest page, the pending page, a deep page (``before_id`` in
the middle of the owner's ids), an exact and a bounded count, update, delete and
create, through ``TaskRepository`` on a direct connection (no added latency: what is
measured is the server's work plus the repository's fixed CPU cost). All sizes are
built first and stay up; the calls of every size, owner and operation are then
interleaved, so drift on a busy machine hits 10k and 1M alike. It also
records table and index sizes, the plans of the skewed owner's pages, and the
skewed newest page in the former shape (``user_id = :owner ORDER BY id DESC``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import psycopg2  # type: ignore[import-untyped]
import sqlalchemy

from todo_backend import repository_core as core
from todo_backend.db import create_db_engine, get_session, init_db
from todo_backend.models import TaskCreate, TaskUpdate
from todo_backend.repository import TaskRepository

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.run import DEFAULT_URL, Target, _admin, _resolve_target, scratch_database

OUT_DIR: Final = Path(__file__).resolve().parents[2] / "docs" / "benchmarks" / "scale"
HEAVY: Final = "skewed-owner"
PER_USER: Final = 100
BOUND: Final = 1000  # count(limit=...) in the bounded count
OPS: Final = (
    "get",
    "list newest",
    "list pending",
    "deep page",
    "count",
    "count (limit 1000)",
    "update",
    "delete",
    "create",
)
OLD_LIST: Final = (
    "SELECT id, user_id, title, description, complete, created_at, updated_at "
    "FROM tasks WHERE user_id = %s ORDER BY id DESC LIMIT 50"
)


def load(cur: Any, total: int) -> dict[str, Any]:
    """Fill tasks with *total* rows: the skewed owner's oldest tenth, then ~100 per user."""
    heavy = total // 10
    users = (total - heavy) // PER_USER
    started = time.perf_counter()
    cur.execute(
        "INSERT INTO tasks (user_id, title, description, complete, created_at, updated_at) "
        "SELECT %s, 'task ' || g, NULL, g %% 2 = 0, now(), now() "
        "FROM generate_series(1, %s) AS g",
        (HEAVY, heavy),
    )
    cur.execute(
        "INSERT INTO tasks (user_id, title, description, complete, created_at, updated_at) "
        "SELECT 'user-' || (g %% %s), 'task ' || g, NULL, (g / %s) %% 2 = 0, now(), now() "
        "FROM generate_series(1, %s) AS g",
        (users, users, total - heavy),
    )
    cur.execute("VACUUM ANALYZE tasks")
    return {
        "rows": total,
        "heavy_rows": heavy,
        "users": users + 1,
        "load_s": time.perf_counter() - started,
    }


def sizes(cur: Any) -> dict[str, int]:
    """Bytes of the heap and of each index of tasks, and the total."""
    cur.execute(
        "SELECT c.relname, pg_relation_size(c.oid) FROM pg_class c "
        "WHERE c.oid = 'tasks'::regclass OR c.oid IN "
        "(SELECT indexrelid FROM pg_index WHERE indrelid = 'tasks'::regclass)"
    )
    out = {name: int(size) for name, size in cur.fetchall()}
    cur.execute("SELECT pg_total_relation_size('tasks')")
    out["total"] = int(cur.fetchone()[0])
    return out


class Owner:
    """The ids one benchmark owner may read, update and delete, refreshed as they change."""

    def __init__(self, cur: Any, names: list[str]) -> None:
        self.names = names
        cur.execute(
            "SELECT user_id, array_agg(id ORDER BY id) FROM tasks "
            "WHERE user_id = ANY(%s) GROUP BY user_id",
            (names,),
        )
        self.ids: dict[str, list[int]] = {name: list(ids) for name, ids in cur.fetchall()}

    def pick(self, rng: random.Random) -> tuple[str, int]:
        """Return a random owner of this kind and one of their task ids."""
        name = rng.choice(self.names)
        return name, rng.choice(self.ids[name])

    def middle(self, name: str) -> int:
        """Return the middle id of *name*'s tasks: the cursor of a deep page."""
        ids = self.ids[name]
        return ids[len(ids) // 2]


def _calls(repo: TaskRepository, owner: Owner, rng: random.Random) -> dict[str, Callable[[], Any]]:
    def get() -> Any:
        return repo.get(*owner.pick(rng))

    def newest() -> Any:
        return repo.list(rng.choice(owner.names), limit=50)

    def pending() -> Any:
        return repo.list(rng.choice(owner.names), complete=False, limit=50)

    def deep() -> Any:
        name = rng.choice(owner.names)
        return repo.list(name, limit=50, before_id=owner.middle(name))

    def count() -> Any:
        return repo.count(rng.choice(owner.names))

    def bounded() -> Any:
        return repo.count(rng.choice(owner.names), limit=BOUND)

    def update() -> Any:
        return repo.update(*owner.pick(rng), TaskUpdate(title="renamed"))

    def delete() -> Any:
        name, task_id = owner.pick(rng)
        owner.ids[name].remove(task_id)
        return repo.delete(name, task_id)

    def create() -> Any:
        name = rng.choice(owner.names)
        task = repo.create(name, TaskCreate(title="new"))
        owner.ids[name].append(task.id or 0)
        return task

    return dict(
        zip(OPS, (get, newest, pending, deep, count, bounded, update, delete, create), strict=True)
    )


def _summary(seconds: list[float]) -> dict[str, float]:
    us = sorted(s * 1e6 for s in seconds)
    return {
        "n": len(us),
        "median_us": statistics.median(us),
        "p99_us": us[min(len(us) - 1, (len(us) * 99) // 100)],
    }


def measure(targets: dict[str, tuple[str, Any]], iterations: int) -> dict[str, Any]:
    """Time every operation, owner and size, all interleaved in one shuffled sequence.

    *targets* maps a size to (database URL, admin cursor). The sizes share the
    machine's drift: each round runs every (size, owner, operation) once, in random
    order, so a busy moment hits 10k and 1M alike.
    """
    rng = random.Random(iterations)  # noqa: S311 - sampling, not secrets
    calls: dict[tuple[str, str, str], Callable[[], Any]] = {}
    engines = []
    try:
        for size, (url_text, cur) in targets.items():
            cur.execute("SELECT DISTINCT user_id FROM tasks WHERE user_id <> %s", (HEAVY,))
            normal_names = sorted(row[0] for row in cur.fetchall())
            owners = {
                "skewed": Owner(cur, [HEAVY]),
                "normal": Owner(cur, rng.sample(normal_names, min(200, len(normal_names)))),
            }
            engine = create_db_engine(url_text)
            engines.append(engine)
            repo = TaskRepository(next(get_session(engine)))
            for kind, owner in owners.items():
                for op, call in _calls(repo, owner, rng).items():
                    calls[size, kind, op] = call
        plan = list(calls)
        for key in plan:  # warm-up: a pass over every call
            calls[key]()
        samples: dict[tuple[str, str, str], list[float]] = {key: [] for key in plan}
        for _ in range(iterations):
            rng.shuffle(plan)
            for key in plan:
                started = time.perf_counter()
                calls[key]()
                samples[key].append(time.perf_counter() - started)
    finally:
        for engine in engines:
            engine.dispose()
    return {
        size: {
            kind: {op: _summary(samples[size, kind, op]) for op in OPS}
            for kind in ("skewed", "normal")
        }
        for size in targets
    }


def skewed_plans(cur: Any) -> dict[str, str]:
    """Return the scan node of each page of the skewed owner, as the repository sends it."""
    dialect = sqlalchemy.create_engine("postgresql+psycopg2://").dialect
    cur.execute("SELECT min(id), max(id) FROM tasks WHERE user_id = %s", (HEAVY,))
    low, high = cur.fetchone()
    pages = {
        "newest": (None, None),
        "pending": (False, None),
        "deep": (None, (low + high) // 2),
        "deep pending": (False, (low + high) // 2),
    }
    out = {}
    for name, (complete, before_id) in pages.items():
        call = core.list_call(HEAVY, complete, 50, before_id)
        if not isinstance(call.stmt, sqlalchemy.Select):
            raise TypeError("a list call's statement is a SELECT")
        compiled = call.stmt.compile(dialect=dialect)
        cur.execute(f"EXPLAIN (FORMAT JSON) {compiled}", {**compiled.params, **call.params})
        node = cur.fetchone()[0][0]["Plan"]
        while "Index Name" not in node and node.get("Plans"):
            node = node["Plans"][0]
        out[name] = (
            f"{node['Node Type']} {node.get('Scan Direction', '')} {node.get('Index Name', '')}"
        )
    return out


def old_shape(cur: Any, owner: str, iterations: int) -> dict[str, float]:
    """Time the newest page in the former shape, for comparison (raw psycopg2)."""
    seconds = []
    for _ in range(iterations):
        started = time.perf_counter()
        cur.execute(OLD_LIST, (owner,))
        cur.fetchall()
        seconds.append(time.perf_counter() - started)
    return _summary(seconds)


def run_sizes(url: Any, totals: list[int], iterations: int) -> dict[str, Any]:
    """Build each size in its own scratch database, then measure them all together."""
    results: dict[str, Any] = {}
    with ExitStack() as stack:
        targets = {}
        for total in totals:
            name = stack.enter_context(scratch_database(url))
            target = Target(url, name)
            engine = create_db_engine(target.url_text())
            init_db(engine)
            engine.dispose()
            conn = _admin(url, name)
            stack.callback(conn.close)
            cur = conn.cursor()
            result: dict[str, Any] = {"data": load(cur, total), "sizes": sizes(cur)}
            print(f"{total:,} rows loaded in {result['data']['load_s']:.1f} s", flush=True)
            result["plans"] = skewed_plans(cur)
            # Before the timed calls: their creates put the owner's newest rows on top.
            cur.execute("SELECT DISTINCT user_id FROM tasks WHERE user_id <> %s LIMIT 1", (HEAVY,))
            normal = cur.fetchone()[0]
            result["old_shape_newest"] = {
                "skewed": old_shape(cur, HEAVY, max(5, iterations // 20)),
                "normal": old_shape(cur, normal, max(5, iterations // 20)),
            }
            results[str(total)] = result
            targets[str(total)] = (target.url_text(), cur)
        for size, ops in measure(targets, iterations).items():
            results[size]["ops"] = ops
    return results


def count_study(url: Any, repeats: int) -> dict[str, Any]:
    """Time exact and bounded counts of one owner of 100k and one of 1M tasks.

    First with the visibility map empty (autovacuum off for the table, after one pass
    that sets hint bits), then after ``VACUUM``: what an exact count costs when the
    map is stale and when it is current.
    """
    owners = {"100k": 100_000, "1M": 1_000_000}
    out: dict[str, Any] = {}
    with scratch_database(url) as name:
        target = Target(url, name)
        engine = create_db_engine(target.url_text())
        init_db(engine)
        conn = _admin(url, name)
        try:
            cur = conn.cursor()
            cur.execute("ALTER TABLE tasks SET (autovacuum_enabled = false)")
            for owner, n in owners.items():
                cur.execute(
                    "INSERT INTO tasks (user_id, title, complete, created_at, updated_at) "
                    "SELECT %s, 'task ' || g, g %% 2 = 0, now(), now() "
                    "FROM generate_series(1, %s) AS g",
                    (f"owner-{owner}", n),
                )
            cur.execute("ANALYZE tasks")
            repo = TaskRepository(next(get_session(engine)))
            for state in ("visibility map empty", "after VACUUM"):
                if state == "after VACUUM":
                    cur.execute("VACUUM ANALYZE tasks")
                for owner in owners:
                    user = f"owner-{owner}"
                    repo.count(user)  # sets hint bits on the first pass
                    for label, limit in (("exact", None), ("limit 1000", BOUND)):
                        seconds = []
                        for _ in range(repeats):
                            started = time.perf_counter()
                            repo.count(user, limit=limit)
                            seconds.append(time.perf_counter() - started)
                        out[f"{state} | {owner} | {label}"] = _summary(seconds)
        finally:
            conn.close()
            engine.dispose()
    return out


def _label(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 else f"{n // 1000}k"


def _ms(us: float) -> str:
    return f"{us / 1000:.3f}" if us < 10_000 else f"{us / 1000:.1f}"


def render_markdown(results: dict[str, Any]) -> str:
    """Render the report: per operation and owner, median and p99 per size, ratio to 10k."""
    meta, runs = results["meta"], results["sizes"]
    labels = [_label(int(n)) for n in runs]
    base = runs[next(iter(runs))]
    lines = [
        "# Scale benchmark",
        "",
        f"Run {meta['started']} on {meta['machine']}, {meta['cpus']} CPUs (load average "
        f"{meta['load_before']:.1f} before, {meta['load_after']:.1f} after: a shared, busy "
        f"machine), PostgreSQL {meta['postgresql']}, {meta['iterations']} calls per "
        "operation, owner and size, interleaved. Times in ms, direct connection.",
        "",
        "| operation | owner | "
        + " | ".join(f"{x} median | {x} p99" for x in labels)
        + " | "
        + " | ".join(f"{x}/{labels[0]}" for x in labels[1:])
        + " |",
        "| --- | --- |" + " ---: |" * (2 * len(labels) + len(labels) - 1),
    ]
    for op in OPS:
        for kind in ("skewed", "normal"):
            cells = []
            for run in runs.values():
                row = run["ops"][kind][op]
                cells += [_ms(row["median_us"]), _ms(row["p99_us"])]
            ratios = [
                f"{run['ops'][kind][op]['median_us'] / base['ops'][kind][op]['median_us']:.2f}x"
                for run in list(runs.values())[1:]
            ]
            lines.append(f"| {op} | {kind} | " + " | ".join(cells + ratios) + " |")
    lines += ["", "Skewed owner's page against a normal owner's (median), per size:", ""]
    lines += ["| page | " + " | ".join(labels) + " |", "| --- |" + " ---: |" * len(labels)]
    for op in ("list newest", "list pending", "deep page"):
        cells = [
            f"{run['ops']['skewed'][op]['median_us'] / run['ops']['normal'][op]['median_us']:.2f}x"
            for run in runs.values()
        ]
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    lines += ["", "Sizes (MB) and load:", ""]
    lines += ["| relation | " + " | ".join(labels) + " |", "| --- |" + " ---: |" * len(labels)]
    for rel in base["sizes"]:
        cells = [f"{run['sizes'].get(rel, 0) / 2**20:.1f}" for run in runs.values()]
        lines.append(f"| {rel} | " + " | ".join(cells) + " |")
    lines.append(
        "| load (s) | " + " | ".join(f"{run['data']['load_s']:.1f}" for run in runs.values()) + " |"
    )
    lines += ["", "Plans of the skewed owner's pages:", ""]
    for n, run in runs.items():
        plans = "; ".join(f"{page}: {plan.strip()}" for page, plan in run["plans"].items())
        lines.append(f"- {_label(int(n))}: {plans}")
    lines += [
        "",
        "The newest page in the former shape (`user_id = :owner ORDER BY id DESC`, "
        "raw psycopg2), median ms:",
        "",
    ]
    for n, run in runs.items():
        old = run["old_shape_newest"]
        lines.append(
            f"- {_label(int(n))}: skewed owner {_ms(old['skewed']['median_us'])}, "
            f"normal owner {_ms(old['normal']['median_us'])}"
        )
    return "\n".join(lines) + "\n"


def render_chart(results: dict[str, Any], path: Path) -> None:
    """Bars: median per operation and owner, one bar per size (log scale)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    runs = results["sizes"]
    groups = [(op, kind) for op in OPS for kind in ("skewed", "normal")]
    fig = Figure(figsize=(13, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(runs)
    for i, (n, run) in enumerate(runs.items()):
        values = [run["ops"][kind][op]["median_us"] / 1000 for op, kind in groups]
        ax.bar(
            [g + i * width for g in range(len(groups))],
            values,
            width,
            label=f"{_label(int(n))} rows",
        )
    ax.set_xticks([g + width * (len(runs) - 1) / 2 for g in range(len(groups))])
    names = [op.replace("count (limit 1000)", "count\nlimit 1000") for op, _ in groups]
    ax.set_xticklabels(
        [f"{name}\n{kind}" for name, (_, kind) in zip(names, groups, strict=True)], fontsize=7
    )
    ax.set_yscale("log")
    ax.set_ylabel("median ms (log)")
    ax.set_title("Repository calls by table size: skewed owner (oldest tenth) and normal owners")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--ten-million", action="store_true", help="also build 10M rows")
    parser.add_argument("--iterations", type=int, default=300, help="calls per op and owner")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="report folder")
    parser.add_argument(
        "--count-study", action="store_true", help="only time counts of 100k and 1M tasks"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Build each size, measure it, print the report and write it to the output folder."""
    args = parse_args(argv)
    url = _resolve_target(os.environ.get("TEST_DATABASE_URL") or DEFAULT_URL)
    conn = _admin(url)
    cur = conn.cursor()
    cur.execute("SHOW server_version")
    version = str(cur.fetchone()[0])
    conn.close()
    meta = {
        "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "machine": f"{platform.system()} {platform.machine()}",
        "python": platform.python_version(),
        "psycopg2": psycopg2.__version__.split()[0],
        "postgresql": version,
        "iterations": args.iterations,
        "load_before": os.getloadavg()[0],
    }
    if args.count_study:
        study = count_study(url, repeats=15)
        lines = [
            "| state | owner's tasks | count | median ms | p99 ms |",
            "| --- | --- | --- | ---: | ---: |",
        ]
        for key, row in study.items():
            cells = key.split(" | ")
            lines.append(
                f"| {' | '.join(cells)} | {_ms(row['median_us'])} | {_ms(row['p99_us'])} |"
            )
        report = "\n".join(lines) + "\n"
        print(report)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "count.md").write_text(report, encoding="utf-8")
        (args.out / "count.json").write_text(
            json.dumps({"meta": meta, "counts": study}, indent=2) + "\n", encoding="utf-8"
        )
        return 0
    totals = [10_000, 1_000_000] + ([10_000_000] if args.ten_million else [])
    runs = run_sizes(url, totals, args.iterations)
    meta["load_after"] = os.getloadavg()[0]
    results = {"meta": meta, "sizes": runs}
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
