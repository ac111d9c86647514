"""Config loading: embedded defaults, precedence default < file < env < cli, one-line errors naming key and source."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from tidegate.gateway.config import (
    CliOverride,
    Config,
    ConfigError,
    Source,
    load_config,
    parse_set_option,
    render_json,
    render_toml,
)


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tidegate.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_need_no_file_and_match_the_documented_values() -> None:
    loaded = load_config()
    config = loaded.config
    assert config.broker.data_dir == "./tidegate-data"
    assert config.broker.auto_create_topics is True
    assert config.broker.default_queues == 4
    assert config.broker.max_message_bytes == 4194304
    assert config.broker.new_group_start == "latest"
    assert config.broker.invisible_ms == 30000
    assert config.broker.max_attempts == 16
    assert config.storage.flush == "sync"
    assert config.storage.flush_interval_ms == 100
    assert config.storage.segment_bytes == 134217728
    assert config.storage.index_entries_per_file == 300000
    assert config.storage.retention_hours == 72
    assert config.storage.retention_bytes == 0
    assert config.storage.retention_check_s == 60
    assert (config.listeners.native.enabled, config.listeners.native.host, config.listeners.native.port) == (
        True, "127.0.0.1", 10911)
    assert (config.listeners.admin.enabled, config.listeners.admin.host, config.listeners.admin.port) == (
        True, "127.0.0.1", 8080)
    mqtt = config.listeners.mqtt
    assert (mqtt.port, mqtt.ws_port, mqtt.tls_port, mqtt.wss_port) == (1883, 8083, 8883, 8084)
    amqp = config.listeners.amqp
    assert (amqp.port, amqp.tls_port) == (5672, 5671)
    assert (config.tls.cert_file, config.tls.key_file, config.tls.ca_file) == ("", "", "")
    assert config.log.level == "info"
    assert config == Config()
    assert set(loaded.sources.values()) == {Source("default")}
    assert loaded.config_file is None


def test_each_source_overrides_the_one_below_it(tmp_path: Path) -> None:
    path = write_toml(tmp_path, """
[storage]
flush = "async"
flush_interval_ms = 250
segment_bytes = 1048576
retention_hours = 5

[listeners.native]
port = 1111
""")
    environ = {
        "TIDEGATE_STORAGE__FLUSH_INTERVAL_MS": "500",
        "TIDEGATE_STORAGE__SEGMENT_BYTES": "2097152",
        "TIDEGATE_LISTENERS__NATIVE__PORT": "2222",
    }
    overrides = [parse_set_option("storage.segment_bytes=4194305"), CliOverride("listeners.native.port", "0",
                                                                                 "--native-port")]
    loaded = load_config(path, environ, overrides)
    storage = loaded.config.storage
    assert storage.retention_hours == 5  # file only
    assert storage.flush == "async"  # file only
    assert storage.flush_interval_ms == 500  # env beats file
    assert storage.segment_bytes == 4194305  # cli beats env and file
    assert loaded.config.listeners.native.port == 0  # cli beats env beats file
    assert loaded.sources["storage.retention_hours"] == Source("file", str(path))
    assert loaded.sources["storage.flush_interval_ms"] == Source("env", "TIDEGATE_STORAGE__FLUSH_INTERVAL_MS")
    assert loaded.sources["storage.segment_bytes"] == Source("cli", "--set storage.segment_bytes=4194305")
    assert loaded.sources["listeners.native.port"] == Source("cli", "--native-port")
    assert loaded.sources["broker.data_dir"] == Source("default")


def test_environment_names_the_config_file_when_no_path_is_given(tmp_path: Path) -> None:
    path = write_toml(tmp_path, '[log]\nlevel = "debug"\n')
    loaded = load_config(None, {"TIDEGATE_CONFIG": str(path)})
    assert loaded.config.log.level == "debug"
    assert loaded.config_file == path


def test_text_values_from_env_and_cli_are_parsed_to_the_schema_types() -> None:
    loaded = load_config(environ={"TIDEGATE_BROKER__AUTO_CREATE_TOPICS": "no", "TIDEGATE_STORAGE__FLUSH": "ASYNC"},
                         overrides=[parse_set_option("listeners.mqtt.enabled=off"),
                                    parse_set_option("tls.ca_file=/etc/ca.pem")])
    assert loaded.config.broker.auto_create_topics is False
    assert loaded.config.storage.flush == "async"
    assert loaded.config.listeners.mqtt.enabled is False
    assert loaded.config.tls.ca_file == "/etc/ca.pem"


def test_unrelated_tidegate_variables_without_double_underscore_are_ignored() -> None:
    assert load_config(environ={"TIDEGATE_ADDR": "127.0.0.1:1"}).config == Config()


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"environ": {"TIDEGATE_STORAGE__FLSH": "sync"}},
         "unknown key storage.flsh (from env TIDEGATE_STORAGE__FLSH)"),
        ({"environ": {"TIDEGATE_STORAGE_FLUSH": "sync"}},
         "unknown setting TIDEGATE_STORAGE_FLUSH (from env); nested keys are separated by a double underscore"),
        ({"overrides": [CliOverride("nosuch.key", "1", "--set nosuch.key=1")]},
         "unknown key nosuch.key (from cli --set nosuch.key=1)"),
        ({"overrides": [CliOverride("listeners.native", "1", "--set listeners.native=1")]},
         "listeners.native is a section, not a value (from cli --set listeners.native=1)"),
        ({"overrides": [CliOverride("listeners.admin.port", "eighty", "--admin-port")]},
         'listeners.admin.port must be an integer, got string "eighty" (from cli --admin-port)'),
        ({"overrides": [CliOverride("storage.flush", "fast", "--flush")]},
         'storage.flush must be one of sync, async, got "fast" (from cli --flush)'),
        ({"environ": {"TIDEGATE_BROKER__AUTO_CREATE_TOPICS": "maybe"}},
         'broker.auto_create_topics must be true or false, got string "maybe" (from env '
         'TIDEGATE_BROKER__AUTO_CREATE_TOPICS)'),
        ({"environ": {"TIDEGATE_LISTENERS__NATIVE__PORT": "70000"}},
         "listeners.native.port must be a port number 0-65535, got 70000"),
        ({"environ": {"TIDEGATE_BROKER__DEFAULT_QUEUES": "0"}},
         "broker.default_queues must be at least 1, got 0"),
        ({"environ": {"TIDEGATE_BROKER__NEW_GROUP_START": "middle"}},
         'broker.new_group_start must be one of earliest, latest, got "middle"'),
        ({"overrides": [CliOverride("listeners.admin.port", "10911", "--admin-port")]},
         "listeners.admin.port 10911 (from cli --admin-port) is also used by listeners.native.port"),
        ({"overrides": [CliOverride("tls.cert_file", "/c.pem", "--set tls.cert_file=/c.pem")]},
         "tls.cert_file is set (from cli --set tls.cert_file=/c.pem) but tls.key_file is empty"),
        ({"overrides": [CliOverride("storage.segment_bytes", "4194304", "--set storage.segment_bytes=4194304")]},
         "broker.max_message_bytes (4194304, from default) must be smaller than storage.segment_bytes"),
    ],
)
def test_bad_values_raise_one_line_errors_naming_key_and_source(kwargs: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(**kwargs)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[storage]\nflush = 1\n", "storage.flush must be a string, got integer 1 (from file "),
        ("[storage]\nsegment_bytes = \"big\"\n", 'storage.segment_bytes must be an integer, got string "big"'),
        ("[broker]\nauto_create_topics = \"yes\"\n", "broker.auto_create_topics must be true or false"),
        ("[storage]\nflush = \"never\"\n", 'storage.flush must be one of sync, async, got "never" (from file '),
        ("[storage]\nbogus = 1\n", "unknown key storage.bogus (from file "),
        ("[mystery]\nx = 1\n", "unknown section [mystery] (from file "),
        ("storage = 5\n", "storage must be a table, got integer 5 (from file "),
        ("[storage\n", "is not valid TOML"),
    ],
)
def test_bad_config_files_raise_one_line_errors_naming_key_and_file(tmp_path: Path, text: str,
                                                                     expected: str) -> None:
    path = write_toml(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_a_missing_config_file_is_an_error_naming_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file .*absent.toml not found"):
        load_config(tmp_path / "absent.toml")


def test_set_option_without_equals_sign_is_rejected() -> None:
    with pytest.raises(ConfigError, match="--set expects key=value"):
        parse_set_option("storage.flush")


def test_set_option_keeps_equals_signs_inside_the_value() -> None:
    override = parse_set_option("tls.cert_file=/a=b.pem")
    assert (override.key, override.value) == ("tls.cert_file", "/a=b.pem")


def test_rendered_toml_reads_back_as_the_same_config_with_sources_as_comments() -> None:
    loaded = load_config(environ={"TIDEGATE_STORAGE__FLUSH": "async"},
                         overrides=[parse_set_option('broker.data_dir=/tmp/with "quotes"')])
    text = render_toml(loaded)
    assert tomllib.loads(text) == loaded.config.to_dict()
    assert 'flush                  = "async"  # env TIDEGATE_STORAGE__FLUSH' in text
    assert "[listeners.native]" in text
    assert "# default" in text


def test_rendered_json_can_include_sources() -> None:
    import json

    loaded = load_config(overrides=[CliOverride("listeners.native.port", "0", "--native-port")])
    plain = json.loads(render_json(loaded))
    assert plain["listeners"]["native"]["port"] == 0
    with_sources = json.loads(render_json(loaded, with_sources=True))
    assert with_sources["config"] == plain
    assert with_sources["sources"]["listeners.native.port"] == "cli --native-port"


def test_seconds_with_a_fraction_are_read_from_file_environment_and_command_line(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[alarms]\ncheck_interval_s = 2\n")
    assert load_config(path).config.alarms.check_interval_s == 2.0
    loaded = load_config(path, environ={"TIDEGATE_ALARMS__CHECK_INTERVAL_S": "0.25"},
                         overrides=[parse_set_option("listeners.amqp.handshake_timeout_s=7.5")])
    assert loaded.config.alarms.check_interval_s == 0.25
    assert loaded.config.listeners.amqp.handshake_timeout_s == 7.5
    with pytest.raises(ConfigError, match=r'alarms.check_interval_s must be a number, got string "soon"'):
        load_config(environ={"TIDEGATE_ALARMS__CHECK_INTERVAL_S": "soon"})


@pytest.mark.parametrize("text", ["nan", "inf", "-inf"])
def test_seconds_that_are_not_finite_are_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="alarms.check_interval_s must be a number"):
        load_config(environ={"TIDEGATE_ALARMS__CHECK_INTERVAL_S": text})
