"""A paho MQTT client for end-to-end security tests: CONNECT answers, PUBACKs and SUBACKs waited for (bounded)."""

from __future__ import annotations

import threading

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from tidegate.gateway.testing import wait_until

TIMEOUT = 10.0


class Mqtt:
    """`connect` returns the CONNACK reason, `publish` the PUBACK reason (or "disconnected" when the broker closed
    the connection instead, as MQTT 3.1.1 refusals do), `subscribe` the SUBACK reason codes."""

    def __init__(self, protocol: int, client_id: str) -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
        self.connack = threading.Event()
        self.reason: object = None
        self.disconnected = threading.Event()
        self.acks: dict[int, object] = {}
        self.subacks: dict[int, list] = {}
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda c, u, flags, rc, props: self.disconnected.set()
        self.client.on_publish = lambda c, u, mid, rc, props: self.acks.__setitem__(mid, rc)
        self.client.on_subscribe = lambda c, u, mid, rcs, props: self.subacks.__setitem__(mid, rcs)

    def _on_connect(self, client, userdata, flags, reason, props) -> None:
        self.reason = reason
        self.connack.set()

    def connect(self, port: int, user: str | None = None, password: str | None = None) -> object:
        if user is not None:
            self.client.username_pw_set(user, password)
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        assert self.connack.wait(TIMEOUT), "no CONNACK"
        return self.reason

    def publish(self, topic: str, payload: bytes = b"x") -> object:
        info = self.client.publish(topic, payload, qos=1)
        wait_until(lambda: info.mid in self.acks or self.disconnected.is_set(), TIMEOUT, f"PUBACK for {topic}")
        return self.acks.get(info.mid, "disconnected")

    def subscribe(self, topic_filter: str) -> list:
        _, mid = self.client.subscribe(topic_filter, qos=1)
        wait_until(lambda: mid in self.subacks, TIMEOUT, f"SUBACK for {topic_filter}")
        return self.subacks[mid]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
