"""Row-level security on tasks: PostgreSQL itself keeps users apart, the second wall.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07

On PostgreSQL: the NOLOGIN role ``todo_app`` (no BYPASSRLS), created when missing
and granted to the migrating role so that its connections can switch to it; the
privileges it needs (USAGE on the schema of tasks, the table, its id sequence);
row-level security enabled and FORCEd on ``tasks`` (a table's owner is exempt
otherwise); and the policy ``tasks_owner_only``: ``todo_app``
sees and writes only the rows whose ``user_id`` equals the transaction's
``todo.user_id`` setting. The setting is read once per statement (an InitPlan), so
the (user_id, id) index serves the condition; unset, it matches no row.

The package's engines switch every transaction to ``todo_app`` and set
``todo.user_id`` in the message that carries their bounds (``todo_backend.db``).

Roles belong to the cluster (plain PostgreSQL: one role for all its databases;
Neon: one per branch), privileges and policies to the database. Both directions are
idempotent: the role is created only when missing, and the downgrade drops it only
when no other database still holds privileges for it.

SQLite has no row-level security: a no-op there.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import context, op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen at this revision: todo_backend.db.APP_ROLE and USER_SETTING name the same.
_ROLE = "todo_app"
_POLICY = "tasks_owner_only"
_OWNER_CONDITION = "user_id = (SELECT current_setting('todo.user_id', true))"

_CREATE_ROLE = """
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'todo_app') THEN
        CREATE ROLE todo_app NOLOGIN NOBYPASSRLS;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL; -- created by a migration of another database of the cluster meanwhile
END
$$
"""
_REFUSE_BYPASSING_ROLE = """
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_roles
               WHERE rolname = 'todo_app' AND (rolsuper OR rolbypassrls)) THEN
        RAISE EXCEPTION 'role todo_app exists with SUPERUSER or BYPASSRLS, which would '
            'bypass row-level security'
            USING HINT = 'An administrator must run ALTER ROLE todo_app NOSUPERUSER '
                'NOBYPASSRLS; then migrate again.';
    END IF;
END
$$
"""
_GRANT_ROLE = """
DO $$
BEGIN
    IF NOT pg_catalog.pg_has_role(current_user, 'todo_app', 'MEMBER') THEN
        GRANT todo_app TO CURRENT_USER;
    END IF;
EXCEPTION WHEN unique_violation THEN
    NULL; -- granted by a migration of another database of the cluster meanwhile
END
$$
"""
# The schema that holds tasks (public unless search_path says otherwise): a schema
# made by CREATE SCHEMA grants PUBLIC no USAGE.
_GRANT_SCHEMA = """
DO $$
BEGIN
    EXECUTE pg_catalog.format('GRANT USAGE ON SCHEMA %I TO todo_app',
        (SELECT n.nspname FROM pg_catalog.pg_class AS c
         JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
         WHERE c.oid = 'tasks'::regclass));
END
$$
"""
_DROP_ROLE_UNLESS_USED = """
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'todo_app') THEN
        DROP ROLE todo_app;
    END IF;
EXCEPTION WHEN dependent_objects_still_exist OR insufficient_privilege THEN
    NULL; -- another database still grants it privileges: it stays for them
END
$$
"""


def upgrade() -> None:
    """Create or reuse the application role, grant it the table, turn the policy on."""
    if context.get_context().dialect.name != "postgresql":
        return
    op.execute(_CREATE_ROLE)
    op.execute(_REFUSE_BYPASSING_ROLE)
    op.execute(_GRANT_ROLE)
    op.execute(_GRANT_SCHEMA)
    op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE tasks TO {_ROLE}")
    op.execute(f"GRANT USAGE ON SEQUENCE tasks_id_seq TO {_ROLE}")
    op.execute(f"DROP POLICY IF EXISTS {_POLICY} ON tasks")
    op.execute(
        f"CREATE POLICY {_POLICY} ON tasks TO {_ROLE} "
        f"USING ({_OWNER_CONDITION}) WITH CHECK ({_OWNER_CONDITION})"
    )
    op.execute("ALTER TABLE tasks ENABLE ROW LEVEL SECURITY")
    op.execute("ALTER TABLE tasks FORCE ROW LEVEL SECURITY")


def downgrade() -> None:
    """Turn the policy off, revoke this database's grants, drop the role if unused."""
    if context.get_context().dialect.name != "postgresql":
        return
    op.execute("ALTER TABLE tasks NO FORCE ROW LEVEL SECURITY")
    op.execute("ALTER TABLE tasks DISABLE ROW LEVEL SECURITY")
    op.execute(f"DROP POLICY IF EXISTS {_POLICY} ON tasks")
    op.execute(_REVOKE)
    op.execute(_DROP_ROLE_UNLESS_USED)


_REVOKE = """
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'todo_app') THEN
        REVOKE ALL ON TABLE tasks FROM todo_app;
        REVOKE ALL ON SEQUENCE tasks_id_seq FROM todo_app;
        EXECUTE pg_catalog.format('REVOKE USAGE ON SCHEMA %I FROM todo_app',
            (SELECT n.nspname FROM pg_catalog.pg_class AS c
             JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
             WHERE c.oid = 'tasks'::regclass));
    END IF;
END
$$
"""
