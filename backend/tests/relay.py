"""A loopback TCP relay in front of one server, for tests that watch or break the wire.

Subclasses say what to do with each relayed connection (:meth:`LoopbackRelay._relay`):
count its messages, lose an answer, cut it off. The relay listens on 127.0.0.1 only.
"""

from __future__ import annotations

import socket
import threading

__all__ = ["LoopbackRelay"]


class LoopbackRelay:
    """Accept connections on a free loopback port and open one to *upstream* for each.

    A subclass sets its own attributes before calling ``super().__init__``: the accept
    thread starts here.
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self._upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        """Stop accepting connections."""
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self._upstream)
            except OSError:  # the server is gone: so is this client's connection
                client.close()
                continue
            self._relay(client, server)

    def _relay(self, client: socket.socket, server: socket.socket) -> None:
        """Carry the traffic between *client* and *server* (threads of the subclass's)."""
        raise NotImplementedError
