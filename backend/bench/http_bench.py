"""HTTP benchmark: the README's FastAPI service against the same API on raw psycopg_pool.

Run with ``nox -s bench -- --http [options]`` or ``python backend/bench/http_bench.py``.
On a scratch database of the server named by ``TEST_DATABASE_URL`` (default: the
local one; any other host is refused), seeded with 100 users x 1,000 tasks, each
side (:mod:`bench.http_apps`: ``package`` and ``floor``) is served by uvicorn with
one worker on loopback and loaded by a stdlib asyncio client: 32 keep-alive
connections, each sending one HTTP/1.1 request at a time over raw asyncio streams
(an HTTP client library would saturate before the server does). Scenarios: ``get``
(one task by id), ``list`` (the newest 50), ``create`` and ``mixed`` (50% get, 25%
list, 15% create, 10% update). Each run starts a fresh server, warms up, measures for
``--seconds``, and stops the server; runs alternate A B, B A, ... per scenario.

Reported per scenario and side (medians over the runs): requests/s, p50 and p99
latency, the server process's CPU per request, and the new server connections of a
run (``pg_stat_database.sessions`` across the server's whole life, start-up
included); plus the package's requests/s as a ratio of the floor's. The report goes
to ``docs/benchmarks/http.md`` and ``http.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.burst import scratch_database, server_sessions
from bench.common import make_schema, write_report
from todo_backend.config import normalize_database_url
from todo_backend.db import CONNECTING_ROLE, create_db_engine, is_local_host

DEFAULT_URL: Final = "postgresql://postgres@127.0.0.1:5432/postgres"
OUT_DIR: Final = Path(__file__).resolve().parents[2] / "docs" / "benchmarks"
BACKEND: Final = Path(__file__).resolve().parents[1]
SIDES: Final = ("package", "floor")  # --sides may add "queuepool" (the pool before)
SCENARIOS: Final = ("get", "list", "create", "mixed")
TICKS: Final = os.sysconf("SC_CLK_TCK")

Request = tuple[bytes, int]  # the raw request and the status it must answer


@dataclass
class Traffic:
    """Builds the requests of one scenario for the seeded data."""

    users: int
    tasks: int
    rng: random.Random = field(default_factory=lambda: random.Random(7))  # noqa: S311

    def _user_and_id(self) -> tuple[str, int]:
        task_id = self.rng.randint(1, self.users * self.tasks)
        return f"u{task_id % self.users}", task_id

    @staticmethod
    def _request(method: str, path: str, user: str, body: bytes = b"") -> bytes:
        head = f"{method} {path} HTTP/1.1\r\nHost: bench\r\nX-User: {user}\r\n"
        if body:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        return head.encode() + b"\r\n" + body

    def get(self) -> Request:
        """Read one task by id."""
        user, task_id = self._user_and_id()
        return self._request("GET", f"/tasks/{task_id}", user), 200

    def list(self) -> Request:
        """Read a user's newest 50 tasks."""
        user = f"u{self.rng.randrange(self.users)}"
        return self._request("GET", "/tasks?limit=50", user), 200

    def create(self) -> Request:
        """Create a task."""
        user = f"u{self.rng.randrange(self.users)}"
        return self._request("POST", "/tasks", user, b'{"title": "a new task"}'), 201

    def update(self) -> Request:
        """Mark a task complete (or pending)."""
        user, task_id = self._user_and_id()
        body = b'{"complete": true}' if self.rng.random() < 0.5 else b'{"complete": false}'
        return self._request("PATCH", f"/tasks/{task_id}", user, body), 200

    def mixed(self) -> Request:
        """50% get, 25% list, 15% create, 10% update."""
        draw = self.rng.random()
        if draw < 0.5:
            return self.get()
        if draw < 0.75:
            return self.list()
        if draw < 0.9:
            return self.create()
        return self.update()

    def maker(self, scenario: str) -> Callable[[], Request]:
        """Return the request factory of *scenario*."""
        makers: dict[str, Callable[[], Request]] = {
            "get": self.get,
            "list": self.list,
            "create": self.create,
            "mixed": self.mixed,
        }
        return makers[scenario]


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> int:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    if length:
        await reader.readexactly(length)
    return status


async def load(
    port: int, make: Callable[[], Request], *, connections: int, warmup: float, seconds: float
) -> dict[str, Any]:
    """Keep *connections* keep-alive connections busy; measure after *warmup* for *seconds*."""
    latencies: list[float] = []
    errors: list[str] = []
    start = time.monotonic()
    measure_from, stop = start + warmup, start + warmup + seconds

    async def client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while (now := time.monotonic()) < stop:
                request, expected = make()
                status = await _exchange(reader, writer, request)
                done = time.monotonic()
                if status != expected:
                    errors.append(f"{status} for {request.split(b' ', 2)[:2]!r}")
                elif now >= measure_from:
                    latencies.append(done - now)
        finally:
            writer.close()

    await asyncio.gather(*(client() for _ in range(connections)))
    if errors:
        raise RuntimeError(f"{len(errors)} unexpected answers, e.g. {errors[:3]}")
    latencies.sort()
    n = len(latencies)
    return {
        "requests": n,
        "rps": n / seconds,
        "p50_ms": latencies[n // 2] * 1000,
        "p99_ms": latencies[min(n - 1, (n * 99) // 100)] * 1000,
    }


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_until_serving(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("the server did not start within 60 s")


def run_once(
    side: str, scenario: str, url: str, admin: Any, *, database: str, args: argparse.Namespace
) -> dict[str, Any]:
    """Start *side*'s server, load it with *scenario*, stop it; return the run's figures."""
    before = server_sessions(admin, database)
    port = _free_port()
    env = {**os.environ, "DATABASE_URL": url, "PYTHONPATH": str(BACKEND)}
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        f"bench.http_apps:{side}_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    process = subprocess.Popen(command, env=env, cwd=BACKEND.parent)  # noqa: S603 - our own app
    profiler = None
    try:
        _wait_until_serving(port, process)
        if args.profile is not None:
            profiler = _profile(process.pid, args.profile / f"{scenario}-{side}.txt", args)
        traffic = Traffic(args.users, args.tasks_per_user)
        cpu_at: list[float] = []

        async def measured() -> dict[str, Any]:
            loop = asyncio.get_running_loop()
            loop.call_later(args.warmup, lambda: cpu_at.append(_cpu_seconds(process.pid)))
            loop.call_later(
                args.warmup + args.seconds, lambda: cpu_at.append(_cpu_seconds(process.pid))
            )
            return await load(
                port,
                traffic.maker(scenario),
                connections=args.concurrency,
                warmup=args.warmup,
                seconds=args.seconds,
            )

        result = asyncio.run(measured())
        result["server_cpu_us_per_request"] = (cpu_at[1] - cpu_at[0]) / result["requests"] * 1e6
    finally:
        process.send_signal(signal.SIGINT)  # a graceful stop runs the lifespan's shutdown
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if profiler is not None:
            profiler.wait(timeout=30)
    result["new_server_connections"] = server_sessions(admin, database) - before
    return result


def _profile(pid: int, out: Path, args: argparse.Namespace) -> subprocess.Popen[bytes]:
    """Sample the server *pid* with py-spy for the whole run; folded stacks go to *out*.

    The samples cost the server some CPU, so a profiled run's figures are not results.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    command = ["py-spy", "record", "--pid", str(pid), "--format", "raw", "--rate", "200"]
    command += ["--duration", str(int(args.warmup + args.seconds + 1)), "--output", str(out)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL)  # noqa: S603 - a fixed tool


def seed(url: URL, users: int, tasks_per_user: int, row_security: str) -> None:
    """Create the schema (*row_security*: on or off) and users x tasks_per_user tasks.

    Task g belongs to user g % users.
    """
    engine = create_db_engine(url.render_as_string(hide_password=False))
    try:
        make_schema(engine, row_security)
        # Seeded as the connecting role: rows of every user, past the row-level policy.
        with engine.begin() as conn:
            conn.execution_options(**CONNECTING_ROLE)
            conn.execute(
                text(
                    "INSERT INTO tasks (user_id, title, description, complete, created_at, "
                    "updated_at) SELECT 'u' || (g % :users), 'task ' || g, NULL, g % 3 = 0, "
                    "now(), now() FROM generate_series(1, :n) AS g ORDER BY g"
                ),
                {"users": users, "n": users * tasks_per_user},
            )
            first = conn.execute(text("select user_id from tasks where id = 1")).scalar_one()
            if first != f"u{1 % users}":
                raise RuntimeError("seeded ids do not start at 1")
    finally:
        engine.dispose()
    plain = create_engine(url, isolation_level="AUTOCOMMIT")  # VACUUM: no bounds prefix
    try:
        with plain.connect() as conn:
            conn.execute(text("VACUUM ANALYZE tasks"))
    finally:
        plain.dispose()


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Return the median of each figure over *runs* and the most new connections of one."""
    keys = ("rps", "p50_ms", "p99_ms", "server_cpu_us_per_request")
    summary: dict[str, Any] = {key: statistics.median(run[key] for run in runs) for key in keys}
    summary["new_server_connections_max"] = max(run["new_server_connections"] for run in runs)
    summary["runs"] = runs
    return summary


def report(results: dict[str, Any]) -> str:
    """Render *results* as Markdown."""
    meta = results["meta"]
    lines = [
        "# HTTP benchmark: the README's FastAPI service vs hand-written psycopg_pool",
        "",
        f"{meta['date']}, Python {meta['python']}, {meta['machine']}; uvicorn 1 worker on "
        f"loopback, {meta['concurrency']} keep-alive connections, {meta['seconds']} s "
        f"measured per run after {meta['warmup']} s warm-up, {meta['rounds']} runs per side "
        f"alternated; {meta['users']} users x {meta['tasks_per_user']} tasks. Medians over "
        "the runs; new connections: the most one run opened (its server's whole life).",
        "",
        "| scenario | side | req/s | ratio to floor | p50 ms | p99 ms | server CPU us/req "
        "| new connections |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for scenario in meta["scenarios"]:
        floor = results[scenario].get("floor", {}).get("rps")
        for side, s in results[scenario].items():
            ratio = f"{s['rps'] / floor:.2f}x" if floor and side != "floor" else "1"
            lines.append(
                f"| {scenario} | {side} | {s['rps']:.0f} | {ratio} | {s['p50_ms']:.2f} | "
                f"{s['p99_ms']:.2f} | {s['server_cpu_us_per_request']:.0f} | "
                f"{s['new_server_connections_max']} |"
            )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=5, help="measured per run (5)")
    parser.add_argument("--warmup", type=float, default=1, help="warm-up per run (1)")
    parser.add_argument("--rounds", type=int, default=2, help="runs per side and scenario (2)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--tasks-per-user", type=int, default=1000)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--sides", default=",".join(SIDES), help="package, floor, queuepool")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="report folder")
    parser.add_argument(
        "--row-security",
        choices=("on", "off"),
        default="on",
        help="on: the database migrated to head, the policy in force (default); off: init_db",
    )
    parser.add_argument(
        "--profile", type=Path, help="also write py-spy folded stacks of each server run here"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the HTTP benchmark, print the report and write it to the output folder."""
    args = parse_args(argv)
    server = normalize_database_url(os.environ.get("TEST_DATABASE_URL") or DEFAULT_URL)
    if not is_local_host(server):
        raise SystemExit("the HTTP benchmark only runs against a server on this machine")
    scenarios = [s for s in args.scenarios.split(",") if s]
    sides = tuple(s for s in args.sides.split(",") if s)
    results: dict[str, Any] = {
        "meta": {
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "python": platform.python_version(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "concurrency": args.concurrency,
            "seconds": args.seconds,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "users": args.users,
            "tasks_per_user": args.tasks_per_user,
            "scenarios": scenarios,
            "sides": sides,
        }
    }
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    try:
        with scratch_database(server) as url:
            seed(url, args.users, args.tasks_per_user, args.row_security)
            text_url = url.render_as_string(hide_password=False)
            for scenario in scenarios:
                runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
                for round_ in range(args.rounds):
                    order = sides if round_ % 2 == 0 else sides[::-1]
                    for side in order:
                        run = run_once(
                            side, scenario, text_url, admin, database=url.database or "", args=args
                        )
                        print(f"{scenario:7} {side:8} {json.dumps(run)}", flush=True)
                        runs[side].append(run)
                results[scenario] = {side: summarise(runs[side]) for side in sides}
    finally:
        admin.dispose()
    write_report(args.out, "http", report(results), results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
