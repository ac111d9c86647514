"""A client that stops reading is closed once its output budget is used: v5 hears 0x97, 3.1.1 is just dropped."""

from tidegate.adapters.mqtt.codec import Disconnect, Pingreq, Will
from tidegate.adapters.mqtt.reason_codes import ReasonCode

from .test_protocol import publishes, subscribe


def test_a_v5_client_that_does_not_read_gets_quota_exceeded_and_is_dropped(env):
    client = env.client(level=5)
    client.connect("slow")
    client.protocol.output_budget = 10
    client.protocol.pauseProducing()  # its socket buffer is full
    client.send(*[Pingreq()] * 8)  # each PINGRESP is 2 bytes: the 6th one crosses the budget
    packets = client.received()
    assert isinstance(packets[-1], Disconnect) and packets[-1].reason_code == ReasonCode.QUOTA_EXCEEDED
    assert client.transport.disconnected or client.protocol.closing
    assert client.protocol.state == "closed"


def test_a_311_client_that_does_not_read_is_dropped_and_its_will_fires(env):
    watcher = env.client(4)
    watcher.connect("watcher")
    subscribe(watcher, env, "will/#")
    client = env.client(4)
    client.connect("slow", will=Will("will/slow", b"gone", 1))
    client.protocol.output_budget = 10
    client.protocol.pauseProducing()
    client.send(*[Pingreq()] * 8)
    assert client.protocol.state == "closed"
    env.pump()
    assert [p.payload for p in publishes(watcher.received())] == [b"gone"]
