"""The todo-db console script against PostgreSQL, on the module's scratch database."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import Engine, inspect, text
from sqlalchemy.engine import URL

from tests.cli_runner import SENTINEL, Call, cli_env, error_lines, run_all, run_cli, run_json
from todo_backend.cli import ExitCode, main
from todo_backend.config import mask_url
from todo_backend.db import CONNECTING_ROLE, create_db_engine, init_db


def _env(url: URL) -> dict[str, str]:
    return cli_env(DATABASE_URL=url.render_as_string(hide_password=False))


def _drop_tasks(engine: Engine) -> None:
    # Admin work: as the connecting role (the database may be migrated, RLS forced).
    with engine.execution_options(**CONNECTING_ROLE).begin() as conn:
        # A fresh database: no table and no migration history either.
        conn.execute(text("DROP TABLE IF EXISTS tasks, alembic_version"))


def test_init_creates_the_schema_once(
    module_engine: Engine, scratch_url: URL, tmp_path: Path
) -> None:
    """init creates the tasks table on an empty database, and a second init changes nothing."""
    _drop_tasks(module_engine)
    first = run_cli("init", cwd=tmp_path, env=_env(scratch_url))
    assert first.returncode == 0, first.stderr
    assert first.stdout == f"table tasks created on {mask_url(scratch_url)}\n"
    second = run_cli("init", cwd=tmp_path, env=_env(scratch_url))
    assert second.returncode == 0, second.stderr
    assert second.stdout.startswith("table tasks already present, nothing to do")


def test_list_on_a_fresh_database_creates_the_schema(
    module_engine: Engine, scratch_url: URL, tmp_path: Path
) -> None:
    """A first command without `init` creates the tasks table and succeeds."""
    _drop_tasks(module_engine)
    assert run_json("list", "--user", "alice", "--json", cwd=tmp_path, env=_env(scratch_url)) == []
    assert inspect(module_engine).has_table("tasks")


def test_migrate_then_migrate_check(
    module_engine: Engine, scratch_url: URL, tmp_path: Path
) -> None:
    """migrate builds the schema on an empty database; migrate --check then finds it current."""
    _drop_tasks(module_engine)
    env = _env(scratch_url)
    behind = run_cli("migrate", "--check", cwd=tmp_path, env=env)
    assert behind.returncode == ExitCode.MIGRATION_NEEDED, behind.stdout + behind.stderr
    migrated = run_cli("migrate", cwd=tmp_path, env=env)
    assert migrated.returncode == 0, migrated.stderr
    assert inspect(module_engine).has_table("tasks")
    current = run_cli("migrate", "--check", cwd=tmp_path, env=env)
    assert current.returncode == 0, current.stdout + current.stderr
    again = run_cli("migrate", cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stderr


def test_lifecycle_and_isolation(
    engine: Engine, scratch_url: URL, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two users' tasks stay apart: bob can neither complete nor delete alice's task."""
    url = scratch_url.render_as_string(hide_password=False)
    added_alice, added_bob = run_all(
        [
            Call(["add", "--user", "alice", "Buy milk", "--json"], tmp_path, _env(scratch_url)),
            # DATABASE_URL unset: the option after the command names the database.
            Call(
                ["add", "--user", "bob", "Walk the dog", "--json", "--database-url", url], tmp_path
            ),
        ]
    )
    assert added_alice.returncode == 0, added_alice.stderr
    assert added_bob.returncode == 0, added_bob.stderr
    assert added_bob.stderr == ""
    alice = json.loads(added_alice.stdout)
    bob = json.loads(added_bob.stdout)
    assert alice["created_at"].endswith("Z")
    task_id = str(alice["id"])

    env = _env(scratch_url)
    bob_list, bob_done, bob_delete, alice_done = run_all(
        [
            Call(["list", "--user", "bob", "--json"], tmp_path, env),
            Call(["done", "--user", "bob", task_id], tmp_path, env),
            Call(["delete", "--user", "bob", task_id], tmp_path, env),
            Call(["done", "--user", "alice", task_id, "--json"], tmp_path, env),
        ]
    )
    assert json.loads(bob_list.stdout) == [bob]
    for refused in (bob_done, bob_delete):
        assert refused.returncode == ExitCode.NOT_FOUND
        assert error_lines(refused) == [f"todo-db: error: no task {task_id} for user bob"]
    assert alice_done.returncode == 0, alice_done.stderr
    assert json.loads(alice_done.stdout) | {"updated_at": None} == alice | {
        "complete": True,
        "updated_at": None,
    }

    deleted = run_cli("delete", "--user", "alice", task_id, cwd=tmp_path, env=env)
    assert (deleted.returncode, deleted.stdout) == (0, f"deleted task {task_id} for user alice\n")
    assert main(["list", "--user", "alice", "--json", "--database-url", url]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_check_reports_postgresql_with_the_password_masked(
    scratch_url: URL, tmp_path: Path
) -> None:
    """check on the server under test: reachable, its version and TLS state, password ***."""
    # A server that asks for no password (trust) gets a sentinel one it never checks.
    url = scratch_url if scratch_url.password else scratch_url.set(password=SENTINEL)
    secret = str(url.password)
    result = run_cli(
        "check", "--database-url", url.render_as_string(hide_password=False), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr.replace(secret, "<the password>")
    assert result.stderr == ""
    lines = (line.split(":", 1) for line in result.stdout.splitlines())
    report = {key: value.strip() for key, value in lines}
    # The URL shown is the masked one (a password equal to the user name, as in
    # GitHub's service container, cannot be told apart by a search of the text).
    assert report.pop("database") == mask_url(url)
    assert ":***@" in mask_url(url)
    if secret != url.username:  # else the role name that `rls:` reports reads the same
        assert all(secret not in value for value in report.values())
    assert report["reachable"] == "yes"
    assert report["server"].startswith("PostgreSQL ")
    assert report["tls"] == ("on" if _driver_uses_tls(url) else "off")
    assert report["endpoint"].startswith(("direct", "pooled"))


def _driver_uses_tls(url: URL) -> bool:
    """Whether the package's own engine reaches *url* over TLS, as psycopg2 sees it."""
    engine = create_db_engine(url.render_as_string(hide_password=False))
    try:
        with engine.connect() as conn:
            dbapi = conn.connection.dbapi_connection
            assert dbapi is not None
            return bool(dbapi.info.ssl_in_use)
    finally:
        engine.dispose()


def test_demo_on_postgresql(engine: Engine, scratch_url: URL, tmp_path: Path) -> None:
    """The demo runs on DATABASE_URL without a fallback note and shows isolation holding."""
    result = run_cli("demo", cwd=tmp_path, env=_env(scratch_url))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith(f"todo-db demo on {mask_url(scratch_url)}\n")
    assert "ALLOWED" not in result.stdout
    assert result.stdout.count("for user demo-bob") == 5
    assert "afterwards: unchanged" in result.stdout


def test_demo_hint_never_shows_the_password_of_its_database_url(
    engine: Engine, scratch_url: URL, tmp_path: Path
) -> None:
    """Given a --database-url with a password, the closing hint mentions the option, not the URL."""
    url = scratch_url if scratch_url.password else scratch_url.set(password=SENTINEL)
    given = url.render_as_string(hide_password=False)
    result = run_cli("demo", "--database-url", given, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    # Not a plain search for the password: GitHub's service container uses the user
    # name as password, and "postgres" is also the start of the scheme.
    assert given not in output
    assert f":{url.password}@" not in output
    assert result.stdout.splitlines()[-1].endswith(
        " list --user demo-alice (with the same --database-url)"
    )


def test_check_shows_the_bounds_the_server_applies(scratch_url: URL, tmp_path: Path) -> None:
    """check prints the statement, lock and idle bounds as the server reports them."""
    env = cli_env(
        DATABASE_URL=scratch_url.render_as_string(hide_password=False),
        DB_STATEMENT_TIMEOUT="12",
        DB_LOCK_TIMEOUT="0.75",
        DB_IDLE_IN_TRANSACTION_TIMEOUT="45",
    )
    result = run_cli("check", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    report = dict(line.split(":", 1) for line in result.stdout.splitlines())
    assert report["bounds"].strip() == (
        "statement_timeout=12s, lock_timeout=750ms, idle_in_transaction_session_timeout=45s"
    )


def test_check_reports_row_security_off_then_forced(
    module_engine: Engine, scratch_url: URL, tmp_path: Path
) -> None:
    """`todo-db check` says rls off on an init_db database and on and forced after migrate."""
    _drop_tasks(module_engine)
    env = _env(scratch_url)
    init_db(module_engine)
    before = run_cli("check", cwd=tmp_path, env=env)
    assert before.returncode == 0, before.stderr
    assert "rls:       off: the repository's user_id condition is the only wall" in before.stdout
    assert "warning" not in before.stdout
    _drop_tasks(module_engine)
    assert run_cli("migrate", cwd=tmp_path, env=env).returncode == 0
    after = run_cli("check", cwd=tmp_path, env=env)
    assert after.returncode == 0, after.stderr
    assert "rls:       on and forced (revision 0003)" in after.stdout
    with module_engine.connect() as conn:
        bypasses = conn.execute(
            text("SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user"),
            execution_options=CONNECTING_ROLE,
        ).scalar_one()
    assert ("bypasses row-level security" in after.stdout) is bool(bypasses)
    _drop_tasks(module_engine)
