"""todo-db: manage one user's tasks and check the database from the command line.

``todo-db demo`` shows the package at work; ``init`` creates the schema; ``check``
reports on the connection; ``add``, ``list``, ``done`` and ``delete`` act on the tasks
of the user named by ``--user``, through the same user-scoped repository the API
uses. The database is ``--database-url``, else ``DATABASE_URL`` from the environment
or ``.env``, else the embedded SQLite file ``./todo.db`` (announced on stderr). Every
failure is one line on stderr with a documented exit code, and no output ever shows
a password.

Each subcommand is one :class:`Command` entry in :data:`COMMANDS`: its arguments and
its handler. Adding a subcommand means writing a handler and listing it there.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC
from enum import IntEnum
from pathlib import Path
from types import ModuleType
from typing import Any, Final, NoReturn

from dotenv import dotenv_values
from pydantic import ValidationError
from sqlalchemy import Engine, inspect
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from todo_backend import __version__
from todo_backend.config import Settings, load_settings, mask_url
from todo_backend.db import (
    cannot_connect,
    check_database,
    create_db_engine,
    error_reason,
    get_session,
    url_host,
)
from todo_backend.errors import ConfigurationError, DatabaseUnavailableError, TodoBackendError
from todo_backend.models import Task, TaskCreate, TaskRead, TaskUpdate, validate_user_id
from todo_backend.repository import MAX_PAGE_SIZE, TaskRepository

__all__ = [
    "COMMANDS",
    "FALLBACK_DATABASE",
    "Command",
    "ExitCode",
    "build_parser",
    "describe_endpoint",
    "ensure_schema",
    "format_tasks",
    "main",
    "redact",
    "resolve_settings",
    "run_add",
    "run_check",
    "run_delete",
    "run_demo",
    "run_done",
    "run_init",
    "run_list",
    "run_migrate",
]

PROG: Final = "todo-db"
FALLBACK_DATABASE: Final = "todo.db"
DEMO_USERS: Final = ("demo-alice", "demo-bob")
_TABLE: Final = "tasks"
_TITLE_WIDTH: Final = 60


class ExitCode(IntEnum):
    """The process exit status of every outcome; listed in ``todo-db --help``."""

    OK = 0
    DATABASE_ERROR = 1
    USAGE = 2
    CONFIGURATION = 3
    UNAVAILABLE = 4
    INVALID_INPUT = 5
    NOT_FOUND = 6
    MIGRATION_NEEDED = 7
    OUTPUT_CLOSED = 141


_EXIT_MEANINGS: Final = {
    ExitCode.OK: "success (check: the database is healthy)",
    ExitCode.DATABASE_ERROR: "the database refused the statement (permissions, constraints)",
    ExitCode.USAGE: "bad command line",
    ExitCode.CONFIGURATION: "malformed DATABASE_URL, --database-url or DB_* setting",
    ExitCode.UNAVAILABLE: "database unreachable or unhealthy (run `todo-db check`)",
    ExitCode.INVALID_INPUT: "invalid user id, title or description",
    ExitCode.NOT_FOUND: "no such task for this user (another user's task counts as none)",
    ExitCode.MIGRATION_NEEDED: "migrate --check: the database is behind or differs from the models",
    ExitCode.OUTPUT_CLOSED: "the reader of the output went away (e.g. `| head`)",
}

# Passwords in URLs (scheme://user:secret@host) and in key=value form (password=...).
# Greedy up to the last "@" of the word: over-masking beats leaking. The literal
# placeholder PASSWORD of the package's URL hints is left readable.
_URL_PASSWORD: Final = re.compile(
    r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@]*:)(?!PASSWORD@HOST)\S*@"
)
_KEYWORD_PASSWORD: Final = re.compile(r"(?P<head>password=)[^\s&'\"]*", re.IGNORECASE)


def redact(text: str) -> str:
    """Return *text* with every password in a URL or ``password=`` pair replaced by ``***``.

    Applied to everything this tool writes to stderr, argparse's own messages
    included: argparse echoes the offending argument, which may be a database URL.
    """
    text = _URL_PASSWORD.sub(r"\g<head>***@", text)
    return _KEYWORD_PASSWORD.sub(r"\g<head>***", text)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors never echo a password."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {redact(message)}\n")


class _TaskNotFoundError(Exception):
    """The user owns no task with this id (it may belong to someone else)."""

    def __init__(self, task_id: int, user_id: str) -> None:
        super().__init__(f"no task {task_id} for user {user_id}")


class _InvalidInputError(Exception):
    """Input failed validation; ``lines`` holds one ``field: message`` line per error."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("; ".join(lines))
        self.lines = lines


# -- database selection ------------------------------------------------------------


def resolve_settings(database_url: str | None, env_file: str = ".env") -> Settings:
    """Choose the database: *database_url*, else ``DATABASE_URL``, else ``./todo.db``.

    ``DATABASE_URL`` is read from the environment or *env_file* by
    :func:`~todo_backend.config.load_settings`; the ``DB_*`` tuning variables apply
    whichever URL is chosen. Only a missing or blank ``DATABASE_URL`` falls back to the
    embedded SQLite file, and that is said once on stderr; a malformed one raises
    :class:`ConfigurationError`.
    """
    if database_url is None and not _database_url_is_set(env_file):
        _note(f"no DATABASE_URL set; using the embedded SQLite database ./{FALLBACK_DATABASE}")
        database_url = f"sqlite:///{FALLBACK_DATABASE}"
    return load_settings(env_file, database_url=database_url)


def _database_url_is_set(env_file: str) -> bool:
    # The same precedence as load_settings: the environment wins over the file.
    raw = os.environ.get("DATABASE_URL")
    if raw is None and Path(env_file).is_file():
        raw = dotenv_values(env_file).get("DATABASE_URL")
    return bool(raw and raw.strip())


def ensure_schema(engine: Engine) -> bool:
    """Create the schema when the tasks table is missing; return whether it was created.

    Costs one catalogue query when the table exists, so every command can call it
    and work on a fresh database without a prior ``todo-db init``. A missing schema is
    created by running the migrations, so a database this tool creates is managed by
    them from the start and ``todo-db migrate`` later finds it current.
    """
    if inspect(engine).has_table(_TABLE):
        return False
    _migrations().upgrade(engine)
    return True


def _migrations() -> ModuleType:
    # Alembic takes about 0.2 s to import: load it only when the schema must change.
    from todo_backend import migrate  # noqa: PLC0415

    return migrate


@contextmanager
def _repository(engine: Engine) -> Iterator[TaskRepository]:
    sessions = get_session(engine)  # the package's one session helper
    try:
        yield TaskRepository(next(sessions))
    finally:
        sessions.close()


# -- output ------------------------------------------------------------------------


def format_tasks(tasks: Sequence[Task]) -> str:
    """Render *tasks* as an aligned text table: id, done, creation time (UTC), title."""
    header = ("ID", "DONE", "CREATED (UTC)", "TITLE")
    rows = [
        (
            str(task.id),
            "yes" if task.complete else "no",
            task.created_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S"),
            _clip(task.title, _TITLE_WIDTH),
        )
        for task in tasks
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(3)]
    return "\n".join(
        f"{row[0]:>{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:<{widths[2]}}  {row[3]}"
        for row in (header, *rows)
    )


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _task_json(task: Task) -> dict[str, Any]:
    return TaskRead.model_validate(task).model_dump(mode="json")


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2))


def _print_task(task: Task, verb: str, *, as_json: bool) -> None:
    if as_json:
        _print_json(_task_json(task))
        return
    state = "done" if task.complete else "pending"
    print(f"{verb} task {task.id} for user {task.user_id}: {task.title} ({state})")


def _note(message: str) -> None:
    print(f"{PROG}: {redact(message)}", file=sys.stderr)


def _fail(code: ExitCode, *lines: str) -> int:
    for line in lines:
        # One line per error, whatever the message holds.
        flat = " ".join(line.splitlines())
        print(f"{PROG}: error: {redact(flat)}", file=sys.stderr)
    return code


# -- input -------------------------------------------------------------------------


def _validation_lines(err: ValidationError, field: str, *, located: bool = True) -> list[str]:
    # pydantic's str(err) repeats input_value=...; build "field: message" lines instead.
    # Not *located*: every error is about the one option *field* (its loc is the API's).
    lines = []
    for problem in err.errors(include_url=False, include_input=False):
        where = ".".join(str(part) for part in problem["loc"]) if located else ""
        where = where or field
        lines.append(f"invalid {where}: {problem['msg']}")
    return lines


def _owner(raw: str) -> str:
    try:
        return validate_user_id(raw)
    except ValidationError as err:
        raise _InvalidInputError(_validation_lines(err, "user", located=False)) from None


def _limit(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {raw!r}") from None
    if not 1 <= value <= MAX_PAGE_SIZE:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_PAGE_SIZE}, got {value}")
    return value


def _user_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--user", required=True, metavar="USER", help="the owner's user id")


def _json_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--json", action="store_true", help=f"print {what}")


def _id_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("id", type=int, metavar="ID", help="the task id")


# -- commands ----------------------------------------------------------------------


def run_init(_args: argparse.Namespace, engine: Engine) -> int:
    """Create the tasks table and its indexes if missing; a second run changes nothing."""
    created = ensure_schema(engine)
    state = "created" if created else "already present, nothing to do"
    print(f"table {_TABLE} {state} on {redact(mask_url(engine.url))}")
    return ExitCode.OK


_RLS_STATES: Final = {
    "forced": "on and forced (revision 0003): PostgreSQL keeps users apart too",
    "on": "on, not forced: the table's owner is exempt",
    "off": "off: the repository's user_id condition is the only wall (run `todo-db migrate`)",
    "no table": "off: no tasks table yet",
}


def run_check(_args: argparse.Namespace, engine: Engine) -> int:
    """Connect once and report reachability, latency, server, TLS, endpoint, bounds, RLS.

    Row-level security (PostgreSQL): on and forced, on, or off, and a warning when the
    connecting role bypasses it or cannot switch to the application role. The check
    runs as the connecting role. The URL is shown with its password masked. Exits 0
    when the database answered, otherwise :attr:`ExitCode.UNAVAILABLE` with what to check on stderr.
    """
    health = check_database(engine)
    is_sqlite = engine.dialect.name == "sqlite"
    if not health.ok:
        server = "-"
    elif is_sqlite:
        server = health.server_version
    else:
        server = f"PostgreSQL {health.server_version}"
    if health.ssl is None:
        tls = "not applicable (SQLite)" if is_sqlite else "unknown"
    else:
        tls = "on" if health.ssl else "off"
    report = {
        "database": redact(mask_url(engine.url)),
        "reachable": "yes" if health.ok else "no",
        "latency": f"{health.latency_ms:.1f} ms (connect and one query)",
        "server": server,
        "tls": tls,
        "endpoint": describe_endpoint(engine.url),
    }
    if health.timeouts:
        # As the server applies them to this connection's statements.
        report["bounds"] = ", ".join(f"{name}={value}" for name, value in health.timeouts.items())
    if health.row_security:
        report["rls"] = _RLS_STATES.get(health.row_security, health.row_security)
    for key, value in report.items():
        print(f"{key + ':':<10} {value}")
    for warning in health.warnings:
        print(f"warning:   {warning}")
    if health.ok:
        return ExitCode.OK
    return _fail(ExitCode.UNAVAILABLE, health.detail)


def _migrate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--check",
        action="store_true",
        help="change nothing; exit 7 if the database is behind the newest revision "
        "or its schema differs from the models",
    )


def run_migrate(args: argparse.Namespace, engine: Engine) -> int:
    """Upgrade the schema to the newest revision; with ``--check``, only report.

    The upgrade is one connection (a cold Neon compute is woken once) and one
    transaction per revision applied, each all or nothing, with its lock waits bounded
    by ``DB_MIGRATION_LOCK_TIMEOUT``; a no-op on a current database.
    ``--check`` changes nothing and exits :attr:`ExitCode.MIGRATION_NEEDED` when the
    database is behind, has no migration history, or differs from the models, one
    problem per line on stderr.
    """
    migrate = _migrations()
    where = redact(mask_url(engine.url))
    if args.check:
        result = migrate.check(engine)
        current, head = result.current or "none", result.head or "none"
        print(f"database {where}: revision {current}, newest {head}")
        if result.ok:
            print("schema: current, and identical to the models")
            return ExitCode.OK
        return _fail(ExitCode.MIGRATION_NEEDED, *result.problems)
    before, after = migrate.upgrade(engine)  # both read on the upgrade's one connection
    if before == after:
        print(f"database {where}: already at revision {after}, nothing to do")
    else:
        print(f"database {where}: migrated from {before or 'an empty schema'} to {after}")
    return ExitCode.OK


def describe_endpoint(url: URL) -> str:
    """Say what *url* connects to: embedded SQLite, a direct server, or a pooled endpoint.

    Neon's pooled (PgBouncer) hosts carry ``-pooler`` in their first DNS label, e.g.
    ``ep-cool-name-123456-pooler.eu-central-1.aws.neon.tech``; every other PostgreSQL
    host is a direct connection.
    """
    if url.get_backend_name() == "sqlite":
        where = url.database if url.database not in (None, "", ":memory:") else "in memory"
        return f"embedded SQLite ({where})"
    host = url_host(url)
    if not host or host.startswith("/"):
        return "direct (Unix socket)"
    if "-pooler" in host.split(".", 1)[0].lower():
        return "pooled (Neon PgBouncer, transaction mode)"
    return "direct"


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    _user_option(parser)
    parser.add_argument("title", metavar="TITLE", help="1 to 200 characters")
    parser.add_argument("--description", metavar="TEXT", help="up to 1000 characters")
    _json_option(parser, "the new task as a JSON object")


def run_add(args: argparse.Namespace, engine: Engine) -> int:
    """Create a task for ``--user`` and print it (as a JSON object with ``--json``)."""
    owner = _owner(args.user)
    data = TaskCreate(title=args.title, description=args.description)
    with _repository(engine) as repo:
        task = repo.create(owner, data)
    _print_task(task, "added", as_json=args.json)
    return ExitCode.OK


def _list_arguments(parser: argparse.ArgumentParser) -> None:
    _user_option(parser)
    state = parser.add_mutually_exclusive_group()
    state.add_argument("--done", action="store_true", help="only completed tasks")
    state.add_argument("--pending", action="store_true", help="only tasks not yet done")
    parser.add_argument(
        "--limit",
        type=_limit,
        default=50,
        metavar="N",
        help=f"at most N tasks, newest first (1-{MAX_PAGE_SIZE}, default 50)",
    )
    _json_option(parser, "a JSON array of task objects")


def run_list(args: argparse.Namespace, engine: Engine) -> int:
    """Print the user's newest tasks as a table, or as a JSON array with ``--json``.

    The JSON array holds one TaskRead object per task, timestamps in ISO-8601 UTC.
    """
    owner = _owner(args.user)
    complete = True if args.done else False if args.pending else None
    with _repository(engine) as repo:
        tasks = repo.list(owner, complete=complete, limit=args.limit)
    if args.json:
        _print_json([_task_json(task) for task in tasks])
    elif not tasks:
        kind = {True: "done ", False: "pending ", None: ""}[complete]
        print(f"no {kind}tasks for user {owner}")
    else:
        print(format_tasks(tasks))
        if len(tasks) == args.limit:
            print(f"(the newest {args.limit} shown; --limit takes up to {MAX_PAGE_SIZE})")
    return ExitCode.OK


def _done_arguments(parser: argparse.ArgumentParser) -> None:
    _user_option(parser)
    _id_argument(parser)
    _json_option(parser, "the completed task as a JSON object")


def run_done(args: argparse.Namespace, engine: Engine) -> int:
    """Mark the user's task ``ID`` complete and print it; another user's task is not found."""
    owner = _owner(args.user)
    with _repository(engine) as repo:
        task = repo.update(owner, args.id, TaskUpdate(complete=True))
    if task is None:
        raise _TaskNotFoundError(args.id, owner)
    _print_task(task, "completed", as_json=args.json)
    return ExitCode.OK


def _delete_arguments(parser: argparse.ArgumentParser) -> None:
    _user_option(parser)
    _id_argument(parser)


def run_delete(args: argparse.Namespace, engine: Engine) -> int:
    """Delete the user's task ``ID``; another user's task is not found and stays intact."""
    owner = _owner(args.user)
    with _repository(engine) as repo:
        deleted = repo.delete(owner, args.id)
    if not deleted:
        raise _TaskNotFoundError(args.id, owner)
    print(f"deleted task {args.id} for user {owner}")
    return ExitCode.OK


def run_demo(_args: argparse.Namespace, engine: Engine) -> int:
    """Walk through the package on the selected database, with two demo users.

    Creates the schema, replaces the earlier tasks of ``demo-alice`` and ``demo-bob``
    (and no one else's), adds tasks for both, lists them, completes and deletes one,
    and shows that one user can neither see nor touch the other's task. Leaves the
    database ready for the other commands; exits non-zero if isolation failed.
    """
    print(f"todo-db demo on {redact(mask_url(engine.url))}")
    print(f"table {_TABLE} {'created' if ensure_schema(engine) else 'is ready'}")
    alice, bob = DEMO_USERS
    with _repository(engine) as repo:
        cleared = _clear_demo_tasks(repo)
        if cleared:
            print(f"removed {cleared} task(s) left by an earlier demo")
        milk = TaskRead.model_validate(repo.create(alice, TaskCreate(title="Buy oat milk")))
        report = TaskRead.model_validate(
            repo.create(
                alice, TaskCreate(title="Send the quarterly report", description="PDF to finance")
            )
        )
        repo.create(bob, TaskCreate(title="Walk the dog"))
        for user in DEMO_USERS:
            print(f"\n{user}'s tasks:\n{format_tasks(repo.list(user))}")
        repo.update(alice, milk.id, TaskUpdate(complete=True))
        repo.delete(alice, report.id)
        print(f"\n{alice} completes task {milk.id} and deletes task {report.id}:")
        print(format_tasks(repo.list(alice)))
        refused = _demo_isolation(repo, owner=alice, intruder=bob, task_id=milk.id)
        intact = repo.get(alice, milk.id)
    unchanged = intact is not None and intact.title == milk.title and intact.complete
    print(f"{alice}'s task {milk.id} afterwards: {'unchanged' if unchanged else 'CHANGED'}")
    print(f"\ndemo finished; try: {_this_program()} list --user {alice}{_same_database(_args)}")
    return ExitCode.OK if refused and unchanged else ExitCode.DATABASE_ERROR


def _this_program() -> str:
    """Return a command line that starts this ``todo-db`` again from the working directory.

    The demo often runs in a tool's environment (``nox -s demo``, ``uv run``) whose
    bin directory the user's shell does not have on PATH. The bare name is used only
    when PATH finds this very program and no virtualenv is active around it;
    otherwise the program's path, relative to the working directory when below it.
    """
    program = Path(sys.argv[0]) if sys.argv else Path()
    if program.name == "__main__.py":  # python -m todo_backend
        return f"{_shell_path(Path(sys.executable))} -m todo_backend"
    if program.name != PROG:
        return PROG  # main() called from Python: the documented name
    program = program.absolute()
    found = shutil.which(PROG)
    virtualenv = os.environ.get("VIRTUAL_ENV")
    in_virtualenv = virtualenv is not None and program.is_relative_to(Path(virtualenv).absolute())
    if found is not None and Path(found).absolute() == program and not in_virtualenv:
        return PROG
    return _shell_path(program)


def _shell_path(path: Path) -> str:
    absolute = path.absolute()
    try:
        shown = str(absolute.relative_to(Path.cwd()))
    except ValueError:
        shown = str(absolute)
    if os.sep not in shown:
        shown = f".{os.sep}{shown}"  # a bare name would be looked up on PATH
    return shlex.quote(shown)


def _same_database(args: argparse.Namespace) -> str:
    """Return the ``--database-url`` the demo was given, if any, for the hint; never a password."""
    given: str | None = getattr(args, "database_url", None)
    if given is None:
        return ""  # DATABASE_URL, .env or ./todo.db: the same from the same directory
    if redact(given) != given or "password" in given.lower():
        return " (with the same --database-url)"
    return f" --database-url {shlex.quote(given)}"


def _clear_demo_tasks(repo: TaskRepository) -> int:
    cleared = 0
    for user in DEMO_USERS:
        while tasks := repo.list(user, limit=MAX_PAGE_SIZE):
            cleared += sum(repo.delete(user, task.id) for task in tasks if task.id is not None)
    return cleared


def _demo_isolation(repo: TaskRepository, *, owner: str, intruder: str, task_id: int) -> bool:
    print(f"\n{intruder} tries {owner}'s task {task_id}:")
    attempts = {
        "read it": repo.get(intruder, task_id) is None,
        "list it": all(task.id != task_id for task in repo.list(intruder)),
        "rename it": repo.update(intruder, task_id, TaskUpdate(title="mine now")) is None,
        "complete it": repo.update(intruder, task_id, TaskUpdate(complete=False)) is None,
        "delete it": not repo.delete(intruder, task_id),
    }
    for action, was_refused in attempts.items():
        outcome = f"no task {task_id} for user {intruder}" if was_refused else "ALLOWED"
        print(f"  {action + ':':<13} {outcome}")
    return all(attempts.values())


def _no_arguments(_parser: argparse.ArgumentParser) -> None:
    return None


Handler = Callable[[argparse.Namespace, Engine], int]


@dataclass(frozen=True, slots=True)
class Command:
    """One subcommand: its name, one-line help, arguments and handler.

    With ``needs_schema`` the tasks table is created before the handler runs when it
    is missing; commands that manage the schema themselves (or must not touch it)
    say False. The handler gets the parsed arguments and an engine the caller disposes.
    """

    name: str
    summary: str
    run: Handler
    arguments: Callable[[argparse.ArgumentParser], None] = _no_arguments
    needs_schema: bool = True


COMMANDS: Final[tuple[Command, ...]] = (
    Command("demo", "show the package at work with two demo users", run_demo, needs_schema=False),
    Command("init", "create the schema if missing (idempotent)", run_init, needs_schema=False),
    Command("check", "report on the database connection", run_check, needs_schema=False),
    Command(
        "migrate",
        "upgrade the schema to the newest revision (--check: report only)",
        run_migrate,
        _migrate_arguments,
        needs_schema=False,
    ),
    Command("add", "add a task for a user", run_add, _add_arguments),
    Command("list", "list a user's tasks, newest first", run_list, _list_arguments),
    Command("done", "mark a user's task complete", run_done, _done_arguments),
    Command("delete", "delete a user's task", run_delete, _delete_arguments),
)


# -- parser and entry point --------------------------------------------------------

_DESCRIPTION: Final = """\
Manage todo tasks and check the database.

database: --database-url URL (before or after the command), else DATABASE_URL from
the environment or ./.env, else the embedded SQLite file ./todo.db (said on stderr).
Accepted URLs: postgresql://USER:PASSWORD@HOST/DB?sslmode=require, sqlite:///PATH."""


def _epilog() -> str:
    codes = "\n".join(f"  {int(code)}  {meaning}" for code, meaning in _EXIT_MEANINGS.items())
    return f"exit codes:\n{codes}"


def _database_option(parser: argparse.ArgumentParser, default: str | None) -> None:
    parser.add_argument(
        "--database-url",
        metavar="URL",
        default=default,
        help="database to use (overrides DATABASE_URL); shown only with the password masked",
    )


def build_parser() -> argparse.ArgumentParser:
    """Build the ``todo-db`` parser: global options, then one subparser per :data:`COMMANDS`.

    ``--database-url`` is accepted before and after the subcommand: the subparsers
    inherit a copy whose default is SUPPRESS, so it only overrides when given there.
    """
    parser = _Parser(
        prog=PROG,
        description=_DESCRIPTION,
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _database_option(parser, default=None)
    shared = _Parser(add_help=False)
    _database_option(shared, default=argparse.SUPPRESS)
    subparsers = parser.add_subparsers(
        title="commands", dest="command_name", metavar="COMMAND", required=True
    )
    for command in COMMANDS:
        sub = subparsers.add_parser(
            command.name,
            parents=[shared],
            help=command.summary,
            description=command.summary,
            epilog=_epilog(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.arguments(sub)
        sub.set_defaults(command=command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``todo-db`` with *argv* (default ``sys.argv[1:]``) and return the exit status.

    Never raises for an expected failure: each is reported as one line on stderr,
    password-masked, and mapped to an :class:`ExitCode`. The engine is disposed
    before returning.
    """
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help, --version, or a usage error already printed
        return exit_.code if isinstance(exit_.code, int) else ExitCode.USAGE
    command: Command = args.command
    try:
        status = _run(command, args)
        sys.stdout.flush()
    except BrokenPipeError:
        # Output piped into `head` and the like: stop quietly, as a shell tool should.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitCode.OUTPUT_CLOSED
    except _EXPECTED_ERRORS as err:
        return _fail(_exit_code(err), *_error_lines(err))
    return status


def _run(command: Command, args: argparse.Namespace) -> int:
    engine = create_db_engine(resolve_settings(args.database_url))
    try:
        if command.needs_schema:
            ensure_schema(engine)
        return command.run(args, engine)
    except DBAPIError as err:
        raise _translate(err) from None
    finally:
        engine.dispose()


# Expected failures and their exit codes; the first matching class wins.
_EXIT_CODES: Final[tuple[tuple[type[Exception], ExitCode], ...]] = (
    (_TaskNotFoundError, ExitCode.NOT_FOUND),
    (_InvalidInputError, ExitCode.INVALID_INPUT),
    (ValidationError, ExitCode.INVALID_INPUT),
    (ConfigurationError, ExitCode.CONFIGURATION),
    (DatabaseUnavailableError, ExitCode.UNAVAILABLE),
    (SQLAlchemyError, ExitCode.DATABASE_ERROR),
    (TodoBackendError, ExitCode.DATABASE_ERROR),
)
_EXPECTED_ERRORS: Final = tuple(kind for kind, _ in _EXIT_CODES)


def _exit_code(err: Exception) -> ExitCode:
    return next(code for kind, code in _EXIT_CODES if isinstance(err, kind))


def _error_lines(err: Exception) -> list[str]:
    if isinstance(err, _InvalidInputError):
        return err.lines
    if isinstance(err, ValidationError):
        return _validation_lines(err, "input")
    return [str(err)]


def _translate(err: DBAPIError) -> TodoBackendError:
    if err.statement is None:  # raised while connecting: nothing was sent
        return cannot_connect(err)
    return TodoBackendError(f"the database refused the statement: {error_reason(err)}")
