"""The chaos soak's checker: a clean history passes and each planted violation is caught."""

from __future__ import annotations

from chaos.history import Call, Fault, Seen, Write, check, report

BOUND = 10.0


def _create(user: str, token: str, task_id: int, start: float, **kw: object) -> Call:
    """An acknowledged create of *token* that got id *task_id*."""
    seen = Seen(task_id, user, f"t:{token}", token)
    return Call(
        "w0",
        "direct",
        "create",
        user,
        start,
        start + 0.1,
        writes=(Write(f"t:{token}", token=token),),
        returned=(seen,),
        **kw,  # type: ignore[arg-type]
    )


def _update(user: str, task_id: int, title: str, start: float, **kw: object) -> Call:
    """An update of *task_id* to *title*; acknowledged with the row unless *kw* says else."""
    returned = () if kw.get("error") else (Seen(task_id, user, title, "?"),)
    return Call(
        "w1",
        "pgbouncer",
        "update",
        user,
        start,
        start + 0.1,
        writes=(Write(title, task_id=task_id),),
        reads=(task_id,),
        returned=returned,
        **kw,  # type: ignore[arg-type]
    )


def _history() -> tuple[list[Call], list[Seen]]:
    """A small clean history: two users, updates, one delete, one unknown write."""
    calls = [
        _create("alice", "a1", 1, 0.0),
        _create("bob", "b1", 2, 0.0),
        _create("alice", "a2", 3, 0.0),
        _update("alice", 1, "u:1", 1.0),
        _update("alice", 1, "u:2", 2.0),
        _update("alice", 1, "u:3", 3.0, error="DatabaseUnavailableError", unknown=True),
        _update("bob", 2, "u:4", 1.0, error="DatabaseTimeoutError"),
        Call("w2", "direct", "delete", "alice", 4.0, 4.1, deletes=(3,), reads=(3,), deleted=True),
        Call("w2", "direct", "get", "bob", 5.0, 5.1, reads=(1,)),  # alice's task: None
    ]
    final = [Seen(1, "alice", "u:3", "a1"), Seen(2, "bob", "t:b1", "b1")]
    return calls, final


def test_a_clean_history_passes() -> None:
    """The unknown later write may be the final state; the timed-out one must not be."""
    calls, final = _history()
    verdict = check(calls, final, bound=BOUND, pools_checked_out={"direct": 0})
    assert verdict.violations == []
    text = report(calls, [], verdict, duration=1, bound=BOUND, final_rows=len(final))
    assert "verdict: PASS" in text
    assert "update" in text


def test_the_last_acknowledged_write_is_also_a_valid_final_state() -> None:
    """An unknown write may also not have happened: the last acknowledged one is fine."""
    calls, final = _history()
    final[0] = Seen(1, "alice", "u:2", "a1")
    assert check(calls, final, bound=BOUND).ok


def test_a_duplicate_create_is_caught() -> None:
    """A create stored twice is a violation."""
    calls, final = _history()
    final.append(Seen(9, "bob", "t:b1", "b1"))
    assert any(v.startswith("duplicate") for v in check(calls, final, bound=BOUND).violations)


def test_a_lost_write_is_caught() -> None:
    """A task left at a write older than the last acknowledged one is a lost write."""
    calls, final = _history()
    final[0] = Seen(1, "alice", "u:1", "a1")
    violations = check(calls, final, bound=BOUND).violations
    assert [v for v in violations if v.startswith("lost write")], violations


def test_a_timed_out_write_that_stuck_is_caught() -> None:
    """A write reported as failed (not unknown) must not be the final state."""
    calls, final = _history()
    final[1] = Seen(2, "bob", "u:4", "b1")
    assert any(v.startswith("lost write") for v in check(calls, final, bound=BOUND).violations)


def test_a_lost_acknowledged_create_is_caught() -> None:
    """An acknowledged create missing at the end, with no delete, is a violation."""
    calls, final = _history()
    del final[1]
    assert any(v.startswith("lost create") for v in check(calls, final, bound=BOUND).violations)


def test_an_acknowledged_delete_still_present_is_caught() -> None:
    """A task whose delete was acknowledged must be gone."""
    calls, final = _history()
    final.append(Seen(3, "alice", "t:a2", "a2"))
    violations = check(calls, final, bound=BOUND).violations
    assert any(v.startswith("acknowledged delete") for v in violations)


def test_a_cross_user_read_is_caught() -> None:
    """A call that returned another user's task is a violation."""
    calls, final = _history()
    calls.append(
        Call(
            "w3",
            "direct",
            "get",
            "bob",
            6.0,
            6.1,
            reads=(1,),
            returned=(Seen(1, "alice", "u:3", "a1"),),
        )
    )
    assert any(v.startswith("cross-user") for v in check(calls, final, bound=BOUND).violations)


def test_undocumented_errors_slow_calls_and_leaks_are_caught() -> None:
    """A raw driver error, a call past its bound plus the longest pause, a leaked connection."""
    calls, final = _history()
    calls.append(Call("w4", "direct", "count", "bob", 0.0, 0.1, error="OperationalError"))
    calls.append(Call("w4", "direct", "count", "bob", 0.0, BOUND + 2.5))
    calls.append(Call("w4", "direct", "count", "bob", 0.0, BOUND + 1.5))  # within the pause
    pause = Fault("pause server", 1.0, 3.0)
    verdict = check(calls, final, bound=BOUND, pauses=[pause], pools_checked_out={"direct": 1})
    rules = sorted(v.split(":")[0] for v in verdict.violations)
    assert rules == ["pool leak", "too slow", "undocumented error"]
    text = report(calls, [pause], verdict, duration=1, bound=BOUND, final_rows=len(final))
    assert "verdict: FAIL (3 violations)" in text


def test_a_cross_user_change_is_caught_even_when_its_outcome_was_unknown() -> None:
    """Another user's write, even one of unknown outcome, must never be a task's state."""
    calls, final = _history()
    calls.append(_update("bob", 1, "u:bob", 6.0, error="DatabaseUnavailableError", unknown=True))
    final[0] = Seen(1, "alice", "u:bob", "a1")
    violations = check(calls, final, bound=BOUND).violations
    assert [v for v in violations if v.startswith("cross-user")], violations
