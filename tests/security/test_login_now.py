"""`login_now`: the gate's synchronous admission of logins it can decide on the spot (the reconnect-storm fast path
that skips the Deferred chain), recorded exactly like a successful `authenticate`; everything else is left to
`authenticate`, with nothing recorded."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from tidegate.core.security.gate import AllowAllGate, Credentials, Principal
from tidegate.core.security.policy_gate import LoginThrottle, PolicyGate
from tidegate.core.security.users import SecurityDirectory
from tidegate.core.storage.memory import MemoryMetadataStore


class RecordingAudit:
    def __init__(self) -> None:
        self.logins: list[dict] = []

    def login(self, **fields) -> None:
        self.logins.append(fields)


def make_gate(**kwargs) -> tuple[PolicyGate, RecordingAudit, Clock]:
    directory = SecurityDirectory(MemoryMetadataStore())
    directory.bootstrap("adminpw")
    directory.add_user("alice", b"s3cret")
    clock = Clock()
    audit = RecordingAudit()
    gate = PolicyGate(directory, clock, throttle=LoginThrottle(clock, base_delay_s=0.2), audit=audit, **kwargs)
    return gate, audit, clock


def test_an_anonymous_loopback_login_is_admitted_on_the_spot_and_audited_like_authenticate():
    gate, audit, _ = make_gate()
    principal = gate.login_now(Credentials("anonymous", client_id="dev1", source="127.0.0.1", listener="mqtt"))
    assert principal is not None and principal.anonymous and principal.client_id == "dev1"
    assert [(a["ok"], a["mechanism"], a["client_id"]) for a in audit.logins] == [(True, "anonymous", "dev1")]


def test_passwords_refusals_and_throttled_sources_are_left_to_authenticate_with_nothing_recorded():
    gate, audit, _ = make_gate()
    assert gate.login_now(Credentials("password", username="alice", password=b"s3cret", source="127.0.0.1")) is None
    assert gate.login_now(Credentials("anonymous", source="10.1.2.3")) is None  # anonymous from loopback only
    assert gate.login_now(Credentials("certificate", certificate_identity="nobody", source="127.0.0.1")) is None
    assert audit.logins == [] and len(gate.throttle) == 0
    gate.throttle.failed("127.0.0.1")  # a source with a failed login waits for its delay: no fast path
    assert gate.login_now(Credentials("anonymous", source="127.0.0.1")) is None


def test_a_certificate_naming_an_enabled_user_is_admitted_on_the_spot():
    gate, audit, _ = make_gate()
    principal = gate.login_now(Credentials("certificate", username="alice", certificate_identity="alice",
                                           source="10.0.0.9", listener="mqtts"))
    assert principal is not None and principal.name == "alice" and not principal.anonymous
    assert audit.logins[0]["mechanism"] == "certificate"


def test_authenticate_still_answers_every_login_the_same_way():
    gate, audit, _ = make_gate()
    out: list = []
    gate.authenticate(Credentials("anonymous", client_id="c", source="127.0.0.1")).addBoth(out.append)
    assert isinstance(out[0], Principal) and out[0].anonymous
    gate.authenticate(Credentials("anonymous", source="10.1.2.3")).addBoth(out.append)
    assert not isinstance(out[1], Principal)  # NotAuthenticated
    assert [a["ok"] for a in audit.logins] == [True, False]


def test_a_gate_subclass_with_its_own_authenticate_is_never_bypassed():
    class PendingGate(AllowAllGate):
        def authenticate(self, credentials):
            return Deferred()

    assert AllowAllGate().login_now(Credentials("anonymous")).anonymous
    assert PendingGate.login_now is None  # adapters then take the asynchronous path


def test_an_adapter_connection_admitted_on_the_spot_does_not_wait_for_a_deferred():
    from tidegate.adapters.mqtt.codec import Connack, Connect, MqttCodec
    from tidegate.adapters.mqtt.server import MqttServerFactory
    from tidegate.adapters.mqtt.settings import MqttSettings
    from tidegate.core.testing import make_broker

    class Peer:
        type, host, port = "TCP", "127.0.0.1", 40001

    gate, audit, clock = make_gate()
    calls: list[str] = []
    authenticate = gate.authenticate
    gate.authenticate = lambda credentials: calls.append("authenticate") or authenticate(credentials)  # type: ignore
    factory = MqttServerFactory(make_broker(clock), gate, clock, MqttSettings(sys_interval=0))
    transport = StringTransport(peerAddress=Peer())
    protocol = factory.buildProtocol(Peer())
    protocol.makeConnection(transport)
    codec = MqttCodec(server_side=False)
    protocol.dataReceived(codec.encode(Connect("dev1", protocol_level=4, clean_start=True)))
    packets = codec.receive_data(transport.value())
    assert isinstance(packets[0], Connack) and packets[0].reason_code == 0
    assert calls == [] and len(audit.logins) == 1
    factory.stop()
