"""Alembic environment of todo_backend, run by alembic for every migration command.

Online, it joins the connection that :mod:`todo_backend.migrate` placed in
``config.attributes["connection"]``: that connection is already inside a
transaction, so alembic runs every revision in it and the caller commits once.
Started any other way, it opens such a connection itself on the database in
``config.attributes["url_or_engine"]``, the ``sqlalchemy.url`` option of an ini
file, or else ``DATABASE_URL``. Offline (``--sql``) it renders SQL for that URL's
dialect without connecting. Options come from :func:`todo_backend.migrate.context_options`.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, Engine
from sqlalchemy.engine import URL, make_url

from todo_backend.config import load_settings
from todo_backend.migrate import UrlOrEngine, context_options, migration_connection

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
    if isinstance(database, URL):
        return database
    return load_settings().url if database is None else make_url(database)


def run_migrations_offline() -> None:
    """Render the migrations as SQL for the database's dialect, without connecting."""
    context.configure(
        url=_offline_url(),
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        **context_options(),
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_on(connection: Connection) -> None:
    """Run the migrations on *connection*, inside the transaction it is already in."""
    context.configure(connection=connection, **context_options())
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the migrations on the caller's connection, or on a new one in a transaction."""
    connection = config.attributes.get("connection")
    if isinstance(connection, Connection):
        run_migrations_on(connection)
        return
    with migration_connection(_database()) as new_connection:
        run_migrations_on(new_connection)


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
