"""Chaos soak: many workers, many users, faults at random moments, a checked history.

``nox -s chaos -- --duration N`` (default 60 s). A throwaway PostgreSQL cluster and a
PgBouncer in transaction mode start on loopback. Worker threads call the repository
for several users, half through PgBouncer and half directly, each recording every
call it made and what came back (:mod:`chaos.history`). A chaos thread meanwhile
terminates backends, restarts PgBouncer, restarts the server (fast or immediate),
holds row locks past the lock bound and pauses the server (SIGSTOP, then SIGCONT).
Some workers also stall inside ``atomic()`` blocks past the idle bound. At the end
the final table is read once and the checker judges the history; the report fits
one screen and the exit status is 1 on any violation. ``--save PATH`` also writes the
recorded history there; ``--judge PATH`` judges a saved history again, without servers.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from sqlalchemy import Engine, create_engine, text
from sqlmodel import Session

from todo_backend.config import Settings
from todo_backend.db import create_db_engine, init_db
from todo_backend.errors import DatabaseTimeoutError, DatabaseUnavailableError, TodoBackendError
from todo_backend.models import Task, TaskCreate, TaskUpdate
from todo_backend.repository import TaskRepository

# Run as a script, this file's folder is on sys.path but its package is not.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.fix_servers import PgBouncer, PgCluster, ServerAccount

from chaos.history import Call, Fault, Recording, Seen, Write
from chaos.servers import pause, resume, start_bouncer, start_cluster

USERS: Final = tuple(f"user{i}" for i in range(6))
WORKERS: Final = 12
# Bounds of the soak's engines, short so that faults make them fire often.
BOUNDS: Final = Settings(
    database_url="postgresql://placeholder@127.0.0.1/postgres",
    pool_size=3,
    max_overflow=2,
    pool_timeout=3,
    connect_timeout=3,
    statement_timeout=2,
    lock_timeout=0.5,
    idle_in_transaction_timeout=1.5,
)
PGBOUNCER_WAIT: Final = 3  # PgBouncer's query_wait_timeout and server_connect_timeout
PGBOUNCER_POOL: Final = 4
MAX_PAUSE: Final = 3.0
CROSS_USER_SHARE: Final = 0.1  # calls aimed at a task of any user, not only the caller's
STALL_SHARE: Final = 0.02  # atomic blocks whose caller stalls past the idle bound
LIST_LIMIT: Final = 20


def call_bound() -> float:
    """Return the longest a call may take while the server runs, from the soak's bounds.

    A call waits at most ``pool_timeout`` for a pooled connection and
    ``connect_timeout`` to open one; behind PgBouncer its query may queue up to
    ``query_wait_timeout`` for a server connection; each of its statements (an atomic
    block sends up to three with COMMIT) runs at most ``statement_timeout``; a read
    cut mid-flight is tried once more on a new connection. One second of slack covers
    the machine's scheduling noise.
    """
    return (
        BOUNDS.pool_timeout
        + 2 * (BOUNDS.connect_timeout + PGBOUNCER_WAIT)
        + 3 * BOUNDS.statement_timeout
        + 1.0
    )


@dataclass
class Registry:
    """Ids of acknowledged creates per user, shared by the workers to aim their calls."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    ids: dict[str, list[int]] = field(default_factory=lambda: {u: [] for u in USERS})

    def add(self, user: str, task_id: int) -> None:
        """Remember a created task."""
        with self.lock:
            self.ids[user].append(task_id)

    def pick(self, rng: random.Random, user: str) -> int:
        """Return a task id of *user*, or of anyone now and then (a cross-user attempt)."""
        with self.lock:
            if rng.random() < CROSS_USER_SHARE:
                pool = list(itertools.chain.from_iterable(self.ids.values()))
            else:
                pool = self.ids[user]
            return rng.choice(pool) if pool else rng.randrange(1, 1000)


def _seen(task: Task | None) -> tuple[Seen, ...]:
    if task is None:
        return ()
    return (Seen(task.id or 0, task.user_id, task.title, task.description or ""),)


@dataclass
class _Outcome:
    """What one call asked and what came back, filled in while it runs."""

    op: str
    user: str
    start: float
    end: float = 0.0
    writes: tuple[Write, ...] = ()
    deletes: tuple[int, ...] = ()
    reads: tuple[int, ...] = ()
    returned: tuple[Seen, ...] = ()
    deleted: bool | None = None
    error: str | None = None
    unknown: bool = False
    stalled: float = 0.0
    reason: str = ""
    count: int | None = None
    limit: int | None = None


def _reason(err: Exception, *, unknown: bool) -> str:
    if isinstance(err, DatabaseTimeoutError):
        return err.bound
    if unknown:
        return "lost in flight, outcome unknown"
    if isinstance(err, DatabaseUnavailableError):
        return "cannot connect"
    if type(err) is TodoBackendError:
        return "atomic block failed"
    return ""


class Worker:
    """One API worker: random calls for random users, every one recorded."""

    def __init__(
        self, name: str, endpoint: str, engine: Engine, registry: Registry, seed: int
    ) -> None:
        self.name = name
        self.endpoint = endpoint
        self.engine = engine
        self.registry = registry
        self.rng = random.Random(seed)  # noqa: S311 - picks calls and faults, not secrets
        self.calls: list[Call] = []
        self._serial = itertools.count()

    def _token(self) -> str:
        return f"{self.name}-{next(self._serial)}"

    def run(self, deadline: float, max_calls: int) -> None:
        """Call until *deadline* or *max_calls*, whichever comes first."""
        ops: list[tuple[Callable[[TaskRepository, str], Call], int]] = [
            (self._create, 25),
            (self._update, 25),
            (self._get, 15),
            (self._list, 10),
            (self._delete, 8),
            (self._count, 5),
            (self._atomic, 12),
        ]
        kinds, weights = zip(*ops, strict=True)
        for _ in range(max_calls):
            if time.monotonic() >= deadline:
                return
            op = self.rng.choices(kinds, weights)[0]
            user = self.rng.choice(USERS)
            if self.rng.random() < 0.5:
                # Bound to the engine, as an API request's repository is.
                self.calls.append(op(TaskRepository(self.engine), user))
                continue
            with Session(self.engine, expire_on_commit=False) as session:
                self.calls.append(op(TaskRepository(session), user))

    @contextmanager
    def _recorded(self, op: str, user: str, **what: Any) -> Iterator[_Outcome]:
        """Time the block and record its outcome; the caller turns it into a Call."""
        outcome = _Outcome(op=op, user=user, start=time.monotonic(), **what)
        try:
            yield outcome
        except Exception as err:  # noqa: BLE001 - every error is recorded and judged
            outcome.error = type(err).__name__
            outcome.unknown = isinstance(err, DatabaseUnavailableError) and "in flight" in str(err)
            outcome.reason = _reason(err, unknown=outcome.unknown)
        outcome.end = time.monotonic()

    def _call(self, out: _Outcome) -> Call:
        return Call(
            worker=self.name,
            endpoint=self.endpoint,
            op=out.op,
            user=out.user,
            start=out.start,
            end=out.end,
            writes=out.writes,
            deletes=out.deletes,
            reads=out.reads,
            returned=out.returned,
            deleted=out.deleted,
            error=out.error,
            unknown=out.unknown,
            stalled=out.stalled,
            reason=out.reason,
            count=out.count,
            limit=out.limit,
        )

    def _create(self, repo: TaskRepository, user: str) -> Call:
        token = self._token()
        write = Write(title=f"t:{token}", token=token)
        with self._recorded("create", user, writes=(write,)) as out:
            task = repo.create(user, TaskCreate(title=write.title, description=token))
            out.returned = _seen(task)
            self.registry.add(user, task.id or 0)
        return self._call(out)

    def _update(self, repo: TaskRepository, user: str) -> Call:
        task_id = self.registry.pick(self.rng, user)
        write = Write(title=f"u:{self._token()}", task_id=task_id)
        change = TaskUpdate(title=write.title, complete=self.rng.random() < 0.5)
        with self._recorded("update", user, writes=(write,), reads=(task_id,)) as out:
            out.returned = _seen(repo.update(user, task_id, change))
        return self._call(out)

    def _get(self, repo: TaskRepository, user: str) -> Call:
        task_id = self.registry.pick(self.rng, user)
        with self._recorded("get", user, reads=(task_id,)) as out:
            out.returned = _seen(repo.get(user, task_id))
        return self._call(out)

    def _list(self, repo: TaskRepository, user: str) -> Call:
        with self._recorded("list", user, limit=LIST_LIMIT) as out:
            tasks = repo.list(user, limit=LIST_LIMIT)
            out.returned = tuple(s for t in tasks for s in _seen(t))
        return self._call(out)

    def _count(self, repo: TaskRepository, user: str) -> Call:
        with self._recorded("count", user) as out:
            out.count = repo.count(user)
        return self._call(out)

    def _delete(self, repo: TaskRepository, user: str) -> Call:
        task_id = self.registry.pick(self.rng, user)
        with self._recorded("delete", user, deletes=(task_id,), reads=(task_id,)) as out:
            out.deleted = repo.delete(user, task_id)
        return self._call(out)

    def _atomic(self, repo: TaskRepository, user: str) -> Call:
        token = self._token()
        task_id = self.registry.pick(self.rng, user)
        created = Write(title=f"t:{token}", token=token)
        updated = Write(title=f"u:{self._token()}", task_id=task_id)
        stall = BOUNDS.idle_in_transaction_timeout + 0.5 if self.rng.random() < STALL_SHARE else 0.0
        with self._recorded(
            "atomic", user, writes=(created, updated), reads=(task_id,), stalled=stall
        ) as out:
            with repo.atomic():
                task = repo.create(user, TaskCreate(title=created.title, description=token))
                time.sleep(stall)  # a caller waiting on something slow inside the block
                changed = repo.update(user, task_id, TaskUpdate(title=updated.title))
            out.returned = _seen(task) + _seen(changed)
            self.registry.add(user, task.id or 0)
        return self._call(out)


class Chaos:
    """Injects one fault at a time at random moments until its deadline."""

    def __init__(
        self,
        cluster: PgCluster,
        bouncer: PgBouncer,
        registry: Registry,
        seed: int,
    ) -> None:
        self.cluster = cluster
        self.bouncer = bouncer
        self.registry = registry
        self.rng = random.Random(seed)  # noqa: S311 - picks calls and faults, not secrets
        self.faults: list[Fault] = []
        self.errors: list[str] = []
        url = cluster.url()
        # The chaos thread's own connections die with every restart and termination;
        # pre-ping replaces them (a round trip the injector can afford).
        self.admin = create_engine(
            url,
            isolation_level="AUTOCOMMIT",
            pool_pre_ping=True,
            connect_args={"connect_timeout": 5},
        )
        self.locker = create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": 5})

    def run(self, deadline: float, max_faults: int) -> None:
        """Inject faults until *deadline* (or *max_faults*); never leave the server paused."""
        faults: list[tuple[str, Callable[[], None]]] = [
            ("terminate backends", self._terminate),
            ("restart pgbouncer", self.bouncer.restart),
            ("restart server", self._restart_server),
            ("hold row locks", self._hold_locks),
            ("pause server", self._pause),
        ]
        # Each round injects every kind once, in a random order: all kinds get their turn.
        rounds = itertools.chain.from_iterable(
            self.rng.sample(faults, len(faults)) for _ in itertools.count()
        )
        for kind, inject in itertools.islice(rounds, max_faults):
            wait = self.rng.uniform(0.5, 3.0)
            if time.monotonic() + wait >= deadline:
                return
            time.sleep(wait)
            start = time.monotonic()
            try:
                inject()
            except Exception as err:  # noqa: BLE001 - a fault that failed is reported
                self.errors.append(f"{kind}: {type(err).__name__}: {err}")
            self.faults.append(Fault(kind, start, time.monotonic()))

    def _terminate(self) -> None:
        with self.admin.connect() as conn:
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
                )
            )

    def _restart_server(self) -> None:
        self.cluster.restart(self.rng.choice(["fast", "immediate"]))

    def _hold_locks(self) -> None:
        # Every task of one user: a sixth of the writes meet a locked row meanwhile.
        with self.locker.connect() as conn, conn.begin():
            conn.execute(
                text("SELECT id FROM tasks WHERE user_id = :user FOR UPDATE"),
                {"user": self.rng.choice(USERS)},
            )
            time.sleep(BOUNDS.lock_timeout * 4)

    def _pause(self) -> None:
        pids = pause(self.cluster)
        try:
            time.sleep(self.rng.uniform(1.0, MAX_PAUSE))
        finally:
            resume(pids)

    def close(self) -> None:
        """Dispose the admin engines."""
        self.admin.dispose()
        self.locker.dispose()


def _final_rows(cluster: PgCluster) -> list[Seen]:
    engine = create_engine(cluster.url(), connect_args={"connect_timeout": 10})
    try:
        for attempt in range(30):  # the server may still be recovering from the last fault
            try:
                with engine.connect() as conn:
                    rows = conn.execute(
                        text("SELECT id, user_id, title, description FROM tasks")
                    ).all()
                return [Seen(r.id, r.user_id, r.title, r.description or "") for r in rows]
            except Exception:
                if attempt == 29:
                    raise
                time.sleep(1)
        raise AssertionError("unreachable")
    finally:
        engine.dispose()


def _engine(url: str) -> Engine:
    return create_db_engine(dataclasses.replace(BOUNDS, database_url=url))


def soak(duration: float, seed: int, save: Path | None = None) -> int:
    """Run the soak for *duration* seconds; print the report; return the exit status.

    With *save*, the recorded history is written there first (:class:`Recording`).
    """
    run_as = ServerAccount.pick()
    cluster = start_cluster(run_as)
    bouncer = start_bouncer(cluster, run_as, pool_size=PGBOUNCER_POOL, wait_seconds=PGBOUNCER_WAIT)
    direct_url = cluster.url().render_as_string(hide_password=False)
    engines = {
        "direct": _engine(direct_url),
        "pgbouncer": _engine(bouncer.url("postgres").render_as_string(hide_password=False)),
    }
    init_db(engines["direct"])
    registry = Registry()
    chaos = Chaos(cluster, bouncer, registry, seed)
    workers = [
        Worker(f"w{i}", endpoint, engines[endpoint], registry, seed * 1000 + i)
        for i, endpoint in zip(range(WORKERS), itertools.cycle(engines), strict=False)
    ]
    started = time.monotonic()
    deadline = started + duration
    threads = [
        threading.Thread(target=w.run, args=(deadline, 1_000_000), name=w.name, daemon=True)
        for w in workers
    ]
    chaos_thread = threading.Thread(
        target=chaos.run, args=(deadline, 10_000), name="chaos", daemon=True
    )
    hung: list[str] = []
    try:
        for thread in [*threads, chaos_thread]:
            thread.start()
        chaos_thread.join(timeout=duration + 120)
        for thread in threads:
            thread.join(timeout=max(1.0, deadline + call_bound() + MAX_PAUSE - time.monotonic()))
        hung = [t.name for t in [*threads, chaos_thread] if t.is_alive()]
        elapsed = time.monotonic() - started
        final = _final_rows(cluster)
        checked_out = {name: engine.pool.checkedout() for name, engine in engines.items()}  # type: ignore[attr-defined]
        recording = Recording(
            calls=[call for worker in workers for call in worker.calls],
            final=final,
            faults=chaos.faults,
            duration=elapsed,
            bound=call_bound(),
            pools_checked_out=checked_out,
            problems=[("hung", f"thread {name} did not finish") for name in hung]
            + [("fault injection", error) for error in chaos.errors],
        )
    finally:
        chaos.close()
        for engine in engines.values():
            engine.dispose()
        bouncer.destroy()
        cluster.destroy()
    if save is not None:
        recording.save(save)
    return judge(recording)


def judge(recording: Recording) -> int:
    """Judge *recording*, print its report, and return the exit status (1 on a violation)."""
    verdict = recording.judge()
    print(recording.report(verdict))
    return 0 if verdict.ok else 1


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the soak."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds (default 60)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: time)")
    parser.add_argument("--save", type=Path, help="also write the recorded history to this file")
    parser.add_argument(
        "--judge", type=Path, help="judge a history saved with --save instead of soaking"
    )
    args = parser.parse_args(argv)
    if args.judge is not None:
        return judge(Recording.load(args.judge))
    if args.duration <= 0:
        parser.error("--duration must be above 0")
    seed = args.seed if args.seed is not None else int(time.time())
    print(f"chaos soak: seed {seed}, {args.duration:.0f} s", flush=True)
    return soak(args.duration, seed, args.save)


if __name__ == "__main__":
    sys.exit(main())
