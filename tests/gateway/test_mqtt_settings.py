"""`[listeners.mqtt]` and the MQTT adapter's settings are one field list: every setting is configurable."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from tidegate.adapters.mqtt.settings import MqttSettings
from tidegate.gateway.config import MqttListener, load_config, parse_set_option


def test_every_mqtt_setting_has_a_config_key_with_the_same_default() -> None:
    keys = {f.name for f in fields(MqttListener)}
    missing = [f.name for f in fields(MqttSettings) if f.name not in keys and f.name + "_s" not in keys]
    assert missing == []
    assert MqttSettings.from_config(MqttListener()) == MqttSettings()


def test_connect_timeout_subscription_identifiers_and_delivery_attempts_are_configurable(tmp_path: Path) -> None:
    config_file = tmp_path / "tidegate.toml"
    config_file.write_text("[listeners.mqtt]\nconnect_timeout_s = 3\nsubscription_identifiers_available = false\n",
                           encoding="utf-8")
    loaded = load_config(config_file, environ={}, overrides=[
        parse_set_option("listeners.mqtt.max_delivery_attempts=7"),
        parse_set_option("listeners.mqtt.server_keep_alive=30"),
    ])
    settings = MqttSettings.from_config(loaded.config.listeners.mqtt)
    assert settings.connect_timeout == 3.0
    assert settings.subscription_identifiers_available is False
    assert settings.max_delivery_attempts == 7
    assert settings.server_keep_alive == 30


def test_server_keep_alive_zero_means_the_client_chooses() -> None:
    assert MqttSettings.from_config(MqttListener(server_keep_alive=0)).server_keep_alive is None
