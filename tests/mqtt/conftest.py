"""Helpers for MQTT adapter tests: a broker on a MemoryReactorClock and in-memory clients over StringTransport."""

from __future__ import annotations

import pytest
from twisted.internet.testing import MemoryReactorClock, StringTransport

from tidegate.adapters.mqtt.codec import Connect, MqttCodec
from tidegate.adapters.mqtt.server import MqttServerFactory
from tidegate.adapters.mqtt.settings import MqttSettings
from tidegate.core.security import AllowAllGate
from tidegate.core.testing import make_broker

T0 = 1_700_000_000.0


class FakeClient:
    """One MQTT connection driven by hand: packets in through the client-side codec, packets out decoded."""

    def __init__(self, factory: MqttServerFactory, level: int = 4, port: int = 40000) -> None:
        self.factory = factory
        self.level = level
        self.protocol = factory.buildProtocol(("127.0.0.1", port))
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.codec = MqttCodec(server_side=False)
        self.codec.protocol_level = level

    def send(self, *packets) -> None:
        self.protocol.dataReceived(b"".join(self.codec.encode(p) for p in packets))

    def send_raw(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def received(self) -> list:
        data = self.transport.value()
        self.transport.clear()
        return self.codec.receive_data(data) if data else []

    def connect(self, client_id: str = "c1", clean: bool = True, **kwargs):
        self.send(Connect(client_id, protocol_level=self.level, clean_start=clean, **kwargs))
        packets = self.received()
        assert packets, "no CONNACK"
        self.after_connack = packets[1:]
        return packets[0]

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting

    def drop(self) -> None:
        """The network connection goes away without DISCONNECT."""
        from twisted.internet.error import ConnectionLost
        from twisted.python.failure import Failure

        self.protocol.connectionLost(Failure(ConnectionLost()))


class Env:
    def __init__(self, settings: MqttSettings | None = None, gate=None) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(T0)
        self.broker = make_broker(self.clock)
        self.settings = settings or MqttSettings(sys_interval=0)
        self.gate = gate or AllowAllGate()
        self.factory = MqttServerFactory(self.broker, self.gate, self.clock, self.settings)
        self._port = 40000

    def client(self, level: int = 4) -> FakeClient:
        self._port += 1
        return FakeClient(self.factory, level, self._port)

    def pump(self, turns: int = 5) -> None:
        """Let the broker make messages durable and visible, and deliver them (each step is one reactor turn)."""
        for _ in range(turns):
            self.clock.advance(0)

    def restart(self, settings: MqttSettings | None = None) -> Env:
        """A new broker and adapter over the same stores, as after a crash (nothing is closed cleanly)."""
        self.broker.flush_offsets()
        new = Env.__new__(Env)
        new.clock = MemoryReactorClock()
        new.clock.advance(self.clock.seconds())
        new.broker = make_broker(new.clock, store=self.broker.store, metadata=self.broker.meta)
        new.settings = settings or self.settings
        new.gate = self.gate
        new.factory = MqttServerFactory(new.broker, new.gate, new.clock, new.settings)
        new._port = self._port
        return new


@pytest.fixture
def env() -> Env:
    return Env()


@pytest.fixture
def make_env():
    """Build an Env with particular settings."""
    return Env
