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

Every protocol listener (native, MQTT, AMQP; plain TCP, TLS, WebSocket) is built by one table in
gateway/listeners.py with the one listener shape `Factory(core, gate, clock, settings, *, metrics, listener)`.
Background tasks (index flush, retention) survive storage errors and retry with backoff; /readyz says why the broker
is not ready (store health, durability after an fsync failure).

TLS: every TLS endpoint (protocol listeners and the admin HTTPS port) gets its own reloadable context from
gateway/tls.py. `reload_tls()` re-reads the certificate, key and CA files for all of them at once (all or nothing:
a bad file keeps every listener on the old certificate); SIGHUP and `POST /api/tls/reload` call it. Connections
already open keep the certificate they were accepted with; new connections get the new one.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, maybeDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from tidegate.core.adapter_state import MetadataNamespace
from tidegate.core.alarms import ResourceAlarms, ResourceMonitor, disk_check, memory_check, physical_memory_bytes
from tidegate.core.broker import Broker, BrokerConfig
from tidegate.core.errors import StoreError, StoreFull
from tidegate.core.flush import Durability
from tidegate.core.metrics import CoreMetrics
from tidegate.core.security.audit import AuditLog
from tidegate.core.security.gate import AllowAllGate, Gate
from tidegate.core.security.keyfiles import InsecureKeyFile, check_private_file, read_private_file
from tidegate.core.security.limits import (
    TOPIC_CREATORS_NAMESPACE,
    USER_LIMITS_NAMESPACE,
    Limiter,
    settings_from_mapping,
)
from tidegate.core.security.policy_gate import open_policy_gate
from tidegate.core.security.users import ADMIN_PASSWORD_ENV
from tidegate.core.storage.encryption import load_keyring
from tidegate.core.storage.filestore import FileMessageStore
from tidegate.core.storage.layout import StoreLayout, secure_data_dir, write_atomically
from tidegate.core.storage.metadata import SqliteMetadataStore
from tidegate.gateway.accelerators import describe_accelerators
from tidegate.gateway.admin import AdminRoot, Readiness, SecurityApi, build_admin_site
from tidegate.gateway.config import DEFAULT_BACKLOG, Config, ProcessSection
from tidegate.gateway.listeners import ListenerBuilder, listen_tcp, storm_collector_pause
from tidegate.gateway.metrics import TidegateCollector, build_registry
from tidegate.gateway.reactor_lag import ReactorLagProbe, reactor_idle_probe
from tidegate.gateway.tls import TlsMetrics, TlsSettings, not_after_iso, server_tls_options

log = logging.getLogger("tidegate.app")

LISTENERS_FILE = "listeners.json"
# Durability never runs two fsyncs at once (group commit batches behind the running one): one thread is enough.
FLUSH_POOL_THREADS = 1

INDEX_FLUSH_S = 1.0
BACKGROUND_MAX_BACKOFF_S = 60.0


# Generations 1 and 2 run after this many collections of the generation below (Python's default is 10 and 10).
# Kept with the gen-0 threshold of `process.gc_threshold`: the pair measured in docs/performance.md.
GC_OLDER_GENERATIONS = (20, 100)


def tune_garbage_collector(settings: ProcessSection) -> tuple[int, int, int]:
    """Apply `process.gc_threshold` to this interpreter; returns the thresholds now in force. Called by
    `tidegate serve` only: a library user (or a test) keeps its interpreter's own settings."""
    if settings.gc_threshold > 0:
        gc.set_threshold(settings.gc_threshold, *GC_OLDER_GENERATIONS)
    return gc.get_threshold()


def freeze_startup_objects(settings: ProcessSection) -> int:
    """With `process.gc_freeze`, collect once and move every object alive now (modules, configuration, sessions
    recovered from disk) into the permanent generation, so later full collections never walk them again; returns
    how many objects were frozen (0 when off). Objects frozen here are still freed by reference counting; only a
    reference cycle among them would stay until exit."""
    if not settings.gc_freeze:
        return 0
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


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
        message_cache_bytes=config.broker.message_cache_bytes,
    )


def build_limiter(config: Config, clock: Any, overrides: Any, metrics: CoreMetrics,
                  audit: AuditLog | None = None, creators: Any = None) -> Limiter:
    """The process's limits against abuse from `[limits]` and `[limits.<listener>]`, with per-user overrides kept
    in the metadata namespace `overrides`."""
    limits = config.limits
    listeners = {name: asdict(getattr(limits, name)) for name in ("native", "mqtt", "amqp")}
    if listeners["mqtt"]["max_topics_created_per_user"] < 0:  # the older MQTT-only key keeps working
        listeners["mqtt"]["max_topics_created_per_user"] = config.listeners.mqtt.max_topics_created_per_user
    return Limiter(settings_from_mapping(asdict(limits)), clock, listeners=listeners, overrides=overrides,
                   metrics=metrics, max_tracked_sources=limits.max_tracked_sources,
                   max_tracked_users=limits.max_tracked_users, audit=audit, creators=creators)
def resource_monitor(config: Config, data_dir: Path, alarms: ResourceAlarms, clock: Any,
                     storage_health: list[Callable[[], tuple[bool, str]]]) -> ResourceMonitor:
    """The monitor that raises the resource alarms: storage (health, free disk) and memory (RSS watermark)."""
    section = config.alarms
    watermark = section.memory_high_watermark_bytes
    if watermark == 0:
        watermark = int(physical_memory_bytes() * 0.4)
    return ResourceMonitor(alarms, clock, {
        "storage": [*storage_health, disk_check(data_dir, section.disk_free_limit_bytes)],
        "memory": [memory_check(watermark)],
    }, section.check_interval_s)


def open_message_store(config: Config, data_dir: Path) -> Any:
    """Open the commit log, recovering it after a crash. The calling thread becomes the store's writer thread.

    Raises EncryptionKeyError (a StoreError with an operator-facing message) when the configured keyring is
    unusable or does not open the encrypted records already stored."""
    return FileMessageStore(
        data_dir,
        segment_bytes=config.storage.segment_bytes,
        index_entries_per_file=config.storage.index_entries_per_file,
        page_cache_bytes=config.storage.log_page_cache_bytes,
        keyring=load_keyring(config.storage.encryption_key_file, config.storage.encryption_key_env),
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
        self._admin_tls_port: IListeningPort | None = None
        self._protocol_ports: dict[str, IListeningPort] = {}
        self._retention: LoopingCall | None = None
        self._index_flush: LoopingCall | None = None
        self._resource_monitor: ResourceMonitor | None = None
        self._stoppables: list[Any] = []  # adapter factories with a stop() for shutdown
        self._tls_endpoints: dict[str, Any] = {}  # endpoint name -> its ServerTls (reloaded together)
        self.tls_metrics = TlsMetrics()
        self._previous_sighup: Any = None
        self.limiter: Limiter | None = None  # limits against abuse, built with the broker
        self.audit = AuditLog(None)  # opened in _start from [audit]
        self.gate: Gate = AllowAllGate()  # until the metadata store is open (_start); nothing listens before
        self.reactor_lag = ReactorLagProbe(reactor)
        self._backoff: dict[str, list[float]] = {}  # background task -> [failures in a row, next try time]
        self._pool = ThreadPool(minthreads=1, maxthreads=FLUSH_POOL_THREADS, name="tidegate-flush")
        self.collector = TidegateCollector(
            self.metrics,
            uptime=lambda: self.reactor.seconds() - self.started_at,
            groups=lambda: self.broker.list_groups() if self.broker is not None else (),
            store_stats=lambda: self.store.stats() if self.store is not None else None,
            reactor_lag=self.reactor_lag.histogram,
            recovery=lambda: getattr(self.store, "recovery", None),
            max_topic_labels=config.listeners.admin.metrics_max_topic_labels,
            max_group_labels=config.listeners.admin.metrics_max_group_labels,
        )
        self.registry = build_registry(self.collector)
        self.registry.register(self.tls_metrics)
        self.started: Deferred[None] | None = None
        self._stopping: Deferred[None] | None = None

    def run_password_check(self, function: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """Password hashes (scrypt, tens of ms) run in the reactor's pool, not the flush pool or the reactor."""
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), function, *args)

    # --- lifecycle
    def startService(self) -> None:
        super().startService()
        self._install_reload_signal()
        self.started = ensureDeferred(self._start())

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._stopping is None:
            self._stopping = ensureDeferred(self._stop())
        return self._stopping

    async def _start(self) -> None:
        # Secrets first: a key readable by other users fails start-up before anything listens or is written.
        if self.config.tls.key_file:
            check_private_file(self.config.tls.key_file, "tls.key_file", missing_ok=True)
        metrics_token = b""
        if self.config.security.metrics_token_file:
            metrics_token = read_private_file(os.path.expanduser(self.config.security.metrics_token_file),
                                              "security.metrics_token_file").strip()
            if len(metrics_token) < 16:
                raise InsecureKeyFile("security.metrics_token_file: the token must be at least 16 characters")
        secure_data_dir(self.data_dir)  # 0700, and files an older version left 0644 become 0600
        audit = self.config.audit
        if audit.file:
            self.audit = AuditLog(Path(os.path.expanduser(audit.file)).absolute(), max_bytes=audit.max_bytes,
                                  backup_count=audit.backup_count)
        self.tls_metrics.audit = self.audit  # failed TLS handshakes are audited
        listeners_file = self.data_dir / LISTENERS_FILE
        # A file left by a crashed run would point readers at ports nobody listens on.
        listeners_file.unlink(missing_ok=True)
        self._pool.start()
        listeners = self.config.listeners

        if listeners.admin.enabled:
            admin = listeners.admin
            site, self.admin_root = build_admin_site(self.registry, self.readiness, self.reactor,
                                                     metrics_token=metrics_token)
            if admin.plain_enabled:
                self._admin_port = self.reactor.listenTCP(admin.port, site, interface=admin.host)
                self.addresses["admin"] = format_address(self._admin_port)
            if admin.tls_enabled:
                self._admin_tls_port = self.reactor.listenSSL(admin.tls_port, site, self._tls_options("admin_tls"),
                                                              interface=admin.host)
                self.addresses["admin_tls"] = format_address(self._admin_tls_port)

        began = time.monotonic()
        self.store = open_message_store(self.config, self.data_dir)
        self._log_recovery(time.monotonic() - began)
        self.readiness.done(Readiness.STORE)
        self.readiness.add_check("storage", self.store.health)

        self.metadata = open_metadata_store(self.data_dir)
        gate_settings = {k: v for k, v in asdict(self.config.security).items() if k != "metrics_token_file"}
        self.gate = open_policy_gate(self.metadata, self.reactor, **gate_settings,
                                     admin_password=os.environ.get(ADMIN_PASSWORD_ENV) or None,
                                     run_in_thread=self.run_password_check, listener_hosts=self._listener_hosts(),
                                     audit=self.audit, metrics=self.metrics.security)
        self.durability = Durability(
            self.store,
            self.reactor,
            self.run_in_thread,
            mode=self.config.storage.flush,
            interval_ms=self.config.storage.flush_interval_ms,
            metrics=self.metrics,
            inline_when_idle=(reactor_idle_probe(self.reactor) if self.config.storage.inline_sync_when_idle
                              else None),
            inline_stall_s=self.config.storage.inline_sync_stall_ms / 1000.0,
        )
        self.readiness.add_check("durability", self.durability.health)
        self.broker = Broker(self.store, self.metadata, self.reactor, self.durability, broker_config(self.config))
        self.limiter = build_limiter(self.config, self.reactor,
                                     MetadataNamespace(self.metadata, USER_LIMITS_NAMESPACE), self.metrics,
                                     self.audit, MetadataNamespace(self.metadata, TOPIC_CREATORS_NAMESPACE))
        if self.admin_root is not None:
            self.admin_root.mount("api", SecurityApi(self.gate, extra_hosts=self.gate.admin_hosts,
                                                     tls_reload=self.reload_tls, limiter=self.limiter,
                                                     broker=self.broker))
        self._resource_monitor = resource_monitor(self.config, self.data_dir, self.broker.alarms, self.reactor,
                                                  [self.store.health, self.durability.health])
        self._resource_monitor.start()

        builder = ListenerBuilder(self.config, self.broker, self.gate, self.reactor, self.metrics, self._listen,
                                  limiter=self.limiter)
        self._stoppables.extend(builder.build_all())

        # Readers (tests, scripts) poll for this file: they must see the whole JSON or nothing.
        write_atomically(listeners_file, (json.dumps(self.addresses, indent=2, sort_keys=True) + "\n").encode())
        for name, address in sorted(self.addresses.items()):
            log.info("listening: %s on %s", name, address)
        self.readiness.done(Readiness.LISTENERS)

        self._retention = LoopingCall(self.run_background, "retention", self.enforce_retention)
        self._retention.clock = self.reactor
        self._retention.start(self.config.storage.retention_check_s, now=True)
        # Queue-index entries are buffered in memory (rebuildable from the log); write them out regularly so a
        # crash has little to re-dispatch and the checkpoint keeps moving.
        self._index_flush = LoopingCall(self.run_background, "index flush", self.store.flush_indexes)
        self._index_flush.clock = self.reactor
        self._index_flush.start(INDEX_FLUSH_S, now=False)
        self.reactor_lag.start()
        log.info("tidegate is ready (data_dir=%s, flush=%s, %s)", self.data_dir, self.config.storage.flush,
                 describe_accelerators())

    async def _stop(self) -> None:
        if self.started is not None and not self.started.called:
            # Shutdown raced start-up (a signal during recovery): let start-up finish or fail first so nothing is
            # half-built when the stores close. Its failure has already been reported by whoever started us.
            await _settled(self.started)
        self.readiness.not_ready(Readiness.LISTENERS, "shutting down")
        if self._retention is not None and self._retention.running:
            self._retention.stop()
        self.reactor_lag.stop()
        if self._resource_monitor is not None:
            self._resource_monitor.stop()
        await DeferredList([maybeDeferred(port.stopListening) for port in self._protocol_ports.values()])
        self._protocol_ports.clear()
        storm_collector_pause.release()  # no more accepts: a storm's collector pause must not outlive the listeners
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
            for admin_port in (self._admin_port, self._admin_tls_port):
                if admin_port is not None:
                    await maybeDeferred(admin_port.stopListening)
            self._admin_port = self._admin_tls_port = None
            self._restore_reload_signal()
            if self._pool.started:
                self._pool.stop()
            (self.data_dir / LISTENERS_FILE).unlink(missing_ok=True)
            self.audit.close()
        log.info("tidegate stopped")

    # --- pieces
    def _listener_hosts(self) -> dict[str, str]:
        """Listener name (as adapters put it in Credentials.listener) -> bound host, for anonymous-per-listener."""
        listeners = self.config.listeners
        return {name: getattr(listeners, name).host for name in ("native", "mqtt", "amqp", "admin")}

    def _tls_options(self, endpoint: str) -> Any:
        """The TLS connection creator of one endpoint (`mqtt_tls`, `admin_tls`, ...), kept for `reload_tls`."""
        creator = server_tls_options(TlsSettings.from_config(self.config.tls), endpoint, self.tls_metrics)
        self._tls_endpoints[endpoint] = creator
        return creator

    def reload_tls(self) -> dict[str, Any]:
        """Re-read the TLS files for every TLS endpoint; all or nothing (raises `TlsConfigError`, nothing changed).
        Open connections keep their certificate; new ones get the new one."""
        if self.config.tls.key_file:  # a key made readable by others since start is not loaded again
            check_private_file(self.config.tls.key_file, "tls.key_file", missing_ok=True)
        prepared = [(creator, creator.prepare()) for creator in self._tls_endpoints.values()]
        for creator, loaded in prepared:
            creator.install(loaded)
        self.tls_metrics.reloads += 1
        listeners = {name: not_after_iso(creator.metrics.not_after[name])
                     for name, creator in sorted(self._tls_endpoints.items())}
        log.info("TLS certificates reloaded for %s", ", ".join(listeners) or "no TLS listener")
        return {"reloaded": True, "not_after": listeners}

    def _reload_tls_quietly(self) -> None:
        try:
            self.reload_tls()
        except Exception as exc:  # a bad file must not take the broker down: keep serving the old certificate
            log.error("TLS reload failed, still serving the previous certificates: %s", exc)

    def _install_reload_signal(self) -> None:
        """SIGHUP reloads the TLS certificates (only the main thread may set signal handlers)."""
        if not hasattr(signal, "SIGHUP") or threading.current_thread() is not threading.main_thread():
            return

        def on_sighup(signum: int, frame: Any) -> None:
            self.reactor.callFromThread(self._reload_tls_quietly)  # out of the signal handler, into the reactor

        self._previous_sighup = signal.signal(signal.SIGHUP, on_sighup)

    def _restore_reload_signal(self) -> None:
        if self._previous_sighup is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
            self._previous_sighup = None

    def run_in_thread(self, fn: Callable[[], Any]) -> Deferred[Any]:
        return deferToThreadPool(self.reactor, self._pool, fn)

    def enforce_retention(self) -> None:
        # One retention path: the broker knows the global limits (broker_config) and each topic's retention_ms.
        if self.broker is None:
            return
        deleted = self.broker.enforce_retention()
        if deleted:
            log.info("retention deleted %d commit-log segment(s)", deleted)

    def run_background(self, name: str, task: Callable[[], object]) -> None:
        """Run a periodic storage task; on a storage error log once and retry with exponential backoff (the task
        keeps its state and finishes the job once the disk works again), and say when it recovers."""
        state = self._backoff.setdefault(name, [0, 0.0])
        now = self.reactor.seconds()
        if now < state[1]:
            return
        try:
            task()
        except (StoreError, StoreFull, OSError) as exc:
            state[0] += 1
            state[1] = now + min(BACKGROUND_MAX_BACKOFF_S, INDEX_FLUSH_S * 2 ** state[0])
            if state[0] == 1:
                log.error("%s failed: %s; retrying with backoff", name, exc)
            return
        if state[0]:
            log.info("%s works again after %d failed attempts", name, int(state[0]))
        state[0], state[1] = 0, 0.0

    def _listen(self, name: str, factory: Any, host: str, port: int, tls: bool = False,
                backlog: int = DEFAULT_BACKLOG) -> None:
        factory.noisy = False  # one "listening" line per listener is ours; no per-connection factory chatter
        listening = listen_tcp(self.reactor, port, factory, backlog=backlog, interface=host,
                               tls_options=self._tls_options(name) if tls else None)
        self._protocol_ports[name] = listening
        self.addresses[name] = format_address(listening)

    def _log_recovery(self, seconds: float) -> None:
        report = getattr(self.store, "recovery", None)
        if report is None:
            log.info("message store opened in %.2fs", seconds)
        elif report.clean:
            log.info("message store opened in %.2fs after a clean shutdown", seconds)
        else:
            log.warning(
                "message store recovered in %.2fs after an unclean shutdown: scanned %d bytes, truncated %d bytes "
                "(%d records), dropped %d corrupt bytes in %d ranges, rebuilt %d and trimmed %d index entries",
                seconds, report.scanned_bytes, report.truncated_bytes, report.dropped_records,
                report.dropped_bytes, len(report.dropped_ranges), report.rebuilt_index_entries,
                report.trimmed_index_entries)


async def _settled(deferred: Deferred[Any]) -> None:
    waiter: Deferred[None] = Deferred()

    def settle(result: Any) -> Any:
        waiter.callback(None)
        return result

    deferred.addBoth(settle)
    await waiter
