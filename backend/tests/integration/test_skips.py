"""A run that could not test everything says so: the skip block, its file, strict mode.

Each test runs pytest in a subprocess, as ``nox -s integration`` does, with the
environment it needs spelled out (CI, TEST_STRICT, TEST_SKIP_REPORT), so an outer
CI or strict run does not leak into it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.fix_servers import free_port
from tests.skips import (
    OPENSSL,
    PGBOUNCER,
    POSTGRES_SERVER,
    RULE,
    count_by_piece,
    piece_of,
)

ROOT = Path(__file__).parents[3]
_TEST_FILE = """
from tests.skips import PGBOUNCER, skip_missing


def test_passes() -> None:
    pass


def test_needs_pgbouncer() -> None:
    if {skip}:
        skip_missing(PGBOUNCER, "pgbouncer not found (a test of the skip block)")
"""


def _path_without(tmp_path: Path, name: str) -> str:
    """Return PATH with *name* hidden: each directory holding it becomes a dir of symlinks."""
    dirs: list[str] = []
    for index, directory in enumerate(os.environ.get("PATH", "").split(os.pathsep)):
        if not os.path.exists(os.path.join(directory, name)):
            dirs.append(directory)
            continue
        farm = tmp_path / f"path-{index}"
        farm.mkdir()
        for entry in os.scandir(directory):
            if entry.name != name:
                (farm / entry.name).symlink_to(entry.path)
        dirs.append(str(farm))
    return os.pathsep.join(dirs)


def _pytest(
    args: list[str], *, strict: bool = False, report: Path | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run pytest from the repository root, locally (no CI), without xdist."""
    base = {k: v for k, v in os.environ.items() if k not in {"CI", "TEST_STRICT"}}
    base.pop("TEST_SKIP_REPORT", None)
    if strict:
        base["TEST_STRICT"] = "1"
    if report is not None:
        base["TEST_SKIP_REPORT"] = str(report)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider", *args],
        cwd=ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


def _tmp_suite(tmp_path: Path, *, skip: bool) -> list[str]:
    """Pytest arguments for a two-test file that skips one test for lack of pgbouncer."""
    (tmp_path / "test_two.py").write_text(_TEST_FILE.format(skip=skip))
    config = ["-c", str(ROOT / "pyproject.toml"), "-p", "tests.conftest"]
    return [*config, str(tmp_path / "test_two.py")]


def _read(report: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(report.read_text())
    return loaded


def test_a_run_missing_pieces_ends_with_the_block(tmp_path: Path) -> None:
    """Without a server and with openssl hidden, the run ends naming both and how to install."""
    closed = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    run = _pytest(
        [
            "backend/tests/integration/test_constraints.py::test_raw_sql_stores_rows_at_the_limits",
            "backend/tests/integration/test_tls.py::test_non_local_host_is_encrypted_by_default",
        ],
        TEST_DATABASE_URL=closed,
        PATH=_path_without(tmp_path, "openssl"),
    )
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.rstrip().splitlines()
    block = lines[len(lines) - 1 - lines[::-1].index(RULE, 1) :]
    assert block == [
        RULE,
        "pytest: 2 of 2 tests SKIPPED: this run did not test everything",
        f"  1 test needs {POSTGRES_SERVER.title}",
        "  1 test needs openssl",
        "Install what is missing:",
        "  postgresql-server",
        f"      Debian/Ubuntu: {POSTGRES_SERVER.debian}",
        f"      macOS:         {POSTGRES_SERVER.macos}",
        "  openssl",
        "      Debian/Ubuntu: sudo apt-get install openssl",
        "      macOS:         brew install openssl",
        "To make a skip fail the run: nox -s integration -- --strict, TEST_STRICT=1, or CI=true",
        RULE,
    ], run.stdout


def test_the_block_goes_to_the_report_file_when_asked(tmp_path: Path) -> None:
    """With TEST_SKIP_REPORT, the counts and the block go to that file, not the terminal."""
    report = tmp_path / "integration.json"
    run = _pytest(_tmp_suite(tmp_path, skip=True), report=report)
    assert run.returncode == 0, run.stdout
    assert RULE not in run.stdout
    summary = _read(report)
    assert summary["label"] == "integration"
    assert (summary["collected"], summary["skipped"], summary["other"]) == (2, 1, 0)
    assert summary["by_piece"] == {"pgbouncer": 1}
    assert summary["summary"] == [
        "integration: 1 of 2 tests SKIPPED: this run did not test everything",
        "  1 test needs pgbouncer",
    ]
    assert summary["install"] == {
        "pgbouncer": [
            "  pgbouncer",
            "      Debian/Ubuntu: sudo apt-get install pgbouncer",
            "      macOS:         brew install pgbouncer",
        ]
    }
    assert "--strict" in summary["hint"]


@pytest.mark.parametrize("report", [False, True])
def test_nothing_skipped_means_no_block(tmp_path: Path, report: bool) -> None:
    """A run that skipped nothing prints no block and writes an empty one."""
    path = tmp_path / "integration.json"
    run = _pytest(_tmp_suite(tmp_path, skip=False), report=path if report else None)
    assert run.returncode == 0, run.stdout
    assert "2 passed" in run.stdout
    assert RULE not in run.stdout
    assert "SKIPPED" not in run.stdout
    if report:
        summary = _read(path)
        assert (summary["skipped"], summary["summary"], summary["install"]) == (0, [], {})


def test_strict_mode_fails_a_run_that_skipped(tmp_path: Path) -> None:
    """TEST_STRICT=1 fails the run on a skip, and the block still names what is missing."""
    report = tmp_path / "integration.json"
    run = _pytest(_tmp_suite(tmp_path, skip=True), strict=True, report=report)
    assert run.returncode == pytest.ExitCode.TESTS_FAILED, run.stdout
    assert "TEST_STRICT=1: 1 skipped test(s) fail the run" in run.stdout
    summary = _read(report)
    assert summary["summary"][1:] == [f"  1 test needs {PGBOUNCER.title}"]
    assert summary["hint"] == "TEST_STRICT=1: these skips fail the run"


def test_skips_are_grouped_by_their_tag_only() -> None:
    """Only a ``[needs <piece>]`` tag at the start counts; free text mentioning a piece does not."""
    reasons = [
        "Skipped: [needs openssl] openssl not found on PATH",
        "[needs openssl] openssl not found on PATH",
        "Skipped: pgbouncer not found",
        "Skipped: see [needs pgbouncer] later",
        "Skipped: [needs no-such-piece] unknown",
    ]
    assert piece_of(reasons[0]) is OPENSSL
    assert count_by_piece(reasons) == ({OPENSSL: 2}, 3)
