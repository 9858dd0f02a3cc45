"""Channel and server options, set identically on both ends, each with the reason for its value."""

from __future__ import annotations

MiB = 1024 * 1024
# A batch of 16 four-channel 256x256 fp32 images is 16 MiB; leave room above that. The label-map upload is
# chunked (4 MiB by default), so no single message needs to approach this.
MAX_MESSAGE_BYTES = 64 * MiB

OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Hospital firewalls and NATs drop idle TCP flows after a few minutes: ping every 30 s to keep the stream
    # open while a slow site or a checkpoint keeps it quiet.
    ("grpc.keepalive_time_ms", 30_000),
    # A peer that does not answer a ping within 20 s is gone: fail the stream so the site can reconnect.
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # Allow the client's 30 s pings (the default minimum interval of 5 min would make the server GOAWAY).
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
]
