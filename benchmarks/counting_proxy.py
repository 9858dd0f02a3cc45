"""A loopback TCP relay that counts the bytes crossing it in each direction, for the benchmarks.

What it counts is what crosses the socket (TLS records, HTTP/2 framing, headers and protobuf included), not a
model of it. Put it between a site and its server: the site dials `proxy.port`, the proxy dials the server.
"""

from __future__ import annotations

import socket
import threading


class CountingProxy:
    """TCP proxy on a free localhost port; `up` counts site -> server bytes, `down` server -> site."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.up = 0
        self.down = 0
        self._lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self.sock.accept()
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(client, upstream, "up"), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, "down"), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        try:
            while data := src.recv(1 << 20):
                dst.sendall(data)
                with self._lock:
                    setattr(self, direction, getattr(self, direction) + len(data))
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def counts(self) -> tuple[int, int]:
        """(up, down) so far."""
        with self._lock:
            return self.up, self.down
