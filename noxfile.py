"""The quality gate: ``nox`` runs lint, typecheck, tests and integration.

Tool versions come from the PEP 735 dependency groups in pyproject.toml, installed
from the committed uv.lock (``uv sync --locked``). The project is always installed
editable, so a reused venv (``nox -R``) tests the code as it is on disk.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import nox

nox.needs_version = ">=2025.10.14"
nox.options.default_venv_backend = "uv|virtualenv"
nox.options.download_python = "never"
nox.options.error_on_external_run = True

PYTHONS = ["3.11", "3.12", "3.13"]
ROOT = Path(__file__).parent
CODE = ["backend", "noxfile.py"]
WORKFLOWS = sorted(str(p) for p in (ROOT / ".github" / "workflows").glob("*.yml"))


def _shell_scripts() -> list[str]:
    """Return the shell scripts to lint: ``.ci/run`` and every tracked ``*.sh``."""
    tracked = subprocess.run(
        ["git", "ls-files", "--", "*.sh"], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.split()
    return [".ci/run", *tracked]


LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
# One worker per core, each test module on one worker (it owns a scratch database):
# the console-script and cluster tests wait on process start-up.
INTEGRATION = ["pytest", "-n", "auto", "--dist", "loadfile", "backend/tests/integration"]
UNIT = ["pytest", "backend/tests/unit"]
# On GitHub Actions each pytest run leaves JUnit XML here (uploaded by the workflow)
# and its counts in the job summary.
REPORTS = ROOT / "reports"
# Coverage data of the unit (3.11) and integration runs, combined by `nox -s coverage`.
COVERAGE_DATA = ROOT / ".nox"
# Each integration run writes what it skipped here (backend/tests/conftest.py); the
# block is printed at the end of its session and once more when nox exits.
SKIPPED = ROOT / ".nox" / "skipped"
_SKIP_REPORTS: list[Path] = []
_RULE = "!" * 88  # as tests.skips.RULE and INSTALL_HEADING
_INSTALL_HEADING = "Install what is missing:"


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
        "--extra=async",  # todo_backend.aio is tested, type-checked and benchmarked too
        *(f"--group={group}" for group in groups),
        f"--python={session.virtualenv.location}",
        env={"UV_PROJECT_ENVIRONMENT": session.virtualenv.location},
        external=True,
    )


@nox.session
def lint(session: nox.Session) -> None:
    """Ruff, shellcheck, squawk over every revision, workflow schema and security audit."""
    install(session, "lint")
    session.run("ruff", "check", *CODE)
    session.run("ruff", "format", "--check", *CODE)
    # Each revision's PostgreSQL SQL, one revision at a time: what it locks on a live table.
    session.run("python", "-m", "todo_backend.migration_lint")
    session.run("shellcheck", *_shell_scripts())
    github = ROOT / ".github"
    if WORKFLOWS:
        session.run("check-jsonschema", "--builtin-schema", "vendor.github-workflows", *WORKFLOWS)
    actions = sorted(str(p) for p in github.glob("actions/*/action.yml"))
    if actions:
        session.run("check-jsonschema", "--builtin-schema", "vendor.github-actions", *actions)
    if (github / "dependabot.yml").exists():
        dependabot = str(github / "dependabot.yml")
        session.run("check-jsonschema", "--builtin-schema", "vendor.dependabot", dependabot)
    if github.is_dir():
        # Workflows, composite actions and the Dependabot config. The auditor persona
        # reports everything; each exception is explained inline.
        session.run("zizmor", "--offline", "--persona=auditor", str(github))


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the package, tests, benchmark, chaos soak and this noxfile."""
    install(session, "typecheck", "bench")
    session.run("mypy")


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """Unit tests on in-memory SQLite (coverage recorded on 3.11 for `nox -s coverage`)."""
    install(session, "test")
    pytest = [*UNIT, *session.posargs]
    if session.python != PYTHONS[0]:
        # Branch coverage is a property of the suite, not of the interpreter: tracing
        # doubles a run, so it is measured once, on the oldest supported Python.
        run_pytest(session, session.name, pytest)
        return
    session.env["COVERAGE_FILE"] = str(COVERAGE_DATA / f".coverage-{session.python}")
    session.run("coverage", "erase")
    run_pytest(session, session.name, ["coverage", "run", "-m", *pytest])
    # The unit suite alone, for information: the floor is enforced by `nox -s coverage`
    # over the unit and integration runs together (the PostgreSQL paths need both).
    session.run("coverage", "report", "--fail-under=0", "--skip-covered")


@nox.session
def integration(session: nox.Session) -> None:
    """PostgreSQL tests against TEST_DATABASE_URL (default: the local server).

    Any server: this machine's, a service container, a Neon branch (pooled or direct),
    the Neon stand-in. With CI=true, a missing or unreachable database fails the session,
    and so does any skip; ``-- --strict`` (or TEST_STRICT=1) makes a local skip fail too.
    What skipped is summed up at the end of the session and of ``nox``.
    """
    install(session, "test")
    args = _strict_args(session)
    session.env["TEST_DATABASE_URL"] = os.environ.get("TEST_DATABASE_URL", LOCAL_POSTGRES)
    label = os.environ.get("TEST_DATABASE_LABEL", session.name)
    report = _skip_report(session, label)
    # Every xdist worker and todo-db child records its own data (coverage's subprocess
    # patch, pyproject.toml); `nox -s coverage` adds them to the unit run's.
    session.env["COVERAGE_FILE"] = str(COVERAGE_DATA / ".coverage-integration")
    session.run("coverage", "erase")
    try:
        run_pytest(
            session, label, ["coverage", "run", "--parallel-mode", "-m", *INTEGRATION, *args]
        )
    finally:
        session.run("coverage", "combine", "--quiet", success_codes=[0, 1])
        _print_skips([report])


@nox.session
def coverage(session: nox.Session) -> None:
    """Enforce the 90% branch-coverage floor over the unit (3.11) and integration runs.

    Runs after ``tests-3.11`` and ``integration`` in a bare ``nox``; either alone
    covers only its side of the package (SQLite or PostgreSQL paths).
    """
    install(session, "test")
    data = sorted(str(path) for path in COVERAGE_DATA.glob(".coverage-*") if path.is_file())
    if not data:
        session.error("no coverage data: run `nox -s tests-3.11 integration` first")
    session.env["COVERAGE_FILE"] = str(COVERAGE_DATA / ".coverage")
    session.run("coverage", "combine", "--keep", "--quiet", *data)
    try:
        session.run("coverage", "report")
    finally:
        if "GITHUB_STEP_SUMMARY" in os.environ:
            table = session.run(
                "coverage", "report", "--format=markdown", "--fail-under=0", silent=True
            )
            _summary(f"### Branch coverage (unit + integration)\n\n{table}\n")


@nox.session(default=False)
def standin(session: nox.Session) -> None:
    """Run the integration suite through the Neon stand-in's pooled, then direct endpoint.

    The stand-in (backend/tests/neon_standin.py) is started on 127.0.0.2 for the
    session and stopped afterwards, passed or failed. ``-- --strict`` as in integration.
    """
    install(session, "test")
    args = _strict_args(session)
    state = Path(session.create_tmp()) / "standin"
    standin = ["python", "-m", "tests.neon_standin"]
    session.env["PYTHONPATH"] = str(ROOT / "backend")
    reports: list[Path] = []
    session.run(*standin, "start", "--dir", str(state))
    try:
        for endpoint in ("pooled", "direct"):
            url = (state / f"{endpoint}.url").read_text().strip()
            session.log(f"integration suite through the stand-in's {endpoint} endpoint")
            session.env["TEST_DATABASE_URL"] = url
            label = f"standin-{endpoint}"
            reports.append(_skip_report(session, label))
            run_pytest(session, label, [*INTEGRATION, *args])
    finally:
        session.run(*standin, "stop", "--dir", str(state))
        _print_skips(reports)


def _strict_args(session: nox.Session) -> list[str]:
    """Return the session's pytest arguments; ``--strict`` among them sets TEST_STRICT=1.

    (pytest's own ``--strict`` means its strict config options, not "fail on a skip".)
    """
    args = list(session.posargs)
    if "--strict" in args:
        args = [arg for arg in args if arg != "--strict"]
        session.env["TEST_STRICT"] = "1"
    return args


def _skip_report(session: nox.Session, label: str) -> Path:
    """Have the next pytest run write its skip summary to ``.nox/skipped/<label>.json``.

    Registers (once) the printing of every such summary when nox exits: nox has no
    hook after its last session, but its process ends after its own summary lines.
    """
    path = SKIPPED / f"{label}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    session.env["TEST_SKIP_REPORT"] = str(path)
    if not _SKIP_REPORTS:
        atexit.register(_print_skips, _SKIP_REPORTS)
    if path not in _SKIP_REPORTS:
        _SKIP_REPORTS.append(path)
    return path


def _print_skips(reports: list[Path]) -> None:
    """Print one skip block for the runs behind *reports*; nothing when none skipped.

    The lines come from each run's JSON (backend/tests/conftest.py), assembled as
    ``tests.skips.skip_block`` does: each run's counts, each missing piece's install
    commands once, how to make a skip fail the run.
    """
    summaries: list[str] = []
    installs: dict[str, list[str]] = {}
    hint = ""
    for path in reports:
        try:
            run = json.loads(path.read_text(encoding="utf-8"))
            summaries += run["summary"]
            installs.update(run["install"])
            hint = run["hint"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # that pytest run did not get to its end
    if not summaries:
        return
    heading = [_INSTALL_HEADING] if installs else []
    commands = [line for lines in installs.values() for line in lines]
    lines = [_RULE, *summaries, *heading, *commands, hint, _RULE]
    if sys.stderr.isatty() and "NO_COLOR" not in os.environ:
        lines = [f"\033[1;33m{line}\033[0m" for line in lines]
    sys.stdout.flush()  # after the session's output; nox logs to stderr
    print("\n".join(lines), file=sys.stderr, flush=True)


@nox.session(name="deps-lowest", python=PYTHONS[0], default=False)
def deps_lowest(session: nox.Session) -> None:
    """Run the unit suite on the lowest versions pyproject.toml allows (not the lock)."""
    _unlocked(session, "lowest-direct")


@nox.session(name="deps-latest", python=PYTHONS[-1], default=False)
def deps_latest(session: nox.Session) -> None:
    """Run the unit suite on the newest releases pyproject.toml allows (not the lock)."""
    _unlocked(session, "highest")


def _unlocked(session: nox.Session, resolution: str) -> None:
    session.run_install(
        "uv",
        "pip",
        "install",
        "--upgrade",
        f"--resolution={resolution}",
        f"--python={session.virtualenv.location}",
        "--editable=.[async]",
        "--group=test",
        external=True,
    )
    session.run("uv", "pip", "list", f"--python={session.virtualenv.location}", external=True)
    run_pytest(session, session.name, [*UNIT, *session.posargs])


def run_pytest(session: nox.Session, label: str, command: list[str]) -> None:
    """Run *command* (a pytest run); on GitHub Actions also report it as *label*.

    There, pytest writes JUnit XML to ``reports/<label>.xml`` and the job summary
    gets a line of counts, whether the run passed or not.
    """
    if os.environ.get("GITHUB_ACTIONS") != "true":
        session.run(*command)
        return
    junit = REPORTS / f"{label}.xml"
    junit.unlink(missing_ok=True)
    try:
        session.run(*command, f"--junitxml={junit}")
    finally:
        _summary(_junit_counts(label, junit))


def _junit_counts(label: str, junit: Path) -> str:
    """One Markdown line with the passed/failed/errors/skipped counts of a JUnit file."""
    if not junit.is_file():
        return f"**{label}**: no test report (pytest did not run to the end)\n\n"
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    root = ElementTree.parse(junit).getroot()  # noqa: S314 - the report pytest just wrote
    for suite in root.iter("testsuite"):
        for key in totals:
            totals[key] += int(suite.get(key, "0"))
    passed = totals["tests"] - totals["failures"] - totals["errors"] - totals["skipped"]
    return (
        f"**{label}**: {passed} passed, {totals['failures']} failed, "
        f"{totals['errors']} errors, {totals['skipped']} skipped\n\n"
    )


def _summary(markdown: str) -> None:
    path = os.environ.get("GITHUB_STEP_SUMMARY")
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(markdown)


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


@nox.session(default=False)
def rehearse(session: nox.Session) -> None:
    """Time each revision on a 1,000,000-row tasks table and its longest ACCESS EXCLUSIVE hold.

    On a scratch database of TEST_DATABASE_URL (default: the local server); figures go
    to docs/benchmarks/migrations.md and .json (``-- --rows N --no-write`` to try).
    """
    install(session)
    session.env["TEST_DATABASE_URL"] = os.environ.get("TEST_DATABASE_URL", LOCAL_POSTGRES)
    session.run("python", "backend/bench/rehearse.py", *session.posargs)


@nox.session(default=False)
def scale(session: nox.Session) -> None:
    """Scale benchmark: every call at 10k and 1M rows (``-- --ten-million`` adds 10M)."""
    install(session, "bench")
    session.env["TEST_DATABASE_URL"] = os.environ.get("TEST_DATABASE_URL", LOCAL_POSTGRES)
    session.run("python", "backend/bench/scale.py", *session.posargs)
