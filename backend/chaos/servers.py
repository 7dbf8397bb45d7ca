"""The soak's own servers: a throwaway PostgreSQL cluster and a restartable PgBouncer.

Built from the integration suite's plain functions (``tests/fix_servers.py``), with
what the soak needs on top: PgBouncer's own waits bounded, and pausing the whole
server (SIGSTOP of the postmaster and every backend, then SIGCONT). Everything
listens on 127.0.0.1 only.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

from tests.fix_servers import (
    PgBouncer,
    PgCluster,
    ServerAccount,
    make_cluster,
    make_template,
    start_pgbouncer,
)

__all__ = ["pause", "resume", "start_bouncer", "start_cluster"]


def start_cluster(run_as: ServerAccount, *, max_connections: int = 80) -> PgCluster:
    """Start a throwaway cluster on loopback with room for the soak's connections."""
    template = make_template(run_as)
    try:
        settings = {"max_connections": str(max_connections), "shared_buffers": "32MB"}
        return make_cluster(template, settings=settings)
    finally:
        shutil.rmtree(template.datadir.parent, ignore_errors=True)


def start_bouncer(
    cluster: PgCluster, run_as: ServerAccount, *, pool_size: int, wait_seconds: int
) -> PgBouncer:
    """Start a PgBouncer in front of *cluster* whose own waits end after *wait_seconds*.

    ``query_wait_timeout`` bounds how long a client's query queues for a server
    connection, ``server_connect_timeout`` how long PgBouncer waits for the server to
    answer a new connection: without them a paused or restarting server would hold
    clients for PgBouncer's defaults (120 s and 15 s).
    """
    settings = {
        "query_wait_timeout": str(wait_seconds),
        "server_connect_timeout": str(wait_seconds),
        "server_login_retry": "1",
    }
    return start_pgbouncer(run_as, cluster.url(), pool_size=pool_size, settings=settings)


def _postmaster(cluster: PgCluster) -> int | None:
    try:
        return int((cluster.datadir / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _children(parent: int) -> list[int]:
    pids: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may contain spaces, so split after ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and fields[1] == str(parent):
            pids.append(int(entry))
    return pids


def _signal(pids: list[int], signum: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            continue


def pause(cluster: PgCluster) -> list[int]:
    """SIGSTOP the postmaster, then every backend it had forked; return the pids stopped.

    The postmaster goes first, so no backend can appear after the children are listed.
    """
    postmaster = _postmaster(cluster)
    if postmaster is None:
        return []
    _signal([postmaster], signal.SIGSTOP)
    children = _children(postmaster)
    _signal(children, signal.SIGSTOP)
    return [postmaster, *children]


def resume(pids: list[int]) -> None:
    """SIGCONT every process :func:`pause` stopped, the backends first."""
    _signal(list(reversed(pids)), signal.SIGCONT)
