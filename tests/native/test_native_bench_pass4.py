"""Native pass 4: the bench producer's per-send answer callback (a partial, not a closure) still counts every
answer, acknowledged or failed, and gives its window slot back."""

from __future__ import annotations

import functools

from tidegate.client.common import ConnectionClosed
from tidegate.gateway.bench.delivery import ProducerTally
from tidegate.gateway.bench.native import NativeDriver, SendWindow


def test_on_sent_marks_each_acknowledged_sequence_and_returns_the_slot() -> None:
    """An answered send marks its sequence numbers acknowledged (one, or a batch's run) and frees its window slot."""
    tally, window = ProducerTally(), SendWindow(4)
    assert window.acquire(0) and window.acquire(0)
    single = NativeDriver._on_sent(tally, window, 0, 1, 0)
    batch = NativeDriver._on_sent(tally, window, 1, 3, 0)
    assert isinstance(single, functools.partial)  # one object per pending send, no closure cells
    single(object())
    batch(object())
    assert tally.acked == 4 and tally.failed == 0
    assert tally.acked_seqs.as_int() == 0b1111
    assert window.returned == 2


def test_on_sent_counts_a_failed_send_as_failed_and_returns_the_slot() -> None:
    """An exception in place of the answer counts the send's messages failed, keeps the first error's text, marks
    nothing acknowledged and frees the slot."""
    tally, window = ProducerTally(), SendWindow(1)
    assert window.acquire(0)
    NativeDriver._on_sent(tally, window, 5, 2, 0)(ConnectionClosed("gone"))
    assert (tally.acked, tally.failed) == (0, 2)
    assert tally.first_error.startswith("ConnectionClosed")
    assert tally.acked_seqs.as_int() == 0
    assert window.acquire(0)
