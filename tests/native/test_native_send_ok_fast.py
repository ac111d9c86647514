"""`encode_send_oks` (the SEND_OK frames of a run of pipelined SENDs in one pass) against the one-at-a-time
`encode_send_ok`, which the codec tests pin to the frame table."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidegate.adapters.native.codec import SEND_OK_TYPE, NativeCodec, Role, State, encode_send_ok
from tidegate.adapters.native.errors import FrameValueError
from tidegate.adapters.native.fastpath import encode_send_oks
from tidegate.adapters.native.frames import FrameFlag, SendOk
from tidegate.core.api import SendResult

ONEWAY = int(FrameFlag.ONEWAY)
_results = st.builds(
    SendResult,
    msg_id=st.one_of(st.text(alphabet="0123456789ABCDEF", min_size=24, max_size=24), st.text(max_size=30)),
    topic=st.text(min_size=1, max_size=20),
    queue_id=st.integers(0, 2**32 - 1),
    queue_offset=st.integers(0, 2**63 - 1),
    commit_offset=st.just(0),
    commit_end=st.just(1),
    bound=st.just(0),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**32 - 1), st.sampled_from([0, ONEWAY]), _results), max_size=20))
def test_send_oks_equal_the_one_by_one_frames(runs: list) -> None:
    """Same bytes as encode_send_ok per non-ONEWAY request, in order; ONEWAY requests get nothing."""
    requests = [SimpleNamespace(request_id=rid, flags=flags) for rid, flags, _ in runs]
    results = [r for _, _, r in runs]
    expected = b"".join(encode_send_ok(rid, r.msg_id, r.topic, r.queue_id, r.queue_offset)
                        for rid, flags, r in runs if not flags & ONEWAY)
    assert encode_send_oks(SEND_OK_TYPE, requests, results, ONEWAY) == expected


def test_send_oks_decode_as_send_ok_frames() -> None:
    results = [SendResult("00000000000000A065536B00", "orders", 3, 41, 0, 1, 0),
               SendResult("00000000000000B065536B00", "orders", 3, 42, 0, 1, 0)]
    requests = [SimpleNamespace(request_id=7, flags=0), SimpleNamespace(request_id=8, flags=0)]
    codec = NativeCodec(Role.CLIENT)
    codec.state = State.OPEN  # past the handshake
    frames = codec.receive_data(encode_send_oks(SEND_OK_TYPE, requests, results, ONEWAY))
    assert [(type(x), x.request_id, x.msg_id, x.topic, x.queue_id, x.queue_offset) for x in frames] == [
        (SendOk, 7, results[0].msg_id, "orders", 3, 41), (SendOk, 8, results[1].msg_id, "orders", 3, 42)]


def test_send_oks_refuse_values_the_wire_cannot_carry() -> None:
    with pytest.raises(FrameValueError):
        encode_send_oks(SEND_OK_TYPE, [SimpleNamespace(request_id=2**32, flags=0)],
                        [SendResult("A" * 24, "t", 0, 0, 0, 1, 0)], ONEWAY)
