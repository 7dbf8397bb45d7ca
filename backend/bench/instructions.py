"""Instructions per request: the HTTP benchmark's two services, counted by cachegrind.

Run with ``nox -s bench -- --instructions [options]`` or
``python backend/bench/instructions.py``. Wall-clock throughput on a shared machine
varies by more than the differences worth measuring (runs of the same code differ by
±15%); the number of user-space instructions a request costs does not. Each side of
:mod:`bench.http_apps` (``package``: the README's service; ``floor``: the same API
hand-written on psycopg_pool) is driven in-process through its ASGI interface (no
sockets, no HTTP parsing: what remains is the framework and the data layer), 32
requests at a time, on the same seeded scratch database as the HTTP benchmark, under
``valgrind --tool=cachegrind`` twice: for ``--small`` and for ``--large`` requests. The
difference of the two counts over the difference in requests is one request's
instructions, start-up and shutdown excluded. The requests are drawn from a fixed
seed, the same for both sides, and hash randomisation is off, so a rerun on the same
code gives the same figures to within a fraction of a percent.

It needs ``valgrind`` on the PATH (Debian: ``apt-get install valgrind``). The report
goes to ``docs/benchmarks/instructions.md`` and ``.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from sqlalchemy.engine import URL

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.burst import scratch_database
from bench.common import write_report
from todo_backend.config import normalize_database_url
from todo_backend.db import is_local_host

DEFAULT_URL: Final = "postgresql://postgres@127.0.0.1:5432/postgres"
OUT_DIR: Final = Path(__file__).resolve().parents[2] / "docs" / "benchmarks"
SIDES: Final = ("package", "floor")
SCENARIOS: Final = ("get", "list", "create", "update")
CONCURRENCY: Final = 32
_I_REFS: Final = re.compile(r"I\s+refs:\s+([\d,]+)")

Message = dict[str, Any]
Scope = dict[str, Any]


def _requests(scenario: str, count: int, users: int, tasks: int) -> list[tuple[Scope, bytes]]:
    """Return *count* ASGI requests of *scenario* on the seeded data, from a fixed seed."""
    rng = random.Random(20261207)  # noqa: S311 - a benchmark's request mix, not a secret
    made: list[tuple[Scope, bytes]] = []
    for _ in range(count):
        task_id = rng.randint(1, users * tasks)
        user = f"u{task_id % users}"
        method, path, query, body = "GET", f"/tasks/{task_id}", b"", b""
        if scenario == "list":
            user, path, query = f"u{rng.randrange(users)}", "/tasks", b"limit=50"
        elif scenario == "create":
            method, path = "POST", "/tasks"
            body = json.dumps({"title": f"new {rng.random():.6f}"}).encode()
        elif scenario == "update":
            method, body = "PATCH", json.dumps({"complete": rng.random() < 0.5}).encode()
        headers = [(b"host", b"bench"), (b"x-user", user.encode())]
        if body:
            headers += [(b"content-type", b"application/json")]
            headers += [(b"content-length", str(len(body)).encode())]
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": query,
            "headers": headers,
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8000),
        }
        made.append((scope, body))
    return made


async def _serve(app: Callable[..., Awaitable[None]], scope: Scope, body: bytes) -> int:
    """Send one request through *app*'s ASGI interface; return its status."""
    sent = False
    status = 0

    async def receive() -> Message:
        nonlocal sent
        if sent:  # the app waits for a disconnect only after its response
            await asyncio.sleep(3600)
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


async def _drive(side: str, scenario: str, count: int, users: int, tasks: int) -> None:
    """Serve *count* requests of *scenario* on *side*'s app, 32 at a time, and check them."""
    from bench import http_apps  # noqa: PLC0415 - after DATABASE_URL is set

    app = http_apps.package_app() if side == "package" else http_apps.floor_app()
    pending = _requests(scenario, count, users, tasks)
    expected = 201 if scenario == "create" else 200
    async with app.router.lifespan_context(app):
        queue = iter(pending)

        async def worker() -> None:
            for scope, body in queue:
                status = await _serve(app, scope, body)
                if status != expected:
                    raise RuntimeError(f"{side} answered {status} to {scope['method']}")

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


def _count(side: str, scenario: str, count: int, url: str, args: argparse.Namespace) -> int:
    """Run one child under cachegrind; return the instructions it executed."""
    env = {**os.environ, "DATABASE_URL": url, "PYTHONHASHSEED": "0"}
    with tempfile.TemporaryDirectory() as folder:
        command = [
            "valgrind",
            "--tool=cachegrind",
            "--cache-sim=no",
            f"--cachegrind-out-file={folder}/out",
            sys.executable,
            __file__,
            "--child",
            side,
            scenario,
            str(count),
            "--users",
            str(args.users),
            "--tasks-per-user",
            str(args.tasks_per_user),
        ]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)  # noqa: S603
    found = _I_REFS.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"{side} {scenario} x{count} failed:\n{done.stderr[-3000:]}")
    return int(found.group(1).replace(",", ""))


def report(results: dict[str, Any]) -> str:
    """Render *results* as Markdown."""
    meta = results["meta"]
    lines = [
        "# Instructions per request: the README's FastAPI service vs hand-written psycopg_pool",
        "",
        f"{meta['date']}, Python {meta['python']}, {meta['machine']}; in-process ASGI, "
        f"{CONCURRENCY} requests at a time, `valgrind --tool=cachegrind`; the difference of "
        f"{meta['small']} and {meta['large']} requests per side; {meta['users']} users x "
        f"{meta['tasks_per_user']} tasks, row-level security on.",
        "",
        "| scenario | package | floor | ratio |",
        "| --- | ---: | ---: | ---: |",
    ]
    for scenario in meta["scenarios"]:
        got = results[scenario]
        package, floor = got.get("package"), got.get("floor")
        ratio = f"{package / floor:.2f}x" if package and floor else "-"
        shown = [f"{value:,}" if value else "-" for value in (package, floor)]
        lines.append(f"| {scenario} | {shown[0]} | {shown[1]} | {ratio} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--small", type=int, default=320, help="requests of the short run")
    parser.add_argument("--large", type=int, default=3520, help="requests of the long run")
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--tasks-per-user", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="report folder")
    parser.add_argument("--no-write", action="store_true", help="print the report only")
    parser.add_argument("--child", nargs=3, metavar=("SIDE", "SCENARIO", "COUNT"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Count each side's instructions per request, print the report and write it."""
    args = parse_args(argv)
    if args.child:
        side, scenario, count = args.child
        asyncio.run(_drive(side, scenario, int(count), args.users, args.tasks_per_user))
        return 0
    if shutil.which("valgrind") is None:
        raise SystemExit("instructions per request need valgrind (apt-get install valgrind)")
    from bench.http_bench import seed  # noqa: PLC0415 - the HTTP benchmark's own seeding

    server = normalize_database_url(os.environ.get("TEST_DATABASE_URL") or DEFAULT_URL)
    if not is_local_host(server):
        raise SystemExit("the instruction counts only run against a server on this machine")
    scenarios = [s for s in args.scenarios.split(",") if s]
    sides = [s for s in args.sides.split(",") if s]
    results: dict[str, Any] = {
        "meta": {
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "python": platform.python_version(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "small": args.small,
            "large": args.large,
            "users": args.users,
            "tasks_per_user": args.tasks_per_user,
            "scenarios": scenarios,
        }
    }
    with scratch_database(server) as url:
        text_url = URL.render_as_string(url, hide_password=False)
        seed(url, args.users, args.tasks_per_user, "on")
        for scenario in scenarios:
            results[scenario] = {}
            for side in sides:
                small = _count(side, scenario, args.small, text_url, args)
                large = _count(side, scenario, args.large, text_url, args)
                per_request = round((large - small) / (args.large - args.small))
                results[scenario][side] = per_request
                print(f"{scenario:7} {side:8} {per_request:,} instructions/request", flush=True)
    text = report(results)
    if args.no_write:
        print(text)
    else:
        write_report(args.out, "instructions", text, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
