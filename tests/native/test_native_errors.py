"""Core errors carry blame, not wire codes; the native adapter's one table gives them their stable codes, and the
SDK reads it backwards so clients see the class the broker raised with the same code as before."""

from __future__ import annotations

import pytest

from tidegate.adapters.native import frames as f
from tidegate.adapters.native.client.common import ConnectionClosed, error_from_frame
from tidegate.adapters.native.codec import FrameTooLarge, MalformedFrame, ProtocolError, UnsupportedVersion
from tidegate.adapters.native.errors import CLASSES_BY_CODE, WIRE_CODES, ErrorCode, error_for_code, wire_code
from tidegate.core import errors as core

# The codes every core error class had before they moved out of the core (never renumber).
EXPECTED = {
    core.InvalidName: 10, core.TopicNotFound: 11, core.TopicExists: 12, core.QueueNotFound: 13,
    core.GroupNotFound: 14, core.OffsetOutOfRange: 15, core.MessageTooLarge: 16, core.MessageNotFound: 17,
    core.InvalidFilter: 18, core.InvalidReceipt: 19, core.NoPermission: 20, core.NotAuthorized: 21,
    core.NotAuthenticated: 22, core.StoreFull: 30, core.StoreError: 31, core.CorruptRecord: 31,
    core.ShuttingDown: 32, core.TidegateError: 99, core.BadRequest: 1,
}


@pytest.mark.parametrize(("cls", "code"), EXPECTED.items(), ids=lambda v: getattr(v, "__name__", str(v)))
def test_every_core_error_class_keeps_its_wire_code(cls: type[core.TidegateError], code: int) -> None:
    assert wire_code(cls("x")) == code


def test_the_broker_is_to_blame_only_for_store_full_store_error_shutting_down_and_internal() -> None:
    ours = {code for cls, code in WIRE_CODES.items() if issubclass(cls, core.ServerError)}
    assert ours == {ErrorCode.STORE_FULL, ErrorCode.STORE_ERROR, ErrorCode.SHUTTING_DOWN, ErrorCode.INTERNAL}
    for cls in WIRE_CODES:
        if cls not in (core.TidegateError, core.ServerError, core.ClientError):
            assert issubclass(cls, core.ClientError) != issubclass(cls, core.ServerError), cls


def test_core_errors_carry_no_wire_code_of_their_own() -> None:
    for name in vars(core.TidegateError):
        assert name != "code"
    assert "code" not in vars(core.NotAuthorized("no")) and "code" not in vars(core.NotAuthorized)


def test_anything_that_is_not_a_tidegate_error_is_internal() -> None:
    assert wire_code(RuntimeError("boom")) == ErrorCode.INTERNAL
    assert wire_code(KeyError("k")) == ErrorCode.INTERNAL


def test_protocol_errors_of_the_codec_keep_their_own_codes() -> None:
    assert wire_code(MalformedFrame("bad")) == ErrorCode.MALFORMED_FRAME
    assert wire_code(FrameTooLarge("big")) == ErrorCode.FRAME_TOO_LARGE
    assert wire_code(ProtocolError("wrong state")) == ErrorCode.BAD_REQUEST
    assert wire_code(ProtocolError("odd", code=ErrorCode.UNSUPPORTED_VERSION)) == ErrorCode.UNSUPPORTED_VERSION


@pytest.mark.parametrize("cls", [c for c in EXPECTED if c not in (core.TidegateError, core.CorruptRecord)],
                         ids=lambda c: c.__name__)
def test_the_sdk_rebuilds_the_class_the_broker_raised_with_its_code(cls: type[core.TidegateError]) -> None:
    """An ERROR frame becomes the same core class on the client, with `.code` the wire code and the message kept."""
    code = wire_code(cls("x"))
    error = error_from_frame(f.Error(request_id=1, code=int(code), message="why"))
    assert type(error) is cls and error.code == code and error.message == "why"


def test_sdk_special_cases_keep_their_classes_and_codes() -> None:
    assert type(error_from_frame(f.Error(code=31, message="disk"))) is core.StoreError  # not CorruptRecord
    assert isinstance(error_from_frame(f.Error(code=2, message="v")), UnsupportedVersion)
    assert isinstance(error_from_frame(f.Error(code=3, message="big")), FrameTooLarge)
    internal = error_from_frame(f.Error(code=99, message="oops"))
    assert type(internal) is core.TidegateError and internal.code == ErrorCode.INTERNAL
    unknown = error_for_code(777, "odd")
    assert unknown.code == ErrorCode.INTERNAL and "777" in unknown.message
    assert ConnectionClosed("gone").code == ErrorCode.SHUTTING_DOWN
    assert set(CLASSES_BY_CODE) >= {ErrorCode.NOT_AUTHORIZED, ErrorCode.NOT_AUTHENTICATED, ErrorCode.BAD_REQUEST}
