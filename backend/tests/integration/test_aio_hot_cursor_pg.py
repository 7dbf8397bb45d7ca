"""The async hot path's cursor (``aio.db.HotPathCursor``): timestamps as psycopg reads them.

The cursor loads ``timestamptz`` straight into UTC instead of psycopg's own loader
followed by the column's ``UTCDateTime`` processor. Users rely on it giving the same
instant, always as an aware UTC datetime, whatever the session's time zone (offsets
in whole hours, half hours, and the seconds of historic local mean times), and on it
failing where psycopg fails (BC dates, infinity, years past 9999), with psycopg's
error.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from sqlalchemy.engine import URL

from todo_backend.aio.db import HotPathCursor

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
