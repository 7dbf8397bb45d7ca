"""Fixtures shared by the unit and integration suites; the skip block and no-skip rule.

A run that skipped tests ends with a block that says how many, grouped by the missing
piece, with the commands that install each (``tests.skips``). With ``TEST_SKIP_REPORT``
set to a file path, the counts and the block's lines go to that JSON file instead of
the terminal, for the caller to print (the noxfile does, at the end of the session and
of ``nox``, one block for all its runs); the file's stem names the run. With CI=true
or TEST_STRICT=1, a run that skipped any test fails.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Generator, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlmodel import Session

from tests.repository_contract import CutShort, once_at
from tests.skips import (
    count_by_piece,
    fail_hint,
    install_lines,
    skip_block,
    skip_summary,
    skips_fail,
)
from todo_backend.db import create_db_engine, get_session, init_db
from todo_backend.repository import TaskRepository


def _terminal(session: pytest.Session) -> pytest.TerminalReporter | None:
    """pytest's terminal reporter; None in an xdist worker (its controller reports)."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if hasattr(session.config, "workerinput") or not isinstance(reporter, pytest.TerminalReporter):
        return None
    return reporter


def _skip_reasons(reporter: pytest.TerminalReporter) -> list[str]:
    """The reason of each skipped test of the run, as pytest reported it."""
    reports = reporter.stats.get("skipped", [])
    return [r.longrepr[2] if isinstance(r.longrepr, tuple) else str(r.longrepr) for r in reports]


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """With CI=true or TEST_STRICT=1, a run that skipped any test fails: never green."""
    reporter = _terminal(session)
    setting = skips_fail()
    if reporter is None or setting is None or exitstatus != pytest.ExitCode.OK:
        return
    skipped = len(_skip_reasons(reporter))
    if skipped:
        reporter.line("")  # after xdist's progress line, which the reporter does not track
        reporter.write_line(f"{setting}: {skipped} skipped test(s) fail the run", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(wrapper=True, tryfirst=True, specname="pytest_sessionfinish")
def pytest_sessionfinish_skip_block(session: pytest.Session) -> Generator[None]:
    """After pytest's own summary, end with the skip block (or write it to TEST_SKIP_REPORT).

    The outermost wrapper of the hook, so the block follows pytest's last line.
    """
    result = yield
    reporter = _terminal(session)
    if reporter is None:
        return result
    reasons = _skip_reasons(reporter)
    report = os.environ.get("TEST_SKIP_REPORT")
    if not report:
        for line in skip_block("pytest", reasons, session.testscollected):
            reporter.write_line(line, yellow=True, bold=True)
        return result
    pieces, other = count_by_piece(reasons)
    label = Path(report).stem
    summary = {
        "label": label,
        "collected": session.testscollected,
        "skipped": len(reasons),
        "by_piece": {piece.key: count for piece, count in pieces.items()},
        "other": other,
        # What the noxfile prints: the block of skip_block, from several runs.
        "summary": skip_summary(label, reasons, session.testscollected),
        "install": install_lines(reasons),
        "hint": fail_hint(),
    }
    Path(report).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return result


@pytest.fixture
def sqlite_engine() -> Iterator[Engine]:
    """A fresh in-memory SQLite database with the schema, disposed afterwards."""
    engine = create_db_engine("sqlite://")
    init_db(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    """A session on the suite's ``engine`` fixture, opened the way the API will."""
    yield from get_session(engine)


@pytest.fixture
def repo(session: Session) -> TaskRepository:
    """A repository on the suite's session."""
    return TaskRepository(session)


@pytest.fixture
def repo_on() -> Callable[[Session], TaskRepository]:
    """Make a repository on a given session."""
    return TaskRepository


@pytest.fixture
def open_repo(engine: Engine) -> Callable[[], TaskRepository]:
    """Make a repository on a fresh session of the suite's engine."""
    return lambda: TaskRepository(next(get_session(engine)))


@pytest.fixture
def repo_in_outer_transaction(
    engine: Engine,
) -> Callable[[], AbstractContextManager[TaskRepository]]:
    """Make a repository on a session bound to a Connection whose transaction is rolled back."""

    @contextmanager
    def bound() -> Iterator[TaskRepository]:
        with engine.connect() as conn:
            outer = conn.begin()
            with Session(
                bind=conn, join_transaction_mode="create_savepoint", expire_on_commit=False
            ) as session:
                yield TaskRepository(session)
            outer.rollback()

    return bound


@pytest.fixture
def raw_engine(engine: Engine) -> Engine:
    """A sync engine on the suite's database, for raw SQL against the schema itself."""
    return engine


class Interrupted(BaseException):
    """A KeyboardInterrupt stand-in: a BaseException, but one that cannot stop pytest itself."""


def _interrupt() -> None:
    raise Interrupted


@pytest.fixture
def cut_short(engine: Engine) -> CutShort:
    """Cut a sync call short: the next event of a name on ``engine`` raises :class:`Interrupted`."""
    return CutShort(Interrupted, lambda event_name: once_at(engine, event_name, _interrupt))
