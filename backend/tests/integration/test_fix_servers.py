"""The throwaway-server fixtures keep their promises.

Loopback only, stopped and deleted afterwards, and never a silent skip in CI.
"""

from __future__ import annotations

import socket

import pytest

from tests.fix_servers import LOOPBACK, ClusterFactory, PgBouncerFactory, find_binary

_MISSING = "no-such-tool-for-todo-backend-tests"


def _listening(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=1):
            return True
    except OSError:
        return False


def test_a_missing_binary_skips_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without CI, a missing binary skips the test and names the binary."""
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=_MISSING):
        find_binary(_MISSING)


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
    bouncer.stop()
    assert bouncer.process.poll() is not None
    assert not _listening(bouncer.port)
