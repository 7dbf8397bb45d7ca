"""The async hot path's cursor (``aio.db.HotPathCursor``): timestamps as psycopg reads them.

The cursor loads ``timestamptz`` straight into UTC instead of psycopg's own loader
followed by the column's ``UTCDateTime`` processor. Users rely on it giving the same
instant, always as an aware UTC datetime, whatever the session's time zone (offsets
in whole hours, half hours, and the seconds of historic local mean times), and on it
failing where psycopg fails (BC dates, infinity, years past 9999), with psycopg's
error; and where the application loads timestamps its own way (a loader of its own on
the connection), on that loader's values made UTC as ``UTCDateTime`` makes them.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, cast

import psycopg
import pytest
from psycopg.abc import Buffer
from psycopg.rows import dict_row, tuple_row
from psycopg.types.datetime import TimestamptzLoader
from sqlalchemy import Engine, event, text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from todo_backend.aio import AsyncTaskRepository, create_async_db_engine
from todo_backend.aio.db import HotPathCursor
from todo_backend.config import Settings
from todo_backend.models import TaskCreate

ALICE = "alice"

# Zones far apart, and with offsets of odd minutes and seconds in the past.
_ZONES = ["UTC", "Etc/UTC", "Asia/Kolkata", "America/St_Johns", "Europe/Amsterdam", "Asia/Tokyo"]
# Instants that read back in every zone above (within years 1..9999 everywhere).
_READABLE = [
    "2026-12-07 05:28:40.123456+00",
    "2026-06-07 05:28:40.5+00",
    "2000-02-29 23:59:59.999999+00",
    "1850-06-01 12:00:00+00",
    "1901-12-13 20:45:52+00",
    "0002-01-01 00:00:00+00",
    "9999-12-30 00:00:00+00",
]
# What psycopg cannot load into a datetime at all.
_UNREADABLE = ["infinity", "-infinity", "0001-06-01 00:00:00+00 BC", "9999-12-31 23:00:00-05"]


async def _read(url: URL, zone: str, literal: str, *, hot: bool) -> Any:
    """Return *literal* as a timestamptz read in *zone*, by the hot cursor or psycopg's own."""
    conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
    async with await psycopg.AsyncConnection.connect(conninfo, prepare_threshold=None) as conn:
        # SET LOCAL, in a transaction: through a pooler too, and for this session only.
        await conn.execute("SELECT set_config('timezone', %s, true)", (zone,))
        cursor = HotPathCursor(conn) if hot else psycopg.AsyncClientCursor(conn)
        await cursor.execute("SELECT %s::timestamptz", (literal,))
        row = await cursor.fetchone()
        assert row is not None
        await conn.rollback()
        return row[0]


@pytest.mark.parametrize("zone", _ZONES)
def test_every_timestamp_reads_as_the_same_instant_in_utc(admin_url: URL, zone: str) -> None:
    """The hot cursor reads the instant psycopg reads, as an aware UTC datetime, in any zone."""

    async def scenario() -> None:
        for literal in _READABLE:
            own: datetime = await _read(admin_url, zone, literal, hot=False)
            hot: datetime = await _read(admin_url, zone, literal, hot=True)
            assert hot.tzinfo is UTC, (zone, literal)
            assert hot == own, (zone, literal)
            assert hot == own.astimezone(UTC)
            # The instant the server was given, to the microsecond.
            assert hot == datetime.fromisoformat(literal)

    asyncio.run(scenario())


@pytest.mark.parametrize("zone", ["UTC", "America/St_Johns"])
def test_what_psycopg_cannot_read_fails_with_psycopgs_own_error(admin_url: URL, zone: str) -> None:
    """BC dates, infinity and years past 9999 fail as psycopg fails: its DataError."""

    async def outcome(literal: str, *, hot: bool) -> type[BaseException]:
        try:
            await _read(admin_url, zone, literal, hot=hot)
        except psycopg.Error as err:
            return type(err)
        raise AssertionError(f"{literal!r} was read in {zone}")

    async def scenario() -> None:
        for literal in _UNREADABLE:
            own = await outcome(literal, hot=False)
            assert await outcome(literal, hot=True) is own, literal
            assert issubclass(own, psycopg.DataError)

    asyncio.run(scenario())


def test_other_cursors_of_the_connection_load_as_psycopg_does(admin_url: URL) -> None:
    """The UTC loader is the hot cursor's own: the connection's other cursors are untouched."""

    async def scenario() -> None:
        conninfo = admin_url.set(drivername="postgresql").render_as_string(hide_password=False)
        async with await psycopg.AsyncConnection.connect(conninfo) as conn:
            await conn.execute("SELECT set_config('timezone', 'Asia/Tokyo', true)")
            HotPathCursor(conn)  # registering its loader changes nothing for the others
            cursor = await conn.execute("SELECT '2026-12-07 05:28:40+00'::timestamptz")
            row = await cursor.fetchone()
            assert row is not None
            assert row[0].tzinfo is not UTC
            assert row[0].utcoffset().total_seconds() == 9 * 3600
            await conn.rollback()

    asyncio.run(scenario())


def _engine_of_one(url: URL, *, hot: bool) -> AsyncEngine:
    """The package's async engine on *url*, one pooled connection; *hot*: its hot path on.

    Off, a caller's statement listener sends every statement through SQLAlchemy.
    """
    settings = Settings(
        database_url=url.render_as_string(hide_password=False), pool_size=1, max_overflow=0
    )
    engine = create_async_db_engine(settings)
    if not hot:
        event.listen(engine.sync_engine, "before_cursor_execute", lambda *_: None)
    return engine


@pytest.fixture
def process_time_zone(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the test with the process's local time zone set to ``request.param``."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = request.param
    time.tzset()
    yield request.param
    if before is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = before
    time.tzset()


# What an application's own timestamptz loader may make of 'infinity' (psycopg's
# documented way to read it), and of the others: microseconds cut to milliseconds.
_OWN_LOADS: dict[str, Any] = {
    "None": None,
    "naive datetime.max": datetime.max,  # noqa: DTZ901 - naive values are the case here
    "naive year 3000": datetime(3000, 1, 1),  # noqa: DTZ001
    "aware year 3000": datetime(3000, 1, 1, tzinfo=UTC),
}


@pytest.mark.parametrize("process_time_zone", ["UTC", "Asia/Kathmandu"], indirect=True)
@pytest.mark.parametrize("infinity", list(_OWN_LOADS))
def test_an_applications_own_timestamp_loader_reads_as_through_sqlalchemy(
    module_engine: Engine, scratch_url: URL, process_time_zone: str, infinity: str
) -> None:
    """The connection's own loader is used, and its values made UTC as UTCDateTime makes them."""
    value = _OWN_LOADS[infinity]

    class OwnLoader(TimestamptzLoader):
        def load(self, data: Buffer) -> Any:
            if bytes(data) == b"infinity":
                return value
            loaded = super().load(data)
            return loaded.replace(microsecond=loaded.microsecond // 1000 * 1000)

    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.driver_connection.adapters.register_loader("timestamptz", OwnLoader)

    async def read(*, hot: bool) -> list[str]:
        engine = _engine_of_one(scratch_url, hot=hot)
        event.listen(engine.sync_engine, "connect", on_connect)
        try:
            repo = AsyncTaskRepository(engine)
            task = await repo.create(ALICE, TaskCreate(title="loaded"))
            plain = await repo.get(ALICE, task.id or 0)
            async with engine.begin() as conn:
                await conn.execute(
                    text("UPDATE tasks SET created_at = 'infinity' WHERE id = :id"),
                    {"id": task.id},
                )
            try:
                special = await repo.get(ALICE, task.id or 0)
            except Exception as err:  # noqa: BLE001 - the outcome is what is compared
                return [f"{type(err).__name__}: {err}"]
            assert plain is not None
            assert special is not None
            return [
                repr(plain.updated_at.microsecond % 1000),
                repr(special.created_at),
                repr(special.updated_at.tzinfo),
            ]
        finally:
            await engine.dispose()

    assert asyncio.run(read(hot=True)) == asyncio.run(read(hot=False))


def test_a_loader_the_application_registers_later_is_used_from_the_next_call(
    scratch_url: URL, module_engine: Engine
) -> None:
    """The hot cursor is kept per connection, yet a loader registered since is used at once."""

    class MillisecondLoader(TimestamptzLoader):
        def load(self, data: Buffer) -> Any:
            loaded = super().load(data)
            return loaded.replace(microsecond=loaded.microsecond // 1000 * 1000)

    async def read(*, hot: bool) -> list[int]:
        engine = _engine_of_one(scratch_url, hot=hot)
        try:
            repo = AsyncTaskRepository(engine)
            task = await repo.create(ALICE, TaskCreate(title="loaded later"))
            async with engine.begin() as conn:
                await conn.execute(
                    text("UPDATE tasks SET created_at = :at WHERE id = :id"),
                    {"at": "2026-01-01 00:00:00.123456+00", "id": task.id},
                )
            seen = []
            for _ in range(2):  # the second read reuses whatever the first one made
                before = await repo.get(ALICE, task.id or 0)
                assert before is not None
                seen.append(before.created_at.microsecond)
            async with engine.connect() as conn:  # the pool's one connection
                raw = await conn.get_raw_connection()
                adapters = cast(Any, raw.driver_connection).adapters
                adapters.register_loader("timestamptz", MillisecondLoader)
            after = await repo.get(ALICE, task.id or 0)
            assert after is not None
            seen.append(after.created_at.microsecond)
            return seen
        finally:
            await engine.dispose()

    assert asyncio.run(read(hot=True)) == asyncio.run(read(hot=False)) == [123456, 123456, 123000]


def test_a_client_encoding_a_caller_set_on_the_connection_stores_text_as_sqlalchemy_does(
    scratch_url: URL, module_engine: Engine
) -> None:
    """The kept cursor never writes with the encoding the connection had before."""

    async def write(*, hot: bool) -> list[str]:
        engine = _engine_of_one(scratch_url, hot=hot)
        try:
            repo = AsyncTaskRepository(engine)
            first = await repo.create(ALICE, TaskCreate(title="café"))  # the cursor, UTF8
            async with engine.connect() as conn:  # the pool's one connection
                await conn.execute(text("SET client_encoding TO 'LATIN1'"))
                await conn.commit()
            second = await repo.create(ALICE, TaskCreate(title="naïve"))
            async with engine.connect() as conn:
                await conn.execute(text("SET client_encoding TO 'UTF8'"))
                await conn.commit()
                stored = await conn.execute(
                    text("SELECT title FROM tasks WHERE id IN (:a, :b) ORDER BY id"),
                    {"a": first.id, "b": second.id},
                )
                return [second.title, *stored.scalars()]
        finally:
            await engine.dispose()

    assert asyncio.run(write(hot=True)) == asyncio.run(write(hot=False))
    assert asyncio.run(write(hot=True)) == ["naïve", "café", "naïve"]


def test_a_row_factory_a_caller_left_on_the_connection_is_followed_then_undone(
    scratch_url: URL, module_engine: Engine
) -> None:
    """As through SQLAlchemy: rows as the connection makes them, and back once restored."""

    async def read(*, hot: bool) -> list[str]:
        engine = _engine_of_one(scratch_url, hot=hot)
        try:
            repo = AsyncTaskRepository(engine)
            task = await repo.create(ALICE, TaskCreate(title="rows"))
            outcomes = []
            for factory in (dict_row, tuple_row):
                async with engine.connect() as conn:
                    raw = await conn.get_raw_connection()
                    cast(Any, raw.driver_connection).row_factory = factory
                try:
                    got = await repo.get(ALICE, task.id or 0)
                    outcomes.append(got.title if got else "none")
                except Exception as err:  # noqa: BLE001 - the outcome is what is compared
                    outcomes.append(type(err).__name__)
            return outcomes
        finally:
            await engine.dispose()

    hot, cold = asyncio.run(read(hot=True)), asyncio.run(read(hot=False))
    assert hot == cold
    assert hot[-1] == "rows"
