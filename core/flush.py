"""Durability: when an appended message counts as on disk, and group commit of fsyncs.

`sync` mode (the default): an acknowledgement waits for an fsync that covers the message. fsync runs in a thread
(`run_in_thread`) so the reactor keeps serving. An idle flusher starts the fsync at the end of the reactor turn that
appended the first record (no timer, no batching window: at low rates a message waits for one fsync and nothing
else); while one fsync runs, new appends pile up and the next fsync, started in the reactor turn that learns the
previous one finished, covers all of them at once (group commit), so throughput grows with concurrency instead of
being one fsync per message. The waiters an fsync covers (acknowledgements) and the durable listeners (visibility,
which wakes deliveries) run in the turn that learns it finished.

Inline fsync when the reactor is idle (`inline_when_idle`, on in the broker): at low rates the hand-off to the thread
and back (a thread wake-up, the waker pipe, a second reactor wake-up, a Deferred) costs about as much as the fsync.
So when the flush starts and an idleness probe says no other event is waiting (the reactor's epoll has nothing
ready), the fsync runs on the reactor thread and the acknowledgements go out in the same turn, as Redis does with
`appendfsync always`. Under load the probe sees ready events and the fsync goes to the thread as before, so group
commit and throughput are unchanged. The stall guard: an inline fsync slower than `inline_stall_s` (a slow or busy
disk) blocked every connection for that long, so inlining pauses for `inline_pause_s` and the thread takes over
(the pause doubles while inline fsyncs stay slow, up to `inline_max_pause_s`); no client action can stall the others
for more than one slow fsync per pause. An inline fsync error is handled exactly like a thread's: fatal to the
durability promise.

`async` mode: acknowledgements are immediate and the log is fsynced every `interval_ms`.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime

from tidegate.core.metrics import CoreMetrics
from tidegate.core.storage.api import MessageStore

log = logging.getLogger("tidegate.flush")

# An inline fsync slower than this blocked every connection for that long: stop inlining for INLINE_PAUSE_S, twice
# as long after each slow one that follows a pause (up to INLINE_MAX_PAUSE_S), back to INLINE_PAUSE_S after a fast
# one. One hiccup (a preempted VM) costs a second of thread fsyncs; a slow disk stalls the reactor once a minute.
INLINE_STALL_S = 0.002
INLINE_PAUSE_S = 1.0
INLINE_MAX_PAUSE_S = 64.0


class Durability:
    """Implements core/interfaces_storage.py `Durability` over a MessageStore."""

    def __init__(
        self,
        store: MessageStore,
        clock: IReactorTime,
        run_in_thread: Callable[[Callable[[], int]], Any] | None = None,
        mode: str = "sync",
        interval_ms: int = 100,
        metrics: CoreMetrics | None = None,
        inline_when_idle: Callable[[], bool] | None = None,
        inline_stall_s: float = INLINE_STALL_S,
        inline_pause_s: float = INLINE_PAUSE_S,
        inline_max_pause_s: float = INLINE_MAX_PAUSE_S,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        """`inline_when_idle`: a cheap probe, true when no other event waits for the reactor; with it (and a
        `run_in_thread`) an fsync started while the reactor is idle runs inline. `timer` measures fsync durations
        (injected by tests)."""
        if mode not in ("sync", "async"):
            raise ValueError(f"flush mode must be 'sync' or 'async', not {mode!r}")
        self.store = store
        self.clock = clock
        self.mode = mode
        self.interval_ms = interval_ms
        self.metrics = metrics or CoreMetrics()
        self._run_in_thread = run_in_thread
        self._inline_when_idle = inline_when_idle
        # The log fsync alone, when the store offers it: FileMessageStore.sync() on its owning thread also writes
        # index entries and the checkpoint (~0.1 ms per call), which the broker's periodic index flush does anyway.
        self._sync_inline: Callable[[], int] = getattr(store, "sync_log", store.sync)
        self.inline_stall_s = inline_stall_s
        self.inline_pause_s = inline_pause_s
        self.inline_max_pause_s = inline_max_pause_s
        self._next_pause_s = inline_pause_s
        self._timer = timer
        self._inline_paused_until = 0.0
        self.inline_syncs = 0  # fsyncs run on the reactor thread because it was idle
        self.thread_syncs = 0  # fsyncs handed to run_in_thread
        self.inline_pauses = 0  # times the stall guard switched inlining off for inline_pause_s
        self._waiters: list[tuple[int, int, Callable[[], None]]] = []  # heap of (commit_end, seq, callback)
        self._seq = 0
        self._flushing = False
        self._scheduled = None
        self._periodic = None
        self._listeners: list[Callable[[int], None]] = []
        self._closed = False
        self._idle_waiters: list[Any] = []
        self.failed: BaseException | None = None
        if mode == "async":
            self._periodic = self.clock.callLater(interval_ms / 1000.0, self._periodic_flush)

    @property
    def visible_offset(self) -> int:
        """Commit-log offset below which consumers may see messages."""
        return self.store.end_offset if self.mode == "async" else self.store.durable_offset

    def on_durable(self, listener: Callable[[int], None]) -> None:
        """Register `listener(durable_offset)`, called each time the durable offset advances (sync mode)."""
        self._listeners.append(listener)

    def when_durable(self, commit_end: int, callback: Callable[[], None]) -> None:
        if self.mode == "async" or self.store.durable_offset >= commit_end:
            callback()
            return
        self._seq += 1
        heapq.heappush(self._waiters, (commit_end, self._seq, callback))
        self.request_flush()

    def request_flush(self) -> None:
        """Ask for an fsync covering everything appended so far, at the end of this reactor turn.

        On an idle flusher this is the turn that appended the first record of a quiet period: no timer, no batching
        window; only the rest of the turn (the other events of the same poll) joins the fsync. Starting it in the
        middle of the turn gains nothing: the flush thread needs the GIL, which the reactor holds for the rest of
        the turn except inside its own system calls (where the two then trade it back and forth), and
        measured at 1,000 msg/s the mid-turn start cost 0.85 extra context switches per message for the same
        latency (docs/performance.md, "Latency at low rate"). While an fsync runs, appends pile up and
        `_flush_done` asks for the next one; its zero-delay call runs in the same `runUntilCurrent` as the
        thread's result (Twisted runs the thread-call queue, then every timed call that is due).
        """
        if (self.mode == "async" or self._flushing or self._scheduled is not None or self._closed
                or self.failed is not None):
            return
        self._scheduled = self.clock.callLater(0, self._start_flush)

    def _start_flush(self) -> None:
        self._scheduled = None
        if self._flushing or self.store.durable_offset >= self.store.end_offset:
            return
        self._flushing = True
        if self._run_in_thread is None:
            self._sync_here()
        elif self._may_inline():
            self.inline_syncs += 1
            self._sync_here(inline=True)
        else:
            self.thread_syncs += 1
            started = self._timer()
            d = self._run_in_thread(self.store.sync)
            d.addCallbacks(self._flush_done, self._flush_failed_failure, callbackArgs=(started,))

    def _may_inline(self) -> bool:
        if self._inline_when_idle is None or self.clock.seconds() < self._inline_paused_until:
            return False
        return self._inline_when_idle()

    def _sync_here(self, inline: bool = False) -> None:
        """fsync on the calling (reactor) thread; acknowledgements and listeners run before this returns. `inline`:
        the reactor was idle (the log only, watched by the stall guard)."""
        started = self._timer()
        try:
            durable = self._sync_inline() if inline else self.store.sync()
        except BaseException as exc:  # noqa: BLE001 - reported to every waiter below
            self._flush_failed(exc)
            return
        if inline:
            took = self._timer() - started
            if took > self.inline_stall_s:
                self._pause_inlining(took)
            else:
                self._next_pause_s = self.inline_pause_s
        self._flush_done(durable, started)

    def _pause_inlining(self, took: float) -> None:
        pause = self._next_pause_s
        self._next_pause_s = min(pause * 2, self.inline_max_pause_s)
        self._inline_paused_until = self.clock.seconds() + pause
        self.inline_pauses += 1
        if pause >= self.inline_max_pause_s or self.inline_pauses == 1:  # a slow disk logs once a minute at most
            log.info("an fsync on the reactor thread took %.1f ms (limit %.1f ms): fsyncs run in the flush thread "
                     "for the next %.0f s", took * 1000, self.inline_stall_s * 1000, pause)

    def idle(self) -> Any:
        """A Deferred that fires once no fsync is running in a thread (shutdown waits for it before close())."""
        from twisted.internet.defer import Deferred, succeed

        if not self._flushing:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._idle_waiters.append(waiter)
        return waiter

    def _now_idle(self) -> None:
        self._flushing = False
        waiters, self._idle_waiters = self._idle_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _flush_done(self, durable: int, started: float) -> None:
        self.metrics.fsync_latency.observe(self._timer() - started)
        self._now_idle()
        # Listeners first: visibility pumps the deliveries the fsync released (core/delivery.py `run_woken`), so
        # a subscriber's copy leaves before the publishers' acknowledgements, whose writes wake the publishers
        # (end-to-end latency is the delivery's; an acknowledgement waits only for the pumps of this turn)
        for listener in self._listeners:
            try:
                listener(durable)
            except Exception:  # a failing listener must not withhold the acknowledgements of durable records
                log.exception("a durability listener failed")
        waiters = self._waiters
        while waiters and waiters[0][0] <= durable:
            _, _, callback = heapq.heappop(waiters)
            callback()
        if self.store.durable_offset < self.store.end_offset and not self._closed:
            self.request_flush()  # what piled up during this fsync: the next one starts in this same turn

    def _flush_failed_failure(self, failure: Any) -> None:
        self._flush_failed(failure.value)

    def _flush_failed(self, exc: BaseException) -> None:
        # An fsync failure ends the durability promise for this process: on Linux a retried fsync can succeed
        # after the kernel dropped the dirty pages it could not write (PostgreSQL's fsync lesson), so a retry
        # could acknowledge records that are not on disk. Nothing waiting is ever acknowledged; the store refuses
        # further appends; readiness reports it; a restart recovers from what the log really holds.
        self._now_idle()
        if self.failed is None:
            log.critical("fsync failed: %s; acknowledgements are withheld and writes refused: restart the broker "
                         "to recover from the log", exc)
        self.failed = exc

    def health(self) -> tuple[bool, str]:
        """(ok, reason) for readiness: false for good once an fsync has failed."""
        if self.failed is None:
            return True, ""
        return False, f"fsync failed ({self.failed}); restart to recover"

    def _periodic_flush(self) -> None:
        self._periodic = None
        if self._closed or self.failed is not None:
            return
        if self.store.durable_offset < self.store.end_offset:
            started = self._timer()
            if self._run_in_thread is None:
                try:
                    durable = self.store.sync()
                except Exception as exc:  # noqa: BLE001 - fatal to durability, see _flush_failed
                    self._flush_failed(exc)
                    return
                self._flush_done(durable, started)
            elif not self._flushing:
                self._flushing = True
                d = self._run_in_thread(self.store.sync)
                d.addCallbacks(self._flush_done, self._periodic_failed, callbackArgs=(started,))
        self._periodic = self.clock.callLater(self.interval_ms / 1000.0, self._periodic_flush)

    def _periodic_failed(self, failure: Any) -> None:
        self._flush_failed(failure.value)

    def close(self) -> None:
        """Stop timers and fsync synchronously (shutdown path), releasing every waiter."""
        self._closed = True
        if self._inline_when_idle is not None:
            log.info("fsyncs since start: %d inline (idle reactor), %d in the flush thread, inlining paused %d times",
                     self.inline_syncs, self.thread_syncs, self.inline_pauses)
        for call in (self._scheduled, self._periodic):
            if call is not None and call.active():
                call.cancel()
        self._scheduled = self._periodic = None
        if self.failed is not None:
            return  # nothing more is durable than what an fsync proved; waiters stay unacknowledged
        durable = self.store.sync()
        waiters = self._waiters
        while waiters and waiters[0][0] <= durable:
            heapq.heappop(waiters)[2]()
        for listener in self._listeners:
            listener(durable)
