"""What a local test run could not test, and the block that says so.

A test that needs a piece of the machine (a PostgreSQL server, its binaries,
PgBouncer, openssl) and finds it missing calls :func:`skip_missing`: locally the test
skips with a reason tagged ``[needs <piece>]``, with ``CI=true`` it fails. At the end
of the run the skips are counted per piece from that tag (never from the free text),
and :func:`skip_block` renders the block the run ends with: the count per missing
piece, the commands that install it on Debian/Ubuntu and on macOS, and how to make a
skip fail the run. No skip, no block.

A skip fails the run with ``CI=true`` and in strict mode (``TEST_STRICT=1``, which
``nox -s integration -- --strict`` sets). Strict mode keeps the skips (so the block
still says what is missing) and fails the run at its end; ``CI=true`` fails each test
at the missing piece.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

import pytest

__all__ = [
    "INSTALL_HEADING",
    "OPENSSL",
    "PGBOUNCER",
    "PIECES",
    "POSTGRES_BINARIES",
    "POSTGRES_SERVER",
    "RULE",
    "SERVER_ACCOUNT",
    "Piece",
    "count_by_piece",
    "fail_hint",
    "in_ci",
    "install_lines",
    "piece_of",
    "skip_block",
    "skip_missing",
    "skip_summary",
    "skips_fail",
    "strict_mode",
]

_TRUE: Final = frozenset({"1", "true", "yes"})


def in_ci() -> bool:
    """Tell whether the suite runs in CI, where a missing tool is a failure, not a skip."""
    return os.environ.get("CI", "").lower() in _TRUE


def strict_mode() -> bool:
    """Tell whether a local run asked to fail on any skip (``TEST_STRICT=1``)."""
    return os.environ.get("TEST_STRICT", "").lower() in _TRUE


def skips_fail() -> str | None:
    """Name the setting that makes a skipped test fail the run, or None when none does."""
    if in_ci():
        return "CI=true"
    if strict_mode():
        return "TEST_STRICT=1"
    return None


@dataclass(frozen=True, slots=True)
class Piece:
    """A piece of the machine some tests need, and how to install it.

    ``key`` is the tag in a skip's reason (``[needs <key>]``); ``debian`` and
    ``macos`` are the commands (apt, Homebrew) that provide it.
    """

    key: str
    title: str
    debian: str
    macos: str


POSTGRES_SERVER: Final = Piece(
    "postgresql-server",
    "a PostgreSQL server (TEST_DATABASE_URL, default postgres@127.0.0.1:5432, no password)",
    "sudo apt-get install postgresql  # and trust 127.0.0.1 in pg_hba.conf, as .ci/run does",
    "brew install postgresql@17 && brew services start postgresql@17 && createuser -s postgres",
)
POSTGRES_BINARIES: Final = Piece(
    "postgresql-binaries",
    "the PostgreSQL server binaries (initdb, pg_ctl, postgres)",
    "sudo apt-get install postgresql  # found in /usr/lib/postgresql/*/bin",
    'brew install postgresql@17 && export PATH="$(brew --prefix postgresql@17)/bin:$PATH"',
)
PGBOUNCER: Final = Piece(
    "pgbouncer",
    "pgbouncer",
    "sudo apt-get install pgbouncer",
    "brew install pgbouncer",
)
OPENSSL: Final = Piece(
    "openssl",
    "openssl",
    "sudo apt-get install openssl",
    "brew install openssl",
)
SERVER_ACCOUNT: Final = Piece(
    "server-account",
    "an account to run servers as when the tests run as root (postgres or nobody)",
    "sudo apt-get install postgresql  # creates the postgres account",
    "run the tests as your own user, not root",
)
PIECES: Final = (POSTGRES_SERVER, POSTGRES_BINARIES, PGBOUNCER, OPENSSL, SERVER_ACCOUNT)
_BY_KEY: Final = {piece.key: piece for piece in PIECES}
_TAG: Final = re.compile(r"(?:Skipped: )?\[needs ([a-z0-9-]+)\] ")


def skip_missing(piece: Piece, detail: str) -> None:
    """Skip the test for lack of *piece* (a tagged reason), or fail it when ``CI=true``.

    *detail* says what was looked for and where; it follows the tag in the reason.
    Never returns (typed ``None`` so that callers end with an explicit ``raise``).
    """
    if in_ci():
        pytest.fail(f"{detail} (CI=true: integration tests must not skip)", pytrace=False)
    pytest.skip(f"[needs {piece.key}] {detail}")


def piece_of(reason: str) -> Piece | None:
    """The piece a skip's reason is tagged with, or None for any other skip."""
    found = _TAG.match(reason)
    return None if found is None else _BY_KEY.get(found.group(1))


def count_by_piece(reasons: Iterable[str]) -> tuple[dict[Piece, int], int]:
    """Count skip reasons per missing piece (in ``PIECES`` order), and the untagged rest."""
    counts: Counter[Piece | None] = Counter(piece_of(reason) for reason in reasons)
    other = counts.pop(None, 0)
    return {piece: counts[piece] for piece in PIECES if counts[piece]}, other


def _tests(count: int) -> str:
    return f"{count} test" if count == 1 else f"{count} tests"


RULE: Final = "!" * 88
INSTALL_HEADING: Final = "Install what is missing:"


def skip_summary(label: str, reasons: Sequence[str], total: int) -> list[str]:
    """Count one run's skips per missing piece; no lines when *reasons* is empty.

    *label* names the run (a nox session), *reasons* holds one reason per skipped
    test and *total* counts the tests the run collected.
    """
    if not reasons:
        return []
    pieces, other = count_by_piece(reasons)
    skipped = f"{len(reasons)} of {_tests(total)} SKIPPED"
    lines = [f"{label}: {skipped}: this run did not test everything"]
    lines += [
        f"  {_tests(count)} {'needs' if count == 1 else 'need'} {piece.title}"
        for piece, count in pieces.items()
    ]
    if other:
        lines.append(f"  {_tests(other)} skipped for other reasons (pytest's SKIPPED lines)")
    return lines


def install_lines(reasons: Sequence[str]) -> dict[str, list[str]]:
    """For each piece the skips miss (by key): its name and its apt and Homebrew commands."""
    return {
        piece.key: [
            f"  {piece.key}",
            f"      Debian/Ubuntu: {piece.debian}",
            f"      macOS:         {piece.macos}",
        ]
        for piece in count_by_piece(reasons)[0]
    }


def fail_hint() -> str:
    """The block's last line: what makes a skip fail the run, or that something does."""
    failing = skips_fail()
    if failing is not None:
        return f"{failing}: these skips fail the run"
    return "To make a skip fail the run: nox -s integration -- --strict, TEST_STRICT=1, or CI=true"


def skip_block(label: str, reasons: Sequence[str], total: int) -> list[str]:
    """The lines a run with skips ends with; no lines when *reasons* is empty.

    A rule, :func:`skip_summary`, the install commands, :func:`fail_hint`, a rule. The
    noxfile assembles the same block from several runs' JSON summaries.
    """
    summary = skip_summary(label, reasons, total)
    if not summary:
        return []
    installs = [line for lines in install_lines(reasons).values() for line in lines]
    heading = [INSTALL_HEADING] if installs else []
    return [RULE, *summary, *heading, *installs, fail_hint(), RULE]
