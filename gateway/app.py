"""Builds the Tidegate process from a `Config`: stores, durability, broker, listeners, admin HTTP, retention.

This is the only module that names concrete classes. Start-up order, and why:

1. the admin listener, so a port conflict there is found before a long recovery, and /readyz answers 503 until
   the rest is up;
2. the message store, opened (recovered) on the reactor thread: the store binds its single writer to the thread
   that opens it, and only `sync()` may run elsewhere;
3. metadata, durability (group-commit fsyncs in a small dedicated thread pool) and the broker;
4. the protocol listeners (native, then MQTT and AMQP when their adapters are installed);
5. `<data_dir>/listeners.json` with every bound address, then /readyz turns 200; the retention task starts.

Shutdown reverses it: /readyz turns 503, listeners stop accepting, `broker.close()` flushes offsets and the log and
closes both stores (the message store writes its clean-shutdown marker), the admin listener stops last.

Protocol adapters still being written are skipped with one log line while their module is absent:
`tidegate.adapters.mqtt.server` must provide `MqttServerFactory(broker, clock, metrics=...)` and
`tidegate.adapters.amqp.server` must provide `AmqpServerFactory(broker, clock, metrics=...)`.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, maybeDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from twisted.web.resource import Resource
from twisted.web.server import Site

from tidegate.adapters.native.server import NativeServerFactory
from tidegate.core.broker import Broker, BrokerConfig
from tidegate.core.flush import Durability
from tidegate.core.metrics import CoreMetrics
from tidegate.core.storage.filestore import FileMessageStore
from tidegate.core.storage.layout import StoreLayout, write_atomically
from tidegate.core.storage.metadata import SqliteMetadataStore
from tidegate.gateway.admin import AdminRoot, Readiness, build_admin_site
from tidegate.gateway.config import Config
from tidegate.gateway.metrics import TidegateCollector, build_registry
from tidegate.gateway.tls import server_tls_options

log = logging.getLogger("tidegate.app")

LISTENERS_FILE = "listeners.json"
# A native frame carries one message plus its properties, or a batch: allow twice the largest body.
NATIVE_FRAME_TO_BODY_RATIO = 2
# Durability never runs two fsyncs at once (group commit batches behind the running one): one thread is enough.
FLUSH_POOL_THREADS = 1

INDEX_FLUSH_S = 1.0

OPTIONAL_ADAPTERS = {
    "mqtt": ("tidegate.adapters.mqtt.server", "MqttServerFactory"),
    "amqp": ("tidegate.adapters.amqp.server", "AmqpServerFactory"),
}


def format_address(port: IListeningPort) -> str:
    address = port.getHost()
    host = address.host
    return f"[{host}]:{address.port}" if ":" in host else f"{host}:{address.port}"


def resolve_data_dir(config: Config) -> Path:
    return Path(os.path.expanduser(config.broker.data_dir)).absolute()


def read_listeners_file(data_dir: str | os.PathLike[str]) -> dict[str, str]:
    """The addresses a running process bound, by listener name (`{"native": "127.0.0.1:10911", ...}`)."""
    with open(Path(data_dir) / LISTENERS_FILE, encoding="utf-8") as fh:
        return json.load(fh)


def broker_config(config: Config) -> BrokerConfig:
    retention_hours = config.storage.retention_hours
    return BrokerConfig(
        auto_create_topics=config.broker.auto_create_topics,
        default_queues=config.broker.default_queues,
        max_body=config.broker.max_message_bytes,
        new_group_start=config.broker.new_group_start,
        invisible_ms=config.broker.invisible_ms,
        max_attempts=config.broker.max_attempts,
        retention_ms=retention_hours * 3_600_000,  # 0 = no age limit, as in the store
        retention_bytes=config.storage.retention_bytes,
    )


def mqtt_settings(section: Any) -> Any:
    """MqttSettings from the `[listeners.mqtt]` section (the adapter validates the values)."""
    from tidegate.adapters.mqtt.settings import MqttSettings

    return MqttSettings(
        receive_maximum=section.receive_maximum,
        max_packet_size=section.max_packet_size,
        topic_alias_maximum=section.topic_alias_maximum,
        server_keep_alive=section.server_keep_alive or None,
        max_keep_alive=section.max_keep_alive,
        maximum_qos=section.maximum_qos,
        retain_available=section.retain_available,
        wildcard_subscription_available=section.wildcard_subscription_available,
        shared_subscription_available=section.shared_subscription_available,
        session_expiry_max=section.session_expiry_max,
        persistent_session_expiry=section.persistent_session_expiry,
        max_inflight=section.max_inflight,
        max_queued_messages=section.max_queued_messages,
        allow_empty_client_id=section.allow_empty_client_id,
        sys_interval=float(section.sys_interval_s),
    )


def open_message_store(config: Config, data_dir: Path) -> Any:
    """Open the commit log, recovering it after a crash. The calling thread becomes the store's writer thread."""
    return FileMessageStore(
        data_dir,
        segment_bytes=config.storage.segment_bytes,
        index_entries_per_file=config.storage.index_entries_per_file,
    )


def open_metadata_store(data_dir: Path) -> Any:
    return SqliteMetadataStore(StoreLayout(data_dir).meta_db_path)


class TidegateProcess(Service):
    """The whole broker process as one Twisted service; `started` fires once everything listens."""

    name = "tidegate"

    def __init__(self, config: Config, reactor: Any) -> None:
        self.config = config
        self.reactor = reactor
        self.data_dir = resolve_data_dir(config)
        self.metrics = CoreMetrics()
        self.readiness = Readiness()
        self.started_at = reactor.seconds()
        self.store: Any = None
        self.metadata: Any = None
        self.durability: Durability | None = None
        self.broker: Broker | None = None
        self.admin_root: AdminRoot | None = None
        self.addresses: dict[str, str] = {}
        self._admin_port: IListeningPort | None = None
        self._protocol_ports: dict[str, IListeningPort] = {}
        self._retention: LoopingCall | None = None
        self._index_flush: LoopingCall | None = None
        self._stoppables: list[Any] = []  # adapter factories with a stop() for shutdown
        self._tls: Any = None
        self._pool = ThreadPool(minthreads=1, maxthreads=FLUSH_POOL_THREADS, name="tidegate-flush")
        self.collector = TidegateCollector(
            self.metrics,
            uptime=lambda: self.reactor.seconds() - self.started_at,
            groups=lambda: self.broker.list_groups() if self.broker is not None else (),
            store_stats=lambda: self.store.stats() if self.store is not None else None,
        )
        self.registry = build_registry(self.collector)
        self.started: Deferred[None] | None = None
        self._stopping: Deferred[None] | None = None

    # --- lifecycle
    def startService(self) -> None:
        super().startService()
        self.started = ensureDeferred(self._start())

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._stopping is None:
            self._stopping = ensureDeferred(self._stop())
        return self._stopping

    async def _start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        listeners_file = self.data_dir / LISTENERS_FILE
        # A file left by a crashed run would point readers at ports nobody listens on.
        listeners_file.unlink(missing_ok=True)
        self._pool.start()
        listeners = self.config.listeners

        if listeners.admin.enabled:
            site, self.admin_root = build_admin_site(self.registry, self.readiness, self.reactor)
            self._admin_port = self.reactor.listenTCP(listeners.admin.port, site, interface=listeners.admin.host)
            self.addresses["admin"] = format_address(self._admin_port)

        began = time.monotonic()
        self.store = open_message_store(self.config, self.data_dir)
        self._log_recovery(time.monotonic() - began)
        self.readiness.done(Readiness.STORE)

        self.metadata = open_metadata_store(self.data_dir)
        self.durability = Durability(
            self.store,
            self.reactor,
            self.run_in_thread,
            mode=self.config.storage.flush,
            interval_ms=self.config.storage.flush_interval_ms,
            metrics=self.metrics,
        )
        self.broker = Broker(self.store, self.metadata, self.reactor, self.durability, broker_config(self.config))

        if listeners.native.enabled:
            factory = NativeServerFactory(
                self.broker,
                self.reactor,
                max_frame=self.config.broker.max_message_bytes * NATIVE_FRAME_TO_BODY_RATIO,
                metrics=self.metrics,
            )
            self._listen("native", factory, listeners.native.host, listeners.native.port)
        if listeners.mqtt.enabled:
            self._start_mqtt(listeners.mqtt)
        if listeners.amqp.enabled:
            self._start_optional_adapter("amqp", listeners.amqp.host, listeners.amqp.port)

        # Readers (tests, scripts) poll for this file: they must see the whole JSON or nothing.
        write_atomically(listeners_file, (json.dumps(self.addresses, indent=2, sort_keys=True) + "\n").encode())
        for name, address in sorted(self.addresses.items()):
            log.info("listening: %s on %s", name, address)
        self.readiness.done(Readiness.LISTENERS)

        self._retention = LoopingCall(self.enforce_retention)
        self._retention.clock = self.reactor
        self._retention.start(self.config.storage.retention_check_s, now=True).addErrback(
            lambda failure: log.error("retention task stopped: %s", failure.getErrorMessage()))
        # Queue-index entries are buffered in memory (rebuildable from the log); write them out regularly so a
        # crash has little to re-dispatch and the checkpoint keeps moving.
        self._index_flush = LoopingCall(self.store.flush_indexes)
        self._index_flush.clock = self.reactor
        self._index_flush.start(INDEX_FLUSH_S, now=False).addErrback(
            lambda failure: log.error("index flush task stopped: %s", failure.getErrorMessage()))
        log.info("tidegate is ready (data_dir=%s, flush=%s)", self.data_dir, self.config.storage.flush)

    async def _stop(self) -> None:
        if self.started is not None and not self.started.called:
            # Shutdown raced start-up (a signal during recovery): let start-up finish or fail first so nothing is
            # half-built when the stores close. Its failure has already been reported by whoever started us.
            await _settled(self.started)
        self.readiness.not_ready(Readiness.LISTENERS, "shutting down")
        if self._retention is not None and self._retention.running:
            self._retention.stop()
        await DeferredList([maybeDeferred(port.stopListening) for port in self._protocol_ports.values()])
        self._protocol_ports.clear()
        if self._index_flush is not None and self._index_flush.running:
            self._index_flush.stop()
        for stoppable in self._stoppables:
            stoppable.stop()
        if self.durability is not None:
            await self.durability.idle()  # the store must not close under an fsync running in the pool
        try:
            if self.broker is not None:
                self.broker.close()
            else:
                # The broker never came up (start-up failed after opening a store): close what was opened.
                # Nothing was appended, so the store's clean-shutdown marker is the truth.
                for opened in (self.store, self.metadata):
                    if opened is not None:
                        opened.close()
        finally:
            if self._admin_port is not None:
                await maybeDeferred(self._admin_port.stopListening)
                self._admin_port = None
            if self._pool.started:
                self._pool.stop()
            (self.data_dir / LISTENERS_FILE).unlink(missing_ok=True)
        log.info("tidegate stopped")

    # --- pieces
    def _tls_options(self) -> Any:
        if self._tls is None:
            tls = self.config.tls
            self._tls = server_tls_options(tls.cert_file, tls.key_file, tls.ca_file or None)
        return self._tls

    def run_in_thread(self, fn: Callable[[], Any]) -> Deferred[Any]:
        return deferToThreadPool(self.reactor, self._pool, fn)

    def enforce_retention(self) -> None:
        # One retention path: the broker knows the global limits (broker_config) and each topic's retention_ms.
        if self.broker is None:
            return
        deleted = self.broker.enforce_retention()
        if deleted:
            log.info("retention deleted %d commit-log segment(s)", deleted)

    def _listen(self, name: str, factory: Any, host: str, port: int, tls: bool = False) -> None:
        factory.noisy = False  # one "listening" line per listener is ours; no per-connection factory chatter
        if tls:
            listening = self.reactor.listenSSL(port, factory, self._tls_options(), interface=host)
        else:
            listening = self.reactor.listenTCP(port, factory, interface=host)
        self._protocol_ports[name] = listening
        self.addresses[name] = format_address(listening)

    def _start_mqtt(self, section: Any) -> None:
        from tidegate.adapters.mqtt.server import MqttServerFactory
        from tidegate.adapters.mqtt.websocket import websocket_resource

        factory = MqttServerFactory(self.broker, self.reactor, mqtt_settings(section))
        self._stoppables.append(factory)
        self._listen("mqtt", factory, section.host, section.port)
        site = None
        if section.ws_enabled or section.wss_enabled:
            root = Resource()
            root.putChild(section.ws_path.strip("/").encode(),
                          websocket_resource(factory, f"ws://{section.host}{section.ws_path}", self.reactor))
            site = Site(root)
            site.noisy = False
        if section.ws_enabled:
            self._listen("mqtt_ws", site, section.host, section.ws_port)
        if section.tls_enabled:
            self._listen("mqtt_tls", factory, section.host, section.tls_port, tls=True)
        if section.wss_enabled:
            self._listen("mqtt_wss", site, section.host, section.wss_port, tls=True)

    def _start_optional_adapter(self, name: str, host: str, port: int) -> None:
        module_name, factory_name = OPTIONAL_ADAPTERS[name]
        if not _module_exists(module_name):
            log.info("%s listener skipped: %s is not part of this build yet", name, module_name)
            return
        factory_class = getattr(importlib.import_module(module_name), factory_name)
        if name == "amqp":
            from tidegate.core.security.gate import AllowAllGate

            factory = factory_class(self.broker, AllowAllGate(), self.reactor, self.config.listeners.amqp,
                                    metrics=self.metrics, listener=name)
            self._stoppables.append(factory)  # cancels its x-expires timers at shutdown
        else:
            factory = factory_class(self.broker, self.reactor, metrics=self.metrics)
        self._listen(name, factory, host, port)

    def _log_recovery(self, seconds: float) -> None:
        report = getattr(self.store, "recovery", None)
        if report is None:
            log.info("message store opened in %.2fs", seconds)
        elif report.clean:
            log.info("message store opened in %.2fs after a clean shutdown", seconds)
        else:
            log.warning(
                "message store recovered in %.2fs after an unclean shutdown: scanned %d bytes, truncated %d bytes "
                "(%d records), rebuilt %d and trimmed %d index entries", seconds, report.scanned_bytes,
                report.truncated_bytes, report.dropped_records, report.rebuilt_index_entries,
                report.trimmed_index_entries)


def _module_exists(module_name: str) -> bool:
    try:
        return importlib.util.find_spec(module_name) is not None
    except ModuleNotFoundError:
        # A parent package is missing (tidegate.adapters.amqp itself): the adapter is absent too.
        return False


async def _settled(deferred: Deferred[Any]) -> None:
    waiter: Deferred[None] = Deferred()

    def settle(result: Any) -> Any:
        waiter.callback(None)
        return result

    deferred.addBoth(settle)
    await waiter
