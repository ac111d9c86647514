"""Log lines caused by clients, rate-limited per cause and never echoing unbounded client data.

A misbehaving client can cause the same warning thousands of times a second (a dropped QoS 0 publish, a refused
frame). `ClientLog.warn(cause, fmt, *args)` writes the first line of a cause at once, then at most one line per
interval with how many were suppressed meanwhile. Arguments are clipped (`clip`) so a 60 KB topic name makes a
short line, not a 120 KB one. Causes are a bounded set: past `max_causes` the oldest cause is forgotten.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

DEFAULT_INTERVAL_S = 10.0
DEFAULT_MAX_CAUSES = 1024
CLIP_CHARS = 200


def clip(value: Any, limit: int = CLIP_CHARS) -> str:
    """`value` as text of at most `limit` characters, saying how much was cut."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...({len(text) - limit} more chars)"


class ClientLog:
    """Rate-limited logging for events a client can trigger at will."""

    def __init__(self, logger: logging.Logger, clock: Callable[[], float], *, interval_s: float = DEFAULT_INTERVAL_S,
                 max_causes: int = DEFAULT_MAX_CAUSES) -> None:
        self._logger = logger
        self._clock = clock
        self._interval = interval_s
        self._max_causes = max_causes
        self._causes: OrderedDict[str, list[float | int]] = OrderedDict()  # cause -> [next allowed time, suppressed]

    def log(self, level: int, cause: str, fmt: str, *args: Any) -> bool:
        """Log `fmt % args` unless `cause` was logged within the interval; True if a line was written."""
        now = self._clock()
        state = self._causes.get(cause)
        if state is not None and now < state[0]:
            state[1] += 1
            return False
        suppressed = int(state[1]) if state is not None else 0
        if state is None:
            if len(self._causes) >= self._max_causes:
                self._causes.popitem(last=False)
            state = self._causes[cause] = [0.0, 0]
        else:
            self._causes.move_to_end(cause)
        state[0], state[1] = now + self._interval, 0
        clipped = tuple(clip(a) if isinstance(a, str | bytes) else a for a in args)
        if suppressed:
            fmt += " (%d similar lines suppressed in the last %.0fs)"
            clipped += (suppressed, self._interval)
        self._logger.log(level, fmt, *clipped)
        return True

    def warn(self, cause: str, fmt: str, *args: Any) -> bool:
        return self.log(logging.WARNING, cause, fmt, *args)

    def info(self, cause: str, fmt: str, *args: Any) -> bool:
        return self.log(logging.INFO, cause, fmt, *args)
