"""Errors about the bytes and values of one native frame, raised by the typed frame table (`frames.py`) and by
the hot-path byte helpers (`fastpath.py`) alike, so they live below both. Errors about the protocol's rules
(`ProtocolError` and its kinds: wrong frame for the state, frame too large...) belong to the codec (`codec.py`).
"""

from __future__ import annotations

from tidegate.core.errors import ErrorCode, TidegateError


class FrameValueError(TidegateError):
    """A frame was built (or decoded) with a value its wire type cannot carry."""

    code = ErrorCode.MALFORMED_FRAME


class Truncated(Exception):
    """Internal: a field ran past the end of its frame; the codec reports it as MALFORMED_FRAME."""
