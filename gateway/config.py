"""The process configuration: typed sections with an embedded default, merged from four sources.

Precedence, lowest first: built-in defaults < TOML file < environment < command line.

* file: any subset of the schema, e.g. ``[storage]\\nflush = "async"`` or ``[listeners.native]\\nport = 0``.
* environment: ``TIDEGATE_<SECTION>__<KEY>``; nested sections take one ``__`` per level
  (``TIDEGATE_STORAGE__FLUSH=async``, ``TIDEGATE_LISTENERS__NATIVE__PORT=0``). ``TIDEGATE_CONFIG`` names the file
  when ``--config`` is not given. Other ``TIDEGATE_*`` names without ``__`` are left for other tools.
* command line: ``--set storage.flush=async`` (repeatable) and shortcuts built on it (see gateway/cli.py).

Unknown keys, wrong types and out-of-range values raise `ConfigError` naming the key and the source that set it.
Port 0 means "pick an ephemeral port"; the bound addresses are written to ``<data_dir>/listeners.json``.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, get_type_hints

from tidegate.gateway.tls import DEFAULT_CIPHERS, TLS_VERSIONS, VERIFY_MODES

CERTIFICATE_IDENTITIES = ("cn", "san_dns", "san_email", "san_uri")

ENV_PREFIX = "TIDEGATE_"
ENV_CONFIG_FILE = "TIDEGATE_CONFIG"
FLUSH_MODES = ("sync", "async")
GROUP_START_POSITIONS = ("earliest", "latest")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
# mallopt takes a C int: the largest process.malloc_* value
MAX_MALLOPT_BYTES = 2**31 - 1
_TRUE_WORDS = frozenset({"true", "yes", "on", "1"})
_FALSE_WORDS = frozenset({"false", "no", "off", "0"})


class ConfigError(Exception):
    """A configuration value that cannot be used; the message is one line naming the key and its source."""


@dataclass(slots=True, frozen=True)
class BrokerSection:
    data_dir: str = "./tidegate-data"
    auto_create_topics: bool = True
    default_queues: int = 4
    max_message_bytes: int = 4 * 1024 * 1024
    new_group_start: str = "latest"
    invisible_ms: int = 30_000
    max_attempts: int = 16
    # Recent messages kept decoded for delivery, bounded by bytes (core/reader.py); 0 turns the cache off.
    message_cache_bytes: int = 64 * 1024 * 1024


@dataclass(slots=True, frozen=True)
class StorageSection:
    flush: str = "sync"
    flush_interval_ms: int = 100
    # sync flush: run the fsync on the reactor thread when no other event waits (low rates: saves the thread
    # hand-off, ~0.1 ms per message); an inline fsync slower than inline_sync_stall_ms switches inlining off for
    # 1 s, doubling up to 64 s while they stay slow, so a slow disk cannot keep stalling the other connections
    # (core/flush.py).
    inline_sync_when_idle: bool = True
    inline_sync_stall_ms: float = 2.0
    segment_bytes: int = 128 * 1024 * 1024
    # > 0: commit-log pages further than this behind the durable end are dropped from the OS page cache after each
    # fsync (posix_fadvise DONTNEED; Linux/BSD), so a growing log reuses the pages it just released instead of
    # taking never-used ones (which cost 3-4x more kernel time per byte written on a VM whose host reclaims free
    # memory; docs/performance.md "Third pass"). Readers further behind than this (and than the message cache)
    # then read the disk. 0 (default) = leave the cache to the OS.
    log_page_cache_bytes: int = 0
    index_entries_per_file: int = 300_000
    retention_hours: int = 72  # 0 = no age limit
    retention_bytes: int = 0  # 0 = no size limit
    retention_check_s: int = 60
    # Encryption at rest (docs/security.md): a keyring file (mode 0600, `id:base64key` lines, the last is current)
    # or the name of an environment variable holding the same entries; both empty = records stored in clear.
    encryption_key_file: str = ""
    encryption_key_env: str = ""


# Accept backlog of every listener: a reconnect storm of thousands of clients must not overflow the kernel's
# queue of connections waiting for accept() (Twisted's default is 50). The default asks for the most there is: the
# kernel caps any request at net.core.somaxconn, and gateway/listeners.py asks for exactly that when it can read it.
DEFAULT_BACKLOG = 65535


@dataclass(slots=True, frozen=True)
class NativeListener:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 10911
    plain_enabled: bool = True  # false: no plain-TCP port, only tls_port (TLS-only listener)
    tls_enabled: bool = False
    tls_port: int = 10912
    backlog: int = DEFAULT_BACKLOG
    heartbeat_s: int = 30  # clients must send something this often; 3 silent intervals close (0 = never)
    max_credit: int = 10_000  # outstanding credit of one subscription; larger CREDIT/SUBSCRIBE asks are clamped


@dataclass(slots=True, frozen=True)
class AdminListener:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8080
    plain_enabled: bool = True  # false: HTTPS only (needs tls_enabled)
    tls_enabled: bool = False  # HTTPS on tls_port with the [tls] certificate
    tls_port: int = 8443
    # /metrics (served here): topics and consumer groups with a label of their own (the busiest first); the
    # rest are summed under "other", private ones under their %KIND%. Bounds the series a scrape returns.
    metrics_max_topic_labels: int = 100
    metrics_max_group_labels: int = 100


@dataclass(slots=True, frozen=True)
class MqttListener:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 1883
    plain_enabled: bool = True  # false: no plain-TCP port 1883 (ws_enabled switches plain WebSocket off)
    ws_enabled: bool = True
    ws_port: int = 8083
    ws_path: str = "/mqtt"
    tls_enabled: bool = False
    tls_port: int = 8883
    wss_enabled: bool = False
    wss_port: int = 8084
    backlog: int = DEFAULT_BACKLOG
    # MQTT limits, advertised in CONNACK (v5) and enforced for every version; see docs/mqtt.md. One key per field
    # of adapters/mqtt/settings.py MqttSettings (`_s` for seconds), which the gateway builds from this section.
    receive_maximum: int = 32
    max_packet_size: int = 1024 * 1024
    topic_alias_maximum: int = 16
    server_keep_alive: int = 0  # 0 = accept the client's keep alive (capped by max_keep_alive)
    max_keep_alive: int = 3600
    maximum_qos: int = 2
    retain_available: bool = True
    wildcard_subscription_available: bool = True
    shared_subscription_available: bool = True
    subscription_identifiers_available: bool = True
    session_expiry_max: int = 7 * 24 * 3600
    persistent_session_expiry: int = 7 * 24 * 3600
    max_inflight: int = 1024
    max_queued_messages: int = 10_000
    allow_empty_client_id: bool = True
    connect_timeout_s: int = 10  # a new connection has this long to send CONNECT
    sys_interval_s: int = 10
    max_delivery_attempts: int = 1_000_000  # deliveries of one message to a session before it is dead-lettered
    max_filters_per_subscribe: int = 256  # beyond: SUBACK 0x97 Quota exceeded (v5) / 0x80 (3.1.1) per filter
    max_subscriptions_per_session: int = 1024  # new filters beyond are refused the same way
    max_queued_retained_bytes: int = 8 * 1024 * 1024  # retained payload waiting for one connection; beyond: not sent
    max_outbound_topic_aliases: int = 256  # cap on the client's Topic Alias Maximum (topic names kept per connection)
    client_id_binding: str = "user"  # "user": a session's client id belongs to the user that created it; "none"
    max_sessions_per_user: int = 100_000  # beyond: CONNACK 0x97 (v5) / 3 (3.1.1); 0 = no limit
    ws_allowed_origins: str = ""  # comma-separated Origins allowed cross-origin over WebSocket ("*" = any)
    # the MQTT listener's value of the core limit `[limits.mqtt] max_topics_created_per_user` when that is unset
    # (-1): topics one user may have created (every protocol counts); beyond, a publish creating one gets 0x97
    max_topics_created_per_user: int = 10_000


@dataclass(slots=True, frozen=True)
class AmqpListener:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 5672
    plain_enabled: bool = True  # false: AMQPS only
    tls_enabled: bool = False
    tls_port: int = 5671
    # AMQP limits, offered in connection.tune; see docs/amqp.md
    frame_max: int = 131072
    channel_max: int = 2047
    heartbeat: int = 60
    max_message_bytes: int = 16 * 1024 * 1024  # a content header announcing more closes the channel (406)
    handshake_timeout_s: float = 10.0
    backlog: int = DEFAULT_BACKLOG


@dataclass(slots=True, frozen=True)
class ListenersSection:
    native: NativeListener = field(default_factory=NativeListener)
    admin: AdminListener = field(default_factory=AdminListener)
    mqtt: MqttListener = field(default_factory=MqttListener)
    amqp: AmqpListener = field(default_factory=AmqpListener)


@dataclass(slots=True, frozen=True)
class ConnectionsSection:
    """Limits every client connection of every protocol gets (adapters/base.py)."""

    # Bytes that may wait for a client whose socket does not drain before the connection is closed (MQTT 5 hears
    # DISCONNECT 0x97, native an ERROR). Delivery already stops while a socket is paused; this bounds replies.
    output_budget_bytes: int = 8 * 1024 * 1024
    # Bytes a client may send while its login is being decided (pipelined behind CONNECT/HELLO) before it is cut.
    login_hold_bytes: int = 1024 * 1024


@dataclass(slots=True, frozen=True)
class AlarmsSection:
    """Resource alarms (core/alarms.py): while one is raised, publishers are blocked (AMQP connection.blocked)."""

    check_interval_s: float = 1.0
    # Resident memory of the process at which publishers are blocked; 0 = 40 % of physical memory (RabbitMQ's
    # vm_memory_high_watermark 0.4), -1 = off.
    memory_high_watermark_bytes: int = 0
    # Free space on the data directory's file system below which publishers are blocked (RabbitMQ's
    # disk_free_limit, 50 MB by default); 0 = off. A full disk or a failed fsync blocks them regardless.
    disk_free_limit_bytes: int = 50_000_000


@dataclass(slots=True, frozen=True)
class TlsSection:
    """Certificates and rules of every TLS listener (gateway/tls.py; docs/security.md)."""

    cert_file: str = ""  # PEM: the server certificate first, then its intermediates (the whole chain is sent)
    key_file: str = ""  # PEM private key of cert_file
    ca_file: str = ""  # PEM bundle of the CAs that sign client certificates; set it to ask for them (mTLS)
    # With ca_file: "required" (no verified certificate, no handshake), "optional" (clients without one may log in
    # with a password), "none" (do not ask). Without ca_file only "required" (the default, unused) or "none".
    verify: str = "required"
    min_version: str = "1.2"  # "1.2" or "1.3"
    ciphers: str = DEFAULT_CIPHERS  # TLS 1.2 cipher list (OpenSSL syntax); default: ECDHE with AEAD only
    # Which part of a verified client certificate names the user: "cn" (subject common name), "san_dns",
    # "san_email" or "san_uri" (the first subject alternative name of that kind). The user must exist and be
    # enabled; clients with a certificate and no user name log in as it (MQTT, native, AMQP SASL EXTERNAL).
    identity: str = "cn"


ANONYMOUS_POLICIES = ("loopback", "true", "false")


@dataclass(slots=True, frozen=True)
class SecuritySection:
    """The gate (core/security): who may connect anonymously and how failed logins are slowed down."""

    # "loopback": anonymous clients only from 127.0.0.0/8 and ::1 (as the user `anonymous`); "true": from anywhere
    # (logged as a warning at start); "false": never. TOML may write true/false unquoted.
    allow_anonymous: str = "loopback"
    # Each failed login from a source address doubles the wait before that source's next answer, from
    # login_delay_ms up to login_delay_max_ms; at most login_delay_sources addresses are remembered.
    login_delay_ms: int = 200
    login_delay_max_ms: int = 10_000
    login_delay_sources: int = 10_000
    # Host names (comma-separated) the admin HTTP API answers to besides IP literals and localhost (against DNS
    # rebinding, any other Host header is refused).
    admin_hosts: str = ""
    # JWT bearer tokens as the password (core/security/tokens.py): HS256 with the secret in jwt_secret_file (at least
    # 32 bytes, mode 0600), RS256/ES256 with the public keys of jwt_jwks_file; off when both are empty. aud/iss are
    # checked when set; exp is required; jwt_leeway_s of clock skew is forgiven; the claim jwt_username_claim names
    # the user (who must exist and be enabled).
    jwt_secret_file: str = ""
    jwt_jwks_file: str = ""
    jwt_audience: str = ""
    jwt_issuer: str = ""
    jwt_username_claim: str = "sub"
    jwt_leeway_s: int = 30
    # A bearer token (at least 16 characters, file mode 0600) that GET /metrics then requires; empty: /metrics is
    # open to whoever reaches the admin port (bound to 127.0.0.1 by default). /healthz and /readyz stay open.
    metrics_token_file: str = ""


@dataclass(slots=True, frozen=True)
class AuditSection:
    """The audit log (core/security/audit.py): JSON lines, rotated by size; off while `file` is empty."""

    file: str = ""
    max_bytes: int = 50 * 1024 * 1024
    backup_count: int = 5


@dataclass(slots=True, frozen=True)
class ListenerLimits:
    """One listener's own limits (`[limits.mqtt]`, ...); -1 = as in `[limits]`. Publish rates are per user over
    every protocol, so they are set in `[limits]` (and per user) only."""

    max_message_bytes: int = -1
    max_property_bytes: int = -1
    max_connections_per_user: int = -1
    max_connections_per_source: int = -1
    connection_rate_per_source: int = -1
    connection_burst_per_source: int = -1
    max_subscriptions_per_session: int = -1
    # -1 = as [limits]; for mqtt, -1 = `[listeners.mqtt] max_topics_created_per_user` (10,000 by default)
    max_topics_created_per_user: int = -1


@dataclass(slots=True, frozen=True)
class LimitsSection:
    """Limits against abuse (core/security/limits.py); 0 = unlimited, and every default is 0. Per-user values
    override these (`tidegate user limits NAME ...`); see docs/security.md, "Limits"."""

    max_message_bytes: int = 0  # body bytes of one message (broker.max_message_bytes still applies)
    max_property_bytes: int = 0  # key + value bytes of one message's properties (64 KiB in the core regardless)
    max_connections_per_user: int = 0  # over every listener
    max_connections_per_source: int = 0  # per client IP address, per listener
    connection_rate_per_source: int = 0  # new connections per second per IP address
    connection_burst_per_source: int = 0  # 0 = the rate
    publish_rate: int = 0  # messages per second per user, shared by all their connections in every protocol
    publish_burst: int = 0  # 0 = the rate
    publish_bytes_rate: int = 0  # body bytes per second per user
    publish_bytes_burst: int = 0  # 0 = the rate
    max_subscriptions_per_session: int = 0  # bound filters and consumers of one connection
    max_topics_created_per_user: int = 0  # topics one user's actions created that still exist, every protocol
    max_tracked_sources: int = 100_000  # addresses remembered for the per-source limits (oldest forgotten)
    max_tracked_users: int = 100_000
    native: ListenerLimits = field(default_factory=ListenerLimits)
    mqtt: ListenerLimits = field(default_factory=ListenerLimits)
    amqp: ListenerLimits = field(default_factory=ListenerLimits)


@dataclass(slots=True, frozen=True)
class LogSection:
    level: str = "info"


@dataclass(slots=True, frozen=True)
class ProcessSection:
    """Interpreter settings `tidegate serve` applies to its own process (gateway/app.py `tune_garbage_collector`)."""

    # CPython's cyclic garbage collector: with 10,000 live connections every full collection walks all of their
    # objects, and a connection storm allocates fast enough to trigger many. A higher first-generation threshold
    # makes collections rarer; 0 keeps Python's default (700). `gc_freeze` moves everything alive after start-up
    # (modules, config, recovered state) out of the collector's reach for good.
    gc_threshold: int = 50_000
    gc_freeze: bool = True
    # glibc malloc (gateway/memory_tuning.py; Linux with glibc only, ignored elsewhere; 0 keeps glibc's dynamic
    # default): keep up to malloc_trim_threshold_bytes of freed heap instead of handing it back to the kernel and
    # faulting it in again for the next large message, grow the heap malloc_top_pad_bytes at a time, and serve
    # buffers below malloc_mmap_threshold_bytes (socket reads, payloads up to the largest message) from the heap.
    malloc_trim_threshold_bytes: int = 64 * 1024 * 1024
    malloc_top_pad_bytes: int = 16 * 1024 * 1024
    malloc_mmap_threshold_bytes: int = 8 * 1024 * 1024


@dataclass(slots=True, frozen=True)
class Config:
    broker: BrokerSection = field(default_factory=BrokerSection)
    storage: StorageSection = field(default_factory=StorageSection)
    listeners: ListenersSection = field(default_factory=ListenersSection)
    connections: ConnectionsSection = field(default_factory=ConnectionsSection)
    alarms: AlarmsSection = field(default_factory=AlarmsSection)
    tls: TlsSection = field(default_factory=TlsSection)
    security: SecuritySection = field(default_factory=SecuritySection)
    limits: LimitsSection = field(default_factory=LimitsSection)
    audit: AuditSection = field(default_factory=AuditSection)
    log: LogSection = field(default_factory=LogSection)
    process: ProcessSection = field(default_factory=ProcessSection)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True, frozen=True)
class Source:
    """Where a value came from: `kind` is default, file, env or cli; `detail` names the file, variable or option."""

    kind: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.kind} {self.detail}" if self.detail else self.kind


DEFAULT_SOURCE = Source("default")


@dataclass(slots=True, frozen=True)
class CliOverride:
    """One `key=value` given on the command line; `option` is how the user spelled it, for error messages."""

    key: str
    value: str
    option: str


@dataclass(slots=True, frozen=True)
class LoadedConfig:
    config: Config
    sources: dict[str, Source]  # dotted key -> where its effective value came from
    config_file: Path | None


def _walk_schema(cls: type, prefix: str = "") -> Iterator[tuple[str, type]]:
    """Yield (dotted key, type) for every leaf and every section (sections yield their dataclass type)."""
    hints = get_type_hints(cls)
    for f in fields(cls):
        key = prefix + f.name
        kind = hints[f.name]
        yield key, kind
        if is_dataclass(kind):
            yield from _walk_schema(kind, key + ".")


_SCHEMA: dict[str, type] = dict(_walk_schema(Config))
LEAF_KEYS: dict[str, type] = {k: t for k, t in _SCHEMA.items() if not is_dataclass(t)}
SECTION_KEYS: frozenset[str] = frozenset(k for k, t in _SCHEMA.items() if is_dataclass(t))


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value}"
    if isinstance(value, str):
        return f"string {json.dumps(value)}"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


def _coerce(key: str, raw: Any, kind: type, source: Source) -> Any:
    """Check (TOML) or parse (env/cli text) one value against the schema type of `key`."""
    from_text = source.kind in ("env", "cli")
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        if from_text and isinstance(raw, str):
            word = raw.strip().lower()
            if word in _TRUE_WORDS:
                return True
            if word in _FALSE_WORDS:
                return False
        raise ConfigError(f"{key} must be true or false, got {_describe(raw)} (from {source})")
    if kind is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if from_text and isinstance(raw, str):
            try:
                return int(raw.strip())
            except ValueError:
                pass
        raise ConfigError(f"{key} must be an integer, got {_describe(raw)} (from {source})")
    if kind is float:
        value: float | None = None
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            value = float(raw)
        elif from_text and isinstance(raw, str):
            try:
                value = float(raw.strip())
            except ValueError:
                pass
        if value is not None and math.isfinite(value):  # nan and inf would silently switch timers off
            return value
        raise ConfigError(f"{key} must be a number, got {_describe(raw)} (from {source})")
    if kind is str:
        if key == "security.allow_anonymous" and isinstance(raw, bool):
            return "true" if raw else "false"  # the one key that is a word or a boolean
        if isinstance(raw, str):
            return raw
        raise ConfigError(f"{key} must be a string, got {_describe(raw)} (from {source})")
    raise TypeError(f"config key {key} has unsupported type {kind!r}")


def _unknown_key(key: str, source: Source) -> ConfigError:
    section = key.rsplit(".", 1)[0] if "." in key else ""
    if section in SECTION_KEYS:
        known = sorted(k.rsplit(".", 1)[1] for k in _SCHEMA if k.startswith(section + ".") and k.count(".") ==
                       section.count(".") + 1)
        return ConfigError(f"unknown key {key} (from {source}); [{section}] has: {', '.join(known)}")
    top = sorted(k for k in _SCHEMA if "." not in k)
    return ConfigError(f"unknown key {key} (from {source}); sections are: {', '.join(top)}")


class _Merger:
    """Accumulates values by dotted key, remembering the source of each."""

    def __init__(self) -> None:
        defaults = Config()
        self.values: dict[str, Any] = {}
        self.sources: dict[str, Source] = {}
        for key in LEAF_KEYS:
            value: Any = defaults
            for part in key.split("."):
                value = getattr(value, part)
            self.values[key] = value
            self.sources[key] = DEFAULT_SOURCE

    def set(self, key: str, raw: Any, source: Source) -> None:
        kind = LEAF_KEYS.get(key)
        if kind is None:
            if key in SECTION_KEYS:
                raise ConfigError(f"{key} is a section, not a value (from {source}); set one of its keys")
            raise _unknown_key(key, source)
        self.values[key] = _coerce(key, raw, kind, source)
        self.sources[key] = source

    def merge_table(self, table: Mapping[str, Any], source: Source, prefix: str = "") -> None:
        for name, raw in table.items():
            key = prefix + name
            if key in SECTION_KEYS:
                if not isinstance(raw, dict):
                    raise ConfigError(f"{key} must be a table, got {_describe(raw)} (from {source})")
                self.merge_table(raw, source, key + ".")
            elif isinstance(raw, dict):
                known = ", ".join(sorted(SECTION_KEYS))
                raise ConfigError(f"unknown section [{key}] (from {source}); sections are: {known}")
            else:
                self.set(key, raw, source)

    def build(self, cls: type = Config, prefix: str = "") -> Any:
        hints = get_type_hints(cls)
        kwargs = {}
        for f in fields(cls):
            kind = hints[f.name]
            key = prefix + f.name
            kwargs[f.name] = self.build(kind, key + ".") if is_dataclass(kind) else self.values[key]
        return cls(**kwargs)


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory") from None
    except PermissionError:
        raise ConfigError(f"config file {path} is not readable (permission denied)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def env_overrides(environ: Mapping[str, str]) -> list[tuple[str, str, Source]]:
    """(dotted key, text, source) for every `TIDEGATE_<SECTION>__<KEY>` variable, sorted by variable name."""
    out = []
    top_sections = sorted(k for k in SECTION_KEYS if "." not in k)
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name == ENV_CONFIG_FILE:
            continue
        rest = name[len(ENV_PREFIX):]
        source = Source("env", name)
        if "__" not in rest:
            # Not ours unless it looks like a config key missing the double underscore: catch that typo.
            for section in top_sections:
                if rest.lower().startswith(section + "_"):
                    raise ConfigError(f"unknown setting {name} (from env); nested keys are separated by a double "
                                      f"underscore, e.g. TIDEGATE_STORAGE__FLUSH")
            continue
        key = ".".join(part.lower() for part in rest.split("__"))
        out.append((key, environ[name], source))
    return out


def _check_choice(values: dict[str, Any], sources: dict[str, Source], key: str, choices: Sequence[str]) -> None:
    value = values[key]
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {json.dumps(value)} (from {sources[key]})")


def _check_min(values: dict[str, Any], sources: dict[str, Source], key: str, minimum: int) -> None:
    if values[key] < minimum:
        raise ConfigError(f"{key} must be at least {minimum}, got {values[key]} (from {sources[key]})")


def _validate(merger: _Merger) -> None:
    values, sources = merger.values, merger.sources
    # Case of words like "ASYNC" or "INFO" is not meaningful to users; normalise before checking.
    for key in ("storage.flush", "broker.new_group_start", "log.level"):
        values[key] = values[key].strip().lower()
    _check_choice(values, sources, "storage.flush", FLUSH_MODES)
    _check_choice(values, sources, "broker.new_group_start", GROUP_START_POSITIONS)
    _check_choice(values, sources, "log.level", LOG_LEVELS)
    if not values["broker.data_dir"].strip():
        raise ConfigError(f"broker.data_dir must not be empty (from {sources['broker.data_dir']})")
    for key, minimum in (
        ("broker.default_queues", 1),
        ("broker.max_message_bytes", 1),
        ("broker.invisible_ms", 1),
        ("broker.max_attempts", 1),
        ("storage.flush_interval_ms", 1),
        ("storage.inline_sync_stall_ms", 0),
        ("storage.segment_bytes", 4096),
        ("storage.index_entries_per_file", 1),
        ("storage.retention_hours", 0),
        ("storage.retention_bytes", 0),
        ("storage.retention_check_s", 1),
        ("storage.log_page_cache_bytes", 0),
    ):
        _check_min(values, sources, key, minimum)
    if values["broker.max_message_bytes"] >= values["storage.segment_bytes"]:
        # A record never spans segments, so the largest message must fit in one with room for its header.
        raise ConfigError(
            f"broker.max_message_bytes ({values['broker.max_message_bytes']}, from "
            f"{sources['broker.max_message_bytes']}) must be smaller than storage.segment_bytes "
            f"({values['storage.segment_bytes']}, from {sources['storage.segment_bytes']})")
    for key, low in (("broker.message_cache_bytes", 0), ("listeners.native.max_credit", 1),
                     ("listeners.native.heartbeat_s", 0)):
        if values[key] < low:
            raise ConfigError(f"{key} must be at least {low}, got {values[key]} (from {sources[key]})")
    if values["process.gc_threshold"] < 0:
        raise ConfigError(f"process.gc_threshold must be 0 (Python's default) or more, got "
                          f"{values['process.gc_threshold']} (from {sources['process.gc_threshold']})")
    for key in ("process.malloc_trim_threshold_bytes", "process.malloc_top_pad_bytes",
                "process.malloc_mmap_threshold_bytes"):
        if not 0 <= values[key] <= MAX_MALLOPT_BYTES:
            raise ConfigError(f"{key} must be 0 (glibc's default) to {MAX_MALLOPT_BYTES}, got {values[key]} "
                              f"(from {sources[key]})")
    if values["alarms.check_interval_s"] <= 0:
        raise ConfigError(f"alarms.check_interval_s must be above 0, got {values['alarms.check_interval_s']} "
                          f"(from {sources['alarms.check_interval_s']})")
    for key in ("connections.output_budget_bytes", "connections.login_hold_bytes"):
        if values[key] < 4096:
            raise ConfigError(f"{key} must be at least 4096 bytes, got {values[key]} (from {sources[key]})")
    for key in (k for k in LEAF_KEYS if k.startswith("listeners.") and k.endswith(".backlog")):
        if not 1 <= values[key] <= 65535:
            raise ConfigError(f"{key} must be 1-65535, got {values[key]} (from {sources[key]})")
    port_keys = [k for k in LEAF_KEYS if k.startswith("listeners.") and k.endswith("port")]
    for key in port_keys:
        if not 0 <= values[key] <= 65535:
            raise ConfigError(f"{key} must be a port number 0-65535, got {values[key]} (from {sources[key]})")
    for key in (k for k in LEAF_KEYS if k.startswith("listeners.") and k.endswith(".host")):
        if not values[key].strip():
            raise ConfigError(f"{key} must not be empty (from {sources[key]})")
    _validate_tls(values, sources)
    _validate_distinct_ports(values, sources)
    _validate_security(values, sources)
    _validate_limits(values, sources)


def _validate_limits(values: dict[str, Any], sources: dict[str, Source]) -> None:
    for key in ("listeners.admin.metrics_max_topic_labels", "listeners.admin.metrics_max_group_labels"):
        if not 0 <= values[key] <= 100_000:
            raise ConfigError(f"{key} must be 0-100000, got {values[key]} (from {sources[key]})")
    for key in (k for k in LEAF_KEYS if k.startswith("limits.")):
        low = -1 if key.count(".") == 2 else 0  # a listener's -1 means "as [limits]"
        if values[key] < low:
            raise ConfigError(f"{key} must be at least {low}, got {values[key]} (from {sources[key]})")
    for key in ("limits.max_tracked_sources", "limits.max_tracked_users"):
        if values[key] < 1:
            raise ConfigError(f"{key} must be at least 1, got {values[key]} (from {sources[key]})")


def _validate_security(values: dict[str, Any], sources: dict[str, Source]) -> None:
    key = "security.allow_anonymous"
    word = values[key].strip().lower()
    word = "true" if word in _TRUE_WORDS else "false" if word in _FALSE_WORDS else word
    if word not in ANONYMOUS_POLICIES:
        raise ConfigError(f"{key} must be \"loopback\", true or false, got {values[key]!r} (from {sources[key]})")
    values[key] = word
    for delay in ("security.login_delay_ms", "security.login_delay_max_ms"):
        if not 0 <= values[delay] <= 600_000:
            raise ConfigError(f"{delay} must be 0-600000, got {values[delay]} (from {sources[delay]})")
    key = "security.login_delay_sources"
    if not 1 <= values[key] <= 10_000_000:
        raise ConfigError(f"{key} must be 1-10000000, got {values[key]} (from {sources[key]})")
    key = "security.jwt_leeway_s"
    if not 0 <= values[key] <= 3600:
        raise ConfigError(f"{key} must be 0-3600, got {values[key]} (from {sources[key]})")
    key = "security.jwt_username_claim"
    if not values[key].strip():
        raise ConfigError(f"{key} must not be empty (from {sources[key]})")
    for key, low in (("audit.max_bytes", 4096), ("audit.backup_count", 0)):
        if values[key] < low:
            raise ConfigError(f"{key} must be at least {low}, got {values[key]} (from {sources[key]})")


def _validate_tls(values: dict[str, Any], sources: dict[str, Source]) -> None:
    cert, key = values["tls.cert_file"], values["tls.key_file"]
    if bool(cert) != bool(key):
        given, missing = ("tls.cert_file", "tls.key_file") if cert else ("tls.key_file", "tls.cert_file")
        raise ConfigError(f"{given} is set (from {sources[given]}) but {missing} is empty; set both or neither")
    flags = [k for k in LEAF_KEYS if k.startswith("listeners.") and k.endswith((".tls_enabled", ".wss_enabled"))]
    for flag in flags:
        section = flag.rsplit(".", 1)[0]
        if values[section + ".enabled"] and values[flag] and not cert:
            raise ConfigError(f"{flag} is true (from {sources[flag]}) but tls.cert_file and tls.key_file are empty")
    for key, choices in (("tls.verify", VERIFY_MODES), ("tls.min_version", tuple(TLS_VERSIONS)),
                         ("tls.identity", CERTIFICATE_IDENTITIES)):
        values[key] = values[key].strip().lower()
        _check_choice(values, sources, key, choices)
    if values["tls.verify"] == "optional" and not values["tls.ca_file"]:
        raise ConfigError(f"tls.verify is \"optional\" (from {sources['tls.verify']}) but tls.ca_file is empty: "
                          "client certificates need the CA bundle that signs them")
    if not values["tls.ciphers"].strip():
        raise ConfigError(f"tls.ciphers must not be empty (from {sources['tls.ciphers']})")
    for key in (k for k in LEAF_KEYS if k.startswith("listeners.") and k.endswith(".plain_enabled")):
        section = key.rsplit(".", 1)[0]
        if values[section + ".enabled"] and not values[key] and not any(
                values.get(f"{section}.{variant}_enabled") for variant in ("tls", "ws", "wss")):
            raise ConfigError(f"{key} is false (from {sources[key]}) and {section} has no other port enabled; "
                              f"set {section}.enabled = false to switch it off")


def enabled_ports(values: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(port key, host key) of every port a config with these values would bind."""
    out = []
    for name in ("native", "admin", "mqtt", "amqp"):
        section = f"listeners.{name}"
        if not values[f"{section}.enabled"]:
            continue
        if values.get(f"{section}.plain_enabled", True):
            out.append((f"{section}.port", f"{section}.host"))
        for variant in ("ws", "tls", "wss"):
            if values.get(f"{section}.{variant}_enabled"):
                out.append((f"{section}.{variant}_port", f"{section}.host"))
    return out


def _validate_distinct_ports(values: dict[str, Any], sources: dict[str, Source]) -> None:
    seen: dict[tuple[str, int], str] = {}
    for port_key, host_key in enabled_ports(values):
        port = values[port_key]
        if port == 0:
            continue
        where = (values[host_key], port)
        if where in seen:
            raise ConfigError(f"{port_key} {port} (from {sources[port_key]}) is also used by {seen[where]}")
        seen[where] = port_key


def load_config(
    config_file: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Sequence[CliOverride] = (),
) -> LoadedConfig:
    """Merge defaults < `config_file` < `environ` < `overrides` and validate the result.

    `environ` defaults to no environment (callers pass `os.environ` explicitly) so that library use and tests
    never pick up a stray variable. `TIDEGATE_CONFIG` in `environ` names the file when `config_file` is None.
    """
    environ = environ or {}
    merger = _Merger()
    path: Path | None = None
    if config_file is None and environ.get(ENV_CONFIG_FILE):
        config_file = environ[ENV_CONFIG_FILE]
    if config_file is not None:
        path = Path(config_file)
        merger.merge_table(read_config_file(path), Source("file", str(path)))
    for key, text, source in env_overrides(environ):
        merger.set(key, text, source)
    for override in overrides:
        merger.set(override.key, override.value, Source("cli", override.option))
    _validate(merger)
    return LoadedConfig(config=merger.build(), sources=dict(merger.sources), config_file=path)


def parse_set_option(text: str) -> CliOverride:
    """Parse the argument of `--set key=value`."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value, e.g. --set storage.flush=async; got {json.dumps(text)}")
    return CliOverride(key.strip(), value, f"--set {text}")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    # JSON string escapes (\" \\ \n \uXXXX) are all valid in TOML basic strings.
    return json.dumps(value)


def render_toml(loaded: LoadedConfig, with_sources: bool = True) -> str:
    """The effective config as TOML that `tomllib` reads back, each value commented with its source."""
    lines: list[str] = []

    def emit(section_cls: Any, section_value: Any, prefix: str) -> None:
        leaves = [f for f in fields(section_cls) if not is_dataclass(getattr(section_value, f.name))]
        subsections = [f for f in fields(section_cls) if is_dataclass(getattr(section_value, f.name))]
        if leaves:
            if lines:
                lines.append("")
            lines.append(f"[{prefix}]")
            width = max(len(f.name) for f in leaves)
            for f in leaves:
                key = f"{prefix}.{f.name}"
                text = f"{f.name.ljust(width)} = {_toml_value(getattr(section_value, f.name))}"
                if with_sources:
                    text = f"{text}  # {loaded.sources[key]}"
                lines.append(text)
        for f in subsections:
            value = getattr(section_value, f.name)
            emit(type(value), value, f"{prefix}.{f.name}")

    for f in fields(Config):
        value = getattr(loaded.config, f.name)
        emit(type(value), value, f.name)
    return "\n".join(lines) + "\n"


def render_json(loaded: LoadedConfig, with_sources: bool = False) -> str:
    if with_sources:
        payload: dict[str, Any] = {
            "config": loaded.config.to_dict(),
            "sources": {key: str(source) for key, source in sorted(loaded.sources.items())},
        }
    else:
        payload = loaded.config.to_dict()
    return json.dumps(payload, indent=2, sort_keys=False) + "\n"
