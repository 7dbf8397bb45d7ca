"""The soak's history and the checker that judges it from the history alone.

Every call a worker makes is recorded as a :class:`Call`: what it asked, when it
started and ended, what came back or which error it raised, and whether the package
said its outcome is unknown (a write lost in flight). After the soak the final table
is read once; :func:`check` then proves, from those records only, that a correct
store could have produced them:

- every create known to be stored (acknowledged, or seen by a read) is present exactly
  once at the end, unless a delete that could have removed it ran: one by the same
  owner, not over before the create began, that returned True or whose outcome is
  unknown. A create reported as not stored is never seen; an unknown one at most once;
- every acknowledged delete is gone, no task is deleted twice or before its create;
- every row a call returned, and every row of the final table (the last read), holds
  a title that a call which may have succeeded wrote to that very task, for its owner,
  begun before the read ended; never one a call reported as not stored; never one
  surely overwritten (by a write known to be stored that began after it and ended
  before the read began); never a task an acknowledged delete removed before the read;
- no call that found nothing (a get or update returning None, a delete returning
  False, a list leaving a task out, a count too low) missed a task of its caller that
  surely existed throughout the call; no count exceeds the tasks that may have existed;
- an ``atomic()`` block of unknown outcome is applied whole or not at all: once any
  of its writes is seen, all of them count as stored;
- no call returned or changed another user's task; only the package's documented
  errors reached callers; no pooled connection leaked, and no call took longer than
  its bound plus the longest server pause.

Time. An acknowledged call took effect between its start and its end. A call of
unknown outcome may take effect even after its caller saw the error (the server may
still run a statement it had received before the connection died), but not later
than *bound* plus the longest pause after its end, nor after a read that saw it.

Identity. A create writes a unique ``description`` (its token) that updates never
change, and every write sets a title no other write sets; so a row says which create
made it and which write set it last. Ids are never reused.
"""

from __future__ import annotations

import json
import math
from bisect import bisect_left, bisect_right
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

__all__ = [
    "DOCUMENTED_ERRORS",
    "Call",
    "Fault",
    "Recording",
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

_NEVER: Final = math.inf


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
    count: int | None = None  # what a count returned
    limit: int | None = None  # the page size a list asked for

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
    """What :func:`check` found: violations (empty means clean) and what it checked."""

    violations: list[str] = field(default_factory=list)
    checked: Counter[str] = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        """No violation."""
        return not self.violations

    def add(self, rule: str, detail: str) -> None:
        """Record a violation of *rule*."""
        self.violations.append(f"{rule}: {detail}")


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
    *pauses* is added to it (also how late an unknown write may land). *pools_checked_out*
    maps each engine to the connections still checked out after the workers stopped.
    """
    longest_pause = max((p.end - p.start for p in pauses), default=0.0)
    judge = _Judge(calls, list(final), late=bound + longest_pause)
    judge.run()
    verdict = judge.verdict
    _check_errors_and_time(verdict, calls, bound, pauses)
    for engine, count in sorted((pools_checked_out or {}).items()):
        if count:
            verdict.add("pool leak", f"{engine}: {count} connection(s) still checked out")
    return verdict


@dataclass(frozen=True, slots=True)
class _Read:
    """One row as a call returned it (``call`` its index), or as the final table holds it."""

    seen: Seen
    start: float
    end: float
    call: int | None  # None: the final table, read after every call ended


@dataclass(frozen=True, slots=True)
class _Stored:
    """A write known to have reached a task, at some moment between *lo* and *hi*."""

    call: int
    title: str
    lo: float
    hi: float


class _Present:
    """Tasks of one user that surely existed for a while, by id: what a read must see."""

    _BLOCK: Final = 64

    def __init__(self, spans: Iterable[tuple[int, float, float]]) -> None:
        self.spans = sorted(spans)  # (id, surely there from, until)
        self.ids = [task_id for task_id, _, _ in self.spans]
        block = self._BLOCK
        self.block_from = [
            min(since for _, since, _ in self.spans[k : k + block])
            for k in range(0, len(self.spans), block)
        ]
        starts = sorted((since, until) for _, since, until in self.spans)
        self.starts = [since for since, _ in starts]
        self.starts_until = [until for _, until in starts]
        self.untils = sorted(until for _, _, until in self.spans)

    def ids_above(self, floor: float, start: float, end: float) -> Iterator[int]:
        """Ids above *floor* of the tasks that surely existed from *start* to *end*."""
        k = bisect_right(self.ids, floor)
        while k < len(self.spans):
            if self.block_from[k // self._BLOCK] >= start:  # nothing there yet: skip it
                k = (k // self._BLOCK + 1) * self._BLOCK
                continue
            task_id, since, until = self.spans[k]
            if since < start and end <= until:
                yield task_id
            k += 1

    def how_many(self, start: float, end: float) -> int:
        """How many tasks surely existed from *start* to *end*."""
        # #{since < start and until >= end} = #{since < start} - #{until < end}
        # + #{start <= since and until < end}; the last have since in [start, end).
        inside = range(bisect_left(self.starts, start), bisect_left(self.starts, end))
        within = sum(1 for k in inside if self.starts_until[k] < end)
        return bisect_left(self.starts, start) - bisect_left(self.untils, end) + within


class _Judge:
    """The history indexed once, and every rule of the module docstring judged on it."""

    def __init__(self, calls: Sequence[Call], final: list[Seen], *, late: float) -> None:
        self.calls = calls
        self.final = final
        self.late = late
        self.verdict = Verdict()
        self.checked = self.verdict.checked
        self._reported: set[tuple[str, object]] = set()
        self.writers: dict[str, list[tuple[int, Write]]] = defaultdict(list)  # by title
        self.create_of: dict[str, tuple[int, Write]] = {}  # by token
        self.deletes_of: dict[int, list[int]] = defaultdict(list)  # by task id
        for i, call in enumerate(calls):
            for write in call.writes:
                self.writers[write.title].append((i, write))
                if write.token is None:
                    continue
                if write.token in self.create_of:
                    self._add("ambiguous history", f"token {write.token!r} is written twice")
                self.create_of.setdefault(write.token, (i, write))
            for task_id in call.deletes:
                self.deletes_of[task_id].append(i)
        self.reads = [
            _Read(seen, call.start, call.end, i)
            for i, call in enumerate(calls)
            for seen in call.returned
        ]
        self.reads += [_Read(row, _NEVER, _NEVER, None) for row in final]
        self._index_reads()
        self._index_tasks()

    # -- indexes ---------------------------------------------------------------------

    def _index_reads(self) -> None:
        """Learn from the reads which task each token made and which writes took effect."""
        self.seen_by: dict[int, float] = {}  # call -> end of the first read that saw it
        self.token_ids: dict[str, set[int]] = defaultdict(set)
        self.titles_seen: set[tuple[int, str]] = set()
        self.known_ids: set[int] = set()
        for read in self.reads:
            seen = read.seen
            self.known_ids.add(seen.id)
            self.titles_seen.add((seen.id, seen.title))
            made = self.create_of.get(seen.token)
            if made is not None:
                self._saw(made[0], read.end)
                self.token_ids[seen.token].add(seen.id)
            writers = self.writers.get(seen.title, ())
            if len(writers) == 1 and _targets(writers[0][1], seen):
                # (a title written twice would prove nothing about either write)
                self._saw(writers[0][0], read.end)
        self.id_of: dict[str, int] = {}
        made_by: dict[int, str] = {}
        for token, ids in sorted(self.token_ids.items()):
            if len(ids) > 1:
                self._add("duplicate", f"create {token!r} is stored as {len(ids)} tasks")
            task_id = min(ids)
            self.id_of[token] = task_id
            other = made_by.setdefault(task_id, token)
            if other != token:
                self._add("identity", f"task {task_id} was seen made by {other!r} and {token!r}")

    def _saw(self, call: int, when: float) -> None:
        self.seen_by[call] = min(self.seen_by.get(call, _NEVER), when)

    def _index_tasks(self) -> None:
        """Index each known task's owner, when it surely existed, and the writes it got."""
        self.made_by = {task_id: self.create_of[token][0] for token, task_id in self.id_of.items()}
        self.owner = {task_id: self.calls[i].user for task_id, i in self.made_by.items()}
        self.surely: dict[int, tuple[float, float]] = {}
        for task_id, i in self.made_by.items():
            if not self._stored(i):
                continue
            since = self._hi(i)
            until = min(
                (self.calls[d].start for d in self.deletes_of.get(task_id, ()) if self._removes(d)),
                default=_NEVER,
            )
            if since < until:
                self.surely[task_id] = (since, until)
        self.landed: dict[int, list[_Stored]] = defaultdict(list)
        for i, call in enumerate(self.calls):
            if not self._stored(i):
                continue
            for write in call.writes:
                target = write.task_id if write.token is None else self.id_of.get(write.token)
                if target is None or not self._update_landed(i, write, target):
                    continue
                self.landed[target].append(_Stored(i, write.title, call.start, self._hi(i)))

    def _stored(self, i: int) -> bool:
        """Tell whether the call's writes surely took effect: acknowledged, or unknown and seen."""
        call = self.calls[i]
        return call.ok or (call.unknown and i in self.seen_by)

    def _hi(self, i: int) -> float:
        """Return the latest moment a call's writes may have taken effect."""
        call = self.calls[i]
        end = call.end if call.ok else call.end + self.late
        return min(end, self.seen_by.get(i, _NEVER))

    def _removes(self, d: int) -> bool:
        """Tell whether the delete may have removed its task: the owner's, True or unknown."""
        delete = self.calls[d]
        owned = all(self.owner.get(task_id) == delete.user for task_id in delete.deletes)
        return owned and ((delete.ok and bool(delete.deleted)) or delete.unknown)

    def _update_landed(self, i: int, write: Write, task_id: int) -> bool:
        """Tell whether a write of a stored call surely reached *task_id* (a create does)."""
        call = self.calls[i]
        if write.token is not None:
            return True
        if call.ok:  # an acknowledged update that found no task changed nothing
            return any(s.id == task_id and s.title == write.title for s in call.returned)
        if (task_id, write.title) in self.titles_seen:
            return True
        # A block of unknown outcome seen stored through its other write: its update ran
        # inside the call, so it found the task if the task surely existed all along.
        return self.owner.get(task_id) == call.user and self._surely_there(task_id, call)

    def _surely_there(self, task_id: int, call: Call) -> bool:
        since, until = self.surely.get(task_id, (_NEVER, _NEVER))
        return since < call.start and call.end <= until

    def _add(self, rule: str, detail: str, *, key: object = None) -> None:
        if key is not None:
            if (rule, key) in self._reported:
                return
            self._reported.add((rule, key))
        self.verdict.add(rule, detail)

    def _where(self, read: _Read) -> str:
        if read.call is None:
            return "the final table"
        call = self.calls[read.call]
        return f"{call.op} by {call.user!r} at {call.start:.2f}-{call.end:.2f} s"

    def _what(self, i: int) -> str:
        call = self.calls[i]
        outcome = "ok" if call.ok else ("outcome unknown" if call.unknown else call.error)
        return f"{call.op} by {call.user!r} at {call.start:.2f}-{call.end:.2f} s ({outcome})"

    # -- the rules -------------------------------------------------------------------

    def run(self) -> None:
        """Apply every rule."""
        for read in self.reads:
            self._judge_read(read)
        self._judge_creates()
        self._judge_deletes()
        self._judge_not_found()
        self._judge_lists_and_counts()
        self._judge_isolation()
        unknown = [i for i, c in enumerate(self.calls) if c.unknown and c.writes]
        self.checked["unknown writes"] = len(unknown)
        self.checked["unknown writes seen stored"] = sum(1 for i in unknown if i in self.seen_by)
        self.checked["rows read"] = sum(1 for read in self.reads if read.call is not None)

    def _judge_read(self, read: _Read) -> None:
        seen, final = read.seen, read.call is None
        made = self.create_of.get(seen.token)
        if made is None:
            rule = "phantom" if final else "phantom read"
            self._add(
                rule,
                f"{self._where(read)}: task {seen.id} has token {seen.token!r}"
                " that no create wrote",
                key=seen.token,
            )
            return
        create = self.calls[made[0]]
        if not create.applied_maybe:
            rule = "half-written" if final else "unstored read"
            self._add(
                rule,
                f"create {seen.token!r} failed ({create.error}) but {self._where(read)} holds it",
                key=(seen.token, read.call),
            )
        elif create.start >= read.end:
            self._add(
                "phantom read",
                f"{self._where(read)} returned task {seen.id} "
                f"before its create began at {create.start:.2f} s",
            )
        if create.user != seen.user:
            self._add(
                "cross-user",
                f"task {seen.id} moved from {create.user!r} to {seen.user!r}",
                key=seen.id,
            )
        self._judge_title(read)
        for d in self.deletes_of.get(seen.id, ()):
            delete = self.calls[d]
            if delete.ok and delete.deleted and delete.end < read.start:
                if final:
                    detail = f"task {seen.id} was deleted but is still there"
                    self._add("acknowledged delete", detail)
                else:
                    detail = (
                        f"{self._where(read)} returned task {seen.id}, deleted by {self._what(d)}"
                    )
                    self._add("stale read", detail)
                break

    def _judge_title(self, read: _Read) -> None:
        seen = read.seen
        reasons = [self._cannot_explain(i, w, read) for i, w in self.writers.get(seen.title, ())]
        if any(why is None for why in reasons):
            return
        what = f"{self._where(read)}: task {seen.id} holds {seen.title!r}"
        if not reasons:
            rule = "lost write" if read.call is None else "phantom read"
            self._add(rule, f"{what}, which no call wrote")
            return
        found = [why for why in reasons if why is not None]
        rule, detail = next((w for w in found if w[0] == "cross-user"), found[0])
        self._add(rule, f"{what}, {detail}")

    def _cannot_explain(self, i: int, write: Write, read: _Read) -> tuple[str, str] | None:
        """Say why the write cannot be the one *read* saw, or return None if it can."""
        return self._misaimed(i, write, read) or self._overwritten(i, read)

    def _misaimed(self, i: int, write: Write, read: _Read) -> tuple[str, str] | None:
        call, seen, final = self.calls[i], read.seen, read.call is None
        wrong = "lost write" if final else "phantom read"
        if not call.applied_maybe:
            rule = "lost write" if final else "unstored read"
            return rule, f"written by {self._what(i)}: reported as not stored"
        if not _targets(write, seen):
            target = f"task {write.task_id}" if write.token is None else f"create {write.token!r}"
            return wrong, f"written to {target}"
        if call.user != seen.user:
            return "cross-user", f"written by {call.user!r}"
        if call.start >= read.end:
            return wrong, f"written by {self._what(i)}: after the read"
        if call.ok and write.token is None and not self._update_landed(i, write, seen.id):
            return wrong, f"written by {self._what(i)}, which found no task"
        return None

    def _overwritten(self, i: int, read: _Read) -> tuple[str, str] | None:
        seen, hi = read.seen, self._hi(i)
        for later in self.landed.get(seen.id, ()):
            if later.call == i or later.lo <= hi or later.hi >= read.start:
                continue
            block = self.calls[later.call]
            if block.unknown and (seen.id, later.title) not in self.titles_seen:
                # Known stored only because another write of its block was seen.
                return "half-applied block", (
                    f"but {self._what(later.call)} is seen stored, so its later "
                    f"{later.title!r} must be there: only part of the block applied"
                )
            rule = "lost write" if read.call is None else "stale read"
            return rule, f"overwritten by {later.title!r} of {self._what(later.call)}"
        return None

    def _judge_creates(self) -> None:
        in_final = {row.token for row in self.final}
        for token, (i, _write) in self.create_of.items():
            call = self.calls[i]
            self.checked["acknowledged creates"] += call.ok
            if token in in_final or not self._stored(i):
                continue
            if self._maybe_deleted(i, self.id_of.get(token)):
                self.checked["creates deleted"] += 1
                continue
            task = f" (task {self.id_of[token]})" if token in self.id_of else ""
            if call.ok:
                self._add("lost create", f"acknowledged create {token!r}{task} is missing")
            elif len(call.writes) > 1:
                self._add(
                    "half-applied block",
                    f"{self._what(i)} is seen stored, but its create {token!r}{task} is missing",
                )
            else:
                seen = self.seen_by[i]
                self._add(
                    "lost create",
                    f"create {token!r}{task} of unknown outcome, seen stored at "
                    f"{seen:.2f} s, is missing",
                )

    def _maybe_deleted(self, i: int, task_id: int | None) -> bool:
        """Tell whether a delete could have removed the task create *i* made (id unknown: any)."""
        create = self.calls[i]

        def could(d: int) -> bool:
            delete = self.calls[d]
            return (
                delete.user == create.user
                and ((delete.ok and bool(delete.deleted)) or delete.unknown)
                and self._hi(d) > create.start
            )

        if task_id is not None:
            return any(could(d) for d in self.deletes_of.get(task_id, ()))
        unseen = (d for d, c in enumerate(self.calls) if set(c.deletes) - self.known_ids)
        return any(could(d) for d in unseen)

    def _judge_deletes(self) -> None:
        for task_id, deletes in sorted(self.deletes_of.items()):
            acked = [d for d in deletes if self.calls[d].ok and self.calls[d].deleted]
            if len(acked) > 1:
                self._add("deleted twice", f"task {task_id} was deleted by {len(acked)} deletes")
            made = self.made_by.get(task_id)
            for d in acked:
                if made is not None and self.calls[d].end <= self.calls[made].start:
                    self._add(
                        "phantom delete",
                        f"{self._what(d)} removed task {task_id} before "
                        f"{self._what(made)} created it",
                    )

    def _judge_not_found(self) -> None:
        for call in self.calls:
            if not call.ok:
                continue
            asked = {*call.reads, *call.deletes}
            asked.update(w.task_id for w in call.writes if w.task_id is not None)
            for task_id in sorted(asked):
                owned = self.owner.get(task_id) == call.user and self._surely_there(task_id, call)
                self.checked["answers on tasks surely there"] += owned
                if any(s.id == task_id for s in call.returned):
                    continue
                if task_id in call.deletes and call.deleted:
                    continue
                self.checked["not found"] += 1
                if owned:
                    self._add(
                        "missed task",
                        f"{call.op} by {call.user!r} at {call.start:.2f}-{call.end:.2f} s "
                        f"found no task {task_id}, which surely existed then",
                    )

    def _judge_lists_and_counts(self) -> None:
        spans: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
        for known, (since, until) in self.surely.items():
            spans[self.owner[known]].append((known, since, until))
        present = {user: _Present(s) for user, s in spans.items()}
        nobody = _Present(())
        # The tasks a count may see: every create that may have been stored, from its
        # start until an acknowledged delete of it ended.
        born: dict[str, list[float]] = defaultdict(list)
        gone: dict[str, list[float]] = defaultdict(list)
        for token, (i, _write) in self.create_of.items():
            create = self.calls[i]
            if not create.applied_maybe:
                continue
            task_id = self.id_of.get(token)
            deletes = self.deletes_of.get(task_id, []) if task_id is not None else []
            ends = [
                self.calls[d].end
                for d in deletes
                if self.calls[d].ok and self.calls[d].deleted and self._removes(d)
            ]
            born[create.user].append(create.start)
            gone[create.user].append(max(min(ends, default=_NEVER), create.start))
        for values in (*born.values(), *gone.values()):
            values.sort()
        for call in self.calls:
            if not call.ok:
                continue
            tasks = present.get(call.user, nobody)
            if call.op == "list" and call.limit is not None:
                self.checked["lists"] += 1
                ids = {s.id for s in call.returned}
                floor: float = min(ids) if len(call.returned) >= call.limit else -_NEVER
                missing = [t for t in tasks.ids_above(floor, call.start, call.end) if t not in ids]
                if missing:
                    self._add(
                        "missed task",
                        f"list by {call.user!r} at {call.start:.2f}-{call.end:.2f} s left out "
                        f"task(s) {missing[:5]}, which surely existed then",
                    )
            if call.op == "count" and call.count is not None:
                self.checked["counts"] += 1
                least = tasks.how_many(call.start, call.end)
                most = bisect_left(born[call.user], call.end) - bisect_left(
                    gone[call.user], call.start
                )
                if not least <= call.count <= most:
                    self._add(
                        "wrong count",
                        f"count by {call.user!r} at {call.start:.2f}-{call.end:.2f} s returned "
                        f"{call.count}; between {least} and {most} tasks existed",
                    )

    def _judge_isolation(self) -> None:
        for call in self.calls:
            for seen in call.returned:
                if seen.user != call.user:
                    self._add(
                        "cross-user",
                        f"{call.op} by {call.user!r} returned task {seen.id} of {seen.user!r}",
                    )
            if call.ok and call.deleted:
                for task_id in call.deletes:
                    if self.owner.get(task_id, call.user) != call.user:
                        self._add(
                            "cross-user",
                            f"delete by {call.user!r} removed task {task_id} of "
                            f"{self.owner[task_id]!r}",
                        )


def _targets(write: Write, seen: Seen) -> bool:
    """Tell whether *write* was aimed at the task *seen* shows."""
    if write.token is not None:
        return write.token == seen.token
    return write.task_id == seen.id


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
    """One screen: operations, faults, errors by type, the slowest call, what was checked."""
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
    got = verdict.checked
    lines.append(
        f"checked: {got['acknowledged creates']} acknowledged creates "
        f"({got['creates deleted']} gone after a possible delete), "
        f"{got['unknown writes']} unknown writes ({got['unknown writes seen stored']} seen)"
    )
    lines.append(
        f"  reads: {got['rows read']} rows, {got['answers on tasks surely there']} answers "
        f"on tasks surely there, {got['not found']} not found, {got['lists']} lists, "
        f"{got['counts']} counts"
    )
    if verdict.ok:
        lines.append("verdict: PASS (no violation)")
    else:
        lines.append(f"verdict: FAIL ({len(verdict.violations)} violations)")
        lines += [f"  {v}" for v in verdict.violations[:20]]
    return "\n".join(lines)


@dataclass
class Recording:
    """A whole soak as recorded: enough to judge it again later, without any server.

    ``problems`` are (rule, detail) pairs found outside the history (a hung thread, a
    fault that could not be injected). :meth:`save` writes it as JSON and :meth:`load`
    reads it back, so a verdict can be examined, and the checker rerun, after the
    soak's servers are gone (``run.py --save PATH``, then ``run.py --judge PATH``).
    """

    calls: list[Call]
    final: list[Seen]
    faults: list[Fault]
    duration: float
    bound: float
    pools_checked_out: dict[str, int] = field(default_factory=dict)
    problems: list[tuple[str, str]] = field(default_factory=list)

    def judge(self) -> Verdict:
        """Check the history (see :func:`check`) and add the problems found outside it."""
        verdict = check(
            self.calls,
            self.final,
            bound=self.bound,
            pauses=[f for f in self.faults if f.kind == "pause server"],
            pools_checked_out=self.pools_checked_out,
        )
        for rule, detail in self.problems:
            verdict.add(rule, detail)
        return verdict

    def report(self, verdict: Verdict) -> str:
        """Return the one-screen report of this soak under *verdict*."""
        return report(
            self.calls,
            self.faults,
            verdict,
            duration=self.duration,
            bound=self.bound,
            final_rows=len(self.final),
        )

    def save(self, path: Path) -> None:
        """Write the recording to *path* as JSON."""
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path) -> Recording:
        """Read a recording :meth:`save` wrote."""
        data: dict[str, Any] = json.loads(path.read_text())
        calls = [
            Call(
                **{
                    **raw,
                    "writes": tuple(Write(**w) for w in raw["writes"]),
                    "deletes": tuple(raw["deletes"]),
                    "reads": tuple(raw["reads"]),
                    "returned": tuple(Seen(**r) for r in raw["returned"]),
                }
            )
            for raw in data["calls"]
        ]
        return cls(
            calls=calls,
            final=[Seen(**row) for row in data["final"]],
            faults=[Fault(**fault) for fault in data["faults"]],
            duration=data["duration"],
            bound=data["bound"],
            pools_checked_out=data["pools_checked_out"],
            problems=[(rule, detail) for rule, detail in data["problems"]],
        )
