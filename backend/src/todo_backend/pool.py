"""Connection pools that keep their connections while busy and shed them when idle.

SQLAlchemy's :class:`~sqlalchemy.pool.QueuePool` keeps at most ``pool_size``
connections between uses: an overflow connection (one of the next ``max_overflow``)
is closed the moment it is returned to a full pool. Under steady concurrency above
``pool_size`` that closes and reopens a connection on almost every call, and on Neon
each new connection is a TLS handshake plus SCRAM over the network.

:class:`IdleQueuePool` is a QueuePool that keeps every connection it opened, up to
``pool_size + max_overflow``, and closes those above ``pool_size`` only once they sat
unused in the pool for ``idle_timeout`` seconds. The pool hands out the most recently
returned connection first (LIFO), so connections that a lower load no longer needs
stay at the bottom of the stack untouched and age out together; each position of
the stack remembers when its connection was put there. Idle connections are closed
at a checkout, never from a timer: a pool nobody uses keeps them until the next
call (or until the server closes them, which the checkout then notices). Checkout
waits, ``timeout`` (``DB_POOL_TIMEOUT``), recycling, the events and invalidation are
QueuePool's own. :class:`AsyncIdleQueuePool` is the same pool for the async engine.

:meth:`IdleQueuePool.lend` hands out a pooled connection that needs nothing done
first (no connect, recycle, shedding or wait) without SQLAlchemy's checkout around it,
and :meth:`IdleQueuePool.give_back` returns it: the async repository's hot path
borrows a connection that way outside SQLAlchemy's greenlet bridge, and otherwise
checks one out through the bridge as before.

The pool extends QueuePool at the points SQLAlchemy's pools are built on
(``_do_get``, ``_do_return_conn``, the overflow counter, the connection record's
``checkin``); ``tests/unit/test_pool.py`` pins that behaviour against the installed
SQLAlchemy.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from time import monotonic
from typing import Any, Final, cast

from sqlalchemy import exc as sqla_exc
from sqlalchemy.pool import AsyncAdaptedQueuePool, ConnectionPoolEntry, PoolResetState, QueuePool
from sqlalchemy.util import await_only
from sqlalchemy.util import queue as sqla_queue

__all__ = ["AsyncIdleQueuePool", "IdleQueuePool", "reserved"]

DEFAULT_IDLE_TIMEOUT = 60.0
# A connection this close to its recycling age is left to a checkout that may
# reconnect: time passes between this pool's look and SQLAlchemy's own.
_RECYCLE_MARGIN: Final = 1.0


def _reconnects(pool: QueuePool, record: Any) -> bool:
    """Tell whether SQLAlchemy would reconnect *record* at checkout (I/O), or nearly.

    The conditions of ``_ConnectionRecord.get_connection`` (private API, pinned by
    ``tests/unit/test_pool.py`` against the installed SQLAlchemy): no connection, the
    recycling age reached (less a margin), or an invalidation since it connected.
    """
    if record.dbapi_connection is None:
        return True
    started: float = record.starttime
    recycle = pool._recycle
    return (
        (recycle > -1 and time.time() - started > recycle - _RECYCLE_MARGIN)
        or pool._invalidate_time > started
        or record._soft_invalidate_time > started
    )


def _stamp(put_at: list[float], depth: int) -> None:
    """Note that the connection at the top of a stack *depth* high was put there now."""
    if 0 < depth <= len(put_at):
        put_at[depth - 1] = monotonic()


class _Slot:
    """A thread's place in :class:`_HandOffQueue`'s line, and what it is handed."""

    __slots__ = ("handed", "item", "ready")

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.handed = False
        self.item: Any = None


class _HandOffQueue(sqla_queue.Queue[Any]):
    """SQLAlchemy's queue of pooled connections, first come, first served.

    SQLAlchemy's own takes a connection that is in the queue at once, even while
    checkouts are waiting for one: a thread that gives a connection back and asks for
    one again at once (two repository calls in a row) takes it back before the woken
    waiter runs, and the waiter, finding the queue empty, waits again. Under a steady
    load it can so wait until its pool timeout, however short the calls. Here a
    connection given back goes straight to the checkout that has waited longest, as
    psycopg_pool hands them over, so the queue holds connections only while no one
    waits. A put never blocks: the pool has room for every connection it opens.
    """

    def __init__(self, maxsize: int = 0, use_lifo: bool = False) -> None:
        super().__init__(maxsize, use_lifo)
        self._waiters: deque[_Slot] = deque()
        # put_at[i]: when the connection now at stack position i (0 = bottom) was put
        # there. With LIFO, a position is only refilled after everything above it left.
        self.put_at = [0.0] * maxsize

    def _put(self, item: Any) -> None:
        super()._put(item)
        _stamp(self.put_at, len(self.queue))

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        """Hand *item* to the checkout waiting longest, or queue it if none waits."""
        with self.mutex:
            self._give(item)

    def _give(self, item: Any) -> None:
        # Under the mutex.
        if self._waiters:
            slot = self._waiters.popleft()
            slot.item, slot.handed = item, True
            slot.ready.set()
            return
        if self._full():
            raise sqla_queue.Full
        self._put(item)

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """Take a connection; with *block*, wait in line for up to *timeout* seconds."""
        with self.mutex:
            if self.queue:  # nobody waits while the queue holds one
                return self._get()
            if not block:
                raise sqla_queue.Empty
            slot = _Slot()
            self._waiters.append(slot)
        try:
            slot.ready.wait(timeout)
        except BaseException:
            with self.mutex:
                if slot.handed:
                    self._give(slot.item)  # interrupted once served: the next one's
                else:
                    self._waiters.remove(slot)
            raise
        with self.mutex:
            if not slot.handed:
                self._waiters.remove(slot)
                raise sqla_queue.Empty
        return slot.item


class _AsyncHandOffQueue(sqla_queue.AsyncAdaptedQueue[Any]):
    """:class:`_HandOffQueue` for asyncio: a connection given back goes to the longest waiter.

    SQLAlchemy's asyncio queue lets a task that gives a connection back and asks again
    with nothing awaited between take it back before the woken waiter runs, with the
    same starvation as the threads' queue.
    """

    def __init__(self, maxsize: int = 0, use_lifo: bool = False) -> None:
        super().__init__(maxsize, use_lifo)
        self._waiters: deque[asyncio.Future[Any]] = deque()
        self.put_at = [0.0] * maxsize  # as _HandOffQueue's

    def put_nowait(self, item: Any) -> None:
        """Hand *item* to the checkout waiting longest, or queue it if none waits."""
        while self._waiters:
            waiter = self._waiters.popleft()
            # A waiter of a loop closed under it (its task never cancelled) is gone.
            if waiter.done() or waiter.get_loop().is_closed():
                continue
            waiter.set_result(item)
            return
        super().put_nowait(item)
        _stamp(self.put_at, self._queue.qsize())

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """Take a connection; with *block*, wait in line for up to *timeout* seconds."""
        if not block:
            return self.get_nowait()
        if not self._waiters:
            try:
                return self._queue.get_nowait()
            except asyncio.QueueEmpty:
                pass
        return await_only(self.wait_in_line(timeout))

    async def wait_in_line(self, timeout: float | None) -> Any:
        """Wait in line for a connection, up to *timeout* seconds (then ``Empty``)."""
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                return await waiter
        except BaseException as err:
            if waiter.done() and not waiter.cancelled():
                # Handed a connection as the wait ended (timed out, cancelled): the
                # next in line gets it.
                self.put_nowait(waiter.result())
            else:
                waiter.cancel()
                # Already dropped from the line if a connection came in the same pass.
                with suppress(ValueError):
                    self._waiters.remove(waiter)
            if isinstance(err, TimeoutError):
                raise sqla_queue.Empty from err
            raise


# The connection the next checkout in this context takes, and its pool (reserved()).
_RESERVED: Final[ContextVar[tuple[Any, ConnectionPoolEntry] | None]] = ContextVar(
    "todo_backend_reserved_connection", default=None
)


@contextmanager
def reserved(pool: IdleQueuePool, record: ConnectionPoolEntry) -> Iterator[None]:
    """Make the block's next checkout take *record*, which *pool* handed over in turn.

    The checkout is SQLAlchemy's own (reconnecting, recycling, the checkout listeners),
    on that connection, without waiting in line again. A reservation the block did not
    use goes back to *pool* at its end; one made on a pool since replaced
    (``engine.dispose()``) goes back to *pool* at the checkout.
    """
    token = _RESERVED.set((pool, record))
    try:
        yield
    finally:
        unused = _RESERVED.get()
        _RESERVED.reset(token)
        if unused is not None:
            pool._do_return_conn(record)


class _Lent:
    """What a lent connection's record points at in place of its checkout's proxy."""


# A weak reference that stays alive (to a class): the record counts as in use, and
# never as a proxy the garbage collector took (SQLAlchemy's needs_gc).
_LENT: Final = weakref.ref(_Lent)


class IdleQueuePool(QueuePool):
    """A QueuePool that keeps up to ``pool_size + max_overflow`` connections until idle.

    ``pool_size`` connections are kept however idle; the others are closed at a
    checkout once they sat unused for ``idle_timeout`` seconds. ``size()`` is
    ``pool_size`` and ``overflow()`` counts the connections open above it, as in
    QueuePool. Pass it to ``create_engine(poolclass=IdleQueuePool, idle_timeout=...)``.
    """

    _queue_class: type[sqla_queue.QueueCommon[Any]] = _HandOffQueue

    def __init__(
        self,
        creator: Callable[..., Any],
        pool_size: int = 5,
        max_overflow: int = 10,
        timeout: float = 30.0,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        **kw: Any,
    ) -> None:
        if idle_timeout <= 0:
            raise ValueError("idle_timeout must be above 0 seconds")
        kw.pop("use_lifo", None)  # LIFO is what lets the unneeded connections age out
        super().__init__(
            creator,
            pool_size=pool_size,
            max_overflow=max_overflow,
            timeout=timeout,
            use_lifo=True,
            **kw,
        )
        self._size = pool_size
        self._idle_timeout = idle_timeout
        # Room for every connection the pool may open: a returned one is always kept.
        capacity = pool_size + max(max_overflow, 0) if pool_size else 0
        self._pool = self._queue_class(capacity, use_lifo=True)
        # When each position of the stack was filled (the queues keep it).
        self._put_at: list[float] = self._pool.put_at  # type: ignore[attr-defined]
        self._idle_lock = threading.Lock()
        # Connections taken to be closed whose overflow count is not yet given back:
        # reserved under _idle_lock, so concurrent checkouts never shed below pool_size.
        self._shedding = 0

    @property
    def idle_timeout(self) -> float:
        """Seconds a connection above ``pool_size`` may sit unused before it is closed."""
        return self._idle_timeout

    def size(self) -> int:
        """Return how many connections are kept however idle (``pool_size``)."""
        return self._size

    def checkedout(self) -> int:
        """Return how many connections are in use."""
        return self._size + self._overflow - self.checkedin()

    def recreate(self) -> IdleQueuePool:
        """Return a new, empty pool with this one's settings (``engine.dispose()``)."""
        self.logger.info("Pool recreating")
        return self.__class__(
            self._creator,
            pool_size=self._size,
            max_overflow=self._max_overflow,
            timeout=self._timeout,
            idle_timeout=self._idle_timeout,
            pre_ping=self._pre_ping,
            recycle=self._recycle,
            echo=self.echo,
            logging_name=self._orig_logging_name,
            reset_on_return=self._reset_on_return,
            _dispatch=self.dispatch,
            dialect=self._dialect,
        )

    def _do_return_conn(self, record: ConnectionPoolEntry) -> None:
        with self._idle_lock:
            self._pool.put(record, False)  # handed on, or queued with its time

    def _do_get(self) -> ConnectionPoolEntry:
        held = _RESERVED.get()
        if held is not None:
            _RESERVED.set(None)
            owner, record = held
            if owner is self:
                return record
            owner._do_return_conn(record)
        for record in self._take_expired():
            try:
                record.close()
            finally:
                # The overflow first, then the reservation: meanwhile another checkout
                # sees less to shed, never more.
                self._dec_overflow()
                with self._idle_lock:
                    self._shedding -= 1
        return super()._do_get()

    def lend(self, ready: Callable[[Any], bool]) -> ConnectionPoolEntry | None:
        """Hand out the most recently returned connection if it needs no I/O first, else None.

        The connection comes out only if it is open, not due for recycling or replaced
        by an invalidation, no idle connection is due to be closed, the pool neither
        pre-pings nor logs its checkouts, and *ready* approves its DBAPI connection;
        otherwise the pool is left as it was. It comes out as a record, without
        SQLAlchemy's checkout around it: no ``checkout`` event runs, so the borrower
        must make sure that no listener of the pool's would have refused or changed it.
        Give it back to this pool with :meth:`give_back`, invalidated first if it is
        no longer usable. An asyncio caller can so borrow a connection without SQLAlchemy's
        greenlet bridge and without its checkout's cost.
        """
        if self._pre_ping or self.logger.isEnabledFor(logging.DEBUG):
            return None
        with self._idle_lock:
            depth = self._pool.qsize()
            if (
                depth == 0
                # A connection to shed: closing it is I/O.
                or (
                    self._overflow - self._shedding > 0
                    and self._put_at[0] <= monotonic() - self._idle_timeout
                )
            ):
                return None
            put_at = self._put_at[depth - 1]
            record: Any = self._pool.get(False)
            try:
                usable = not _reconnects(self, record) and ready(record.dbapi_connection)
            except BaseException:
                usable = False
                raise
            finally:
                if not usable:
                    # Back where it was, as if never taken.
                    self._pool.put(record, False)
                    self._put_at[depth - 1] = put_at
            if not usable:
                return None
        # In use, as a checkout marks it (a double give-back is then noticed).
        record.fairy_ref = _LENT
        return cast(ConnectionPoolEntry, record)

    def give_back(self, record: ConnectionPoolEntry) -> None:
        """Return a connection :meth:`lend` handed out, as SQLAlchemy's check-in would.

        The pool's ``reset`` and ``checkin`` events run for it, as at any check-in; the
        rollback SQLAlchemy's check-in makes is left out, so the borrower gives back
        only a connection with no transaction open (in autocommit). A connection
        invalidated while lent (``record.invalidate()``) is returned empty, and the
        pool reconnects it at its next checkout.
        """
        try:
            if self.dispatch.reset and record.dbapi_connection is not None:
                # What a raw connection's close() tells them (SQLAlchemy's _finalize_fairy).
                state = PoolResetState(
                    transaction_was_reset=False, terminate_only=False, asyncio_safe=True
                )
                self.dispatch.reset(record.dbapi_connection, record, state)
        except Exception as err:
            # As SQLAlchemy's check-in: logged, the connection discarded, not raised.
            self.logger.error("Exception during reset or similar", exc_info=True)
            record.invalidate(err)
        except BaseException as err:
            record.invalidate(err)  # cut short: its state is unknown
            raise
        finally:
            # The record's own check-in: the checkin event, then back into this pool.
            cast(Any, record).checkin()

    def invalidate_older(self, record: ConnectionPoolEntry, err: BaseException) -> None:
        """Discard a lent connection the server dropped, and all that the pool opened before it.

        SQLAlchemy's own reaction to a disconnect (``Pool._invalidate``, private API,
        pinned by ``tests/unit/test_pool.py``): a server that dropped one connection has
        usually dropped them all, so each connection opened before this one is
        reconnected at its next checkout. Give *record* back with :meth:`give_back`.
        """
        if self._invalidate_time < cast(Any, record).starttime:
            self._invalidate_time = time.time()
        record.invalidate(err)

    def _take_expired(self) -> list[ConnectionPoolEntry]:
        """Remove from the pool the connections above ``pool_size`` idle too long.

        What may be shed (the overflow less what other checkouts are closing) is read
        and reserved under the lock, so two checkouts at once never both shed the same
        overflow and close connections of the ``pool_size`` kept.
        """
        if self._overflow <= 0:  # a hint only: the count that matters is read below
            return []
        cutoff = monotonic() - self._idle_timeout
        taken: list[ConnectionPoolEntry] = []
        with self._idle_lock:
            depth = self._pool.qsize()
            stale = 0
            while stale < depth and self._put_at[stale] <= cutoff:
                stale += 1
            # Taking from the top leaves the stale ones at the bottom in place; the
            # count is what matters: that many connections were not needed for a while.
            for _ in range(min(stale, self._overflow - self._shedding)):
                try:
                    taken.append(self._pool.get(False))
                except sqla_queue.Empty:  # pragma: no cover - qsize was read under the lock
                    break
            self._shedding += len(taken)
        return taken


class AsyncIdleQueuePool(IdleQueuePool, AsyncAdaptedQueuePool):
    """:class:`IdleQueuePool` for ``create_async_engine``: an asyncio queue, in turn."""

    _queue_class = _AsyncHandOffQueue
    _pool: _AsyncHandOffQueue

    async def borrow(self, ready: Callable[[Any], bool]) -> tuple[ConnectionPoolEntry | None, bool]:
        """:meth:`lend`, or wait in line (awaited, no greenlet) when every connection is out.

        Returns ``(record, True)`` for a connection lent at once (:meth:`lend`).
        With the pool at its maximum and none free, a checkout would wait for one; here
        the caller waits in the same line, in turn with the pool's other checkouts, and
        gets ``(record, False)``: the connection handed over, its turn kept, still to
        be taken with :meth:`take_handed` (lent if it needs no I/O) or else checked out
        through SQLAlchemy inside :func:`reserved` (no second wait). ``(None, False)``:
        the caller checks out as usual (a connection may have to be opened, or
        checkouts are pre-pinged or logged). Out of time, it raises the pool's own
        ``TimeoutError``, as a checkout does.
        """
        record = self.lend(ready)
        if record is not None:
            return record, True
        if (
            self.checkedin()
            or self._max_overflow < 0
            or self._overflow < self._max_overflow
            or self._pre_ping
            or self.logger.isEnabledFor(logging.DEBUG)
        ):
            return None, False  # left to a checkout that may connect (I/O), or is logged
        try:
            handed = await self._pool.wait_in_line(self._timeout)
        except sqla_queue.Empty:
            raise sqla_exc.TimeoutError(
                f"QueuePool limit of size {self.size()} overflow {self.overflow()} reached, "
                f"connection timed out, timeout {self._timeout:0.2f}",
                code="3o7r",
            ) from None
        return cast(ConnectionPoolEntry, handed), False

    def take_handed(self, record: ConnectionPoolEntry, ready: Callable[[Any], bool]) -> bool:
        """Lend *record*, handed over by :meth:`borrow`, if it needs no I/O (as :meth:`lend`).

        False if it needs I/O first, or *ready* could not tell (an error): it is still
        the caller's, to check out inside :func:`reserved`.
        """
        try:
            usable = not _reconnects(self, record) and ready(record.dbapi_connection)
        except Exception:  # noqa: BLE001 - SQLAlchemy's checkout then looks for itself
            usable = False
        except BaseException:
            self._do_return_conn(record)  # interrupted: the next in line's
            raise
        if usable:
            cast(Any, record).fairy_ref = _LENT
        return usable
