"""Row-level security as Neon's owner role meets it, on a cluster of our own.

The connecting role is a non-superuser with CREATEDB, CREATEROLE and BYPASSRLS, as
Neon's default role is: it bypasses row security itself, so only the engine's switch
to the application role keeps users apart. Through PgBouncer in transaction mode
with one server connection shared by scoped and unscoped clients, and across
databases of one cluster sharing the role.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL
from sqlmodel import Session

from tests.fix_servers import PgBouncerFactory, PgCluster
from tests.integration.databases import fresh_database
from tests.integration.row_security import COUNT, INSERT
from todo_backend import ConfigurationError, TaskCreate, TaskRepository, migrate, user_scope
from todo_backend.db import APP_ROLE, UNBOUNDED, check_database, create_db_engine

_STATE = text(
    "SELECT pg_backend_pid(), current_user, coalesce(current_setting('todo.user_id', true), '')"
)


@pytest.fixture(scope="module")
def owner(own_cluster: PgCluster) -> Iterator[URL]:
    """A login role like Neon's owner (CREATEDB CREATEROLE BYPASSRLS, no superuser)."""
    name = f"owner_{uuid.uuid4().hex[:8]}"
    admin = create_engine(own_cluster.url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE ROLE "{name}" LOGIN CREATEDB CREATEROLE BYPASSRLS'))
    try:
        yield own_cluster.url(user=name)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP ROLE IF EXISTS "{name}"'))
        admin.dispose()


def _url_text(url: URL) -> str:
    return url.render_as_string(hide_password=False)


def _role_exists(owner: URL) -> bool:
    engine = create_engine(owner)
    try:
        with engine.connect() as conn:
            found = conn.execute(
                text("SELECT count(*) FROM pg_roles WHERE rolname = :r"), {"r": APP_ROLE}
            )
            return bool(found.scalar_one())
    finally:
        engine.dispose()


@pytest.mark.pgbouncer
def test_one_pooled_server_connection_never_leaks_a_user_or_role(
    owner: URL, pgbouncer: PgBouncerFactory
) -> None:
    """Scoped, unscoped and repository clients share ONE server connection; none sees another's."""
    with fresh_database(owner) as url:
        migrate.upgrade(_url_text(url))
        bouncer = pgbouncer(
            owner.set(database="postgres"), pool_size=1, users=(owner.username or "",)
        )
        pooled = _url_text(bouncer.url(url.database or "", user=owner.username or ""))
        scoped, unscoped, repo_engine = (create_db_engine(pooled) for _ in range(3))
        try:
            repo = TaskRepository(Session(repo_engine))
            repo.create("alice", TaskCreate(title="a"))
            repo.create("bob", TaskCreate(title="b"))
            pids = set()
            with Session(scoped) as alice_session, Session(unscoped) as other:
                for _ in range(3):
                    with user_scope(alice_session, "alice"):
                        pid, role, user = alice_session.execute(_STATE).one()
                        pids.add(pid)
                        assert (role, user) == (APP_ROLE, "alice")
                        assert alice_session.execute(COUNT).scalar_one() == 1
                    alice_session.commit()
                    pid, role, user = other.execute(_STATE).one()
                    pids.add(pid)
                    assert (role, user) == (APP_ROLE, "")
                    assert other.execute(COUNT).scalar_one() == 0
                    other.commit()
                    assert [t.title for t in repo.list("bob")] == ["b"]
                    # What is left on the server connection between transactions.
                    with unscoped.connect() as conn:
                        left = conn.execution_options(isolation_level="AUTOCOMMIT", **UNBOUNDED)
                        pid, role, user = left.execute(_STATE).one()
                        pids.add(pid)
                        assert (role, user) == (owner.username, "")
            assert len(pids) == 1  # one server connection served everything
            # The owner bypasses row security, and check says so.
            health = check_database(unscoped)
            assert health.row_security == "forced"
            assert any("bypasses row-level security" in w for w in health.warnings)
        finally:
            for engine in (scoped, unscoped, repo_engine):
                engine.dispose()
            bouncer.destroy()


def test_upgrade_and_downgrade_are_idempotent_across_databases_of_a_cluster(
    owner: URL,
) -> None:
    """The role is shared by the cluster's databases: made once, dropped with the last user."""
    with fresh_database(owner) as first, fresh_database(owner) as second:
        migrate.upgrade(_url_text(first))
        migrate.upgrade(_url_text(second))  # the role exists already
        assert _role_exists(owner)
        migrate.downgrade(_url_text(first), "0002")
        assert _role_exists(owner)  # the second database still uses it
        engine: Engine = create_db_engine(_url_text(second))
        try:
            repo = TaskRepository(Session(engine))
            repo.create("alice", TaskCreate(title="still kept apart"))
            with engine.begin() as conn:
                assert conn.execute(COUNT).scalar_one() == 0
        finally:
            engine.dispose()
        migrate.downgrade(_url_text(second), "0002")
        assert not _role_exists(owner)
        plain = create_db_engine(_url_text(first))
        try:
            assert check_database(plain).row_security == "off"
            with plain.begin() as conn:  # no role to switch to: runs as the owner, as before
                conn.execute(INSERT, {"user_id": "alice", "title": "plain"})
                assert conn.execute(COUNT).scalar_one() == 1
        finally:
            plain.dispose()
        migrate.upgrade(_url_text(first))  # the role is made again
        assert _role_exists(owner)
        migrate.downgrade(_url_text(first), "0002")


def test_a_login_role_that_cannot_switch_gets_a_configuration_error(
    own_cluster: PgCluster,
) -> None:
    """A login role outside todo_app gets a ConfigurationError saying what to grant."""
    name = f"other_{uuid.uuid4().hex[:8]}"
    admin = create_engine(own_cluster.url(), isolation_level="AUTOCOMMIT")
    try:
        # Made and dropped by the superuser, who may end the other role's backends.
        with fresh_database(own_cluster.url()) as url:
            migrate.upgrade(_url_text(url))
            with admin.connect() as conn:
                conn.execute(text(f'CREATE ROLE "{name}" LOGIN'))
            other = create_db_engine(_url_text(url.set(username=name)))
            try:
                with pytest.raises(ConfigurationError, match=f"GRANT {APP_ROLE} TO"):
                    TaskRepository(Session(other)).count("alice")
                health = check_database(other)
                assert any(f"cannot switch to {APP_ROLE}" in w for w in health.warnings)
            finally:
                other.dispose()
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP ROLE IF EXISTS "{name}"'))
        admin.dispose()
