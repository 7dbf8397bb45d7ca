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

Inside :func:`checkout_without_io`, a checkout hands out only a connection that needs
nothing done first (no connect, recycle, shedding or wait): the async repository's
hot path checks a connection out that way outside SQLAlchemy's greenlet bridge, and
otherwise, on :class:`CheckoutNeedsIO`, goes through the bridge as before.

The pool extends QueuePool at the points SQLAlchemy's pools are built on
(``_do_get``, ``_do_return_conn``, the overflow counter); ``tests/unit/test_pool.py``
pins that behaviour against the installed SQLAlchemy.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from time import monotonic
from typing import Any, Final

from sqlalchemy.pool import AsyncAdaptedQueuePool, ConnectionPoolEntry, QueuePool
from sqlalchemy.util import queue as sqla_queue

__all__ = [
    "AsyncIdleQueuePool",
    "CheckoutNeedsIO",
    "IdleQueuePool",
    "checking_out_without_io",
    "checkout_without_io",
]

DEFAULT_IDLE_TIMEOUT = 60.0
# A connection this close to its recycling age is left to a checkout that may
# reconnect: time passes between this pool's look and SQLAlchemy's own.
_RECYCLE_MARGIN: Final = 1.0


class CheckoutNeedsIO(Exception):  # noqa: N818 - a signal, not an error a caller sees
    """A checkout inside :func:`checkout_without_io` would need I/O first; nothing was changed."""


# Inside checkout_without_io: what approves a connection for it (see there).
_WITHOUT_IO: Final[ContextVar[Callable[[Any], bool] | None]] = ContextVar(
    "todo_backend_checkout_without_io", default=None
)


@contextmanager
def checkout_without_io(ready: Callable[[Any], bool]) -> Iterator[None]:
    """Make the pool's checkouts in the block hand out only a connection ready as it is.

    An :class:`IdleQueuePool` then gives the most recently returned connection only if
    it needs no I/O before use (it is open, not due for recycling or replaced by an
    invalidation, and no idle connection is due to be closed) and *ready* approves its
    DBAPI connection; otherwise it raises :class:`CheckoutNeedsIO`, with the pool as it
    was. Checkout listeners that could refuse a connection must then not do I/O
    either (:func:`checking_out_without_io`). An asyncio caller can so check out
    without SQLAlchemy's greenlet bridge.
    """
    token = _WITHOUT_IO.set(ready)
    try:
        yield
    finally:
        _WITHOUT_IO.reset(token)


def checking_out_without_io() -> bool:
    """Tell whether a checkout is being made inside :func:`checkout_without_io`."""
    return _WITHOUT_IO.get() is not None


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


class IdleQueuePool(QueuePool):
    """A QueuePool that keeps up to ``pool_size + max_overflow`` connections until idle.

    ``pool_size`` connections are kept however idle; the others are closed at a
    checkout once they sat unused for ``idle_timeout`` seconds. ``size()`` is
    ``pool_size`` and ``overflow()`` counts the connections open above it, as in
    QueuePool. Pass it to ``create_engine(poolclass=IdleQueuePool, idle_timeout=...)``.
    """

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
        # _put_at[i]: when the connection now at stack position i (0 = bottom) was put
        # there. With LIFO, a position is only refilled after everything above it left.
        self._put_at = [0.0] * capacity
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
            self._pool.put(record, False)
            depth = self._pool.qsize()
            if 0 < depth <= len(self._put_at):
                self._put_at[depth - 1] = monotonic()

    def _do_get(self) -> ConnectionPoolEntry:
        ready = _WITHOUT_IO.get()
        if ready is not None:
            return self._take_ready(ready)
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

    def _take_ready(self, ready: Callable[[Any], bool]) -> ConnectionPoolEntry:
        """Take the top connection if it needs no I/O (:func:`checkout_without_io`)."""
        with self._idle_lock:
            depth = self._pool.qsize()
            if depth == 0 or (
                # A connection to shed: closing it is I/O.
                self._overflow - self._shedding > 0
                and self._put_at[0] <= monotonic() - self._idle_timeout
            ):
                raise CheckoutNeedsIO
            put_at = self._put_at[depth - 1]
            record = self._pool.get(False)
            if _reconnects(self, record) or not ready(record.dbapi_connection):
                # Back where it was, as if never taken.
                self._pool.put(record, False)
                self._put_at[depth - 1] = put_at
                raise CheckoutNeedsIO
        return record

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
    """:class:`IdleQueuePool` for ``create_async_engine`` (an asyncio-adapted queue)."""
