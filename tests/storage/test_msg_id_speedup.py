"""record.make_msg_id and its compiled twin (core/storage/_record_speedups.pyx): the same 24-character text as the
12-byte hex packing, and the same OverflowError outside 16 hex digits of commit offset."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidegate.core.storage import record
from tidegate.core.storage.accelerator import extensions_disabled


def _reference_msg_id(commit_offset: int, store_ts: int) -> str:
    """The documented layout, spelled out: commit offset in 16 hex digits, store seconds (low 32 bits) in 8."""
    return f"{commit_offset:016X}{(store_ts // 1000) & 0xFFFFFFFF:08X}"


def test_compiled_make_msg_id_is_bound_unless_disabled() -> None:
    """record.make_msg_id is the compiled twin when the extension is built and TIDEGATE_NO_EXTENSIONS is unset."""
    try:
        import tidegate.core.storage._record_speedups  # noqa: F401
        built = True
    except ImportError:
        built = False
    assert (record.make_msg_id is not record.py_make_msg_id) == (built and not extensions_disabled())


@settings(max_examples=500, deadline=None)
@given(st.integers(0, (1 << 64) - 1), st.integers(-(1 << 50), 1 << 50))
def test_make_msg_id_variants_give_the_same_text(commit_offset: int, store_ts: int) -> None:
    """Both variants give exactly the reference text (and parse_msg_id reads it back)."""
    expected = _reference_msg_id(commit_offset, store_ts)
    assert record.py_make_msg_id(commit_offset, store_ts) == expected
    assert record.make_msg_id(commit_offset, store_ts) == expected
    assert record.parse_msg_id(expected) == (commit_offset, (store_ts // 1000) & 0xFFFFFFFF)


@pytest.mark.parametrize("commit_offset", [-1, 1 << 64])
def test_make_msg_id_rejects_offsets_outside_16_hex_digits(commit_offset: int) -> None:
    """An offset below 0 or from 2**64 on raises OverflowError in both variants."""
    for fn in (record.py_make_msg_id, record.make_msg_id):
        with pytest.raises(OverflowError):
            fn(commit_offset, 0)
