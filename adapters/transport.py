"""Helpers every protocol adapter applies to its transport."""

from __future__ import annotations

from typing import Any


def disable_nagle(transport: Any) -> None:
    """Send small frames at once: with Nagle's algorithm on, a reply written while the previous one is still
    unacknowledged waits for the peer's delayed ACK (about 40 ms), which caps a pipelining client at a few
    thousand messages per second. Transports without TCP (WebSocket wrappers, tests) are left alone."""
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        try:
            set_no_delay(True)
        except OSError:
            pass
