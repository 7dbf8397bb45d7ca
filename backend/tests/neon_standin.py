"""A Neon stand-in on loopback, so the integration suite can be run as it runs on Neon.

Neon gives each database a direct endpoint (the compute's PostgreSQL) and a pooled one
(PgBouncer in transaction mode), both TLS-only with SCRAM passwords, and an owner role
that is not a superuser but may create databases. This starts the same on this
machine, listening on ``127.0.0.2``: loopback, but not a host the package treats as
local, so it insists on TLS there exactly as it does for Neon.

- direct: a throwaway PostgreSQL cluster whose pg_hba.conf admits only TLS connections
  with a SCRAM password (plain-text connections are refused); database ``neondb``
  owned by ``neondb_owner`` (``LOGIN CREATEDB CREATEROLE BYPASSRLS``, no superuser,
  as Neon's owner role: BYPASSRLS through ``neon_superuser``).
- pooled: PgBouncer in transaction pool mode in front of it, requiring TLS and SCRAM
  from its clients and using both towards the server.

From the repository root, with the test group installed (``nox -s standin`` does all
of this and runs the integration suite through both endpoints)::

    PYTHONPATH=backend python -m tests.neon_standin start   # writes .standin/{pooled,direct}.url
    TEST_DATABASE_URL="$(cat .standin/pooled.url)" nox -s integration
    PYTHONPATH=backend python -m tests.neon_standin stop

The URLs hold a password made up at start; they stay in the state directory.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL

from tests.fix_servers import (
    PgBouncer,
    PgCluster,
    ServerAccount,
    make_cluster,
    make_template,
    start_pgbouncer,
)

__all__ = ["HOST", "OWNER", "StandIn", "start", "stop_from_state"]

HOST: Final = "127.0.0.2"
OWNER: Final = "neondb_owner"
DATABASE: Final = "neondb"
DEFAULT_DIR: Final = Path(".standin")
# Neon's smallest computes allow about a hundred connections; the pooler many more.
_SETTINGS: Final = {"max_connections": "100", "password_encryption": "scram-sha-256"}
_POOL_SIZE: Final = 20


@dataclass(frozen=True)
class StandIn:
    """A running stand-in: how to reach its two endpoints, and its servers."""

    pooled_url: str
    direct_url: str
    cluster: PgCluster
    bouncer: PgBouncer
    template_base: Path

    def stop(self) -> None:
        """Stop both servers and delete their files; idempotent."""
        self.bouncer.destroy()
        self.cluster.destroy()
        shutil.rmtree(self.template_base, ignore_errors=True)

    def state(self) -> dict[str, str | int]:
        """What :func:`stop_from_state` needs to stop it from another process."""
        return {
            "pooled_url": self.pooled_url,
            "direct_url": self.direct_url,
            "cluster_base": str(self.cluster.base),
            "bindir": str(self.cluster.bindir),
            "template_base": str(self.template_base),
            "bouncer_base": str(self.bouncer.base),
            "bouncer_pid": self.bouncer.pid,
        }


# The superuser only through the cluster's own Unix socket (set-up and tear-down);
# over TCP, TLS and a SCRAM password or nothing, as on Neon.
_HBA: Final = ("local all postgres trust", "hostssl all all 127.0.0.0/8 scram-sha-256")


def _superuser_url(cluster: PgCluster) -> URL:
    return URL.create(
        "postgresql+psycopg2",
        username="postgres",
        database="postgres",
        query={"host": str(cluster.base), "port": str(cluster.port)},
    )


def start() -> StandIn:
    """Start the stand-in's server and pooler; return how to reach them and stop them."""
    account = ServerAccount.pick()
    template = make_template(account)
    try:
        cluster = make_cluster(template, listen=(HOST,), settings=_SETTINGS, hba=_HBA, ssl=True)
    except BaseException:
        shutil.rmtree(template.datadir.parent, ignore_errors=True)
        raise
    password = secrets.token_urlsafe(18)
    bouncer: PgBouncer | None = None
    try:
        admin = create_engine(_superuser_url(cluster), isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(
                    text(f"CREATE ROLE {OWNER} LOGIN CREATEDB CREATEROLE BYPASSRLS PASSWORD :pw"),
                    {"pw": password},
                )
                conn.execute(text(f"CREATE DATABASE {DATABASE} OWNER {OWNER}"))
        finally:
            admin.dispose()
        direct = cluster.url(host=HOST, user=OWNER, password=password, database=DATABASE)
        bouncer = start_pgbouncer(
            account, direct, pool_size=_POOL_SIZE, users={OWNER: password}, listen=HOST, tls=True
        )
    except BaseException:
        if bouncer is not None:
            bouncer.destroy()
        cluster.destroy()
        shutil.rmtree(template.datadir.parent, ignore_errors=True)
        raise
    pooled = bouncer.url(DATABASE, user=OWNER, password=password)
    return StandIn(
        pooled_url=_url_text(pooled),
        direct_url=_url_text(direct),
        cluster=cluster,
        bouncer=bouncer,
        template_base=template.datadir.parent,
    )


def _url_text(url: URL) -> str:
    # Neon's console hands out postgresql:// URLs with sslmode=require.
    return url.set(drivername="postgresql", query={"sslmode": "require"}).render_as_string(
        hide_password=False
    )


def stop_from_state(state: dict[str, str | int]) -> None:
    """Stop a stand-in that another process started, from its :meth:`StandIn.state`."""
    pid = int(state["bouncer_pid"])
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    else:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.05)
    shutil.rmtree(str(state["bouncer_base"]), ignore_errors=True)
    base = Path(str(state["cluster_base"]))
    if base.exists():
        account = ServerAccount.pick()
        PgCluster(base, Path(str(state["bindir"])), account, 0, (HOST,)).destroy()
    shutil.rmtree(str(state["template_base"]), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A child of this process lingers as a zombie until reaped.
    try:
        reaped, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return reaped == 0


def main(argv: list[str] | None = None) -> int:
    """``start`` or ``stop`` the stand-in; its state lives in ``--dir``."""
    parser = argparse.ArgumentParser(prog="python -m tests.neon_standin", description=__doc__)
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="state directory")
    args = parser.parse_args(argv)
    state: Path = args.dir / "state.json"
    if args.action == "start":
        if state.exists():
            parser.error(f"{state} exists: the stand-in runs already (stop it first)")
        stand_in = start()
        args.dir.mkdir(parents=True, exist_ok=True)
        state.write_text(json.dumps(stand_in.state(), indent=2))
        (args.dir / "pooled.url").write_text(stand_in.pooled_url + "\n")
        (args.dir / "direct.url").write_text(stand_in.direct_url + "\n")
        print(f"Neon stand-in running; URLs in {args.dir}/pooled.url and {args.dir}/direct.url")
        return 0
    if not state.exists():
        print(f"no stand-in state in {args.dir}: nothing to stop", file=sys.stderr)
        return 0
    stop_from_state(json.loads(state.read_text()))
    for name in ("state.json", "pooled.url", "direct.url"):
        (args.dir / name).unlink(missing_ok=True)
    print("Neon stand-in stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
