"""Values and helpers shared by the blocking and the Twisted SDK: results, error mapping, conversions."""

from __future__ import annotations

from dataclasses import dataclass

from tidegate.adapters.native import frames as f
from tidegate.adapters.native.codec import FrameTooLarge, MalformedFrame, ProtocolError, UnsupportedVersion
from tidegate.adapters.native.errors import ErrorCode, error_for_code
from tidegate.core.api import Delivered, PullResult, PullStatus
from tidegate.core.errors import TidegateError
from tidegate.core.model import QueueRef

DEFAULT_ADDRESS = "127.0.0.1:10911"
DEFAULT_PORT = 10911
# What the SDK accepts from the server: the server splits pushes to its own max_frame, which may be large.
CLIENT_MAX_FRAME = 256 * 1024 * 1024


class ConnectionClosed(TidegateError):
    """The connection to the broker ended before the request was answered."""

    code = ErrorCode.SHUTTING_DOWN


class RequestTimeout(TidegateError):
    """The broker did not answer within the timeout (the request may still have been applied)."""

    code = ErrorCode.INTERNAL


class NotStarted(TidegateError):
    """A client object was used before `start()`."""

    code = ErrorCode.INTERNAL


# The codec's own protocol errors keep their classes (they carry their codes); everything else is the core class
# the broker raised (adapters/native/errors.py).
PROTOCOL_ERRORS: dict[int, type[ProtocolError]] = {
    int(cls.code): cls for cls in (UnsupportedVersion, FrameTooLarge, MalformedFrame)}


def error_from_frame(frame: f.Error) -> TidegateError:
    """The TidegateError subclass matching the server's code, with the code in `.code` (plain TidegateError
    for codes without a class, INTERNAL for codes this SDK does not know)."""
    protocol_error = PROTOCOL_ERRORS.get(frame.code)
    if protocol_error is not None:
        return protocol_error(frame.message)
    return error_for_code(frame.code, frame.message)


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep:
        return address, DEFAULT_PORT
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise ValueError(f"bad broker address {address!r}: expected host:port") from None


@dataclass(slots=True, frozen=True)
class SendResult:
    """Where a sent message was stored. The broker answers only once the message is durable."""

    msg_id: str
    topic: str
    queue_id: int
    queue_offset: int


@dataclass(slots=True, frozen=True)
class TopicDescription:
    topic: f.TopicInfo
    queues: tuple[f.QueueRange, ...]


@dataclass(slots=True, frozen=True)
class GroupDescription:
    group: f.GroupSummary
    progress: tuple[f.ProgressRecord, ...]

    @property
    def lag(self) -> int:
        return sum(p.lag for p in self.progress)


STATUS_FROM_WIRE = {f.Status.FOUND: PullStatus.FOUND, f.Status.NO_NEW: PullStatus.NO_NEW,
                    f.Status.OFFSET_MOVED: PullStatus.OFFSET_MOVED}
MODES = {"clustering": f.Mode.CLUSTERING, "broadcasting": f.Mode.BROADCASTING}
ACKS = {"offset": f.Ack.OFFSET, "message": f.Ack.MESSAGE}


def delivered(record: f.DeliveryRecord) -> Delivered:
    return Delivered(message=record.message, queue=QueueRef(record.topic, record.queue_id),
                     queue_offset=record.queue_offset, receipt=record.receipt, attempt=record.attempt)


def pull_result(frame: f.PullOk) -> PullResult:
    return PullResult(status=STATUS_FROM_WIRE[frame.status], messages=[delivered(r) for r in frame.messages],
                      next_offset=frame.next_offset, min_offset=frame.min_offset, max_offset=frame.max_offset)


def send_result(frame: f.SendOk | f.SendReceipt) -> SendResult:
    return SendResult(msg_id=frame.msg_id, topic=frame.topic, queue_id=frame.queue_id,
                      queue_offset=frame.queue_offset)


def reset_target(to: str | int) -> tuple[f.ResetTo, int]:
    if to == "earliest":
        return f.ResetTo.EARLIEST, 0
    if to == "latest":
        return f.ResetTo.LATEST, 0
    if isinstance(to, int) and not isinstance(to, bool):
        return f.ResetTo.TIMESTAMP, to
    raise ValueError(f"reset target must be 'earliest', 'latest' or a timestamp in ms, not {to!r}")


def mode_of(mode: str) -> f.Mode:
    try:
        return MODES[mode]
    except KeyError:
        raise ValueError(f"mode must be one of {sorted(MODES)}, not {mode!r}") from None


def ack_of(ack: str) -> f.Ack:
    try:
        return ACKS[ack]
    except KeyError:
        raise ValueError(f"ack must be one of {sorted(ACKS)}, not {ack!r}") from None
