"""Throwaway servers on loopback for the integration suite: PostgreSQL clusters and PgBouncer.

``pg_cluster`` makes PostgreSQL clusters a test can stop, restart and reconfigure
without touching the server under test; ``own_cluster`` is one such cluster for the
whole session, for what a hosted database's role may not do (a PgBouncer of our own
in front of it, its wire, its statement log); ``pgbouncer`` puts a PgBouncer in
transaction pool mode in front of a throwaway cluster. All listen on loopback only,
on ports picked free at start, and are stopped and deleted when the test (or the
session) ends, passed or failed. The plain functions behind the fixtures
(``make_cluster``, ``start_pgbouncer``) also build the Neon stand-in
(``tests/neon_standin.py``).

Clusters are copies of one ``initdb`` made per session, which keeps a cluster's
start well under a second. PostgreSQL and PgBouncer refuse to run as root, so when
the suite runs as root the servers run as the ``postgres`` account (else ``nobody``).
A missing binary skips the test locally and fails it when ``CI=true``.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL

from tests.skips import (
    OPENSSL,
    PGBOUNCER,
    POSTGRES_BINARIES,
    SERVER_ACCOUNT,
    in_ci,
    skip_missing,
)

__all__ = [
    "LOOPBACK",
    "ClusterFactory",
    "PeakSampler",
    "PgBouncer",
    "PgBouncerFactory",
    "PgCluster",
    "PgTemplate",
    "ServerAccount",
    "find_binary",
    "free_port",
    "in_ci",
    "make_certificate",
    "make_cluster",
    "make_template",
    "own_cluster",
    "pg_cluster",
    "pg_template",
    "pgbouncer",
    "server_account",
    "start_pgbouncer",
]

LOOPBACK: Final = "127.0.0.1"
_START_TIMEOUT: Final = 30  # seconds; a server that needs longer is broken, not slow
_TIMEOUT_ARG: Final = str(_START_TIMEOUT)
_TRUST_HBA: Final = (f"host all all {LOOPBACK}/32 trust",)


def _search_dirs() -> list[str]:
    dirs: list[str] = []
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        found = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=False, timeout=10
        )
        if found.returncode == 0 and found.stdout.strip():
            dirs.append(found.stdout.strip())
    dirs.extend(os.environ.get("PATH", "").split(os.pathsep))
    # Debian keeps pgbouncer in sbin and the server binaries in one directory per version.
    dirs.extend(["/usr/sbin", "/sbin"])
    dirs.extend(sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True))
    return [d for d in dirs if d]


def find_binary(name: str) -> str:
    """Return the path of *name*: pg_config's bindir first, then PATH, sbin, Debian's dirs.

    Skips the test when it is missing, or fails it when ``CI=true``.
    """
    for directory in _search_dirs():
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    skip_missing(
        PGBOUNCER if name == "pgbouncer" else POSTGRES_BINARIES,
        f"{name} not found (pg_config --bindir, PATH, /usr/sbin, /usr/lib/postgresql/*/bin)",
    )
    raise AssertionError("unreachable")  # pragma: no cover


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port on *host* that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


# -- running as an unprivileged user --------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerAccount:
    """The account servers run as: None fields mean the current (non-root) user."""

    uid: int | None
    gid: int | None

    @classmethod
    def pick(cls) -> ServerAccount:
        """The current user, or when root the ``postgres`` (else ``nobody``) account."""
        if os.geteuid() != 0:
            return cls(None, None)
        for name in ("postgres", "nobody"):
            try:
                entry = pwd.getpwnam(name)
            except KeyError:
                continue
            return cls(entry.pw_uid, entry.pw_gid)
        skip_missing(SERVER_ACCOUNT, "running as root and no 'postgres' or 'nobody' account")
        raise AssertionError("unreachable")  # pragma: no cover

    def own(self, path: Path) -> None:
        """Hand *path* and everything below it to the server account."""
        if self.uid is None or self.gid is None:
            return
        os.chown(path, self.uid, self.gid)
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                os.chown(os.path.join(root, name), self.uid, self.gid, follow_symlinks=False)

    @property
    def _extra_groups(self) -> list[int] | None:
        # Switching to the server account drops root's supplementary groups too.
        return None if self.uid is None else []

    def run(self, args: Sequence[str], *, cwd: Path, timeout: float = 60) -> str:
        """Run *args* as the server account; raise with its output if it fails."""
        done = subprocess.run(
            list(args),
            cwd=cwd,
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
            user=self.uid,
            group=self.gid,
            extra_groups=self._extra_groups,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} exited with {done.returncode}:\n{done.stdout}{done.stderr}"
            )
        return done.stdout

    def popen(self, args: Sequence[str], *, cwd: Path, log: Path) -> subprocess.Popen[bytes]:
        """Start *args* in the background as the server account, output to *log*."""
        with log.open("ab") as out:
            return subprocess.Popen(
                list(args),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                user=self.uid,
                group=self.gid,
                extra_groups=self._extra_groups,
            )


@pytest.fixture(scope="session")
def server_account() -> ServerAccount:
    """The account throwaway servers run as (the postgres account when we are root)."""
    return ServerAccount.pick()


def _scratch_parent() -> str | None:
    # A RAM disk copies a data directory several times faster; use it when roomy
    # (container runtimes often cap /dev/shm at 64 MB).
    shm = "/dev/shm"
    try:
        stats = os.statvfs(shm)
    except OSError:
        return None
    roomy = stats.f_bavail * stats.f_frsize >= 1 << 30
    return shm if roomy and os.access(shm, os.W_OK | os.X_OK) else None


def _scratch_dir(prefix: str, run_as: ServerAccount) -> Path:
    # Not pytest's tmp_path: it sits under a root-only directory the server account
    # cannot enter. A short path also keeps the Unix socket under its 107-byte limit.
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=_scratch_parent()))
    run_as.own(path)
    return path


# -- PostgreSQL -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PgTemplate:
    """A freshly initdb'd data directory that clusters are copied from."""

    bindir: Path
    datadir: Path
    run_as: ServerAccount


def make_template(run_as: ServerAccount) -> PgTemplate:
    """Run initdb once (trust auth, UTF-8, C locale); the caller deletes ``datadir.parent``."""
    initdb = Path(find_binary("initdb"))
    find_binary("pg_ctl")
    base = _scratch_dir("todo-pgtpl-", run_as)
    datadir = base / "data"
    try:
        run_as.run(
            [
                *(str(initdb), "-D", str(datadir), "-A", "trust", "-U", "postgres"),
                *("-E", "UTF8", "--locale=C", "--no-sync", "--wal-segsize=1"),
            ],
            cwd=base,
        )
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
    return PgTemplate(initdb.parent, datadir, run_as)


@pytest.fixture(scope="session")
def pg_template(server_account: ServerAccount) -> Iterator[PgTemplate]:
    """One initdb per session that every throwaway cluster copies; deleted at the end."""
    template = make_template(server_account)
    try:
        yield template
    finally:
        shutil.rmtree(template.datadir.parent, ignore_errors=True)


@dataclass
class PgCluster:
    """One throwaway PostgreSQL cluster listening on loopback."""

    base: Path
    bindir: Path
    run_as: ServerAccount
    port: int
    listen: tuple[str, ...]
    _engines: list[Engine] = field(default_factory=list)

    @property
    def datadir(self) -> Path:
        """The cluster's data directory."""
        return self.base / "data"

    @property
    def logfile(self) -> Path:
        """The server log (stderr of the postmaster)."""
        return self.base / "server.log"

    def url(
        self,
        *,
        host: str = LOOPBACK,
        user: str = "postgres",
        password: str | None = None,
        database: str = "postgres",
    ) -> URL:
        """A psycopg2 URL for this cluster; *host* must be one it listens on."""
        return URL.create(
            "postgresql+psycopg2",
            username=user,
            password=password,
            host=host,
            port=self.port,
            database=database,
        )

    def admin_engine(self) -> Engine:
        """A superuser autocommit engine over plain TCP, disposed with the cluster."""
        engine = create_engine(
            self.url(),
            isolation_level="AUTOCOMMIT",
            connect_args={"sslmode": "disable", "connect_timeout": 5},
        )
        self._engines.append(engine)
        return engine

    def _pg_ctl(self, *args: str) -> None:
        self.run_as.run(
            [str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-w", "-t", _TIMEOUT_ARG, *args],
            cwd=self.base,
            timeout=_START_TIMEOUT + 10,
        )

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        try:
            self._pg_ctl("-l", str(self.logfile), "start")
        except RuntimeError as err:
            raise RuntimeError(f"{err}\nserver log:\n{self.log_tail()}") from None

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: roll back and disconnect every session)."""
        self._pg_ctl("-m", mode, "stop")

    def restart(self, mode: str = "fast") -> None:
        """Restart the server; every open connection is closed by the server."""
        self._pg_ctl("-m", mode, "-l", str(self.logfile), "restart")

    def is_running(self) -> bool:
        """Tell whether a postmaster runs for this data directory."""
        if not self.datadir.is_dir():
            return False
        try:
            self.run_as.run(
                [str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "status"], cwd=self.base
            )
        except RuntimeError:
            return False
        return True

    def log_tail(self, lines: int = 40) -> str:
        """The end of the server log, for failure messages."""
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def log_text(self) -> str:
        """The whole server log."""
        return self.logfile.read_text(errors="replace")

    def destroy(self) -> None:
        """Dispose engines, stop the server if it runs, delete every file; idempotent."""
        for engine in self._engines:
            engine.dispose()
        self._engines.clear()
        if self.is_running():
            self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)


class ClusterFactory(Protocol):
    """Makes a throwaway cluster: see :func:`pg_cluster`."""

    def __call__(  # noqa: D102 - documented on pg_cluster
        self,
        *,
        listen: Sequence[str] = (LOOPBACK,),
        settings: Mapping[str, str] | None = None,
        hba: Sequence[str] = _TRUST_HBA,
        ssl: bool = False,
        start: bool = True,
    ) -> PgCluster: ...


def make_certificate(directory: Path, hosts: Sequence[str]) -> None:
    """Write a self-signed ``server.crt`` and ``server.key`` for *hosts* with openssl."""
    openssl = shutil.which("openssl")
    if openssl is None:
        skip_missing(OPENSSL, "openssl not found on PATH")
        raise AssertionError("unreachable")  # pragma: no cover
    san = ",".join(f"IP:{host}" for host in hosts)
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-nodes", "-days", "1", "-subj", f"/CN={hosts[0]}"),
            *("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-addext", f"subjectAltName={san}"),
            *("-keyout", str(directory / "server.key"), "-out", str(directory / "server.crt")),
        ],
        capture_output=True,
        check=True,
        timeout=60,
    )
    # PostgreSQL refuses a private key others can read.
    (directory / "server.key").chmod(0o600)


def _conf_value(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def make_cluster(
    template: PgTemplate,
    *,
    listen: Sequence[str] = (LOOPBACK,),
    settings: Mapping[str, str] | None = None,
    hba: Sequence[str] = _TRUST_HBA,
    ssl: bool = False,
    start: bool = True,
) -> PgCluster:
    """Copy *template* into a new cluster on loopback; the caller must ``destroy()`` it.

    The arguments are those of :func:`pg_cluster`.
    """
    for host in listen:
        if not host.startswith("127."):
            raise ValueError(f"throwaway clusters listen on loopback only, not {host}")
    run_as = template.run_as
    base = _scratch_dir("todo-pg-", run_as)
    cluster = PgCluster(base, template.bindir, run_as, free_port(listen[0]), tuple(listen))
    try:
        shutil.copytree(template.datadir, cluster.datadir, symlinks=True)
        conf: dict[str, str] = {
            "port": str(cluster.port),
            "listen_addresses": ",".join(listen),
            "unix_socket_directories": str(base),
            "max_connections": "40",
            "shared_buffers": "16MB",
            # Shared memory segments as files in the data directory: deleted with it,
            # even after an immediate stop.
            "dynamic_shared_memory_type": "mmap",
            # Surviving power loss is not under test; a clean restart keeps every commit.
            "fsync": "off",
        }
        if ssl:
            make_certificate(cluster.datadir, listen)
            conf["ssl"] = "on"
        conf.update(settings or {})
        with (cluster.datadir / "postgresql.conf").open("a") as out:
            out.write("\n# throwaway test cluster\n")
            out.writelines(f"{key} = {_conf_value(value)}\n" for key, value in conf.items())
        (cluster.datadir / "pg_hba.conf").write_text("\n".join(hba) + "\n")
        run_as.own(base)
        if start:
            cluster.start()
    except BaseException:
        cluster.destroy()
        raise
    return cluster


@pytest.fixture
def pg_cluster(pg_template: PgTemplate) -> Iterator[ClusterFactory]:
    """Make throwaway clusters for one test; each is stopped and deleted afterwards.

    ``listen`` lists loopback addresses (``127.0.0.2`` works on Linux: all of 127/8
    is loopback). ``settings`` go into postgresql.conf as given, ``hba`` replaces
    pg_hba.conf (default: trust on 127.0.0.1), ``ssl`` adds a self-signed
    certificate for the listen addresses and turns TLS on.
    """
    made: list[PgCluster] = []

    def make(**options: Any) -> PgCluster:
        cluster = make_cluster(pg_template, **options)
        made.append(cluster)
        return cluster

    try:
        yield make
    finally:
        for cluster in made:
            cluster.destroy()


@pytest.fixture(scope="session")
def own_cluster(pg_template: PgTemplate) -> Iterator[PgCluster]:
    """A throwaway cluster for the whole session (one per xdist worker), superuser and trust.

    For what needs powers a hosted database's role lacks (a PgBouncer of our own in
    front of it, reading its wire, its statement log), whatever TEST_DATABASE_URL is.
    """
    cluster = make_cluster(pg_template)
    try:
        yield cluster
    finally:
        cluster.destroy()


# -- PgBouncer --------------------------------------------------------------------------


@dataclass
class PgBouncer:
    """One PgBouncer in transaction pool mode on loopback; it can be restarted."""

    base: Path
    host: str
    port: int
    run_as: ServerAccount
    binary: str
    process: subprocess.Popen[bytes] | None = None

    def url(self, database: str, *, user: str = "postgres", password: str | None = None) -> URL:
        """A psycopg2 URL reaching *database* through this PgBouncer."""
        return URL.create(
            "postgresql+psycopg2",
            username=user,
            password=password,
            host=self.host,
            port=self.port,
            database=database,
        )

    @property
    def logfile(self) -> Path:
        """PgBouncer's log."""
        return self.base / "pgbouncer.log"

    @property
    def pid(self) -> int:
        """The process id of the running PgBouncer."""
        if self.process is None:
            raise RuntimeError("PgBouncer was not started")
        return self.process.pid

    def is_running(self) -> bool:
        """Tell whether the PgBouncer process is alive."""
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start PgBouncer on its port and wait until it accepts connections."""
        process = self.run_as.popen(
            [self.binary, str(self.base / "pgbouncer.ini")],
            cwd=self.base,
            log=self.base / "stdout.log",
        )
        self.process = process
        _wait_until(
            lambda: _port_open(self.host, self.port),
            lambda: process.poll() is not None,
            what=f"PgBouncer on {self.host}:{self.port}",
            log=self.logfile,
        )

    def stop(self) -> None:
        """Stop PgBouncer (SIGTERM, then SIGKILL if it lingers); every client drops."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def restart(self) -> None:
        """Stop PgBouncer and start it again on the same port."""
        self.stop()
        self.start()

    def destroy(self) -> None:
        """Stop PgBouncer and delete its files; idempotent."""
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


def _userlist_entry(user: str, password: str) -> str:
    return '"{}" "{}"\n'.format(user.replace('"', '""'), password.replace('"', '""'))


def start_pgbouncer(
    run_as: ServerAccount,
    target: URL,
    *,
    pool_size: int = 5,
    users: Mapping[str, str] | Sequence[str] = ("postgres",),
    listen: str = LOOPBACK,
    tls: bool = False,
    settings: Mapping[str, str] | None = None,
) -> PgBouncer:
    """Start a PgBouncer in transaction pool mode in front of *target*; ``destroy()`` it.

    Every database name is forwarded to *target*'s host and port, with at most
    *pool_size* server connections per database and user. *users* given as a list
    are trusted; given as a mapping of passwords, clients authenticate with SCRAM and
    PgBouncer logs in to the server with the same password. ``tls`` makes PgBouncer
    require TLS from its clients, as Neon's pooler does, and use it towards a server
    that offers it. *settings* are added to the ``[pgbouncer]`` section as given.
    """
    binary = find_binary("pgbouncer")
    if not (target.host or "").startswith("127.") or not listen.startswith("127."):
        raise ValueError("PgBouncer runs on loopback and targets a loopback server only")
    base = _scratch_dir("todo-pgb-", run_as)
    passwords = dict(users) if isinstance(users, Mapping) else dict.fromkeys(users, "")
    (base / "userlist.txt").write_text(
        "".join(_userlist_entry(user, password) for user, password in passwords.items())
    )
    port = free_port(listen)
    lines = [
        "[databases]",
        f"* = host={target.host} port={target.port or 5432}",
        "[pgbouncer]",
        f"listen_addr = {listen}",
        f"listen_port = {port}",
        "unix_socket_dir =",
        f"auth_type = {'scram-sha-256' if isinstance(users, Mapping) else 'trust'}",
        f"auth_file = {base / 'userlist.txt'}",
        "pool_mode = transaction",
        f"default_pool_size = {pool_size}",
        "max_client_conn = 400",
        f"logfile = {base / 'pgbouncer.log'}",
        f"pidfile = {base / 'pgbouncer.pid'}",
    ]
    if tls:
        make_certificate(base, (listen,))
        lines += [
            "client_tls_sslmode = require",
            f"client_tls_key_file = {base / 'server.key'}",
            f"client_tls_cert_file = {base / 'server.crt'}",
            # TLS towards a server that offers it (a server that requires it gets it).
            "server_tls_sslmode = prefer",
        ]
    lines += [f"{key} = {value}" for key, value in (settings or {}).items()]
    (base / "pgbouncer.ini").write_text("\n".join(lines) + "\n")
    run_as.own(base)
    bouncer = PgBouncer(base, listen, port, run_as, binary)
    try:
        bouncer.start()
    except BaseException:
        bouncer.destroy()
        raise
    return bouncer


class PgBouncerFactory(Protocol):
    """Makes a PgBouncer: see :func:`pgbouncer`."""

    def __call__(  # noqa: D102 - documented on pgbouncer
        self,
        target: URL,
        *,
        pool_size: int = 5,
        users: Sequence[str] = ("postgres",),
        tls: bool = False,
    ) -> PgBouncer: ...


@pytest.fixture
def pgbouncer(server_account: ServerAccount) -> Iterator[PgBouncerFactory]:
    """Start PgBouncers for one test; each is stopped and its files deleted afterwards.

    ``make(target)`` forwards every database name to *target* (a loopback server, e.g.
    a throwaway cluster) in transaction pool mode with at most *pool_size* server
    connections per database and user, trusting the listed *users*; ``tls`` makes it
    require TLS from its clients.
    """
    made: list[PgBouncer] = []

    def make(target: URL, **options: Any) -> PgBouncer:
        bouncer = start_pgbouncer(server_account, target, **options)
        made.append(bouncer)
        return bouncer

    try:
        yield make
    finally:
        for bouncer in made:
            bouncer.destroy()


class PeakSampler:
    """Polls a count query from a background thread and keeps the highest answer.

    Use as a context manager; ``peak`` and ``samples`` are final once it exits.
    """

    def __init__(self, engine: Engine, query: str, params: Mapping[str, object]) -> None:
        self._engine = engine
        self._query = query
        self._params = dict(params)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-sampler", daemon=True)
        self._error: BaseException | None = None
        self.peak = 0
        self.samples = 0

    def _run(self) -> None:
        try:
            with self._engine.connect() as conn:
                while not self._stop.is_set():
                    value = int(conn.execute(text(self._query), self._params).scalar_one())
                    self.peak = max(self.peak, value)
                    self.samples += 1
                    self._stop.wait(0.002)
        except BaseException as err:  # noqa: BLE001 - re-raised in the test's thread
            self._error = err

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        if self._error is not None:
            raise RuntimeError("the sampler failed") from self._error


def _wait_until(
    ready: Callable[[], bool], died: Callable[[], bool], *, what: str, log: Path
) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    while not ready():
        if died() or time.monotonic() > deadline:
            try:
                tail = log.read_text(errors="replace")[-4000:]
            except OSError:
                tail = "(no log)"
            raise RuntimeError(f"{what} did not come up:\n{tail}")
        time.sleep(0.005)
