"""The soak's own servers: a throwaway PostgreSQL cluster and a restartable PgBouncer.

Built from the integration suite's pieces (``tests/fix_servers.py``: the cluster
class, the unprivileged account, scratch directories) but without pytest fixtures,
and with what the soak needs on top: PgBouncer restarts on the same port, PgBouncer's
own waits bounded, and pausing the whole server (SIGSTOP of the postmaster and every
backend, then SIGCONT). Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from sqlalchemy.engine import URL
from tests.fix_servers import (
    LOOPBACK,
    PgCluster,
    _conf_value,
    _port_open,
    _RunAs,
    _scratch_dir,
    _wait_until,
    find_binary,
    free_port,
)

__all__ = ["Bouncer", "pause", "resume", "start_bouncer", "start_cluster"]

_PGBOUNCER_STOP_SECONDS: Final = 10


def start_cluster(run_as: _RunAs, *, max_connections: int = 80) -> PgCluster:
    """initdb a cluster in a scratch directory, configure it for loopback, start it."""
    initdb = Path(find_binary("initdb"))
    base = _scratch_dir("todo-chaos-pg-", run_as)
    cluster = PgCluster(base, initdb.parent, run_as, free_port(), (LOOPBACK,))
    run_as.run(
        [
            *(str(initdb), "-D", str(cluster.datadir), "-A", "trust", "-U", "postgres"),
            *("-E", "UTF8", "--locale=C", "--no-sync", "--wal-segsize=1"),
        ],
        cwd=base,
    )
    conf = {
        "port": str(cluster.port),
        "listen_addresses": LOOPBACK,
        "unix_socket_directories": str(base),
        "max_connections": str(max_connections),
        "shared_buffers": "32MB",
        "dynamic_shared_memory_type": "mmap",
        "fsync": "off",  # an OS crash is not under test; a crash of the server is
    }
    with (cluster.datadir / "postgresql.conf").open("a") as out:
        out.write("\n# chaos soak cluster\n")
        out.writelines(f"{key} = {_conf_value(value)}\n" for key, value in conf.items())
    (cluster.datadir / "pg_hba.conf").write_text(f"host all all {LOOPBACK}/32 trust\n")
    run_as.own(base)
    cluster.start()
    return cluster


@dataclass
class Bouncer:
    """A PgBouncer in transaction pool mode that can be restarted on the same port."""

    base: Path
    port: int
    run_as: _RunAs
    binary: str
    process: subprocess.Popen[bytes] | None = field(default=None)

    def url(self, database: str) -> URL:
        """Return a psycopg2 URL reaching *database* through this PgBouncer."""
        return URL.create(
            "postgresql+psycopg2",
            username="postgres",
            host=LOOPBACK,
            port=self.port,
            database=database,
        )

    def start(self) -> None:
        """Start PgBouncer and wait until it accepts connections."""
        process = self.run_as.popen(
            [self.binary, str(self.base / "pgbouncer.ini")],
            cwd=self.base,
            log=self.base / "stdout.log",
        )
        self.process = process
        _wait_until(
            lambda: _port_open(LOOPBACK, self.port),
            lambda: process.poll() is not None,
            what=f"PgBouncer on port {self.port}",
            log=self.base / "pgbouncer.log",
        )

    def stop(self) -> None:
        """Stop PgBouncer (SIGTERM, then SIGKILL); every client connection drops."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=_PGBOUNCER_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=_PGBOUNCER_STOP_SECONDS)

    def restart(self) -> None:
        """Stop and start again on the same port."""
        self.stop()
        self.start()

    def destroy(self) -> None:
        """Stop and delete its files."""
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


def start_bouncer(
    cluster: PgCluster, run_as: _RunAs, *, pool_size: int, wait_seconds: int
) -> Bouncer:
    """Start a PgBouncer in front of *cluster* whose own waits end after *wait_seconds*.

    ``query_wait_timeout`` bounds how long a client's query queues for a server
    connection, ``server_connect_timeout`` how long PgBouncer waits for the server to
    answer a new connection: without them a paused or restarting server would hold
    clients for PgBouncer's defaults (120 s and 15 s).
    """
    base = _scratch_dir("todo-chaos-pgb-", run_as)
    port = free_port()
    (base / "userlist.txt").write_text('"postgres" ""\n')
    (base / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"* = host={LOOPBACK} port={cluster.port}\n"
        "[pgbouncer]\n"
        f"listen_addr = {LOOPBACK}\n"
        f"listen_port = {port}\n"
        "unix_socket_dir =\n"
        "auth_type = trust\n"
        f"auth_file = {base / 'userlist.txt'}\n"
        "pool_mode = transaction\n"
        f"default_pool_size = {pool_size}\n"
        "max_client_conn = 200\n"
        f"query_wait_timeout = {wait_seconds}\n"
        f"server_connect_timeout = {wait_seconds}\n"
        "server_login_retry = 1\n"
        f"logfile = {base / 'pgbouncer.log'}\n"
        f"pidfile = {base / 'pgbouncer.pid'}\n"
    )
    run_as.own(base)
    bouncer = Bouncer(base, port, run_as, find_binary("pgbouncer"))
    bouncer.start()
    return bouncer


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
