"""A latency-injecting TCP proxy for the benchmark: a simulated Neon link on loopback.

The proxy runs in its own process (so its threads never compete for the benchmark's
GIL) and forwards every connection to the real PostgreSQL server. Each direction of
each connection is a *delay line*: a reader thread stamps every chunk with its arrival
time, a writer thread sends it ``delay`` seconds after that arrival. Chunks that
arrive close together therefore leave close together; delays never add up.

It also counts round trips: a client-to-server chunk that arrives after the server
has spoken (or first on a connection) starts a new *burst*. A statement that needs
one round trip costs one burst; a hidden ``BEGIN`` or ``COMMIT`` costs one more.
Counters live in shared memory, so the benchmark reads them without asking.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import socket
import statistics
import threading
import time
from dataclasses import dataclass
from multiprocessing.sharedctypes import Synchronized
from typing import Any, Final

__all__ = ["BURSTS", "CHUNKS", "LATENESS_SAMPLES", "ProxyHandle", "start_proxy"]

# Indexes into the shared counter array.
BURSTS: Final = 0  # client-to-server bursts: round trips started by the client
CHUNKS: Final = 1  # client-to-server chunks (recv() results)
_LATE_COUNT: Final = 2  # lateness samples written so far (ring buffer position)
_N_COUNTERS: Final = 3
LATENESS_SAMPLES: Final = 4096
_CHUNK: Final = 1 << 16


def _sleep_overshoot() -> float:
    """Return the median time ``time.sleep`` oversleeps by on this machine."""
    over = []
    for _ in range(40):
        started = time.perf_counter()
        time.sleep(0.001)
        over.append(time.perf_counter() - started - 0.001)
    return statistics.median(over)


class _Link:
    """One proxied connection: two delay lines and the burst state they share."""

    def __init__(
        self,
        client: socket.socket,
        server: socket.socket,
        *,
        delay: float,
        early: float,
        counters: Any,
        lateness: Any,
    ) -> None:
        self.client = client
        self.server = server
        self.delay = delay
        self.early = early
        self.counters = counters
        self.lateness = lateness
        self.server_spoke = True  # the first client chunk starts a burst

    def start(self) -> None:
        for src, dst, upstream in (
            (self.client, self.server, True),
            (self.server, self.client, False),
        ):
            line: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()
            threading.Thread(target=self._read, args=(src, line, upstream), daemon=True).start()
            threading.Thread(target=self._write, args=(dst, line), daemon=True).start()

    def _read(
        self, src: socket.socket, line: queue.SimpleQueue[tuple[float, bytes]], upstream: bool
    ) -> None:
        while True:
            try:
                data = src.recv(_CHUNK)
            except OSError:
                data = b""
            arrived = time.perf_counter()
            if upstream and data:
                self.counters[CHUNKS] += 1
                if self.server_spoke:
                    self.server_spoke = False
                    self.counters[BURSTS] += 1
            elif data:
                self.server_spoke = True
            line.put((arrived, data))
            if not data:
                return

    def _write(self, dst: socket.socket, line: queue.SimpleQueue[tuple[float, bytes]]) -> None:
        while True:
            arrived, data = line.get()
            due = arrived + self.delay
            if self.delay:
                # Wake a typical oversleep early, so chunks leave close to their due time.
                wait = due - time.perf_counter() - self.early
                if wait > 0:
                    time.sleep(wait)
                if data:
                    n = int(self.counters[_LATE_COUNT])
                    self.lateness[n % LATENESS_SAMPLES] = time.perf_counter() - due
                    self.counters[_LATE_COUNT] = n + 1
            try:
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(data)
            except OSError:
                return


def _serve(
    upstream: tuple[str, int],
    delay: float,
    port: Synchronized[int],
    counters: Any,
    lateness: Any,
) -> None:
    """Accept connections on a loopback port forever and proxy each to *upstream*."""
    early = _sleep_overshoot() if delay else 0.0
    listener = socket.create_server(("127.0.0.1", 0))
    port.value = listener.getsockname()[1]
    while True:
        client, _ = listener.accept()
        server = socket.create_connection(upstream)
        for sock in (client, server):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _Link(
            client, server, delay=delay, early=early, counters=counters, lateness=lateness
        ).start()


@dataclass
class ProxyHandle:
    """A running proxy process: its port, its counters, and how to stop it."""

    port: int
    delay: float
    process: mp.process.BaseProcess
    counters: Any
    lateness: Any

    def bursts(self) -> int:
        """Return the client-to-server bursts (round trips) seen so far, all connections."""
        return int(self.counters[BURSTS])

    def lateness_us(self) -> list[float]:
        """Return recent per-chunk lateness samples (actual minus intended send), in µs."""
        n = min(int(self.counters[_LATE_COUNT]), LATENESS_SAMPLES)
        return [self.lateness[i] * 1e6 for i in range(n)]

    def stop(self) -> None:
        """Terminate the proxy process and wait for it."""
        self.process.terminate()
        self.process.join(5)


def start_proxy(upstream_host: str, upstream_port: int, one_way_delay: float) -> ProxyHandle:
    """Start a proxy process delaying each direction by *one_way_delay* seconds."""
    ctx = mp.get_context("spawn")
    port = ctx.Value("i", 0)
    counters = ctx.RawArray("q", _N_COUNTERS)
    lateness = ctx.RawArray("d", LATENESS_SAMPLES)
    process = ctx.Process(
        target=_serve,
        args=((upstream_host, upstream_port), one_way_delay, port, counters, lateness),
        daemon=True,
        name="latency-proxy",
    )
    process.start()
    deadline = time.monotonic() + 30
    while port.value == 0:
        if not process.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the latency proxy did not start")
        time.sleep(0.01)
    return ProxyHandle(port.value, one_way_delay, process, counters, lateness)
