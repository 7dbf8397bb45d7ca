"""The quality gate: ``nox`` runs lint, typecheck, tests and integration.

Tool versions come from the PEP 735 dependency groups in pyproject.toml, installed
from the committed uv.lock (``uv sync --locked``). The project is always installed
editable, so a reused venv (``nox -R``) tests the code as it is on disk.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import nox

nox.needs_version = ">=2025.10.14"
nox.options.default_venv_backend = "uv|virtualenv"
nox.options.download_python = "never"
nox.options.error_on_external_run = True

PYTHONS = ["3.11", "3.12", "3.13"]
ROOT = Path(__file__).parent
CODE = ["backend", "noxfile.py"]
WORKFLOWS = sorted(str(p) for p in (ROOT / ".github" / "workflows").glob("*.yml"))
LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"


def _expose_pyenv_pythons() -> None:
    """Make every supported pyenv Python answer as ``python3.X`` for nox and uv.

    pyenv's shims answer only for the selected versions, and pyenv's own shim for
    ``nox`` selects just the one nox runs on. Keep the current selection first (it
    stays the default) and append the newest installed patch of each missing minor.
    """
    pyenv = shutil.which("pyenv")
    if pyenv is None:
        return
    installed = subprocess.run(
        [pyenv, "versions", "--bare"], capture_output=True, text=True, check=False
    ).stdout.split()
    selected = [v for v in os.environ.get("PYENV_VERSION", "").split(":") if v]
    for minor in PYTHONS:
        prefix = minor + "."
        if any(v.startswith(prefix) for v in selected):
            continue
        matches = [v for v in installed if v.startswith(prefix) and v[len(prefix) :].isdigit()]
        if matches:
            selected.append(max(matches, key=lambda v: int(v[len(prefix) :])))
    if selected:
        os.environ["PYENV_VERSION"] = ":".join(selected)


_expose_pyenv_pythons()
# This machine sets PYTHONDONTWRITEBYTECODE, which makes every run recompile
# SQLAlchemy and pydantic; the sessions' venvs are disposable, so let them cache.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)


def install(session: nox.Session, *groups: str) -> None:
    """Install the project (editable) and *groups* into the session's venv from uv.lock."""
    session.run_install(
        "uv",
        "sync",
        "--locked",
        "--no-default-groups",
        *(f"--group={group}" for group in groups),
        f"--python={session.virtualenv.location}",
        env={"UV_PROJECT_ENVIRONMENT": session.virtualenv.location},
        external=True,
    )


@nox.session
def lint(session: nox.Session) -> None:
    """Ruff lint and format check; GitHub workflow schema and security audit."""
    install(session, "lint")
    session.run("ruff", "check", *CODE)
    session.run("ruff", "format", "--check", *CODE)
    if WORKFLOWS:
        session.run("check-jsonschema", "--builtin-schema", "vendor.github-workflows", *WORKFLOWS)
        # The auditor persona reports everything; each exception is explained inline.
        session.run("zizmor", "--offline", "--persona=auditor", *WORKFLOWS)


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the package, tests, benchmark, chaos soak and this noxfile."""
    install(session, "typecheck", "bench")
    session.run("mypy")


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """Unit tests on in-memory SQLite (the 90% branch-coverage floor measured on 3.11)."""
    install(session, "test")
    # No unit test uses Hypothesis; its plugin would cost every run 0.3 s of imports.
    pytest = ["pytest", "-p", "no:hypothesispytest", "backend/tests/unit", *session.posargs]
    if session.python != PYTHONS[0]:
        # Branch coverage is a property of the suite, not of the interpreter: tracing
        # doubles a run, so it is measured once, on the oldest supported Python.
        session.run(*pytest)
        return
    session.env["COVERAGE_FILE"] = str(ROOT / ".nox" / f".coverage-{session.python}")
    session.run("coverage", "erase")
    session.run("coverage", "run", "-m", *pytest)
    session.run("coverage", "report")


@nox.session
def integration(session: nox.Session) -> None:
    """PostgreSQL tests against TEST_DATABASE_URL (default: the local server).

    With CI=true, a missing or unreachable database fails the session.
    """
    install(session, "test")
    session.env["TEST_DATABASE_URL"] = os.environ.get("TEST_DATABASE_URL", LOCAL_POSTGRES)
    # One worker per core, each test module on one worker (it owns a scratch
    # database): the console-script and cluster tests wait on process start-up.
    workers = ["-n", "auto", "--dist", "loadfile"]
    session.run("pytest", *workers, "backend/tests/integration", *session.posargs)


@nox.session(default=False)
def fmt(session: nox.Session) -> None:
    """Apply ruff's fixes and formatting."""
    install(session, "lint")
    session.run("ruff", "check", "--fix", *CODE)
    session.run("ruff", "format", *CODE)


@nox.session(default=False)
def demo(session: nox.Session) -> None:
    """Run ``todo-db demo`` on the embedded SQLite default (the main job)."""
    install(session)
    session.run("todo-db", "demo", *session.posargs)


@nox.session(default=False)
def chaos(session: nox.Session) -> None:
    """Chaos soak on a throwaway cluster and PgBouncer: ``nox -s chaos -- --duration N``."""
    install(session, "test")
    session.run("python", "backend/chaos/run.py", *session.posargs)


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """Benchmark the repository against raw psycopg2 over a simulated Neon link."""
    install(session, "bench")
    session.env["TEST_DATABASE_URL"] = os.environ.get("TEST_DATABASE_URL", LOCAL_POSTGRES)
    session.run("python", "backend/bench/run.py", *session.posargs)
