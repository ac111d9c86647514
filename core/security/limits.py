"""Limits against abuse: sizes, connection counts and rates, publish rate and bandwidth, subscriptions.

Pure bookkeeping with an injected clock (`clock.seconds()`), shared by every listener of the process:

- per source address: concurrent connections and a connection-rate token bucket, checked when a TCP connection is
  made (`admit_source`, adapters/base.py), answered when the client first speaks (CONNECT, HELLO, start-ok);
- per user: concurrent connections (`admit_user`, once the gate has named the principal) and two token buckets,
  messages per second and bytes per second, shared by all of that user's connections in every protocol;
- per connection (`SessionQuota`, held by the CoreSession): message and property size, the user's buckets, and
  the number of subscriptions;
- per user, over every protocol: the topics the user's actions created (auto-created by a publish or subscribe,
  created or declared explicitly, AMQP queues), `max_topics_created_per_user`. Who created which topic is kept
  in the metadata store (`TOPIC_CREATORS_NAMESPACE`), so a restart does not reset the count; topics deleted since
  are not counted (checked when the limit is reached).

Settings come from the `[limits]` config section (process defaults), `[limits.<listener>]` (a listener's own
values, -1 = as `[limits]`) and per-user overrides stored in the metadata store (`set_user_limits`); 0 means
unlimited everywhere, and the defaults are all 0, so ordinary use changes nothing. Overrides apply to live
connections: sessions re-read their settings when `version` moves.

Tables are bounded: sources and idle users beyond `max_tracked_sources` / `max_tracked_users` are forgotten oldest
first (a forgotten source or user starts again with a full bucket, never with a refusal).

Refusals raise `QuotaExceeded` with a `cause` from `CAUSES` (the bounded label set of
`tidegate_security_limit_hits_total{listener,cause}`); each is counted once in `CoreMetrics.security` and reported
to the audit log (`AuditLog.limit_hit`, one line per listener and cause per interval with a repeat count).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Protocol

from tidegate.core.errors import BadRequest, QuotaExceeded
from tidegate.core.metrics import CoreMetrics
from tidegate.core.model import Message
from tidegate.core.security.audit import AuditLog

# The causes a limit hit is counted under (metric label values: a fixed set, never client data).
MESSAGE_SIZE = "message_size"
PROPERTY_SIZE = "property_size"
CONNECTIONS_PER_USER = "connections_per_user"
CONNECTIONS_PER_SOURCE = "connections_per_source"
CONNECTION_RATE = "connection_rate"
PUBLISH_RATE = "publish_rate"
PUBLISH_BANDWIDTH = "publish_bandwidth"
SUBSCRIPTIONS = "subscriptions"
NO_SUBSCRIPTIONS: frozenset[Any] = frozenset()
SCHEMA = "schema"
TOPICS_CREATED = "topics_created"
SESSIONS_PER_USER = "sessions_per_user"  # MQTT's max_sessions_per_user (counted by the adapter)
CAUSES = (MESSAGE_SIZE, PROPERTY_SIZE, CONNECTIONS_PER_USER, CONNECTIONS_PER_SOURCE, CONNECTION_RATE, PUBLISH_RATE,
          PUBLISH_BANDWIDTH, SUBSCRIPTIONS, SCHEMA, TOPICS_CREATED)

USER_LIMITS_NAMESPACE = "security.limits"  # metadata key/value rows: user name -> {field: value}
TOPIC_CREATORS_NAMESPACE = "security.topic_creators"  # metadata key/value rows: topic name -> the user who made it
DEFAULT_MAX_TRACKED = 100_000
CREATION_GRACE_S = 10.0  # a topic admitted this recently counts even if it does not exist yet (batched publish)


class Clock(Protocol):
    def seconds(self) -> float: ...


class KeyValue(Protocol):
    """One namespace of the metadata store (core/adapter_state.MetadataNamespace)."""

    def items(self) -> list[tuple[str, Any]]: ...

    def put(self, key: str, value: Any) -> None: ...

    def delete(self, key: str) -> None: ...


@dataclass(frozen=True, slots=True)
class LimitSettings:
    """One set of limits; 0 = unlimited. Rates are per second, bursts default to one second's worth."""

    max_message_bytes: int = 0  # body bytes of one message (below the broker's own max_message_bytes)
    max_property_bytes: int = 0  # key + value bytes of one message's properties (below the core's 64 KiB)
    max_connections_per_user: int = 0
    max_connections_per_source: int = 0
    connection_rate_per_source: int = 0  # new connections per second from one address
    connection_burst_per_source: int = 0
    publish_rate: int = 0  # messages per second, per user, over all their connections
    publish_burst: int = 0
    publish_bytes_rate: int = 0  # body + property bytes per second, per user
    publish_bytes_burst: int = 0
    max_subscriptions_per_session: int = 0
    max_topics_created_per_user: int = 0  # topics one user may have created (that still exist), every protocol

    def merged(self, overrides: Mapping[str, int]) -> LimitSettings:
        """These settings with `overrides` (a listener's or a user's) applied; negative values mean 'inherit'."""
        changes = {k: int(v) for k, v in overrides.items() if v is not None and int(v) >= 0}
        return replace(self, **changes) if changes else self

    @property
    def any(self) -> bool:
        return any(getattr(self, f.name) for f in fields(self))


SETTING_NAMES = tuple(f.name for f in fields(LimitSettings))
# What a per-user override may set: everything that makes sense for one principal (not per-source limits).
USER_SETTING_NAMES = tuple(n for n in SETTING_NAMES if "source" not in n)


class TokenBucket:
    """`rate` tokens per second up to `burst`. `try_take` refuses when the bucket is short; `take` always takes
    and may leave a debt (throttling callers wait `wait()` seconds before taking more)."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = float(rate)
        self.burst = float(max(burst, 1.0))
        self.tokens = self.burst
        self.stamp = now

    def _refill(self, now: float) -> None:
        elapsed = now - self.stamp
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        self.stamp = now

    def try_take(self, amount: float, now: float) -> bool:
        """Take `amount` if the bucket holds it (or, for an amount above the burst, if the bucket is full)."""
        self._refill(now)
        if self.tokens >= min(amount, self.burst):
            self.tokens -= amount
            return True
        return False

    def take(self, amount: float, now: float) -> float:
        """Take `amount` even into debt; the seconds until the bucket is out of debt again."""
        self._refill(now)
        self.tokens -= amount
        return self.wait(now)

    def give_back(self, amount: float) -> None:
        self.tokens = min(self.burst, self.tokens + amount)

    def wait(self, now: float) -> float:
        self._refill(now)
        return -self.tokens / self.rate if self.tokens < 0 else 0.0

    def retune(self, rate: float, burst: float) -> None:
        self.rate = float(rate)
        self.burst = float(max(burst, 1.0))
        self.tokens = min(self.tokens, self.burst)


def _bucket(rate: int, burst: int, now: float, current: TokenBucket | None) -> TokenBucket | None:
    if rate <= 0:
        return None
    burst = burst if burst > 0 else rate
    if current is None:
        return TokenBucket(rate, burst, now)
    if current.rate != rate or current.burst != max(burst, 1):
        current.retune(rate, burst)
    return current


class _Source:
    __slots__ = ("connections", "bucket")

    def __init__(self) -> None:
        self.connections = 0
        self.bucket: TokenBucket | None = None


class UserState:
    """What all connections of one user share: how many there are and the publish buckets."""

    __slots__ = ("name", "connections", "messages", "bytes", "tuned")

    def __init__(self, name: str) -> None:
        self.name = name
        self.connections = 0
        self.messages: TokenBucket | None = None
        self.bytes: TokenBucket | None = None
        self.tuned: LimitSettings | None = None  # the settings the buckets were built for

    def tune(self, settings: LimitSettings, now: float) -> None:
        if settings is self.tuned:
            return
        self.messages = _bucket(settings.publish_rate, settings.publish_burst, now, self.messages)
        self.bytes = _bucket(settings.publish_bytes_rate, settings.publish_bytes_burst, now, self.bytes)
        self.tuned = settings


class SourceTicket:
    """One admitted connection from a source address; `Limiter.release_source` gives the slot back."""

    __slots__ = ("source", "released")

    def __init__(self, source: str) -> None:
        self.source = source
        self.released = False


class UserTicket:
    __slots__ = ("user", "released")

    def __init__(self, user: UserState) -> None:
        self.user = user
        self.released = False


class Limiter:
    """The process-wide limit tables. `settings` are the `[limits]` defaults, `listeners` per-listener overrides,
    `overrides` the metadata namespace holding per-user overrides (None: in memory only)."""

    def __init__(self, settings: LimitSettings, clock: Clock, *,
                 listeners: Mapping[str, Mapping[str, int]] | None = None, overrides: KeyValue | None = None,
                 metrics: CoreMetrics | None = None, max_tracked_sources: int = DEFAULT_MAX_TRACKED,
                 max_tracked_users: int = DEFAULT_MAX_TRACKED, audit: AuditLog | None = None,
                 creators: KeyValue | None = None) -> None:
        self.settings = settings
        self.clock = clock
        self.metrics = metrics
        self.audit = audit  # limit refusals are audited (rate-limited per listener and cause)
        self.max_tracked_sources = max_tracked_sources
        self.max_tracked_users = max_tracked_users
        self._listeners = {name: settings.merged(values) for name, values in (listeners or {}).items()}
        self._store = overrides
        self._user_overrides: dict[str, dict[str, int]] = {}
        if overrides is not None:
            for name, values in overrides.items():
                if isinstance(values, dict):
                    self._user_overrides[name] = {k: int(v) for k, v in values.items() if k in USER_SETTING_NAMES}
        self._effective: dict[tuple[str, str], LimitSettings] = {}
        # user -> topics its actions created (that may still exist), persisted in `creators` (topic -> user)
        self._creators_store = creators
        # (topic -> when it was admitted; 0 for those loaded at start)
        self._created: dict[str, dict[str, float]] = {}
        if creators is not None:
            for topic, user in creators.items():
                if isinstance(user, str):
                    self._created.setdefault(user, {})[topic] = 0.0
        self._sources: OrderedDict[str, _Source] = OrderedDict()
        self._users: OrderedDict[str, UserState] = OrderedDict()
        self.version = 0  # moves when per-user overrides change: sessions re-read their settings

    # ------------------------------------------------------------------ settings
    def for_listener(self, listener: str) -> LimitSettings:
        return self._listeners.get(listener, self.settings)

    def effective(self, listener: str, user: str) -> LimitSettings:
        """The listener's settings with the user's overrides (cached until the overrides change)."""
        key = (listener, user)
        found = self._effective.get(key)
        if found is None:
            found = self.for_listener(listener).merged(self._user_overrides.get(user, {}))
            if len(self._effective) >= 4 * self.max_tracked_users:
                self._effective.clear()
            self._effective[key] = found
        return found

    def user_limits(self, user: str) -> dict[str, int]:
        return dict(self._user_overrides.get(user, {}))

    def all_user_limits(self) -> dict[str, dict[str, int]]:
        return {name: dict(values) for name, values in sorted(self._user_overrides.items())}

    def set_user_limits(self, user: str, values: Mapping[str, Any]) -> dict[str, int]:
        """Merge `values` into the user's overrides (None or -1 removes a field); returns the new overrides."""
        current = dict(self._user_overrides.get(user, {}))
        for key, value in values.items():
            if key not in USER_SETTING_NAMES:
                raise BadRequest(f"unknown per-user limit {key!r}; known: {', '.join(USER_SETTING_NAMES)}")
            if value is None:
                current.pop(key, None)
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise BadRequest(f"limit {key} must be an integer, not {value!r}")
            if value < 0:
                current.pop(key, None)
            else:
                current[key] = value
        self._apply_user(user, current)
        return dict(current)

    def clear_user_limits(self, user: str) -> None:
        self._apply_user(user, {})

    def _apply_user(self, user: str, values: dict[str, int]) -> None:
        if values:
            self._user_overrides[user] = values
            if self._store is not None:
                self._store.put(user, values)
        else:
            self._user_overrides.pop(user, None)
            if self._store is not None:
                self._store.delete(user)
        self._effective.clear()
        self.version += 1

    # ------------------------------------------------------------------ counting
    def hit(self, listener: str, cause: str, *, user: str = "", source: str = "", reason: str = "") -> None:
        """Count a refusal by a limit and write its (rate-limited) audit line."""
        if self.metrics is not None:
            self.metrics.security.limit_hit(listener, cause)
        if self.audit is not None:
            self.audit.limit_hit(listener=listener, cause=cause, user=user, source=source, reason=reason)

    def refuse(self, listener: str, cause: str, text: str, *, user: str = "", source: str = "") -> QuotaExceeded:
        self.hit(listener, cause, user=user, source=source, reason=text)
        return QuotaExceeded(text, cause)

    # ------------------------------------------------------------------ admission
    def admit_source(self, listener: str, source: str) -> SourceTicket | None:
        """A TCP connection from `source` was made: count it, or raise `QuotaExceeded`. None when nothing about
        sources is limited on this listener (nothing to release)."""
        settings = self.for_listener(listener)
        most, rate = settings.max_connections_per_source, settings.connection_rate_per_source
        if not most and not rate:
            return None
        entry = self._sources.get(source)
        if entry is None:
            entry = self._sources[source] = _Source()
            self._forget_sources()
        else:
            self._sources.move_to_end(source)
        if rate:
            entry.bucket = _bucket(rate, settings.connection_burst_per_source, self.clock.seconds(), entry.bucket)
            assert entry.bucket is not None
            if not entry.bucket.try_take(1, self.clock.seconds()):
                raise self.refuse(listener, CONNECTION_RATE,
                                  f"too many new connections from {source} (limit {rate} per second)", source=source)
        if most and entry.connections >= most:
            raise self.refuse(listener, CONNECTIONS_PER_SOURCE,
                              f"{source} already has {entry.connections} connections (limit {most})", source=source)
        entry.connections += 1
        return SourceTicket(source)

    def release_source(self, ticket: SourceTicket | None) -> None:
        if ticket is None or ticket.released:
            return
        ticket.released = True
        entry = self._sources.get(ticket.source)
        if entry is not None and entry.connections > 0:
            entry.connections -= 1

    def _forget_sources(self) -> None:
        sources = self._sources
        while len(sources) > self.max_tracked_sources:
            sources.popitem(last=False)  # a forgotten busy source only loses its count: it is let in, not out

    def user_state(self, name: str) -> UserState:
        users = self._users
        state = users.get(name)
        if state is None:
            state = users[name] = UserState(name)
            excess = len(users) - self.max_tracked_users
            if excess > 0:
                idle: list[str] = []
                for old_name, old in users.items():  # oldest first; stop as soon as enough idle users are found
                    if old.connections == 0 and old is not state:
                        idle.append(old_name)
                        if len(idle) == excess:
                            break
                for old_name in idle:
                    del users[old_name]
        return state

    def admit_user(self, listener: str, user: str) -> UserTicket:
        """An authenticated connection of `user`: count it against the user's limit, or raise `QuotaExceeded`."""
        state = self.user_state(user)
        most = self.effective(listener, user).max_connections_per_user
        if most and state.connections >= most:
            raise self.refuse(listener, CONNECTIONS_PER_USER,
                              f"user {user!r} already has {state.connections} connections (limit {most})", user=user)
        state.connections += 1
        self._users.move_to_end(user)
        return UserTicket(state)

    def release_user(self, ticket: UserTicket | None) -> None:
        if ticket is None or ticket.released:
            return
        ticket.released = True
        if ticket.user.connections > 0:
            ticket.user.connections -= 1

    # ------------------------------------------------------------------ topics created per user
    def topics_created(self, user: str) -> int:
        return len(self._created.get(user, ()))

    def admit_topic(self, listener: str, user: str, topic: str, exists: Callable[[str], bool], *,
                    source: str = "") -> None:
        """`user` is about to create `topic`: record it, or raise `QuotaExceeded` when the user already created
        `max_topics_created_per_user` topics that still exist (0: unlimited, nothing recorded)."""
        most = self.effective(listener, user).max_topics_created_per_user
        if not most:
            return
        created = self._created.setdefault(user, {})
        if topic in created:
            return
        now = self.clock.seconds()
        if len(created) >= most:
            # Topics deleted since no longer count. Recently admitted ones may not exist *yet* (a publish batch
            # not stored so far): they are kept.
            self._forget_created(user, [t for t, when in created.items()
                                        if now - when > CREATION_GRACE_S and not exists(t)])
            if len(created) >= most:
                raise self.refuse(listener, TOPICS_CREATED,
                                  f"user {user!r} has created {len(created)} topics (limit {most}); "
                                  f"topic {topic!r} is not created", user=user, source=source)
        created[topic] = now
        if self._creators_store is not None:
            self._creators_store.put(topic, user)

    def _forget_created(self, user: str, topics: Sequence[str]) -> None:
        created = self._created.get(user)
        for topic in topics:
            if created is not None:
                created.pop(topic, None)
            if self._creators_store is not None:
                self._creators_store.delete(topic)

    def session_quota(self, listener: str, user: str, source: str = "") -> SessionQuota:
        return SessionQuota(self, listener, user, source)

    def snapshot(self) -> dict[str, Any]:
        """What the tables hold (admin API, tests)."""
        return {"settings": asdict(self.settings), "sources": len(self._sources), "users": len(self._users)}


class SessionQuota:
    """One connection's limits: checked by its CoreSession on publish and subscribe.

    `throttle` (AMQP): a publish over the user's rate is not refused but taken into debt, and the adapter stops
    reading for `publish_wait()` seconds, as RabbitMQ's credit flow does."""

    __slots__ = ("limiter", "listener", "user", "source", "settings", "state", "version", "throttle",
                 "subscriptions", "_sizes", "_buckets")

    def __init__(self, limiter: Limiter, listener: str, user: str, source: str = "") -> None:
        self.limiter = limiter
        self.listener = listener
        self.user = user
        self.source = source  # for the audit line of a refusal
        self.state = limiter.user_state(user)
        self.throttle = False
        # bound patterns and live subscriptions of this session; a shared empty placeholder until the first one
        # (an idle connection's quota holds no set)
        self.subscriptions: set[Any] | frozenset[Any] = NO_SUBSCRIPTIONS
        self.version = -1
        self.settings = limiter.settings
        self._sizes = False
        self._buckets = False
        self._refresh()

    def _refresh(self) -> None:
        limiter = self.limiter
        self.version = limiter.version
        self.settings = settings = limiter.effective(self.listener, self.user)
        self.state.tune(settings, limiter.clock.seconds())
        self._sizes = bool(settings.max_message_bytes or settings.max_property_bytes)
        self._buckets = bool(settings.publish_rate or settings.publish_bytes_rate)

    def charge(self, messages: Sequence[Message]) -> None:
        """Check sizes and take from the user's buckets for `messages`, or raise `QuotaExceeded` (in throttle
        mode the buckets go into debt instead)."""
        if self.version != self.limiter.version:
            self._refresh()
        if self._sizes:
            self._check_sizes(messages)
        if not self._buckets:
            return
        state, now = self.state, self.limiter.clock.seconds()
        count = len(messages)
        messages_bucket, bytes_bucket = state.messages, state.bytes
        size = 0 if bytes_bucket is None else (
            len(messages[0].body) if count == 1 else sum(len(m.body) for m in messages))
        if self.throttle:
            if messages_bucket is not None:
                messages_bucket.take(count, now)
            if bytes_bucket is not None:
                bytes_bucket.take(size, now)
            return
        if messages_bucket is not None and not messages_bucket.try_take(count, now):
            raise self._refuse(PUBLISH_RATE,
                                      f"publish rate of user {self.user!r} over {self.settings.publish_rate} "
                                      "messages per second")
        if bytes_bucket is not None and not bytes_bucket.try_take(size, now):
            if messages_bucket is not None:
                messages_bucket.give_back(count)
            raise self._refuse(PUBLISH_BANDWIDTH,
                                      f"publish bandwidth of user {self.user!r} over "
                                      f"{self.settings.publish_bytes_rate} bytes per second")

    def refund(self, messages: Sequence[Message]) -> None:
        """The core refused what was charged (nothing stored): give the tokens back."""
        if not self._buckets:
            return
        state = self.state
        if state.messages is not None:
            state.messages.give_back(len(messages))
        if state.bytes is not None:
            state.bytes.give_back(sum(len(m.body) for m in messages))

    def publish_wait(self) -> float:
        """Seconds until the user's buckets are out of debt (throttle mode); 0 when publishing may go on."""
        if not self._buckets:
            return 0.0
        now = self.limiter.clock.seconds()
        state = self.state
        wait = state.messages.wait(now) if state.messages is not None else 0.0
        if state.bytes is not None:
            wait = max(wait, state.bytes.wait(now))
        return wait

    def _check_sizes(self, messages: Sequence[Message]) -> None:
        settings = self.settings
        body_limit, property_limit = settings.max_message_bytes, settings.max_property_bytes
        for m in messages:
            if body_limit and len(m.body) > body_limit:
                raise self._refuse(MESSAGE_SIZE,
                                          f"message body is {len(m.body)} bytes; the limit is {body_limit}")
            if property_limit and m.properties:
                size = sum(len(k.encode()) + len(v.encode()) for k, v in m.properties.items())
                if size > property_limit:
                    raise self._refuse(PROPERTY_SIZE,
                                              f"message properties are {size} bytes; the limit is {property_limit}")

    def admit_subscription(self, key: Any = None) -> None:
        """Raise `QuotaExceeded` unless one more subscription fits (`key` already counted always fits); call
        `add_subscription` once it exists. Closed consumers stop counting."""
        if self.version != self.limiter.version:
            self._refresh()
        most = self.settings.max_subscriptions_per_session
        subscriptions = self.subscriptions
        if not most or (key is not None and key in subscriptions):
            return
        if len(subscriptions) >= most and isinstance(subscriptions, set):
            subscriptions.difference_update([s for s in subscriptions if getattr(s, "closed", False)])
        if len(subscriptions) >= most:
            raise self._refuse(SUBSCRIPTIONS,
                                      f"the session already has {len(subscriptions)} subscriptions (limit {most})")

    def add_subscription(self, key: Any) -> None:
        subscriptions = self.subscriptions
        if not isinstance(subscriptions, set):
            subscriptions = self.subscriptions = set()
        subscriptions.add(key)
        if len(subscriptions) > 64 and len(subscriptions) & 63 == 0:  # without a limit, closed ones still go
            subscriptions.difference_update([s for s in subscriptions if getattr(s, "closed", False)])

    def remove_subscription(self, key: Any) -> None:
        subscriptions = self.subscriptions
        if isinstance(subscriptions, set):
            subscriptions.discard(key)

    def admit_topic(self, topic: str, exists: Callable[[str], bool]) -> None:
        """This session is about to create `topic` (Limiter.admit_topic for its user)."""
        if self.version != self.limiter.version:
            self._refresh()
        if self.settings.max_topics_created_per_user:
            self.limiter.admit_topic(self.listener, self.user, topic, exists, source=self.source)

    @property
    def limits_topic_creation(self) -> bool:
        if self.version != self.limiter.version:
            self._refresh()
        return bool(self.settings.max_topics_created_per_user)

    def _refuse(self, cause: str, text: str) -> QuotaExceeded:
        return self.limiter.refuse(self.listener, cause, text, user=self.user, source=self.source)

    def hit(self, cause: str, reason: str = "") -> None:
        """Count (and audit) a refusal the core made for this session (a schema violation)."""
        self.limiter.hit(self.listener, cause, user=self.user, source=self.source, reason=reason)


def settings_from_mapping(values: Mapping[str, Any]) -> LimitSettings:
    """`LimitSettings` from a mapping with (at least) its field names (the `[limits]` config section)."""
    return LimitSettings(**{name: int(values[name]) for name in SETTING_NAMES if name in values})
