"""The shared adapter connection: one write per read, authentication that holds later frames, idle timer, pause."""

from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransport

from tidegate.adapters.base import AdapterConnection, AdapterFactory
from tidegate.core.errors import NotAuthenticated
from tidegate.core.security import AllowAllGate, Credentials, Principal
from tidegate.core.testing import make_broker


class SlowGate(AllowAllGate):
    """Answers authentication only when the test says so."""

    def __init__(self) -> None:
        self.pending: list[Deferred] = []

    def authenticate(self, credentials):
        d = Deferred()
        self.pending.append(d)
        return d


class LineConnection(AdapterConnection):
    """A toy protocol: lines; `LOGIN x` authenticates, anything else is echoed once logged in."""

    def __init__(self) -> None:
        super().__init__()
        self.buffer = b""
        self.seen: list[bytes] = []

    def bytes_received(self, data):
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        self.handle(lines)

    def handle(self, lines):
        for i, line in enumerate(lines):
            if self.authenticating:
                self.hold_frames(lines[i:])
                return
            if line.startswith(b"LOGIN "):
                self.authenticate(Credentials("password", username=line[6:].decode(), source=self.source))
                continue
            self.seen.append(line)
            self.write(b"echo " + line + b"\n")

    frames_resumed = handle

    def on_authenticated(self, principal):
        self.session = self.factory.open_session(principal, self.source)
        self.write(b"welcome " + principal.name.encode() + b"\n")

    def on_authentication_failed(self, failure):
        self.write(b"denied\n")
        self.close()


class LineFactory(AdapterFactory):
    protocol = LineConnection
    protocol_label = "line"


def connect(gate):
    clock = MemoryReactorClock()
    broker = make_broker(clock)
    factory = LineFactory(broker, gate, clock, None)
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport, clock, broker


def test_everything_one_read_causes_goes_out_in_one_write():
    proto, transport, _, broker = connect(AllowAllGate())
    writes = []
    transport.writeSequence = lambda chunks: writes.append(list(chunks))
    proto.dataReceived(b"a\nb\nc\n")
    assert writes == [[b"echo a\n", b"echo b\n", b"echo c\n"]]
    assert broker.metrics.connections["line"] == 1
    proto.connectionLost(None)
    assert broker.metrics.connections["line"] == 0


def test_frames_after_login_in_the_same_read_wait_for_the_decision_and_keep_their_order():
    gate = SlowGate()
    proto, transport, _, _ = connect(gate)
    proto.dataReceived(b"LOGIN alice\none\ntw")
    proto.dataReceived(b"o\nthree\n")
    assert proto.seen == [] and transport.value() == b""
    gate.pending[0].callback(Principal("alice"))
    assert proto.seen == [b"one", b"two", b"three"]
    assert transport.value() == b"welcome alice\necho one\necho two\necho three\n"
    assert proto.session.principal.name == "alice" and proto.session.listener == "line"


def test_a_failed_login_drops_the_held_frames_and_closes():
    gate = SlowGate()
    proto, transport, _, _ = connect(gate)
    proto.dataReceived(b"LOGIN mallory\npublish-this\n")
    gate.pending[0].errback(NotAuthenticated("bad password"))
    assert proto.seen == []
    assert transport.value() == b"denied\n"
    assert transport.disconnecting


def test_a_client_streaming_before_its_login_is_decided_is_cut_off_at_the_budget():
    gate = SlowGate()
    proto, transport, _, _ = connect(gate)
    proto.max_held_bytes = 1000
    proto.dataReceived(b"LOGIN x\n")
    proto.dataReceived(b"y" * 600)
    assert not transport.disconnecting
    proto.dataReceived(b"y" * 600)
    assert transport.disconnected or transport.disconnecting


def test_idle_timer_fires_once_nothing_arrives_for_the_limit():
    proto, transport, clock, _ = connect(AllowAllGate())
    proto.start_idle_timer(10)
    clock.advance(6)
    proto.dataReceived(b"ping\n")
    clock.advance(6)
    assert not transport.disconnecting  # the read at t=6 moved the deadline to t=16
    clock.advance(5)
    assert transport.disconnecting


def test_pause_and_resume_reach_the_adapter():
    proto, transport, _, _ = connect(AllowAllGate())
    assert transport.producer is proto and transport.streaming
    proto.pauseProducing()
    assert proto.paused
    proto.resumeProducing()
    assert not proto.paused


def test_a_client_that_stops_reading_is_closed_once_its_output_budget_is_used():
    proto, transport, _, _ = connect(AllowAllGate())
    proto.output_budget = 100
    proto.pauseProducing()  # the transport's send buffer is full
    proto.dataReceived(b"x" * 40 + b"\n")
    assert not transport.disconnecting
    proto.dataReceived(b"y" * 80 + b"\n")
    assert transport.disconnected or proto.closing


def test_resume_resets_the_output_budget():
    proto, transport, _, _ = connect(AllowAllGate())
    proto.output_budget = 100
    proto.pauseProducing()
    proto.dataReceived(b"x" * 80 + b"\n")
    proto.resumeProducing()
    proto.pauseProducing()
    proto.dataReceived(b"y" * 80 + b"\n")
    assert not transport.disconnecting and not proto.closing


def test_connection_limits_from_the_factory_apply_to_each_connection():
    from tidegate.adapters.base import ConnectionLimits

    clock = MemoryReactorClock()
    factory = LineFactory(make_broker(clock), AllowAllGate(), clock, None,
                          limits=ConnectionLimits(output_budget=5000, max_held_bytes=6000))
    proto = factory.buildProtocol(None)
    proto.makeConnection(StringTransport())
    assert (proto.output_budget, proto.max_held_bytes) == (5000, 6000)
