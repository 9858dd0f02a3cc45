"""A TCP relay that counts what crosses it, and can delay it: the bandwidth benchmark's meter and latency.

Put one between each site and its server (the site dials `relay.port`, the relay dials the server). What it counts
is what crosses the socket (TLS records, HTTP/2 or HTTP/1.1 framing, headers and protobuf included), not a model
of it. Besides totals per direction it keeps:

- a time line of cumulative bytes (one point per chunk read), so a run can be split into one-time traffic (before
  training starts) and recurring traffic, and bytes put against time;
- bursts: the bytes one side sends before the other answers or a pause of `burst_gap_s`. On request/response and
  batch/answer protocols (ours, Flower's) a burst is one message with its framing: the largest burst is what a
  hospital proxy or a message-size limit would see.

`delay_s` holds every chunk that long before passing it on, in order, in each direction (a round trip gains
2 x delay_s): latency for emulated hospital links, where the kernel's `netem` is not available.
"""

from __future__ import annotations

import bisect
import heapq
import socket
import threading
import time
from dataclasses import dataclass, field

UP, DOWN = "up", "down"  # site -> server, server -> site


@dataclass
class _Flow:
    """One connection's burst state."""

    direction: str = ""
    size: int = 0
    last: float = 0.0


@dataclass
class Traffic:
    """What a relay counted; times are seconds since the relay started."""

    up: int = 0
    down: int = 0
    times: list[float] = field(default_factory=list)
    cumulative: list[int] = field(default_factory=list)  # up + down after each chunk
    cumulative_up: list[int] = field(default_factory=list)  # up after each chunk
    bursts: dict[str, list[int]] = field(default_factory=lambda: {UP: [], DOWN: []})
    connections: int = 0

    def total_at(self, t: float) -> int:
        """Bytes (both directions) that had crossed by time t."""
        i = bisect.bisect_right(self.times, t)
        return self.cumulative[i - 1] if i else 0

    def up_at(self, t: float) -> int:
        """Site -> server bytes that had crossed by time t."""
        i = bisect.bisect_right(self.times, t)
        return self.cumulative_up[i - 1] if i else 0


class Relay:
    """TCP relay on `listen` (default: a free localhost port) to `target`."""

    def __init__(self, target: tuple[str, int], listen: tuple[str, int] = ("127.0.0.1", 0), delay_s: float = 0.0,
                 burst_gap_s: float = 0.05):
        self.target = target
        self.delay_s = delay_s
        self.burst_gap_s = burst_gap_s
        self.started = time.monotonic()
        self.started_wall = time.time()
        self._t = Traffic()
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._flows: dict[int, _Flow] = {}
        self._closed = False
        self.sock = socket.create_server(listen)
        self.host, self.port = self.sock.getsockname()[:2]
        threading.Thread(target=self._accept, daemon=True, name="relay-accept").start()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # ---- what was counted ----------------------------------------------------------------------------------
    def counts(self) -> tuple[int, int]:
        """(up, down) so far."""
        with self._lock:
            return self._t.up, self._t.down

    def traffic(self) -> Traffic:
        """A copy of everything counted so far (open bursts included)."""
        with self._lock:
            t = self._t
            bursts = {d: list(v) for d, v in t.bursts.items()}
            for flow in self._flows.values():
                if flow.size:
                    bursts[flow.direction].append(flow.size)
            return Traffic(t.up, t.down, list(t.times), list(t.cumulative), list(t.cumulative_up), bursts,
                           t.connections)

    def now(self) -> float:
        """Seconds since the relay started (the clock of Traffic.times)."""
        return time.monotonic() - self.started

    def close(self) -> None:
        self._closed = True
        for s in [self.sock, *self._open]:
            try:
                s.close()
            except OSError:
                pass

    # ---- relaying ------------------------------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._t.connections += 1
                self._open += [client, upstream]
                flow = id(client)
                self._flows[flow] = _Flow()
            threading.Thread(target=self._pipe, args=(client, upstream, UP, flow), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, DOWN, flow), daemon=True).start()

    def _count(self, direction: str, n: int, flow_id: int) -> None:
        now = self.now()
        with self._lock:
            t = self._t
            if direction == UP:
                t.up += n
            else:
                t.down += n
            t.times.append(now)
            t.cumulative.append(t.up + t.down)
            t.cumulative_up.append(t.up)
            flow = self._flows[flow_id]
            if flow.direction == direction and now - flow.last < self.burst_gap_s:
                flow.size += n
            else:
                if flow.size:
                    t.bursts[flow.direction].append(flow.size)
                flow.direction, flow.size = direction, n
            flow.last = now

    def _pipe(self, src: socket.socket, dst: socket.socket, direction: str, flow: int) -> None:
        delayed = _Delayed(dst, self.delay_s) if self.delay_s > 0 else None
        try:
            while data := src.recv(1 << 20):
                self._count(direction, len(data), flow)
                if delayed is None:
                    dst.sendall(data)
                else:
                    delayed.put(data)
        except OSError:
            pass
        finally:
            if delayed is not None:
                delayed.finish()
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class _Delayed:
    """Sends chunks to `dst` `delay` seconds after they were read, in order, from its own thread."""

    def __init__(self, dst: socket.socket, delay: float):
        self.dst, self.delay = dst, delay
        self._heap: list[tuple[float, int, bytes | None]] = []
        self._n = 0
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True, name="relay-delay")
        self._thread.start()

    def put(self, data: bytes | None) -> None:
        with self._cv:
            heapq.heappush(self._heap, (time.monotonic() + self.delay, self._n, data))
            self._n += 1
            self._cv.notify()

    def finish(self) -> None:
        self.put(None)
        self._thread.join(self.delay + 5)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._cv.wait(None if not self._heap else max(0.0, self._heap[0][0] - time.monotonic()))
                _, _, data = heapq.heappop(self._heap)
            if data is None:
                return
            try:
                self.dst.sendall(data)
            except OSError:
                return
