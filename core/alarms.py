"""Resource alarms: conditions under which the broker should stop taking in messages (RabbitMQ's alarms).

`ResourceAlarms` is the protocol-free hub: monitors raise and clear named alarms (`storage`, `memory`), adapters
subscribe and hear every change of the overall state. Every adapter factory follows it (adapters/base.py): while an
alarm is raised, connections that publish are no longer read (MQTT, native and AMQP alike) and each protocol says
so its own way where it has a way (AMQP: connection.blocked / connection.unblocked).

`ResourceMonitor` polls a list of checks on the clock and feeds the alarms. The checks gateway/app.py gives it:

* `storage`: the store's and the durability's health (a failed fsync, an append that failed because the disk is
  full) and the free space of the data directory against a limit (`disk_check`);
* `memory`: the process's resident set size against a high watermark (`memory_check`).

Nothing here touches sockets or protocols; every clock is passed in.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger("tidegate.alarms")

Check = Callable[[], tuple[bool, str]]  # () -> (ok, reason when not ok)
AlarmListener = Callable[[bool, str], None]  # (alarmed, reason) on every change of the overall state


class ResourceAlarms:
    """Named alarms (`storage`, `memory`, ...); listeners hear when the broker goes from no alarm to some alarm and
    back, and when the reason of an active alarm set changes."""

    def __init__(self) -> None:
        self._active: dict[str, str] = {}
        self._listeners: list[AlarmListener] = []

    @property
    def alarmed(self) -> bool:
        return bool(self._active)

    @property
    def reason(self) -> str:
        """What is wrong, e.g. "memory: rss 2.1 GB over the watermark 2.0 GB" ("" when nothing is)."""
        return "; ".join(f"{name}: {why}" for name, why in sorted(self._active.items()))

    @property
    def active(self) -> dict[str, str]:
        return dict(self._active)

    def set(self, name: str, active: bool, reason: str = "") -> None:
        """Raise (`active`) or clear the alarm `name`; listeners are told only when something changed."""
        before = self.alarmed
        if active:
            if self._active.get(name) == reason:
                return
            if name not in self._active:
                log.warning("resource alarm %s raised: %s; publishers are blocked", name, reason)
            self._active[name] = reason
        else:
            if name not in self._active:
                return
            del self._active[name]
            log.warning("resource alarm %s cleared", name)
        if before != self.alarmed or self.alarmed:
            self._notify()

    def subscribe(self, listener: AlarmListener) -> Callable[[], None]:
        """Call `listener(alarmed, reason)` on every change; returns the function that unsubscribes."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    def _notify(self) -> None:
        alarmed, reason = self.alarmed, self.reason
        for listener in list(self._listeners):
            try:
                listener(alarmed, reason)
            except Exception:  # one broken listener must not keep the others from hearing
                log.exception("resource alarm listener failed")


class ResourceMonitor:
    """Runs `checks` (alarm name -> list of checks) every `interval_s` and raises/clears the alarms accordingly."""

    def __init__(self, alarms: ResourceAlarms, clock: Any, checks: dict[str, Sequence[Check]],
                 interval_s: float = 1.0) -> None:
        self.alarms = alarms
        self.clock = clock
        self.checks = checks
        self.interval_s = interval_s
        self._timer: Any = None

    def start(self) -> None:
        self.check_now()

    def stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def check_now(self) -> None:
        """Run every check once (and schedule the next round)."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        for name, checks in self.checks.items():
            reasons = []
            for check in checks:
                try:
                    ok, why = check()
                except Exception as exc:  # noqa: BLE001 - a failing probe is not an alarm; say so and go on
                    log.warning("resource check %s failed: %s", name, exc)
                    continue
                if not ok:
                    reasons.append(why)
            self.alarms.set(name, bool(reasons), "; ".join(reasons))
        self._timer = self.clock.callLater(self.interval_s, self.check_now)


def current_rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; elsewhere the peak from getrusage)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def physical_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        return 0


def memory_check(watermark_bytes: int, rss: Callable[[], int] = current_rss_bytes) -> Check:
    """Alarm while the process's resident memory is at or above `watermark_bytes` (0 or less: never)."""

    def check() -> tuple[bool, str]:
        if watermark_bytes <= 0:
            return True, ""
        used = rss()
        if used >= watermark_bytes:
            return False, f"resident memory {used} bytes is over the high watermark {watermark_bytes}"
        return True, ""

    return check


def disk_check(path: str | os.PathLike[str], free_limit_bytes: int,
               free: Callable[[str], int] | None = None) -> Check:
    """Alarm while the file system holding `path` has less than `free_limit_bytes` free (0 or less: never)."""

    def free_bytes(where: str) -> int:
        return shutil.disk_usage(where).free

    probe = free or free_bytes

    def check() -> tuple[bool, str]:
        if free_limit_bytes <= 0:
            return True, ""
        left = probe(os.fspath(path))
        if left < free_limit_bytes:
            return False, f"{left} bytes free on the data directory's disk, below the limit {free_limit_bytes}"
        return True, ""

    return check

