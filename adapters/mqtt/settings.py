"""Settings of the MQTT adapter, with the defaults the gateway uses when the config file says nothing.

The one field list: the gateway's `[listeners.mqtt]` section has a key per field (`x`, or `x_s` for a duration in
seconds) and builds these with `MqttSettings.from_config`; a gateway test checks that every field is configurable.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

ONE_MIB = 1024 * 1024
CLIENT_ID_BINDINGS = ("user", "none")


@dataclass(slots=True)
class MqttSettings:
    # Receive Maximum the server announces (v5) and the credit a 3.1.1 client gets: QoS 1/2 messages in flight
    # towards one client, and QoS 1/2 publishes the server accepts from it before acknowledging.
    receive_maximum: int = 32
    # Largest packet accepted from a client, fixed header included (announced as Maximum Packet Size in v5).
    # 1 MiB keeps one connection's worst-case buffer small; raise it for large payloads (the core limit is 4 MiB).
    max_packet_size: int = ONE_MIB
    # Topic aliases a v5 client may use towards the server (Topic Alias Maximum in CONNACK); 0 disables them.
    topic_alias_maximum: int = 16
    # Keep alive imposed on v5 clients through Server Keep Alive; None accepts the client's value (capped below).
    server_keep_alive: int | None = None
    # Upper bound on a v5 client's keep alive; a larger (or zero) request is replaced by this via Server Keep Alive.
    # 3.1.1 has no way to tell the client, so its own keep alive is enforced as given.
    max_keep_alive: int = 3600
    maximum_qos: int = 2  # highest QoS granted to subscriptions and accepted in PUBLISH (v5 Maximum QoS)
    retain_available: bool = True
    wildcard_subscription_available: bool = True
    shared_subscription_available: bool = True
    subscription_identifiers_available: bool = True
    # Cap on a v5 Session Expiry Interval (seconds); 0xFFFFFFFF in CONNECT means "never" and is capped to this too.
    session_expiry_max: int = 7 * 24 * 3600
    # Expiry of a 3.1.1 session with CleanSession=0 (the protocol itself says "forever").
    persistent_session_expiry: int = 7 * 24 * 3600
    # Cap on a v5 client's own Receive Maximum (it may announce up to 65535): QoS 1/2 messages in flight towards
    # one client, and so the core credit of each of its subscriptions; everything beyond waits on disk.
    max_inflight: int = 1024
    # Clean (non-persistent) sessions: once this many messages wait in the session queue, QoS 0 messages are
    # dropped instead of delivered (QoS 1/2 stay queued on disk). 0 = never drop.
    max_queued_messages: int = 10_000
    allow_empty_client_id: bool = True  # assign an id to an empty client id with clean start (3.1.1 and v5)
    connect_timeout: float = 10.0  # seconds a new connection has to send CONNECT
    sys_interval: float = 10.0  # seconds between $SYS/broker/... updates; 0 disables them
    # Deliveries of one message to a session before the core dead-letters it (MQTT itself never gives up).
    max_delivery_attempts: int = 1_000_000
    # Filters one SUBSCRIBE may carry; the ones beyond are refused (v5 SUBACK 0x97 Quota exceeded, 3.1.1 0x80).
    max_filters_per_subscribe: int = 256
    # Subscriptions one session may hold; a new filter beyond is refused the same way (changing one is fine).
    max_subscriptions_per_session: int = 1024
    # Payload bytes of retained messages that may wait for one connection (its socket is paused, or its QoS 1/2
    # window is full) after SUBSCRIBEs; retained messages beyond are not sent (logged, rate-limited).
    max_queued_retained_bytes: int = 8 * ONE_MIB
    # Cap on a v5 client's own Topic Alias Maximum (it may announce 65535): topic names remembered per connection.
    max_outbound_topic_aliases: int = 256
    # Who may use a client id whose session exists: "user" binds it to the user that created the session (another
    # user's CONNECT is refused with CONNACK 0x87 / return code 5, the session untouched); "none" lets anyone
    # take any session over (MQTT's own rule). Anonymous clients all act as the user `anonymous`, so they can take
    # each other's sessions over either way.
    client_id_binding: str = "user"
    # Sessions (live and persisted) one user may own; a new one beyond is refused (CONNACK 0x97 Quota exceeded,
    # 3.1.1 return code 3 Server unavailable). 0 = no limit. Anonymous clients share one count.
    max_sessions_per_user: int = 100_000
    # Origins (`scheme://host[:port]`, or `*`) whose web pages may open MQTT over WebSocket in a browser. A request
    # without Origin (not a browser) and a same-origin request (Origin host:port = Host) are always accepted; any
    # other Origin is refused with HTTP 403. The config file gives them comma-separated.
    ws_allowed_origins: tuple[str, ...] = ()
    # (Topic auto-creation per user is a core limit now: `[limits] max_topics_created_per_user`, which the gateway
    # feeds `[listeners.mqtt] max_topics_created_per_user` as the MQTT listener's value; core/security/limits.py.)

    @classmethod
    def from_config(cls, section: Any) -> MqttSettings:
        """Settings from a config section with one attribute per field: `name`, or `name_s` for durations in
        seconds; a `server_keep_alive` of 0 means "accept the client's" (None). Fields the section lacks keep
        their defaults."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            for key in (f.name, f.name + "_s"):
                if hasattr(section, key):
                    values[f.name] = getattr(section, key)
                    break
        if values.get("server_keep_alive") == 0:
            values["server_keep_alive"] = None
        for seconds in ("connect_timeout", "sys_interval"):
            if seconds in values:
                values[seconds] = float(values[seconds])
        return cls(**values)

    def __post_init__(self) -> None:
        if not 1 <= self.receive_maximum <= 65535:
            raise ValueError("receive_maximum must be 1..65535")
        if self.max_packet_size < 64:
            raise ValueError("max_packet_size must be at least 64 bytes")
        if not 0 <= self.topic_alias_maximum <= 65535:
            raise ValueError("topic_alias_maximum must be 0..65535")
        if self.maximum_qos not in (0, 1, 2):
            raise ValueError("maximum_qos must be 0, 1 or 2")
        if self.max_inflight < self.receive_maximum:
            raise ValueError("max_inflight must be at least receive_maximum")
        if self.max_filters_per_subscribe < 1 or self.max_subscriptions_per_session < 1:
            raise ValueError("max_filters_per_subscribe and max_subscriptions_per_session must be at least 1")
        if self.max_queued_retained_bytes < 0:
            raise ValueError("max_queued_retained_bytes must not be negative")
        if not 0 <= self.max_outbound_topic_aliases <= 65535:
            raise ValueError("max_outbound_topic_aliases must be 0..65535")
        if self.client_id_binding not in CLIENT_ID_BINDINGS:
            raise ValueError(f"client_id_binding must be one of {', '.join(CLIENT_ID_BINDINGS)}")
        if self.max_sessions_per_user < 0:
            raise ValueError("max_sessions_per_user must not be negative (0 = no limit)")
        origins = self.ws_allowed_origins
        if isinstance(origins, str):
            origins = origins.split(",")
        self.ws_allowed_origins = tuple(o.strip().rstrip("/").lower() for o in origins if o.strip())
