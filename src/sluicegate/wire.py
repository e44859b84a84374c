"""Small helpers for what crosses the wire: timestamps, gRPC channel options, trace carriers."""

from __future__ import annotations

import time

ENVELOPE_BYTES = 64 * 1024  # room for everything in a message besides the payload


def now_ms() -> int:
    return int(time.time() * 1000)


def grpc_options(
    *, keepalive_s: float, keepalive_timeout_s: float, max_payload: int, server: bool
) -> list[tuple[str, int]]:
    """Keepalive and size options; client and server must agree or pings get the client dropped.

    All four keepalive settings are needed for a hung peer on an idle stream to be noticed in
    seconds rather than a minute.
    """
    keepalive_ms = int(keepalive_s * 1000)
    timeout_ms = int(keepalive_timeout_s * 1000)
    limit = max_payload + ENVELOPE_BYTES
    options = [
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.ping_timeout_ms", timeout_ms),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
    ]
    if server:
        options += [
            # On by default in grpc: a second server on a taken port would bind silently and share it.
            ("grpc.so_reuseport", 0),
            ("grpc.http2.min_ping_interval_without_data_ms", max(100, keepalive_ms // 2)),
            ("grpc.http2.min_time_between_pings_ms", max(100, keepalive_ms // 2)),
        ]
    return options
