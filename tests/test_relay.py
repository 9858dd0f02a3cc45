"""The benchmark's counting relay counts exactly what crosses it, splits it into bursts, and delays on request."""

from __future__ import annotations

import socket
import threading
import time

from asyndgan.experiments.relay import DOWN, UP, Relay


def _echo_server(replies: dict[int, int]):
    """A server that answers each request of n bytes with replies[n] bytes; returns (address, thread)."""
    srv = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = srv.accept()
        with conn:
            for need, answer in replies.items():
                got = 0
                while got < need:
                    got += len(conn.recv(need - got))
                conn.sendall(b"y" * answer)
        srv.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return srv.getsockname()[:2], t


def _exchange(relay: Relay, replies: dict[int, int]) -> list[float]:
    seconds = []
    with socket.create_connection(("127.0.0.1", relay.port)) as c:
        for need, answer in replies.items():
            started = time.monotonic()
            c.sendall(b"x" * need)
            got = 0
            while got < answer:
                got += len(c.recv(1 << 20))
            seconds.append(time.monotonic() - started)
    return seconds


def test_relay_counts_a_known_payload_exactly_and_splits_it_into_messages():
    replies = {1000: 3_000_000, 2_500_000: 7, 3: 12345}  # request bytes -> answer bytes, in order
    target, server = _echo_server(replies)
    relay = Relay(target, burst_gap_s=0.2)
    _exchange(relay, replies)
    server.join(10)
    time.sleep(0.3)
    up, down = relay.counts()
    assert (up, down) == (sum(replies), sum(replies.values()))
    traffic = relay.traffic()
    assert sorted(traffic.bursts[UP]) == sorted(replies) and sorted(traffic.bursts[DOWN]) == sorted(replies.values())
    assert traffic.cumulative[-1] == up + down and traffic.connections == 1
    assert traffic.total_at(traffic.times[-1]) == up + down and traffic.total_at(-1.0) == 0
    relay.close()


def test_delaying_relay_adds_its_delay_each_way():
    replies = {10: 10, 20: 20}
    target, server = _echo_server(replies)
    relay = Relay(target, delay_s=0.1)
    seconds = _exchange(relay, replies)
    server.join(10)
    assert all(0.19 <= s < 0.6 for s in seconds), seconds  # 2 x 0.1 s per round trip
    assert relay.counts() == (30, 30)
    relay.close()
