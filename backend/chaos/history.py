"""The soak's history and the checker that judges it from the history alone.

Every call a worker makes is recorded as a :class:`Call`: what it asked, when it
started and ended, what came back or which error it raised, and whether the package
said its outcome is unknown (a write lost in flight). After the soak the final table
is read once; :func:`check` then proves, from those records only:

- every acknowledged create is present exactly once (unless deleted), a create that
  failed definitely is absent, and an unknown one is present at most once;
- every acknowledged delete is gone;
- each task's final state is its last acknowledged write, or a write at least as
  late whose outcome the caller was told is unknown;
- no call returned or changed another user's task;
- only the package's documented errors reached callers;
- no pooled connection leaked, and no call took longer than its bound plus the
  longest server pause.

Identity: a create writes a unique ``description`` that updates never change, and
every write sets a unique ``title``; so the final row says which write made it.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "DOCUMENTED_ERRORS",
    "Call",
    "Fault",
    "Seen",
    "Verdict",
    "Write",
    "check",
    "report",
]

# What may reach a caller of the repository during an outage (the contract's list).
DOCUMENTED_ERRORS: Final = frozenset(
    {"DatabaseTimeoutError", "DatabaseUnavailableError", "TodoBackendError"}
)


@dataclass(frozen=True, slots=True)
class Seen:
    """A task as a call returned it, or as the final table holds it."""

    id: int
    user: str
    title: str
    token: str  # the description its create wrote: who made this row


@dataclass(frozen=True, slots=True)
class Write:
    """One write a call asked for: a create (task_id None) or an update, by title."""

    title: str
    task_id: int | None = None
    token: str | None = None  # creates only


@dataclass(frozen=True, slots=True)
class Call:
    """One repository call (or ``atomic()`` block) and what the caller saw."""

    worker: str
    endpoint: str
    op: str
    user: str
    start: float
    end: float
    writes: tuple[Write, ...] = ()
    deletes: tuple[int, ...] = ()
    reads: tuple[int, ...] = ()  # task ids asked for by get/update/delete
    returned: tuple[Seen, ...] = ()
    deleted: bool | None = None
    error: str | None = None  # exception type name
    unknown: bool = False  # the package said the outcome is unknown (lost in flight)
    stalled: float = 0.0  # seconds the caller itself slept inside the call
    reason: str = ""  # which bound, or how the connection failed, for the report

    @property
    def ok(self) -> bool:
        """The call returned normally."""
        return self.error is None

    @property
    def applied_maybe(self) -> bool:
        """Its writes may have been stored: acknowledged, or outcome unknown."""
        return self.ok or self.unknown

    @property
    def seconds(self) -> float:
        """How long the call took, not counting the caller's own stall."""
        return self.end - self.start - self.stalled


@dataclass(frozen=True, slots=True)
class Fault:
    """One fault the chaos thread injected."""

    kind: str
    start: float
    end: float


@dataclass
class Verdict:
    """What :func:`check` found: violations (empty means the history is clean)."""

    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No violation."""
        return not self.violations

    def add(self, rule: str, detail: str) -> None:
        """Record a violation of *rule*."""
        self.violations.append(f"{rule}: {detail}")


def _created_ids(calls: Sequence[Call]) -> dict[str, Seen]:
    """Map each create token to the task its acknowledged create returned."""
    made: dict[str, Seen] = {}
    for call in calls:
        for seen in call.returned:
            tokens = {w.token for w in call.writes if w.token is not None}
            if seen.token in tokens:
                made[seen.token] = seen
    return made


def check(
    calls: Sequence[Call],
    final: Iterable[Seen],
    *,
    bound: float,
    pauses: Sequence[Fault] = (),
    pools_checked_out: Mapping[str, int] | None = None,
) -> Verdict:
    """Judge *calls* against the *final* table; see the module docstring for the rules.

    *bound* is the longest a call may take without a pause; the longest pause in
    *pauses* is added to it. *pools_checked_out* maps each engine to the connections
    still checked out after the workers stopped.
    """
    verdict = Verdict()
    rows = list(final)
    by_token: dict[str, list[Seen]] = defaultdict(list)
    for row in rows:
        by_token[row.token].append(row)
    by_id = {row.id: row for row in rows}
    created = _created_ids(calls)
    owner = {seen.id: seen.user for seen in created.values()}
    for row in rows:
        owner.setdefault(row.id, row.user)

    # Which ids may have been deleted, and which surely were.
    maybe_deleted: set[int] = set()
    surely_deleted: set[int] = set()
    for call in calls:
        if call.applied_maybe:
            maybe_deleted.update(call.deletes)
        if call.ok and call.deleted:
            surely_deleted.update(call.deletes)

    _check_creates(verdict, calls, by_token, created, maybe_deleted)
    for task_id in sorted(surely_deleted & set(by_id)):
        verdict.add("acknowledged delete", f"task {task_id} was deleted but is still there")
    _check_final_states(verdict, calls, rows)
    _check_isolation(verdict, calls, rows, owner, created)
    _check_errors_and_time(verdict, calls, bound, pauses)
    for engine, count in sorted((pools_checked_out or {}).items()):
        if count:
            verdict.add("pool leak", f"{engine}: {count} connection(s) still checked out")
    return verdict


def _check_creates(
    verdict: Verdict,
    calls: Sequence[Call],
    by_token: Mapping[str, list[Seen]],
    created: Mapping[str, Seen],
    maybe_deleted: set[int],
) -> None:
    asked: set[str] = set()
    for call in calls:
        for write in call.writes:
            if write.token is None:
                continue
            asked.add(write.token)
            present = len(by_token.get(write.token, []))
            if present > 1:
                verdict.add("duplicate", f"create {write.token!r} is stored {present} times")
            elif call.ok:
                made = created.get(write.token)
                gone = made is not None and made.id in maybe_deleted
                if present == 0 and not gone:
                    verdict.add("lost create", f"acknowledged create {write.token!r} is missing")
            elif not call.unknown and present:
                verdict.add(
                    "half-written", f"create {write.token!r} failed ({call.error}) but is stored"
                )
    for token in sorted(set(by_token) - asked):
        verdict.add("phantom", f"a stored task has token {token!r} that no create wrote")


def _check_final_states(verdict: Verdict, calls: Sequence[Call], rows: Sequence[Seen]) -> None:
    # Per task: every write by its owner that may have set its title, with the call's
    # interval. A write by another user can never be a valid final state.
    owner = {row.id: row.user for row in rows}
    candidates: dict[int, list[tuple[str, float, float, bool]]] = defaultdict(list)
    token_of_create: dict[str, Call] = {}
    writer: dict[str, str] = {}
    for call in calls:
        for write in call.writes:
            writer[write.title] = call.user
            if write.token is not None:
                token_of_create[write.token] = call
        if not call.applied_maybe:
            continue
        returned = {seen.id for seen in call.returned}
        for write in call.writes:
            if write.task_id is None:
                continue
            # An acknowledged update that found no task changed nothing.
            if call.ok and write.task_id not in returned:
                continue
            if owner.get(write.task_id, call.user) != call.user:
                continue
            candidates[write.task_id].append((write.title, call.start, call.end, call.ok))
    for row in rows:
        create = token_of_create.get(row.token)
        options = list(candidates.get(row.id, []))
        if create is not None and create.applied_maybe:
            title = next(w.title for w in create.writes if w.token == row.token)
            options.append((title, create.start, create.end, create.ok))
        acknowledged = [opt for opt in options if opt[3]]
        allowed = {
            title
            for title, _start, end, _ok in options
            if not any(later_start > end for _t, later_start, _e, _o in acknowledged)
        }
        if row.title not in allowed and writer.get(row.title, row.user) != row.user:
            verdict.add(
                "cross-user",
                f"task {row.id} of {row.user!r} holds {row.title!r}, "
                f"written by {writer[row.title]!r}",
            )
        elif row.title not in allowed:
            written = {title for title, *_ in options}
            why = (
                "was never written by a call that may have succeeded"
                if row.title not in written
                else "was overwritten by a later acknowledged write"
            )
            verdict.add(
                "lost write",
                f"task {row.id} holds {row.title!r}, which {why} (allowed: {sorted(allowed)})",
            )


def _check_isolation(
    verdict: Verdict,
    calls: Sequence[Call],
    rows: Sequence[Seen],
    owner: Mapping[int, str],
    created: Mapping[str, Seen],
) -> None:
    for call in calls:
        for seen in call.returned:
            if seen.user != call.user:
                verdict.add(
                    "cross-user",
                    f"{call.op} by {call.user!r} returned task {seen.id} of {seen.user!r}",
                )
        if call.ok and call.deleted:
            for task_id in call.deletes:
                if owner.get(task_id, call.user) != call.user:
                    verdict.add(
                        "cross-user",
                        f"delete by {call.user!r} removed task {task_id} of {owner[task_id]!r}",
                    )
    for row in rows:
        made = created.get(row.token)
        if made is not None and made.user != row.user:
            verdict.add("cross-user", f"task {row.id} moved from {made.user!r} to {row.user!r}")


def _check_errors_and_time(
    verdict: Verdict, calls: Sequence[Call], bound: float, pauses: Sequence[Fault]
) -> None:
    longest_pause = max((p.end - p.start for p in pauses), default=0.0)
    limit = bound + longest_pause
    for call in calls:
        if call.error is not None and call.error not in DOCUMENTED_ERRORS:
            verdict.add("undocumented error", f"{call.op} raised {call.error}")
        if call.seconds > limit:
            verdict.add(
                "too slow",
                f"{call.op} via {call.endpoint} took {call.seconds:.2f} s "
                f"> {bound:.1f} s bound + {longest_pause:.1f} s pause",
            )


def report(
    calls: Sequence[Call],
    faults: Sequence[Fault],
    verdict: Verdict,
    *,
    duration: float,
    bound: float,
    final_rows: int,
) -> str:
    """One screen: operations by kind, faults, errors by type, the slowest call, verdict."""
    lines = [f"chaos soak: {duration:.0f} s, {len(calls)} calls, {final_rows} tasks at the end"]
    ops: Counter[str] = Counter(call.op for call in calls)
    failed: Counter[str] = Counter(call.op for call in calls if not call.ok)
    lines.append("operations (failed):")
    lines += [f"  {op:<10} {n:>7} ({failed[op]})" for op, n in sorted(ops.items())]
    by_endpoint = Counter(call.endpoint for call in calls)
    lines.append("endpoints: " + ", ".join(f"{k} {v}" for k, v in sorted(by_endpoint.items())))
    kinds: Counter[str] = Counter(fault.kind for fault in faults)
    lines.append("faults injected: " + (", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))))
    errors: Counter[str] = Counter(
        f"{call.error} ({call.reason})" if call.reason else call.error
        for call in calls
        if call.error is not None
    )
    lines.append("errors by type:")
    lines += [f"  {name:<58} {n:>6}" for name, n in errors.most_common()] or ["  none"]
    pauses = [f.end - f.start for f in faults if f.kind == "pause server"]
    if calls:
        slowest = max(calls, key=lambda c: c.seconds)
        outcome = slowest.error or "ok"
        lines.append(
            f"slowest call: {slowest.op} via {slowest.endpoint}, {slowest.seconds:.2f} s "
            f"({outcome}); bound {bound:.1f} s + longest pause {max(pauses, default=0):.1f} s"
        )
    if verdict.ok:
        lines.append("verdict: PASS (no violation)")
    else:
        lines.append(f"verdict: FAIL ({len(verdict.violations)} violations)")
        lines += [f"  {v}" for v in verdict.violations[:20]]
    return "\n".join(lines)
