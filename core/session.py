"""The per-connection core session: the one door from an adapter into the core.

A listener opens a `CoreSession` once a connection has authenticated, with the principal, the source address
and the listener name. Every action the connection's client asks for goes through it, and it asks the gate once
per action (`gate.check(principal, action, resource, source)`), for every protocol the same way. Denials raise
`NotAuthorized`; adapters report it their own way (native error 21, MQTT reason 0x87/0x80, AMQP 403).

Private topics and groups (the broker's `%KIND%` namespace: MQTT session queues, AMQP queues) are reachable only
by a system principal or by the session that owns them: adapter code claims them with `claim_private` (trusted
code, never on a client's say-so), so a client naming `%MQTT%victim` over the native port is refused before the
gate is even asked. Decisions are cached per session until the gate's `version` moves (a policy or user change),
so the publish hot path pays a dict lookup, not a policy evaluation, per message.

Limits against abuse (core/security/limits.py) are the session's `quota`: message and property sizes and the
user's publish rate and bandwidth are charged on `publish` (refused with `QuotaExceeded`, or taken into debt when
the adapter throttles instead: `throttle_publishes`, `publish_wait`), subscriptions are counted on `subscribe` and
`bind`. Messages refused by their topic's schema are counted as limit hits of cause `schema`. Topics the session's
actions create (auto-created by publish, subscribe or get, created or declared explicitly, AMQP queues through
`admit_new_topic`) count against the user's `max_topics_created_per_user`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from tidegate.core.api import Delivered, GroupInfo, PullResult, SendResult
from tidegate.core.errors import MessageNotFound, NotAuthorized, SchemaViolation, TopicNotFound
from tidegate.core.filters import TagFilter
from tidegate.core.interfaces import AdapterStateStore, Core, DeliverySink, Subscription
from tidegate.core.model import Message, QueueRef, TopicConfig, is_private_topic, is_reserved_topic
from tidegate.core.security.gate import CLUSTER, SYSTEM, Action, Gate, Principal, Resource
from tidegate.core.security.limits import SCHEMA, SessionQuota

DECISION_CACHE_ENTRIES = 1024  # per session; a client cycling through names only churns its own cache


class CoreSession:
    """One connection's view of the core, acting as `principal` from `source` on `listener`."""

    __slots__ = ("core", "gate", "principal", "source", "listener", "client_id", "_system", "_owned",
                 "_decisions", "_gate_version", "quota", "_known_topic")

    def __init__(self, core: Core, gate: Gate, principal: Principal, *, source: str = "", listener: str = "",
                 client_id: str = "", quota: SessionQuota | None = None) -> None:
        self.core = core
        self.gate = gate
        self.principal = principal
        self.source = source
        self.listener = listener
        self.client_id = client_id
        self._system = principal.system
        # private topic and group names this session may use -> whether the name is this connection's own queue
        # (an MQTT session queue): what fills those was authorized when bound, so reading them is not put to the
        # gate again. One dict rather than two sets: every MQTT connection holds its session topic in both.
        self._owned: dict[str, bool] = {}
        self._decisions: dict[tuple[Action, Resource], bool] = {}
        self._gate_version = gate.version
        # limits against abuse; None for the broker itself and where no limiter is configured (tests, tools)
        self.quota = None if principal.system else quota
        if self.quota is not None and not self.quota.source:
            self.quota.source = source  # named in the audit line of a refusal
        self._known_topic = ""  # the last topic this session published to that was checked to exist (or admitted)

    def __repr__(self) -> str:
        return f"<CoreSession {self.principal} {self.listener} {self.source} {self.client_id!r}>"

    # ------------------------------------------------------------------ decisions
    def may(self, action: Action, resource: Resource) -> bool:
        """Whether the gate allows `action` on `resource` for this session (cached until the gate changes)."""
        if self._system:
            return True
        if self._gate_version != self.gate.version:
            self._decisions.clear()
            self._gate_version = self.gate.version
        key = (action, resource)
        allowed = self._decisions.get(key)
        if allowed is None:
            allowed = bool(self.gate.check(self.principal, action, resource, self.source))
            if len(self._decisions) >= DECISION_CACHE_ENTRIES:
                self._decisions.clear()
            self._decisions[key] = allowed
        if not allowed:
            note_denial = getattr(self.gate, "note_denial", None)  # PolicyGate: audit line and metrics
            if note_denial is not None:
                note_denial(self.principal, action, resource, source=self.source, listener=self.listener)
        return allowed

    def authorize(self, action: Action, resource: Resource) -> None:
        if not self.may(action, resource):
            raise NotAuthorized(f"{self.principal} may not {action.value} {resource}")

    def _reachable(self, name: str) -> None:
        """Private names belong to their owner; reserved names are never created or written by clients."""
        if not self._system and is_private_topic(name) and name not in self._owned:
            raise NotAuthorized(f"{name!r} is internal to the broker")

    def _writable_name(self, name: str) -> None:
        if not self._system and is_reserved_topic(name) and name not in self._owned:
            raise NotAuthorized(f"{name!r} is in the broker's reserved namespace")

    def _check_read(self, topic: str, group: str | None = None) -> None:
        """Sub on everything under `topic` and on `group`; a queue of the connection's own (`claim_private`,
        `own(..., own_queue=True)`) is not put to the gate: the filters that fill it were checked when bound."""
        owned = self._owned
        if not owned.get(topic):
            self._reachable(topic)
            self.authorize(Action.SUB, Resource.topic_filter(f"{topic}/#"))
        if group is not None and not owned.get(group):
            self._reachable(group)
            self.authorize(Action.SUB, Resource.group(group))

    def _check_group(self, group: str) -> None:
        if not self._owned.get(group):
            self._reachable(group)
            self.authorize(Action.SUB, Resource.group(group))

    def _visible(self, name: str) -> bool:
        return self._system or not is_private_topic(name) or name in self._owned

    # ------------------------------------------------------------------ private (adapter-owned) names
    def claim_private(self, topic: str, queues: int = 1) -> TopicConfig:
        """Create (or reuse) a private topic for this session's own use and allow the session to use it.

        Adapter code only: an MQTT session queue. Never called with a name a client chose."""
        self._owned[topic] = True
        return self.core.ensure_topic(topic, queues=queues, internal=True)

    def own(self, name: str, *, own_queue: bool = False) -> None:
        """Let this session use an existing private topic or group (adapter code only). Reading it is still put
        to the gate (an AMQP queue others share) unless `own_queue`: the connection's own queue, filled only
        through filters that were authorized when bound (an MQTT session queue or share queue)."""
        self._owned[name] = own_queue or self._owned.get(name, False)

    def disown(self, name: str) -> None:
        self._owned.pop(name, None)

    # ------------------------------------------------------------------ data plane
    def now_ms(self) -> int:
        return self.core.now_ms()

    def publish(self, messages: Sequence[Message], queue_id: int | None = None) -> list[SendResult]:
        """Authorize every message (Pub on its full name), then publish them all or none."""
        if not self._system:
            owned = self._owned
            # a batch is usually one name: decide it once (compared by topic and subject, without building the
            # full name of every message)
            checked_topic: str | None = None
            checked_subject: str | None = None
            for m in messages:
                topic, subject = m.topic, m.subject
                if topic == checked_topic and subject == checked_subject:
                    continue
                name = m.full_name
                if is_reserved_topic(topic) and topic not in owned:
                    raise NotAuthorized(f"{topic!r} is in the broker's reserved namespace")
                if not self.may(Action.PUB, Resource.topic(name)):
                    raise NotAuthorized(f"{self.principal} may not publish to {name!r}")
                checked_topic, checked_subject = topic, subject
        quota = self.quota
        if quota is None:
            return self.core.publish(messages, queue_id)
        if quota.limits_topic_creation:
            self._admit_published_topics(messages, quota)
        quota.charge(messages)
        try:
            return self.core.publish(messages, queue_id)
        except Exception as exc:
            quota.refund(messages)  # nothing was stored
            if isinstance(exc, SchemaViolation):
                quota.hit(SCHEMA, str(exc))
            raise

    def _topic_exists(self, name: str) -> bool:
        try:
            self.core.get_topic(name)
        except TopicNotFound:
            return False
        return True

    def _admit_published_topics(self, messages: Sequence[Message], quota: SessionQuota) -> None:
        """Topics a publish would auto-create count against the user's max_topics_created_per_user."""
        known = self._known_topic
        for m in messages:
            topic = m.topic
            if topic == known:
                continue
            if not self._topic_exists(topic):
                quota.admit_topic(topic, self._topic_exists)
            known = topic
        self._known_topic = known

    def admit_new_topic(self, name: str) -> None:
        """This session's action is about to create topic `name` (a topic that does not exist yet: a declare, an
        AMQP queue): count it against the user's max_topics_created_per_user, or raise `QuotaExceeded`."""
        quota = self.quota
        if quota is not None and quota.limits_topic_creation and not self._topic_exists(name):
            quota.admit_topic(name, self._topic_exists)

    def throttle_publishes(self) -> None:
        """Publishes over the user's rate are taken into debt instead of refused; the adapter then stops reading
        for `publish_wait()` seconds (AMQP, as RabbitMQ's credit flow)."""
        if self.quota is not None:
            self.quota.throttle = True

    def publish_wait(self) -> float:
        """Seconds the connection should stop reading until its user's publish buckets are out of debt."""
        quota = self.quota
        return quota.publish_wait() if quota is not None else 0.0

    def when_durable(self, commit_end: int, callback: Callable[[], None]) -> None:
        self.core.when_durable(commit_end, callback)

    def subscribe(self, group: str, topic: str, sink: DeliverySink, *, client_id: str | None = None,
                  **options: Any) -> Subscription:
        """Attach a push consumer (Sub on every name under `topic` and on `group`)."""
        self._check_read(topic, group)
        quota = self.quota
        if quota is None or self._owned.get(topic):  # the own queue: its bound filters are what count
            return self.core.subscribe(group, topic, sink, client_id=client_id or self.client_id, **options)
        self.admit_new_topic(topic)  # subscribing auto-creates the topic
        quota.admit_subscription()
        subscription = self.core.subscribe(group, topic, sink, client_id=client_id or self.client_id, **options)
        quota.add_subscription(subscription)
        return subscription

    def bind(self, pattern: str, destination: QueueRef) -> None:
        """Route names matching `pattern` into one of this session's own queues (Sub on the pattern)."""
        self._reachable(destination.topic)
        if not self._system and destination.topic not in self._owned:
            raise NotAuthorized(f"{destination.topic!r} is not a queue of this session")
        self.authorize(Action.SUB, Resource.topic_filter(pattern))
        quota = self.quota
        if quota is not None:
            quota.admit_subscription((pattern, destination))
        self.core.bind(pattern, destination)
        if quota is not None:
            quota.add_subscription((pattern, destination))

    def unbind(self, pattern: str, destination: QueueRef) -> None:
        self._reachable(destination.topic)
        self.core.unbind(pattern, destination)
        if self.quota is not None:
            self.quota.remove_subscription((pattern, destination))

    def pull(self, queue: QueueRef, offset: int, max_count: int = 32,
             filter_expr: str | TagFilter = "*") -> PullResult:
        self._check_read(queue.topic)
        return self.core.pull(queue, offset, max_count, filter_expr)

    def get(self, group: str, topic: str, *, auto_ack: bool, invisible_ms: int | None = None) -> Delivered | None:
        """Take the next ready message of `group` on `topic` without a subscription (AMQP basic.get)."""
        self._check_read(topic, group)
        if not self._owned.get(topic):
            self.admit_new_topic(topic)
        return self.core.get(group, topic, auto_ack=auto_ack, invisible_ms=invisible_ms)

    def ack(self, group: str, receipt: str) -> None:
        """Settle a message taken with `get` (or delivered to a member of `group`)."""
        self._check_group(group)
        self.core.ack(group, receipt)

    def nack(self, group: str, receipt: str, requeue: bool = True, delay_ms: int = 0) -> None:
        self._check_group(group)
        self.core.nack(group, receipt, requeue, delay_ms)

    def commit_offset(self, group: str, queue: QueueRef, offset: int) -> None:
        self._reachable(queue.topic)
        self._check_group(group)
        self.core.commit_offset(group, queue, offset)

    def queue_offsets(self, queue: QueueRef) -> tuple[int, int]:
        self._reachable(queue.topic)
        return self.core.queue_offsets(queue)

    # ------------------------------------------------------------------ topics
    def ensure_topic(self, name: str, queues: int | None = None) -> TopicConfig:
        self._writable_name(name)
        try:
            return self.core.get_topic(name)
        except TopicNotFound:
            self.authorize(Action.CREATE, Resource.topic(name))
            self.admit_new_topic(name)
            return self.core.ensure_topic(name, queues)

    def create_topic(self, name: str, queues: int | None = None, perm: str = "rw",
                     retention_ms: int = 0) -> TopicConfig:
        self._writable_name(name)
        self.authorize(Action.CREATE, Resource.topic(name))
        self.admit_new_topic(name)
        return self.core.create_topic(name, queues, perm=perm, retention_ms=retention_ms)

    def update_topic(self, name: str, queues: int | None = None, perm: str | None = None,
                     retention_ms: int | None = None) -> TopicConfig:
        self._writable_name(name)
        self.authorize(Action.UPDATE, Resource.topic(name))
        return self.core.update_topic(name, queues, perm=perm, retention_ms=retention_ms)

    def delete_topic(self, name: str) -> None:
        self._reachable(name)
        self.authorize(Action.DELETE, Resource.topic(name))
        self.core.delete_topic(name)

    def get_topic(self, name: str) -> TopicConfig:
        self._reachable(name)
        self.authorize(Action.GET, Resource.topic(name))
        return self.core.get_topic(name)

    def list_topics(self, include_internal: bool = False) -> list[TopicConfig]:
        """Topics this session may see: private topics of other sessions are never listed."""
        self.authorize(Action.LIST, CLUSTER)
        return [t for t in self.core.list_topics(include_internal) if self._visible(t.name)]

    # ------------------------------------------------------------------ groups
    def list_groups(self) -> list[GroupInfo]:
        self.authorize(Action.LIST, CLUSTER)
        return [g for g in self.core.list_groups() if self._visible(g.name)]

    def group_info(self, group: str) -> GroupInfo:
        self._reachable(group)
        self.authorize(Action.GET, Resource.group(group))
        return self.core.group_info(group)

    def reset_offsets(self, group: str, topic: str, to: str | int) -> dict[QueueRef, int]:
        self._reachable(group)
        self._reachable(topic)
        self.authorize(Action.UPDATE, Resource.group(group))
        return self.core.reset_offsets(group, topic, to)

    def delete_group(self, group: str) -> None:
        self._reachable(group)
        self.authorize(Action.DELETE, Resource.group(group))
        self.core.delete_group(group)

    # ------------------------------------------------------------------ queries
    def query_by_id(self, msg_id: str) -> Message:
        """Message ids are guessable, so what is found is checked like a read of its topic (and hidden, not
        refused, when private: its existence is not the client's business)."""
        message = self.core.query_by_id(msg_id)
        if not self._visible(message.topic):
            raise MessageNotFound(f"no message with id {msg_id!r}")
        self.authorize(Action.GET, Resource.topic(message.full_name))
        return message

    def query_by_key(self, topic: str, key: str, limit: int = 64) -> list[Message]:
        self._reachable(topic)
        self.authorize(Action.GET, Resource.topic_filter(f"{topic}/#"))
        return self.core.query_by_key(topic, key, limit)

    def list_by_time(self, topic: str, start_ms: int, end_ms: int, limit: int = 100) -> list[Message]:
        self._reachable(topic)
        self.authorize(Action.GET, Resource.topic_filter(f"{topic}/#"))
        return self.core.list_by_time(topic, start_ms, end_ms, limit)

    # ------------------------------------------------------------------ adapter state
    def adapter_state(self, namespace: str) -> AdapterStateStore:
        return self.core.adapter_state(namespace)


def system_session(core: Core, gate: Gate, listener: str) -> CoreSession:
    """The broker acting for itself (adapter housekeeping: session expiry, wills, retained bookkeeping)."""
    return CoreSession(core, gate, SYSTEM, source="internal", listener=listener)
