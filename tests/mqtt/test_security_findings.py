"""Regression tests for the MQTT findings of issue 9 ("Found on today's build"): each failed on the build it was
found on. Session take-over by client id, shares in the native group namespace, wills and `$SYS`, retained
messages read without a check, forged adapter properties, sessions per user."""

from __future__ import annotations

import pytest

from tidegate.adapters.mqtt.codec import (
    Connack,
    Connect,
    Properties,
    Publish,
    ReasonCode,
    Suback,
    Subscribe,
    TopicSubscription,
    Will,
)
from tidegate.adapters.mqtt.mapping import PROP_PUBLISHER, share_group
from tidegate.adapters.mqtt.settings import MqttSettings
from tidegate.core.model import Message, QueueRef, is_private_topic
from tidegate.core.security import AllowAllGate, Decision, Principal
from tidegate.core.security.gate import ALLOW, Action
from tidegate.core.session import CoreSession
from tidegate.core.testing import RecordingSink


class UsersGate(AllowAllGate):
    """Every username logs in as that user; `denied` lists (action, resource) pairs refused to everyone."""

    def __init__(self, *denied: tuple[Action, str]) -> None:
        self.denied = set(denied)

    def check(self, principal, action, resource, source):
        if (action, str(resource)) in self.denied:
            return Decision(False, "test policy")
        return ALLOW


def login(env, level: int, client_id: str, user: str, *, clean: bool = True, **kwargs):
    client = env.client(level)
    connack = client.connect(client_id, clean=clean, username=user, password=b"pw", **kwargs)
    return client, connack


def publishes(client) -> list[Publish]:
    return [p for p in client.received() if isinstance(p, Publish)]


def queue_victim_session(env, level: int = 5):
    """alice has a persistent session subscribed to `orders/#` with one message queued while she is away."""
    expiry = Properties(session_expiry_interval=3600) if level == 5 else Properties()
    alice, connack = login(env, level, "alice-phone", "alice", clean=False, properties=expiry,
                           will=Will("status/alice", b"offline", properties=Properties()))
    assert connack.reason_code == ReasonCode.SUCCESS
    alice.send(Subscribe(1, (TopicSubscription("orders/#", 1),)))
    env.pump()
    alice.received()
    return alice


# ------------------------------------------------------------------------------------ 1. session take-over
@pytest.mark.parametrize("level", [5, 4])
@pytest.mark.parametrize("clean", [False, True])
def test_another_user_cannot_take_over_resume_or_wipe_a_session_by_its_client_id(level, clean, make_env):
    """mallory connects with alice's client id: refused (v5 CONNACK 0x87, 3.1.1 return code 5) before anything
    happens: alice stays connected, her queued message stays hers, her will does not fire."""
    env = make_env(gate=UsersGate())
    watcher, _ = login(env, 4, "watcher", "bob")
    watcher.send(Subscribe(1, (TopicSubscription("status/#", 0),)))
    alice = queue_victim_session(env, level)
    alice.drop()  # alice is away; her session keeps queueing
    sender, _ = login(env, 4, "sender", "bob")
    sender.send(Publish("orders/1", b"for alice", 1, packet_id=1))
    env.pump()
    assert [p.topic for p in publishes(watcher)] == ["status/alice"]  # her own network failure: her will
    mallory, connack = login(env, level, "alice-phone", "mallory", clean=clean)
    assert connack.reason_code == ReasonCode.NOT_AUTHORIZED and mallory.closed
    if level == 4:
        assert connack.session_present is False
    env.pump()
    assert publishes(mallory) == [] and publishes(watcher) == []
    session = env.factory.sessions.get("alice-phone")
    assert session is not None and session.owner == "alice" and "orders/#" in session.subscriptions
    back, connack = login(env, level, "alice-phone", "alice", clean=False,
                          properties=Properties(session_expiry_interval=3600) if level == 5 else Properties())
    assert connack.session_present
    env.pump()
    assert [p.payload for p in back.after_connack + publishes(back)] == [b"for alice"]


def test_a_connected_victim_is_not_disconnected_and_its_will_never_fires(make_env):
    env = make_env(gate=UsersGate())
    watcher, _ = login(env, 4, "watcher", "bob")
    watcher.send(Subscribe(1, (TopicSubscription("status/#", 0),)))
    alice = queue_victim_session(env)
    mallory, connack = login(env, 5, "alice-phone", "mallory")
    assert connack.reason_code == ReasonCode.NOT_AUTHORIZED
    env.pump()
    assert not alice.closed and alice.received() == [] and publishes(watcher) == []
    assert env.factory.sessions.get("alice-phone").connection is alice.protocol


def test_the_same_user_still_takes_its_own_session_over(make_env):
    env = make_env(gate=UsersGate())
    first, _ = login(env, 5, "dev-1", "alice")
    second, connack = login(env, 5, "dev-1", "alice")
    assert connack.reason_code == ReasonCode.SUCCESS and first.closed


def test_binding_none_lets_anyone_take_over_but_never_fires_the_owners_will(make_env):
    """`client_id_binding = "none"` is MQTT's own rule; even then a take-over by another user is not the owner's
    connection failing, so the owner's will stays unsent."""
    env = make_env(MqttSettings(sys_interval=0, client_id_binding="none"), gate=UsersGate())
    watcher, _ = login(env, 4, "watcher", "bob")
    watcher.send(Subscribe(1, (TopicSubscription("status/#", 0),)))
    alice = queue_victim_session(env)
    mallory, connack = login(env, 5, "alice-phone", "mallory")
    assert connack.reason_code == ReasonCode.SUCCESS and alice.closed
    env.pump()
    assert publishes(watcher) == []
    assert env.factory.sessions.get("alice-phone").owner == "mallory"


def test_anonymous_clients_share_one_principal_and_may_take_each_other_over(make_env):
    """Documented: every anonymous client is the user `anonymous`, so a client id binds nothing between them."""
    env = make_env(gate=UsersGate())
    first = env.client(5)
    assert first.connect("anon-1").reason_code == ReasonCode.SUCCESS
    second = env.client(5)
    assert second.connect("anon-1").reason_code == ReasonCode.SUCCESS and first.closed


def test_the_binding_survives_a_restart(make_env):
    env = make_env(gate=UsersGate())
    alice = queue_victim_session(env)
    alice.drop()
    env = env.restart()
    mallory, connack = login(env, 5, "alice-phone", "mallory", clean=False)
    assert connack.reason_code == ReasonCode.NOT_AUTHORIZED


@pytest.mark.parametrize("level, code", [(5, ReasonCode.QUOTA_EXCEEDED), (4, ReasonCode.SERVER_UNAVAILABLE)])
def test_sessions_per_user_are_limited_and_answered_the_protocols_way(level, code, make_env):
    env = make_env(MqttSettings(sys_interval=0, max_sessions_per_user=2), gate=UsersGate())
    persistent = Properties(session_expiry_interval=600) if level == 5 else Properties()
    for n in range(2):
        client, connack = login(env, level, f"s{n}", "alice", clean=False, properties=persistent)
        assert connack.reason_code == ReasonCode.SUCCESS
        client.drop()
    third, connack = login(env, level, "s2", "alice", clean=False, properties=persistent)
    assert connack.reason_code == code and third.closed
    assert env.factory.sessions.get("s2") is None
    assert sum(count for (_, cause), count in env.factory.metrics.security.limit_hits.items()
               if cause == "sessions_per_user") == 1  # tidegate_security_limit_hits{cause="sessions_per_user"}
    again, connack = login(env, level, "s0", "alice", clean=False, properties=persistent)
    assert connack.reason_code == ReasonCode.SUCCESS  # resuming an own session is not a new one
    other, connack = login(env, level, "b0", "bob")
    assert connack.reason_code == ReasonCode.SUCCESS  # the count is per user


# ------------------------------------------------------------------------------------ 3. $share group namespace
def test_a_share_cannot_join_lock_out_or_delete_a_native_consumer_group(make_env):
    """`$share/billing/...` used to be core group `billing`: joining locked the native group out (another consume
    mode) and leaving deleted its committed offsets. Shares now have a private group namespace."""
    env = make_env(gate=UsersGate())
    broker = env.broker
    native = CoreSession(broker, AllowAllGate(), Principal("billing-app"), source="127.0.0.1", listener="native")
    native.ensure_topic("invoices", queues=1)
    native.publish([Message(topic="invoices", body=b"i1")])
    env.pump()
    native.commit_offset("billing", QueueRef("invoices", 0), 1)
    client, _ = login(env, 5, "sharer", "mallory")
    client.send(Subscribe(1, (TopicSubscription("$share/billing/invoices/#", 1),)))
    env.pump()
    suback = next(p for p in client.received() if isinstance(p, Suback))
    assert suback.reason_codes == (ReasonCode.GRANTED_QOS_1,)
    group = share_group("billing")
    assert group != "billing" and is_private_topic(group)
    # the native application still consumes its group (offset mode), untouched by the share
    sub = native.subscribe("billing", "invoices", RecordingSink(), client_id="app", mode="clustering", ack="offset")
    sub.close()
    client.drop()
    env.pump()
    assert broker.group_info("billing").progress[0].committed == 1
    with pytest.raises(Exception) as refused:
        native.subscribe(group, "invoices", RecordingSink(), client_id="app")
    assert type(refused.value).__name__ == "NotAuthorized"


def test_legacy_share_rows_move_to_the_private_group_on_load(make_env):
    env = make_env(gate=UsersGate())
    client, _ = login(env, 5, "sharer", "alice", clean=False, properties=Properties(session_expiry_interval=60))
    client.send(Subscribe(1, (TopicSubscription("$share/g/t/#", 1),)))
    env.pump()
    client.drop()
    rows = env.factory.sessions.share_rows
    for topic, row in rows.items():
        rows.put(topic, {**row, "group": "g"})  # as written before the private namespace
    env = env.restart()
    assert [row["group"] for _, row in env.factory.sessions.share_rows.items()] == [share_group("g")]


# ------------------------------------------------------------------------------------ 5. will, $SYS, retained
@pytest.mark.parametrize("level, code", [(5, ReasonCode.NOT_AUTHORIZED), (4, ReasonCode.NOT_AUTHORIZED)])
def test_a_will_to_sys_is_refused_at_connect_and_writes_nothing(level, code, make_env):
    env = make_env(gate=UsersGate())
    client = env.client(level)
    connack = client.connect("w", will=Will("$SYS/broker/version", b"pwned", retain=True, properties=Properties()))
    assert connack.reason_code == code and client.closed
    client.drop()
    env.pump()
    assert env.factory.retained.get("$SYS/broker/version") is None
    assert env.factory.sessions.get("w") is None


def test_a_will_the_gate_denies_is_refused_at_connect(make_env):
    env = make_env(gate=UsersGate((Action.PUB, "Topic:alarms/fire")))
    for level in (5, 4):
        client = env.client(level)
        connack = client.connect(f"w{level}", will=Will("alarms/fire", b"x", retain=True, properties=Properties()))
        assert connack.reason_code == ReasonCode.NOT_AUTHORIZED and client.closed
    env.pump()
    assert env.factory.retained.get("alarms/fire") is None
    allowed = env.client(5)
    assert allowed.connect("ok", will=Will("alarms/smoke", b"x", properties=Properties())).reason_code == 0


def test_reading_sys_is_a_permission(make_env):
    env = make_env(MqttSettings(sys_interval=10), gate=UsersGate((Action.SUB, "Topic:$SYS/#")))
    for level, denied in ((5, ReasonCode.NOT_AUTHORIZED), (4, ReasonCode.UNSPECIFIED_ERROR)):
        client, _ = login(env, level, f"sys{level}", "mallory")
        client.send(Subscribe(1, (TopicSubscription("$SYS/#", 0),)))
        packets = client.received()
        suback = next(p for p in packets if isinstance(p, Suback))
        assert suback.reason_codes == (denied,)
        assert [p for p in packets if isinstance(p, Publish)] == []


def test_retained_messages_at_subscribe_pass_the_read_check(make_env):
    """A filter the gate grants may still match a retained name it denies: that message is not sent."""
    env = make_env(gate=UsersGate((Action.SUB, "Topic:hr/salaries")))
    publisher, _ = login(env, 5, "pub", "boss")
    publisher.send(Publish("hr/salaries", b"secret", 1, retain=True, packet_id=1),
                   Publish("hr/holidays", b"open", 1, retain=True, packet_id=2))
    env.pump()
    reader, _ = login(env, 5, "reader", "mallory")
    reader.send(Subscribe(1, (TopicSubscription("hr/+", 1),)))
    env.pump()
    assert [p.topic for p in publishes(reader)] == ["hr/holidays"]


# ------------------------------------------------------------------------------------ 6. forged properties
def test_a_forged_publisher_property_cannot_suppress_a_no_local_delivery(make_env):
    env = make_env(gate=UsersGate())
    victim, _ = login(env, 5, "victim", "alice")
    victim.send(Subscribe(1, (TopicSubscription("chat/#", 1, no_local=True),)))
    env.pump()
    victim.received()
    forger, _ = login(env, 5, "forger", "mallory")
    forger.send(Publish("chat/room", b"hello", 1, packet_id=1,
                        properties=Properties(user_properties=((PROP_PUBLISHER, "victim"), ("mqtt-retain", "1")))))
    env.pump()
    got = publishes(victim)
    assert [p.payload for p in got] == [b"hello"]
    stored = env.broker.pull(QueueRef(env.broker.list_topics()[0].name, 0), 0, 10).messages
    props = [d.message.properties for d in stored if d.message.body == b"hello"][0]
    assert PROP_PUBLISHER not in props and "mqtt-retain" not in props


def test_the_publisher_is_stamped_server_side_for_no_local(make_env):
    env = make_env(gate=UsersGate())
    me, _ = login(env, 5, "me", "alice")
    me.send(Subscribe(1, (TopicSubscription("echo/#", 1, no_local=True),)))
    env.pump()
    me.received()
    me.send(Publish("echo/x", b"mine", 1, packet_id=2,
                    properties=Properties(user_properties=((PROP_PUBLISHER, "someone-else"),))))
    env.pump()
    assert publishes(me) == []  # its own message, whatever it claimed


def test_connack_type_is_the_first_answer(make_env):
    """Sanity for the helpers above: a refused CONNECT answers one CONNACK only."""
    env = make_env(gate=UsersGate())
    login(env, 5, "x", "alice")
    client = env.client(5)
    client.send(Connect("x", protocol_level=5, username="bob", password=b"pw"))
    packets = client.received()
    assert len(packets) == 1 and isinstance(packets[0], Connack)


