"""The sans-IO connection state (adapters/mqtt/state.py): CONNECT negotiation, packet ids, Receive Maximum, aliases.

No Twisted, no broker: values in, values out.
"""

import ast
import subprocess
import sys

import pytest

from tidegate.adapters.mqtt.packets import MQTT_5, Connect, Will
from tidegate.adapters.mqtt.properties import Properties
from tidegate.adapters.mqtt.reason_codes import MqttProtocolError, ReasonCode
from tidegate.adapters.mqtt.settings import MqttSettings
from tidegate.adapters.mqtt.state import (
    UNLIMITED_PACKET_SIZE,
    InboundAliases,
    Inflight,
    Negotiated,
    OutboundAliases,
    PacketIds,
    ReceiveWindow,
    Refusal,
    negotiate,
)


def test_state_module_imports_neither_twisted_nor_the_core_beyond_what_the_codec_uses():
    """Sans-IO like the codec: no reactor, and of the core only the pure routing rules the codec shares."""
    code = ("import sys, tidegate.adapters.mqtt.state; "
            "print(sorted(m for m in sys.modules if m.startswith(('twisted', 'tidegate.core'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert set(ast.literal_eval(out)) <= {"tidegate.core", "tidegate.core.errors", "tidegate.core.routing"}


# ------------------------------------------------------------------------------------------ negotiate


def test_v311_connect_is_accepted_with_the_server_defaults():
    settings = MqttSettings()
    result = negotiate(Connect("c1", protocol_level=4, keep_alive=30), settings, None)
    assert isinstance(result, Negotiated)
    assert (result.client_id, result.assigned_client_id, result.keep_alive) == ("c1", None, 30)
    assert result.session_expiry == 0  # clean session
    assert result.client_receive_maximum == settings.receive_maximum
    assert result.client_maximum_packet_size == UNLIMITED_PACKET_SIZE
    assert result.client_topic_alias_maximum == 0
    connack = result.connack(settings, session_present=False)
    assert connack.reason_code == ReasonCode.SUCCESS and connack.properties == Properties()


def test_v311_persistent_session_gets_the_configured_expiry():
    settings = MqttSettings(persistent_session_expiry=600)
    result = negotiate(Connect("c1", protocol_level=4, clean_start=False), settings, None)
    assert isinstance(result, Negotiated) and result.session_expiry == 600


def test_v5_limits_are_capped_and_announced_in_connack():
    settings = MqttSettings(max_inflight=100, session_expiry_max=60, max_keep_alive=120)
    props = Properties(session_expiry_interval=0xFFFFFFFF, receive_maximum=500, maximum_packet_size=2048,
                       topic_alias_maximum=5)
    result = negotiate(Connect("c5", protocol_level=MQTT_5, keep_alive=0, properties=props), settings, None)
    assert isinstance(result, Negotiated)
    assert result.client_receive_maximum == 100
    assert result.client_maximum_packet_size == 2048
    assert result.client_topic_alias_maximum == 5
    assert (result.requested_expiry, result.session_expiry) == (0xFFFFFFFF, 60)
    assert (result.keep_alive, result.server_keep_alive) == (120, 120)  # 0 = "none" is replaced by the maximum
    connack = result.connack(settings, session_present=True)
    assert connack.session_present
    assert connack.properties.session_expiry_interval == 60
    assert connack.properties.server_keep_alive == 120
    assert connack.properties.receive_maximum == settings.receive_maximum


def test_empty_client_id_gets_the_assigned_one_only_with_clean_start():
    settings = MqttSettings()
    accepted = negotiate(Connect("", protocol_level=MQTT_5), settings, "tidegate-abc")
    assert isinstance(accepted, Negotiated)
    assert (accepted.client_id, accepted.assigned_client_id) == ("tidegate-abc", "tidegate-abc")
    assert accepted.connack(settings, False).properties.assigned_client_identifier == "tidegate-abc"
    refused = negotiate(Connect("", protocol_level=4, clean_start=False), settings, "tidegate-abc")
    assert isinstance(refused, Refusal) and refused.reason == ReasonCode.CLIENT_IDENTIFIER_NOT_VALID
    refused31 = negotiate(Connect("", protocol_level=3), settings, "tidegate-abc")
    assert isinstance(refused31, Refusal)
    not_allowed = negotiate(Connect("", protocol_level=4), MqttSettings(allow_empty_client_id=False), "x")
    assert isinstance(not_allowed, Refusal)


@pytest.mark.parametrize(("settings", "connect", "reason"), [
    (MqttSettings(maximum_qos=1), Connect("w", protocol_level=MQTT_5, will=Will("t", b"x", qos=2)),
     ReasonCode.QOS_NOT_SUPPORTED),
    (MqttSettings(retain_available=False), Connect("w", protocol_level=MQTT_5, will=Will("t", b"x", retain=True)),
     ReasonCode.RETAIN_NOT_SUPPORTED),
    (MqttSettings(), Connect("a", protocol_level=MQTT_5, properties=Properties(authentication_method="SCRAM")),
     ReasonCode.BAD_AUTHENTICATION_METHOD),
])
def test_connect_refusals_carry_their_reason(settings, connect, reason):
    result = negotiate(connect, settings, None)
    assert isinstance(result, Refusal)
    assert (result.reason, result.level) == (reason, MQTT_5)


def test_problem_information_request_is_kept_for_refusals_and_acceptance():
    props = Properties(request_problem_information=False, authentication_method="X")
    assert negotiate(Connect("a", protocol_level=MQTT_5, properties=props), MqttSettings(), None) \
        .problem_information is False


def test_will_delay_comes_from_the_will_properties():
    will = Will("t", b"bye", properties=Properties(will_delay_interval=30))
    result = negotiate(Connect("w", protocol_level=MQTT_5, will=will), MqttSettings(), None)
    assert isinstance(result, Negotiated) and (result.will, result.will_delay) == (will, 30)


# ------------------------------------------------------------------------------------------ packet ids


def test_allocation_skips_ids_in_flight_released_or_remembered_as_sent():
    ids = PacketIds(released={2: "q"})
    first = ids.allocate()
    ids.sent_out(first, Inflight("q", "r1", 1, ("q", 0)))
    second = ids.allocate()
    assert (first, second) == (1, 3)
    assert ids.id_sent_for(("q", 0)) == 1
    assert ids.in_flight_count() == 2  # one in flight + one released


def test_allocation_wraps_and_fails_when_every_id_is_taken():
    ids = PacketIds()
    for packet_id in range(1, 65536):
        ids.sent_out(packet_id, Inflight(None, "", 1, None))
    with pytest.raises(MqttProtocolError):
        ids.allocate()
    ids.acknowledged(40000, 1)
    assert ids.allocate() == 40000


def test_acknowledgement_must_match_the_qos_in_flight():
    ids = PacketIds()
    ids.sent_out(7, Inflight("q", "r", 2, ("q", 5)))
    assert ids.acknowledged(7, 1) is None  # a PUBACK for a QoS 2 message is ignored
    item = ids.acknowledged(7, 2)
    assert item is not None and item.receipt == "r"
    assert ids.id_sent_for(("q", 5)) is None and 7 not in ids.sent_ids
    ids.release(7, "q")
    assert ids.completed(7) == "q"
    assert ids.completed(7) is None


def test_inbound_qos2_ids_are_known_until_released():
    ids = PacketIds()
    ids.qos2_stored(3)
    assert ids.qos2_received(3)
    assert ids.qos2_released(3)
    assert not ids.qos2_received(3)
    assert not ids.qos2_released(3)


def test_connection_end_forgets_in_flight_but_keeps_sent_ids_for_resends():
    ids = PacketIds()
    ids.sent_out(1, Inflight("q", "r", 1, ("q", 9)))
    ids.connection_ended()
    assert ids.inflight == {}
    assert ids.id_sent_for(("q", 9)) == 1  # the redelivery goes out with the same id


# ------------------------------------------------------------------------------------------ Receive Maximum


def test_receive_window_is_enforced_for_v5_only():
    v5 = ReceiveWindow(2, enforced=True)
    v5.admit(1)
    v5.admit(2)
    assert v5.full_for(3) and not v5.full_for(2)
    with pytest.raises(MqttProtocolError) as raised:
        v5.admit(3)
    assert raised.value.reason_code == ReasonCode.RECEIVE_MAXIMUM_EXCEEDED
    v311 = ReceiveWindow(1, enforced=False)
    v311.admit(1)
    v311.admit(2)
    assert not v311.full_for(3)
    v311.done(1)
    assert v311.open == {2}


# ------------------------------------------------------------------------------------------ aliases


def test_inbound_alias_is_set_then_resolved():
    aliases = InboundAliases(maximum=2)
    assert aliases.resolve("a/b", 1) == "a/b"
    assert aliases.resolve("", 1) == "a/b"
    assert aliases.resolve("plain", None) == "plain"
    with pytest.raises(MqttProtocolError):
        aliases.resolve("", 2)  # never set
    with pytest.raises(MqttProtocolError) as raised:
        aliases.resolve("x", 3)
    assert raised.value.reason_code == ReasonCode.TOPIC_ALIAS_INVALID


def test_outbound_aliases_are_chosen_up_to_the_client_maximum_and_recorded_on_confirm():
    aliases = OutboundAliases(maximum=1)
    assert aliases.choose("t/1") == (1, True)
    assert aliases.choose("t/1") == (1, True)  # not confirmed (the packet was too big): still new
    aliases.confirm("t/1", 1)
    assert aliases.choose("t/1") == (1, False)
    assert aliases.choose("t/2") == (None, False)
