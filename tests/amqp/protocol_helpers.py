"""A scripted AMQP client over StringTransport + MemoryReactorClock against AmqpServerFactory on an in-memory broker."""

from __future__ import annotations

from typing import Any

from pamqp import commands
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from tidegate.adapters.amqp.codec import PROTOCOL_HEADER, AmqpClientCodec, ContentEvent, MethodEvent
from tidegate.adapters.amqp.server import AmqpServerFactory, AmqpSettings
from tidegate.core.security.policy_gate import open_policy_gate
from tidegate.core.testing import make_broker


def plain(user: str = "guest", password: str = "guest") -> str:
    return f"\x00{user}\x00{password}"


class World:
    """One broker, one AMQP listener factory, any number of connections."""

    def __init__(self, gate: Any = None, **settings: Any) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(1_700_000_000)  # timestamps like a real clock's (0 reads as "not set")
        self.broker = make_broker(self.clock)
        # The broker's real gate by default: guest/guest from loopback, users and policies from the metadata.
        gate = gate if gate is not None else open_policy_gate(self.broker.meta, self.clock)
        self.factory = AmqpServerFactory(self.broker, gate, self.clock, AmqpSettings(**settings))

    def client(self, host: str = "127.0.0.1", *, handshake: bool = True, **handshake_options: Any) -> Client:
        client = Client(self, host)
        if handshake:
            client.handshake(**handshake_options)
        return client

    def turn(self) -> None:
        """Let the broker run its end-of-turn work (deliveries, confirms)."""
        self.clock.advance(0)


class Client:
    def __init__(self, world: World, host: str) -> None:
        self.world = world
        self.protocol = world.factory.buildProtocol(IPv4Address("TCP", host, 40000))
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", host, 40000))
        self.protocol.makeConnection(self.transport)
        self.codec = AmqpClientCodec()
        self.events: list[Any] = []

    # ------------------------------------------------------------------ sending
    def raw(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def send(self, channel: int, method: Any) -> None:
        self.raw(self.codec.send_method(channel, method))

    def publish(self, channel: int, exchange: str, key: str, body: bytes, properties: Any = None,
                mandatory: bool = False) -> None:
        self.raw(self.codec.send_content(channel, commands.Basic.Publish(exchange=exchange, routing_key=key,
                                                                         mandatory=mandatory),
                                         properties or commands.Basic.Properties(), body))
        self.world.turn()  # the broker makes it visible at the end of the reactor turn

    # ------------------------------------------------------------------ receiving
    def received(self) -> list[Any]:
        """Events the server sent since the last call."""
        self.world.turn()
        data = self.transport.value()
        self.transport.clear()
        if data:
            self.events.extend(self.codec.receive_data(data))
        events, self.events = self.events, []
        return events

    def methods(self) -> list[Any]:
        return [e.method for e in self.received() if isinstance(e, MethodEvent | ContentEvent)]

    def expect(self, *kinds: type) -> list[Any]:
        got = self.methods()
        assert [type(m) for m in got] == list(kinds), got
        return got

    def consume(self, channel: int, **arguments: Any) -> list[ContentEvent]:
        """basic.consume; returns the deliveries that followed ConsumeOk in the same turn."""
        self.send(channel, commands.Basic.Consume(**arguments))
        events = self.received()
        assert isinstance(events[0].method, commands.Basic.ConsumeOk), events
        return [e for e in events[1:] if isinstance(e, ContentEvent)]

    def call(self, channel: int, method: Any, reply: type) -> Any:
        self.send(channel, method)
        return self.expect(reply)[0]

    # ------------------------------------------------------------------ scripted steps
    def handshake(self, response: str | None = None, mechanism: str = "PLAIN", vhost: str = "/",
                  heartbeat: int = 0, capabilities: dict[str, bool] | None = None) -> None:
        self.raw(PROTOCOL_HEADER)
        self.expect(commands.Connection.Start)
        announced = {"consumer_cancel_notify": True, **(capabilities or {})}
        self.send(0, commands.Connection.StartOk(client_properties={"capabilities": announced},
                                                 mechanism=mechanism, response=response or plain()))
        tune = self.expect(commands.Connection.Tune)[0]
        self.send(0, commands.Connection.TuneOk(channel_max=tune.channel_max, frame_max=tune.frame_max,
                                                heartbeat=heartbeat))
        self.call(0, commands.Connection.Open(virtual_host=vhost), commands.Connection.OpenOk)

    def open_channel(self, number: int = 1) -> int:
        self.call(number, commands.Channel.Open(), commands.Channel.OpenOk)
        return number

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting or not self.protocol.connected_
