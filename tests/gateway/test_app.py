"""TidegateProcess wiring with recorded stand-ins for the stores, broker and protocol factories.

These check what gateway/app.py itself decides: start-up order, readiness, listeners.json, optional adapters,
retention, and what shutdown closes. The real stores and broker are exercised by test_process.py.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock

from tidegate.adapters.base import ConnectionLimits
from tidegate.adapters.native.server import NativeSettings
from tidegate.core.alarms import ResourceAlarms
from tidegate.core.security.policy_gate import PolicyGate
from tidegate.core.storage.memory import MemoryMetadataStore
from tidegate.gateway import app, listeners
from tidegate.gateway.config import Config, ListenersSection, MqttListener, load_config, parse_set_option


class RecordingStore:
    def __init__(self) -> None:
        self.retention_calls: list[tuple[int, int, int]] = []
        self.closed = False
        self.recovery = None
        self.end_offset = 0
        self.durable_offset = 0
        self.healthy: tuple[bool, str] = (True, "")

    def enforce_retention(self, now_ms: int, max_age_ms: int, max_bytes: int) -> int:
        self.retention_calls.append((now_ms, max_age_ms, max_bytes))
        return 0

    def flush_indexes(self) -> None:
        pass

    def sync(self) -> int:
        return self.durable_offset

    def stats(self) -> None:
        return None

    def health(self) -> tuple[bool, str]:
        return self.healthy

    def close(self) -> None:
        self.closed = True


class RecordingMetadata(MemoryMetadataStore):
    """The in-memory metadata twin (the gate keeps its users there), recording close()."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    def close(self) -> None:
        self.closed = True


class RecordingBroker:
    instances: list[RecordingBroker] = []

    def __init__(self, store: Any, metadata: Any, clock: Any, durability: Any, config: Any) -> None:
        self.args = (store, metadata, clock, durability, config)
        self.closed = False
        self.alarms = ResourceAlarms()  # part of the Core protocol: the process feeds it from its resource monitor
        RecordingBroker.instances.append(self)

    def list_groups(self) -> list:
        return []

    def enforce_retention(self) -> int:
        # What core.broker.Broker.enforce_retention does with the global limits app.broker_config() gave it.
        store, _metadata, clock, _durability, config = self.args
        return store.enforce_retention(int(clock.seconds() * 1000), config.retention_ms, config.retention_bytes)

    def close(self) -> None:
        self.closed = True


class RecordingFactory:
    """Records the one listener shape `Factory(core, gate, clock, settings, *, metrics, listener)`."""

    stopped = False

    def __init__(self, core: Any, gate: Any, clock: Any, settings: Any, **kwargs: Any) -> None:
        self.broker, self.gate, self.clock, self.settings, self.kwargs = core, gate, clock, settings, kwargs

    def stop(self) -> None:
        self.stopped = True


@pytest.fixture
def stand_ins(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    store, metadata = RecordingStore(), RecordingMetadata()
    RecordingBroker.instances = []
    monkeypatch.setattr(app, "open_message_store", lambda config, data_dir: store)
    monkeypatch.setattr(app, "open_metadata_store", lambda data_dir: metadata)
    monkeypatch.setattr(app, "Broker", RecordingBroker)
    import tidegate.adapters.native.server as native_server

    monkeypatch.setattr(native_server, "NativeServerFactory", RecordingFactory)
    protocols = tuple(replace(row, factory="tidegate_test_absent.amqp:AmqpServerFactory") if row.name == "amqp"
                      else row for row in listeners.PROTOCOLS)
    monkeypatch.setattr(listeners, "PROTOCOLS", protocols)
    return {"store": store, "metadata": metadata}


def make_config(tmp_path: Path, *settings: str) -> Config:
    # The MQTT adapter is built in; these tests are about the process skeleton with stand-in core pieces.
    base = [f"broker.data_dir={tmp_path / 'data'}", "listeners.mqtt.enabled=false"]
    overrides = [parse_set_option(s) for s in (*base, *settings)]
    return load_config(overrides=overrides).config


def started_process(config: Config) -> tuple[Any, MemoryReactorClock]:
    reactor = MemoryReactorClock()
    process = app.TidegateProcess(config, reactor)
    process.startService()
    assert process.started is not None and process.started.called
    process.started.addErrback(lambda failure: pytest.fail(f"start-up failed: {failure.getTraceback()}"))
    return process, reactor


def test_start_binds_admin_then_native_and_writes_listeners_file(tmp_path: Path, stand_ins) -> None:
    config = make_config(tmp_path, "listeners.native.port=0", "listeners.admin.port=0")
    process, reactor = started_process(config)
    try:
        assert [(port, interface) for port, _, _, interface in reactor.tcpServers] == [(0, "127.0.0.1"),
                                                                                    (0, "127.0.0.1")]
        assert reactor.tcpServers[1][1].__class__ is RecordingFactory
        listeners = app.read_listeners_file(tmp_path / "data")
        assert listeners == process.addresses
        assert set(listeners) == {"admin", "native"}
        assert process.readiness.ready
    finally:
        process.stopService()


def test_native_factory_gets_broker_clock_frame_limit_and_shared_metrics(tmp_path: Path, stand_ins) -> None:
    config = make_config(tmp_path, "broker.max_message_bytes=1000")
    process, reactor = started_process(config)
    try:
        factory = reactor.tcpServers[1][1]
        assert factory.broker is RecordingBroker.instances[0]
        assert factory.gate is process.gate and isinstance(factory.gate, PolicyGate)
        assert factory.clock is reactor
        assert factory.settings == NativeSettings(max_frame=2000)
        assert factory.kwargs == {"metrics": process.metrics, "listener": "native",
                                  "limits": ConnectionLimits(output_budget=8 * 1024 * 1024,
                                                             max_held_bytes=1024 * 1024,
                                                             limiter=process.limiter)}
        assert process.limiter is not None and not process.limiter.settings.any  # [limits]: nothing limited
        store, metadata, clock, durability, broker_config = RecordingBroker.instances[0].args
        assert (store, metadata, clock) == (stand_ins["store"], stand_ins["metadata"], reactor)
        assert durability.mode == "sync" and durability.metrics is process.metrics
        assert broker_config.max_body == 1000
        assert broker_config.retention_ms == 72 * 3_600_000
    finally:
        process.stopService()


def test_async_flush_mode_and_interval_reach_durability(tmp_path: Path, stand_ins) -> None:
    process, _ = started_process(make_config(tmp_path, "storage.flush=async", "storage.flush_interval_ms=7"))
    try:
        durability = RecordingBroker.instances[0].args[3]
        assert (durability.mode, durability.interval_ms) == ("async", 7)
    finally:
        process.stopService()


def test_absent_protocol_adapters_are_skipped_with_one_log_line(tmp_path: Path, stand_ins, caplog) -> None:
    caplog.set_level(logging.INFO, logger="tidegate.app")
    process, _ = started_process(make_config(tmp_path))
    try:
        skipped = [r.getMessage() for r in caplog.records if "listener skipped" in r.getMessage()]
        assert skipped == ["amqp listener skipped: tidegate_test_absent.amqp is not part of this build yet"]
        assert "amqp" not in process.addresses
    finally:
        process.stopService()


def test_mqtt_tcp_and_websocket_listeners_share_one_factory(tmp_path: Path, stand_ins, monkeypatch) -> None:
    import tidegate.adapters.mqtt.server as mqtt_server

    class StandInMqttFactory(RecordingFactory):
        pass

    monkeypatch.setattr(mqtt_server, "MqttServerFactory", StandInMqttFactory)
    config = make_config(tmp_path, "listeners.mqtt.enabled=true", "listeners.mqtt.port=0",
                         "listeners.mqtt.ws_port=0", "listeners.mqtt.receive_maximum=7")
    process, reactor = started_process(config)
    try:
        bound = {type(factory).__name__ for _, factory, _, _ in reactor.tcpServers}
        assert {"StandInMqttFactory", "Site"} <= bound
        mqtt_factory = next(f for _, f, _, _ in reactor.tcpServers if isinstance(f, StandInMqttFactory))
        assert mqtt_factory.settings.receive_maximum == 7
        assert {"mqtt", "mqtt_ws"} <= set(app.read_listeners_file(tmp_path / "data"))
    finally:
        process.stopService()
    assert mqtt_factory.stopped


def test_disabled_listeners_are_not_bound(tmp_path: Path, stand_ins) -> None:
    config = make_config(tmp_path, "listeners.admin.enabled=false", "listeners.native.enabled=false")
    config = replace(config, listeners=replace(config.listeners, mqtt=MqttListener(enabled=False)))
    assert isinstance(config.listeners, ListenersSection)
    process, reactor = started_process(config)
    try:
        assert reactor.tcpServers == []
        assert app.read_listeners_file(tmp_path / "data") == {}
    finally:
        process.stopService()


def test_retention_runs_at_start_and_every_check_interval(tmp_path: Path, stand_ins) -> None:
    config = make_config(tmp_path, "storage.retention_hours=2", "storage.retention_bytes=5000",
                         "storage.retention_check_s=30")
    process, reactor = started_process(config)
    try:
        calls = stand_ins["store"].retention_calls
        assert len(calls) == 1
        reactor.advance(30)
        assert len(calls) == 2
        assert calls[1] == (int(reactor.seconds() * 1000), 2 * 3_600_000, 5000)
    finally:
        process.stopService()
    reactor.advance(30)
    assert len(calls) == 2, "retention must stop with the process"


def test_stop_closes_broker_unbinds_and_removes_listeners_file(tmp_path: Path, stand_ins) -> None:
    process, reactor = started_process(make_config(tmp_path))
    stopped = process.stopService()
    assert stopped.called
    assert RecordingBroker.instances[0].closed
    assert not process.readiness.ready
    assert not (tmp_path / "data" / app.LISTENERS_FILE).exists()
    assert not process._pool.started


def test_failed_start_is_reported_and_stop_closes_the_opened_stores(tmp_path: Path, stand_ins,
                                                                     monkeypatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("broker refused to start")

    monkeypatch.setattr(app, "Broker", refuse)
    process = app.TidegateProcess(make_config(tmp_path), MemoryReactorClock())
    process.startService()
    failures: list[str] = []
    process.started.addErrback(lambda failure: failures.append(failure.getErrorMessage()))
    assert failures == ["broker refused to start"]
    assert process.stopService().called
    assert stand_ins["store"].closed and stand_ins["metadata"].closed
    assert not (tmp_path / "data" / app.LISTENERS_FILE).exists()


def test_stale_listeners_file_from_a_crashed_run_is_removed_before_binding(tmp_path: Path, stand_ins,
                                                                            monkeypatch) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / app.LISTENERS_FILE).write_text(json.dumps({"native": "127.0.0.1:1"}))
    monkeypatch.setattr(app, "Broker", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stop here")))
    process = app.TidegateProcess(make_config(tmp_path), MemoryReactorClock())
    process.startService()
    process.started.addErrback(lambda failure: None)
    assert not (data_dir / app.LISTENERS_FILE).exists()
    process.stopService()


def test_every_listener_gets_the_configured_accept_backlog(tmp_path: Path, stand_ins) -> None:
    process, reactor = started_process(make_config(tmp_path, "listeners.native.backlog=512"))
    try:
        native = next(entry for entry in reactor.tcpServers if isinstance(entry[1], RecordingFactory))
        assert native[2] == min(512, listeners.effective_backlog(512))
    finally:
        process.stopService()


def test_backlog_is_capped_by_somaxconn_and_says_so(tmp_path: Path, caplog) -> None:
    somaxconn = tmp_path / "somaxconn"
    somaxconn.write_text("256\n")
    caplog.set_level(logging.INFO, logger="tidegate.app")
    assert listeners.effective_backlog(4096, somaxconn) == 256
    assert listeners.effective_backlog(100, somaxconn) == 100
    assert "net.core.somaxconn=256" in caplog.text


def test_native_gets_a_tls_endpoint_through_the_same_table(tmp_path: Path, stand_ins, monkeypatch) -> None:
    monkeypatch.setattr(app, "server_tls_options", lambda *files: "tls-context")
    config = make_config(tmp_path, "listeners.native.tls_enabled=true", "listeners.native.tls_port=0",
                         "tls.cert_file=/x/cert.pem", "tls.key_file=/x/key.pem")
    process, reactor = started_process(config)
    try:
        port, factory, context, backlog, interface = reactor.sslServers[0]
        assert isinstance(factory, RecordingFactory) and context == "tls-context"
        plain = next(entry[1] for entry in reactor.tcpServers if isinstance(entry[1], RecordingFactory))
        assert plain is factory  # one factory, two endpoints
        assert {"native", "native_tls"} <= set(process.addresses)
    finally:
        process.stopService()


def test_readyz_reports_storage_health_and_recovers_without_restart(tmp_path: Path, stand_ins) -> None:
    process, _ = started_process(make_config(tmp_path))
    try:
        assert process.readiness.ready
        stand_ins["store"].healthy = (False, "disk full: appends refused")
        assert process.readiness.pending == {"storage": "disk full: appends refused"}
        stand_ins["store"].healthy = (True, "")
        assert process.readiness.ready
    finally:
        process.stopService()


def test_index_flush_survives_storage_errors_with_backoff_and_recovers(tmp_path: Path, stand_ins, caplog) -> None:
    from tidegate.core.errors import StoreFull

    caplog.set_level(logging.INFO, logger="tidegate.app")
    attempts: list[float] = []
    clock: list[Any] = []

    def failing_flush() -> None:
        attempts.append(clock[0].seconds())
        if len(attempts) <= 3:
            raise StoreFull("no space left on device")

    stand_ins["store"].flush_indexes = failing_flush
    reactor = MemoryReactorClock()
    clock.append(reactor)
    process = app.TidegateProcess(make_config(tmp_path), reactor)
    process.startService()
    try:
        for _ in range(40):
            reactor.advance(app.INDEX_FLUSH_S)
        assert len(attempts) > 4, "the task kept running after errors"
        gaps = [b - a for a, b in zip(attempts, attempts[1:], strict=False)][:3]
        assert gaps == sorted(gaps) and gaps[2] > gaps[0], "retries back off"
        messages = [r.getMessage() for r in caplog.records]
        assert sum("index flush failed" in m for m in messages) == 1
        assert any("index flush works again after 3 failed attempts" in m for m in messages)
    finally:
        process.stopService()


def test_native_credit_cap_and_heartbeat_come_from_the_config(tmp_path: Path, stand_ins) -> None:
    process, reactor = started_process(make_config(tmp_path, "listeners.native.max_credit=500",
                                                   "listeners.native.heartbeat_s=7"))
    try:
        factory = next(entry[1] for entry in reactor.tcpServers if isinstance(entry[1], RecordingFactory))
        assert (factory.settings.max_credit, factory.settings.heartbeat_s) == (500, 7.0)
    finally:
        process.stopService()


@pytest.mark.parametrize("setting, words", [
    ("broker.message_cache_bytes=-1", "broker.message_cache_bytes must be at least 0"),
    ("listeners.native.max_credit=0", "listeners.native.max_credit must be at least 1"),
    ("connections.output_budget_bytes=10", "connections.output_budget_bytes must be at least 4096"),
    ("listeners.mqtt.backlog=0", "listeners.mqtt.backlog must be 1-65535"),
])
def test_bad_limits_are_one_line_config_errors(tmp_path: Path, setting: str, words: str) -> None:
    from tidegate.gateway.config import ConfigError

    with pytest.raises(ConfigError, match=words):
        make_config(tmp_path, setting)
