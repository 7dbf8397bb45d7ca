"""Alembic environment of todo_backend, run by alembic for every migration command.

Online, it joins the connection that :mod:`todo_backend.migrate` placed in
``config.attributes["connection"]``: that connection is already inside a
transaction, so alembic runs every revision in it and the caller commits once.
Started any other way, it opens such a connection itself on the database in
``config.attributes["url_or_engine"]``, the ``sqlalchemy.url`` option of an ini
file, or else ``DATABASE_URL``. Offline (``--sql``) it renders SQL for that URL's
dialect without connecting (on PostgreSQL each transaction starts with the
``SET LOCAL lock_timeout`` the runner sends), the URL normalised as everywhere in the package
(``postgres://`` is PostgreSQL through psycopg2). Options come from
:func:`todo_backend.migrate.context_options`.
"""

from __future__ import annotations

import re
from typing import Final

from alembic import context
from sqlalchemy import Connection, Engine
from sqlalchemy.engine import URL

from todo_backend.config import load_settings, normalize_database_url
from todo_backend.errors import ConfigurationError
from todo_backend.migrate import (
    UrlOrEngine,
    context_options,
    migration_connection,
    offline_lock_timeout,
)

# A URL that names only a dialect, such as "postgresql://": enough for offline SQL.
_DIALECT_ONLY: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")

config = context.config


def _database() -> UrlOrEngine:
    """Return the database named by the caller or an ini file; None means ``DATABASE_URL``."""
    given: UrlOrEngine = config.attributes.get("url_or_engine")
    return given if given is not None else config.get_main_option("sqlalchemy.url")


def _offline_url() -> URL:
    """Return the URL whose dialect the offline SQL is rendered for."""
    database = _database()
    if isinstance(database, Engine):
        return database.url
    if database is None:
        return load_settings().url
    if isinstance(database, URL):
        database = database.render_as_string(hide_password=False)
    return _normalised(database)


def _normalised(raw: str) -> URL:
    """Normalise *raw* with :func:`normalize_database_url`, accepting a bare dialect.

    Offline SQL needs no host, so ``"postgresql://"`` or ``"postgres://"`` is enough
    here although a connection would refuse it; any other problem is raised as is.
    """
    try:
        return normalize_database_url(raw)
    except ConfigurationError:
        if not _DIALECT_ONLY.fullmatch(raw.strip()):
            raise
        return normalize_database_url(f"{raw.strip()}offline").set(host=None)


def run_migrations_offline() -> None:
    """Render the migrations as SQL for the database's dialect, without connecting."""
    context.configure(
        url=_offline_url(),
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        **context_options(),
    )
    with context.begin_transaction():
        migration = context.get_context()
        if migration.dialect.name == "postgresql":
            # As the runner does online: every transaction bounds its lock waits.
            migration.impl.static_output(offline_lock_timeout())
        context.run_migrations()


def run_migrations_on(connection: Connection) -> None:
    """Run the migrations on *connection*, inside the transaction it is already in."""
    context.configure(connection=connection, **context_options())
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the migrations on the caller's connection, or on a new one in a transaction.

    ``config.attributes["connection"]`` may also hold an engine (pytest-alembic puts
    its ``alembic_engine`` there): the run then opens its transaction on that engine.
    """
    connection = config.attributes.get("connection")
    if isinstance(connection, Connection):
        run_migrations_on(connection)
        return
    database = connection if isinstance(connection, Engine) else _database()
    with migration_connection(database) as new_connection:
        run_migrations_on(new_connection)


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
