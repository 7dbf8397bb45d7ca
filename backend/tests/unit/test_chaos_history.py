"""The chaos soak's checker: a clean history passes and each planted violation is caught."""

from __future__ import annotations

from pathlib import Path

from chaos.history import Call, Fault, Recording, Seen, Write, check, report

BOUND = 10.0
TOKENS = {1: "a1", 2: "b1", 3: "a2"}  # the tasks of the clean history, by id


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
    returned = () if kw.get("error") else (Seen(task_id, user, title, TOKENS[task_id]),)
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


# -- planted histories a sound checker must catch ---------------------------------------


def _delete(user: str, task_id: int, start: float, **kw: object) -> Call:
    """A delete of *task_id* by *user*; *kw* gives its answer or error."""
    return Call(
        "w2",
        "direct",
        "delete",
        user,
        start,
        start + 0.1,
        deletes=(task_id,),
        reads=(task_id,),
        **kw,  # type: ignore[arg-type]
    )


def _get(user: str, task_id: int, start: float, *rows: Seen) -> Call:
    """An acknowledged get of *task_id* by *user* that returned *rows* (none: not found)."""
    return Call("w3", "direct", "get", user, start, start + 0.1, reads=(task_id,), returned=rows)


def _rules(calls: list[Call], final: list[Seen]) -> list[str]:
    """The rule of each violation the checker reports."""
    return [v.split(":")[0] for v in check(calls, final, bound=BOUND).violations]


def test_a_lost_create_is_not_excused_by_another_users_refused_delete() -> None:
    """A delete by another user, which found nothing, cannot have removed the task."""
    calls, final = _history()
    calls.append(_delete("alice", 2, 6.0, deleted=False))
    del final[1]
    assert "lost create" in _rules(calls, final)


def test_a_lost_create_is_not_excused_by_another_users_unknown_delete() -> None:
    """A delete by another user cannot have removed the task, whatever its outcome."""
    calls, final = _history()
    calls.append(_delete("alice", 2, 6.0, error="DatabaseUnavailableError", unknown=True))
    del final[1]
    assert "lost create" in _rules(calls, final)


def test_a_lost_create_is_not_excused_by_a_delete_that_ended_before_it_began() -> None:
    """The owner's delete that completed before the create was invoked cannot delete it."""
    calls, final = _history()
    calls.append(_delete("alice", 4, 8.0, deleted=True))
    calls.append(_create("alice", "a3", 4, 10.0))
    assert "lost create" in _rules(calls, final)


def test_a_lost_create_is_not_excused_by_an_unknown_delete_long_before_it() -> None:
    """A delete of unknown outcome lands within its bound: one long over cannot excuse."""
    calls, final = _history()
    calls.append(_delete("alice", 4, 1.0, error="DatabaseUnavailableError", unknown=True))
    calls.append(_create("alice", "a3", 4, 1.2 + 2 * BOUND))
    assert "lost create" in _rules(calls, final)


def test_a_lost_create_is_not_excused_by_a_later_delete_that_found_nothing() -> None:
    """The owner's later delete that returned False deleted nothing."""
    calls, final = _history()
    calls.append(_delete("bob", 2, 6.0, deleted=False))
    del final[1]
    assert "lost create" in _rules(calls, final)


def test_a_read_of_a_write_reported_as_not_stored_is_caught() -> None:
    """A value whose write raised DatabaseTimeoutError (nothing stored) must never be read."""
    calls, final = _history()
    calls.append(_get("bob", 2, 6.0, Seen(2, "bob", "u:4", "b1")))
    assert "unstored read" in _rules(calls, final)


def test_a_read_of_a_title_no_call_wrote_is_caught() -> None:
    """A read may only return a value some call wrote."""
    calls, final = _history()
    calls.append(_get("alice", 1, 6.0, Seen(1, "alice", "u:never", "a1")))
    assert "phantom read" in _rules(calls, final)


def _unknown_block(start: float) -> Call:
    """An atomic block by alice creating k1 (task 5) and retitling task 1, outcome unknown."""
    return Call(
        "w4",
        "direct",
        "atomic",
        "alice",
        start,
        start + 0.1,
        writes=(Write("t:k1", token="k1"), Write("u:9", task_id=1)),
        reads=(1,),
        error="DatabaseUnavailableError",
        unknown=True,
    )


def test_a_block_of_unknown_outcome_with_only_its_create_stored_is_caught() -> None:
    """The block's create is stored, so its update of a task that surely existed must be."""
    calls, final = _history()
    calls.append(_unknown_block(5.0))
    final[0] = Seen(1, "alice", "u:2", "a1")
    final.append(Seen(5, "alice", "t:k1", "k1"))
    assert "half-applied block" in _rules(calls, final)


def test_a_block_of_unknown_outcome_with_only_its_update_stored_is_caught() -> None:
    """The block's update is visible, so its create must be stored too."""
    calls, final = _history()
    calls.append(_unknown_block(5.0))
    final[0] = Seen(1, "alice", "u:9", "a1")
    assert "half-applied block" in _rules(calls, final)


# -- reads, not-found answers, lists and counts -----------------------------------------


def test_a_stale_read_is_caught() -> None:
    """A read begun after an acknowledged update ended must not return the older title."""
    calls, final = _history()
    calls.append(_get("alice", 1, 2.5, Seen(1, "alice", "u:1", "a1")))
    assert "stale read" in _rules(calls, final)


def test_a_read_of_a_deleted_task_is_caught() -> None:
    """A task an acknowledged delete removed cannot be read after the delete ended."""
    calls, final = _history()
    calls.append(_get("alice", 3, 5.0, Seen(3, "alice", "t:a2", "a2")))
    assert "stale read" in _rules(calls, final)


def test_a_read_before_its_write_began_is_caught() -> None:
    """A read cannot return a title whose write began after the read ended."""
    calls, final = _history()
    calls.append(_get("alice", 1, 0.5, Seen(1, "alice", "u:1", "a1")))
    assert "phantom read" in _rules(calls, final)


def test_not_finding_a_task_that_surely_existed_is_caught() -> None:
    """A get returning None, an update returning None, a delete returning False."""
    for call in (
        _get("bob", 2, 6.0),
        Call("w1", "direct", "update", "bob", 6.0, 6.1, writes=(Write("u:8", task_id=2),)),
        _delete("bob", 2, 6.0, deleted=False),
    ):
        calls, final = _history()
        calls.append(call)
        assert "missed task" in _rules(calls, final), call.op


def test_a_list_leaving_out_a_task_that_surely_existed_is_caught() -> None:
    """A list holds the caller's newest tasks that surely existed, up to its limit."""
    calls, final = _history()
    first, newest = Seen(1, "alice", "u:1", "a1"), Seen(3, "alice", "t:a2", "a2")
    for returned, limit, caught in (
        ((first,), 20, True),  # short of its limit: every task must be there
        ((first,), 1, True),  # a full page, but task 3 is newer than task 1
        ((newest,), 1, False),  # a full page: task 1 is below it
        ((newest, first), 20, False),
    ):
        calls.append(
            Call("w3", "direct", "list", "alice", 1.5, 1.6, returned=returned, limit=limit)
        )
        assert ("missed task" in _rules(calls, final)) is caught, (returned, limit)
        assert _rules(calls, final) in ([], ["missed task"])
        calls.pop()


def test_a_count_outside_what_may_have_existed_is_caught() -> None:
    """A count is at least the tasks that surely existed and at most those that may have."""
    for count, ok in ((2, True), (1, False), (3, False)):
        calls, final = _history()
        calls.append(Call("w3", "direct", "count", "alice", 1.5, 1.6, count=count))
        assert (_rules(calls, final) == []) is ok, count


def test_a_task_deleted_twice_or_before_its_create_is_caught() -> None:
    """Ids are never reused: one task is deleted once, and only after its create began."""
    calls, final = _history()
    calls.append(_delete("alice", 3, 6.0, deleted=True))
    assert "deleted twice" in _rules(calls, final)
    calls, final = _history()
    calls.insert(0, _delete("alice", 3, -1.0, deleted=True))
    assert "phantom delete" in _rules(calls, final)


# -- legitimate concurrency passes ------------------------------------------------------


def test_overlapping_updates_may_land_in_either_order() -> None:
    """Two acknowledged updates that overlap in time may leave either title, and be read so."""
    calls, final = _history()
    calls += [_update("bob", 2, "u:x", 6.0), _update("bob", 2, "u:y", 6.05)]
    for title in ("u:x", "u:y"):
        calls.append(_get("bob", 2, 6.2, Seen(2, "bob", title, "b1")))
        final[1] = Seen(2, "bob", title, "b1")
        assert _rules(calls, final) == [], title
        calls.pop()


def test_an_unknown_write_may_land_after_a_later_acknowledged_one() -> None:
    """The server may still run a statement whose connection died: its title may win."""
    calls, final = _history()
    calls += [
        _update("bob", 2, "u:x", 6.0, error="DatabaseUnavailableError", unknown=True),
        _update("bob", 2, "u:y", 7.0),
        _get("bob", 2, 8.0, Seen(2, "bob", "u:x", "b1")),
    ]
    final[1] = Seen(2, "bob", "u:x", "b1")
    assert _rules(calls, final) == []


def test_a_read_never_returns_what_an_acknowledged_write_replaced() -> None:
    """Once a read saw an unknown write, a later acknowledged write supersedes it for good."""
    calls, final = _history()
    calls += [
        _update("bob", 2, "u:x", 6.0, error="DatabaseUnavailableError", unknown=True),
        _get("bob", 2, 6.5, Seen(2, "bob", "u:x", "b1")),
        _update("bob", 2, "u:y", 7.0),
    ]
    final[1] = Seen(2, "bob", "u:x", "b1")
    assert "lost write" in _rules(calls, final)


def test_a_block_of_unknown_outcome_may_apply_whole_or_not_at_all() -> None:
    """Neither of its writes visible, or both: either is a valid history."""
    calls, final = _history()
    calls.append(_unknown_block(5.0))
    assert _rules(calls, final) == []
    final[0] = Seen(1, "alice", "u:9", "a1")
    final.append(Seen(5, "alice", "t:k1", "k1"))
    assert _rules(calls, final) == []


def test_a_stored_block_whose_update_may_have_found_nothing_passes() -> None:
    """The block's update changes nothing if its task may have been deleted meanwhile."""
    calls, final = _history()
    calls += [
        _unknown_block(5.0),
        _delete("alice", 1, 5.05, error="DatabaseUnavailableError", unknown=True),
    ]
    final[0] = Seen(1, "alice", "u:2", "a1")
    final.append(Seen(5, "alice", "t:k1", "k1"))
    assert _rules(calls, final) == []


def test_a_delete_overlapping_or_after_the_create_may_explain_a_missing_task() -> None:
    """The owner's delete that returned True, or of unknown outcome, begun before the end."""
    for delete in (
        _delete("bob", 2, -0.05, deleted=True),  # overlaps the create: ends at 0.05
        _delete("bob", 2, 6.0, error="DatabaseUnavailableError", unknown=True),
        _delete("bob", 2, -0.5, error="DatabaseUnavailableError", unknown=True),
    ):
        calls, final = _history()
        calls.append(delete)
        del final[1]
        assert _rules(calls, final) == [], delete


def test_reads_around_a_delete_may_see_the_task_or_not() -> None:
    """A read overlapping the delete may return the task or nothing; none is wrong."""
    calls, final = _history()
    calls += [
        _get("alice", 3, 3.95, Seen(3, "alice", "t:a2", "a2")),
        _get("alice", 3, 4.05),
        Call("w3", "direct", "count", "alice", 4.05, 4.07, count=2),
        Call("w3", "direct", "count", "alice", 4.05, 4.07, count=1),
    ]
    assert _rules(calls, final) == []


def test_a_recording_judges_the_same_after_a_round_trip(tmp_path: Path) -> None:
    """A saved history loads back equal, and judges the same."""
    calls, final = _history()
    calls.append(_get("alice", 1, 6.0, Seen(1, "alice", "u:never", "a1")))
    recording = Recording(calls, final, [Fault("pause server", 1.0, 2.0)], 10.0, BOUND)
    recording.problems.append(("hung", "thread w0 did not finish"))
    recording.save(tmp_path / "history.json")
    loaded = Recording.load(tmp_path / "history.json")
    assert loaded == recording
    assert loaded.judge().violations == recording.judge().violations
    assert "verdict: FAIL (2 violations)" in loaded.report(loaded.judge())


def test_a_create_of_unknown_outcome_seen_stored_must_stay() -> None:
    """A read that saw it proves it was stored: missing later, with no delete, it was lost."""
    calls, final = _history()
    unknown = Call(
        "w0",
        "direct",
        "create",
        "bob",
        6.0,
        6.1,
        writes=(Write("t:b2", token="b2"),),
        error="DatabaseUnavailableError",
        unknown=True,
    )
    calls += [unknown, _get("bob", 7, 7.0, Seen(7, "bob", "t:b2", "b2"))]
    assert _rules(calls, final) == ["lost create"]
    final.append(Seen(7, "bob", "t:b2", "b2"))
    assert _rules(calls, final) == []


def test_a_title_two_calls_wrote_is_explained_by_either() -> None:
    """Were a title written twice, a read of it is fine if either write may have put it."""
    calls, final = _history()
    calls += [
        _update("bob", 2, "u:same", 6.0, error="DatabaseTimeoutError"),
        _update("bob", 2, "u:same", 6.5),
        _get("bob", 2, 7.0, Seen(2, "bob", "u:same", "b1")),
    ]
    final[1] = Seen(2, "bob", "u:same", "b1")
    assert _rules(calls, final) == []
    del calls[-3:-1]  # only the write reported as not stored is left
    calls.insert(-1, _update("bob", 2, "u:same", 6.0, error="DatabaseTimeoutError"))
    assert "unstored read" in _rules(calls, final)
