"""MQTT sessions on core primitives.

A session is an internal core topic `%MQTT%<client id>` with one queue, consumed by the core group of the same
name in per-message ack mode. Every subscription filter is a core binding of that queue, so a publish from any
protocol adds one index entry to each matching session. What the core does not know (subscription options,
protocol level, expiry, QoS 2 packet ids) is kept as one JSON row per session in the metadata namespace
`mqtt.sessions` (an `AdapterStateStore`); bindings and the queue are core-durable, so subscriptions and queued
messages survive a restart.

Who acts: the client's own `CoreSession` creates and binds its session queue and share queues (`claim_private`,
`bind`: the gate decides whether it may subscribe to each filter); the adapter's system session (`factory.system`)
does the housekeeping no client asked for: expiry, crash leftovers, removing an empty share.

A shared subscription `$share/G/f` is an internal topic `%MQTTSHARE%<hash(G, f)>` bound to `f` and consumed in
core group `G` (clustering) by every member session; membership is kept in namespace `mqtt.shares` so the topic
is removed when its last member leaves.

Expiry: a session whose connection is gone is removed after its expiry interval (a clock timer); on startup,
sessions whose expiry passed while the broker was down are removed, as are session topics without a row
(left behind by a crash).

What touches the metadata store (SQLite), so that a reconnect storm is not a storm of small transactions:
- A session that ends with its connection (expiry 0: CleanSession=1 in 3.1.1, Session Expiry 0 in v5) has nothing
  to persist: it has no row, and its core topic is created only by its first SUBSCRIBE, so a client that only
  publishes connects and disconnects without a single metadata write.
- A new persistent session is committed before `create` returns, so its CONNACK always follows its durable row
  (Session Present on the next connect is never a promise the disk does not hold). The commit takes every other
  pending row along (group commit); a failure refuses the CONNECT (the core error's reason code) and forgets the
  session.
- Every other change of a row (a resumed session connecting, disconnecting, SUBSCRIBE, QoS 2 ids) is written
  behind: all changes of one reactor turn are committed in one transaction (`flush_rows`, a `callLater(0)`).
  Losing them in a crash costs no promise that was made (see docs/performance.md, "Reconnect storms"); a failed
  commit is retried with backoff (0.5 s doubling to 30 s) and keeps the newest value of each row.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii as _json_string  # a str as the generic encoder writes it
from typing import TYPE_CHECKING, Any

from tidegate.core.errors import TidegateError
from tidegate.core.interfaces import AdapterStateStore
from tidegate.core.model import QueueRef
from tidegate.core.ratelimit import ClientLog
from tidegate.core.routing import SubscriptionTrie
from tidegate.core.security.gate import Action, Resource
from tidegate.core.session import CoreSession

from .mapping import SESSION_TOPIC_PREFIX, SHARE_TOPIC_PREFIX, core_pattern, is_sys_name, session_topic, share_group
from .mapping import share_topic as make_share_topic
from .packets import hidden_by_dollar_rule
from .settings import MqttSettings
from .state import PacketIds

if TYPE_CHECKING:
    from .codec import Will

log = logging.getLogger("tidegate.mqtt")
# compact JSON as the metadata store's encoder writes it (one encoder: `json.dumps` with options builds one per call)
to_json = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


class EncodedRow(dict):  # type: ignore[type-arg]
    """A session row that carries its own JSON text (`json_text`): the metadata store stores that text instead of
    encoding the dict (see core/storage/metadata.py `to_json`). The dict all the same for every other reader; the
    text is the compact JSON of the dict, and the row is not changed after it is made."""

    __slots__ = ("json_text",)

    def __init__(self, row: dict[str, Any], json_text: str) -> None:
        super().__init__(row)
        self.json_text = json_text

SESSIONS_NAMESPACE = "mqtt.sessions"
ROW_RETRY_FIRST_S = 0.5  # backoff of a failed session-row commit: 0.5 s, doubling up to 30 s
ROW_RETRY_MAX_S = 30.0
SHARES_NAMESPACE = "mqtt.shares"
NEVER_EXPIRES = 0xFFFFFFFF


@dataclass(slots=True)
class SubscriptionEntry:
    """One subscription of a session with its MQTT options; `share` is (share name, inner filter)."""

    topic_filter: str
    qos: int
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0
    identifier: int | None = None
    share: tuple[str, str] | None = None

    @property
    def match_filter(self) -> str:
        return self.share[1] if self.share else self.topic_filter

    @property
    def share_topic(self) -> str | None:
        return make_share_topic(*self.share) if self.share else None

    def to_row(self) -> list[Any]:
        return [self.topic_filter, self.qos, self.no_local, self.retain_as_published, self.retain_handling,
                self.identifier, list(self.share) if self.share else None]

    @classmethod
    def from_row(cls, row: list[Any]) -> SubscriptionEntry:
        topic_filter, qos, no_local, rap, rh, identifier, share = row
        return cls(topic_filter, int(qos), bool(no_local), bool(rap), int(rh), identifier,
                   (share[0], share[1]) if share else None)


@dataclass(slots=True)
class PendingWill:
    will: Will
    protocol_level: int
    publisher: CoreSession  # the session of the connection that set it: the will is published as that client
    call: Any = None  # DelayedCall of a delayed will


@dataclass(slots=True)
class Session:
    client_id: str
    topic: str  # the internal core topic, also the core group name
    protocol_level: int
    expiry_interval: int  # seconds after disconnect; 0 = ends with the connection
    subscriptions: dict[str, SubscriptionEntry] = field(default_factory=dict)
    packets: PacketIds = field(default_factory=PacketIds)  # every packet id of the session, both directions
    connection: Any = None
    disconnected_at: int = 0  # ms; 0 while connected
    expiry_call: Any = None
    pending_will: PendingWill | None = None
    # The principal name the session is bound to (`client_id_binding = "user"`): only that user may resume it,
    # take it over or wipe it. Empty for rows written before binding existed: the next login claims them.
    owner: str = ""
    has_queue: bool = True  # its core topic exists (a session with expiry 0 gets one at its first SUBSCRIBE)
    persisted: bool = False  # it has a row in `mqtt.sessions` (written or about to be)
    # The subscriptions' filters (the inner filter of a shared one) → their keys in `subscriptions`, in a core
    # routing trie, so deliveries are re-matched by the same matcher that routed them. No cache: a session's names
    # rarely repeat enough to pay for a cache's memory in each of thousands of sessions. Made when first needed
    # (`_trie`): a session that never subscribes, or a stored one not resumed yet after a restart, has none.
    filter_trie: SubscriptionTrie[str] | None = field(default=None, repr=False, compare=False)
    # The subscriptions as their row stores them, kept until they change: a resume rewrites the session's row
    # (its disconnect time) but never its subscriptions.
    subs_row: list[list[Any]] | None = field(default=None, repr=False, compare=False)
    subs_text: str | None = field(default=None, repr=False, compare=False)  # `subs_row` as JSON, once written

    @property
    def queue(self) -> QueueRef:
        return QueueRef(self.topic, 0)

    @property
    def has_no_local(self) -> bool:
        return any(s.no_local for s in self.subscriptions.values())

    def put_subscription(self, entry: SubscriptionEntry) -> bool:
        """Record a subscription (replacing one with the same filter); returns whether one existed."""
        existed = entry.topic_filter in self.subscriptions
        trie = self._trie()
        self.subs_row = self.subs_text = None
        self.subscriptions[entry.topic_filter] = entry
        trie.add(entry.match_filter, entry.topic_filter)
        return existed

    def pop_subscription(self, topic_filter: str) -> SubscriptionEntry | None:
        if topic_filter not in self.subscriptions:
            return None
        trie = self._trie()
        self.subs_row = self.subs_text = None
        entry = self.subscriptions.pop(topic_filter)
        trie.remove(entry.match_filter, topic_filter)
        return entry

    def clear_subscriptions(self) -> None:
        self.subscriptions.clear()
        self.filter_trie = None
        self.subs_row = self.subs_text = None

    def matching_subscriptions(self, topic_name: str) -> list[SubscriptionEntry]:
        """The subscriptions whose filter matches an MQTT topic name (the core trie plus MQTT's `$` rule)."""
        if not self.subscriptions:
            return []
        entries = [self.subscriptions[key] for key in self._trie().match(topic_name)]
        if topic_name.startswith("$"):
            entries = [e for e in entries if not hidden_by_dollar_rule(e.match_filter, topic_name)]
        return entries

    def _trie(self) -> SubscriptionTrie[str]:
        trie = self.filter_trie
        if trie is None:
            trie = self.filter_trie = SubscriptionTrie(cache_size=0)
            for key, entry in self.subscriptions.items():
                trie.add(entry.match_filter, key)
        return trie

    def to_row(self) -> EncodedRow:
        """The session's row, carrying its JSON text: the text is put together from the session's fields, with the
        subscriptions' part encoded once until they change (the generic encoder took about half of a session-row
        write, and a reconnect storm writes one row per resumed session)."""
        subs = self.subs_row
        subs_text = self.subs_text
        if subs is None:
            subs = self.subs_row = [s.to_row() for s in self.subscriptions.values()]
            subs_text = None
        if subs_text is None:
            subs_text = self.subs_text = to_json(subs)
        inbound_qos2, inbound_text, released, released_text = self._packet_ids_json()
        # plain ints (not an IntEnum's text): the text is what the generic encoder makes of the same dict
        level, expiry, disconnected_at = int(self.protocol_level), int(self.expiry_interval), int(self.disconnected_at)
        text = self._row_text(level, expiry, subs_text, inbound_text, released_text, disconnected_at)
        return EncodedRow({"client_id": self.client_id, "topic": self.topic, "level": level, "expiry": expiry,
                           "subs": subs, "inbound_qos2": inbound_qos2, "released": released,
                           "disconnected_at": disconnected_at, "owner": self.owner}, text)

    def _packet_ids_json(self) -> tuple[list[int], str, list[list[Any]], str]:
        """The row's `inbound_qos2` and `released` values and their JSON text."""
        packets = self.packets
        inbound_qos2: list[int] = sorted(packets.inbound_qos2)
        released: list[list[Any]] = [[pid, topic] for pid, topic in sorted(packets.released.items())]
        return (inbound_qos2, to_json(inbound_qos2) if inbound_qos2 else "[]",
                released, to_json(released) if released else "[]")

    def _row_text(self, level: int, expiry: int, subs_text: str, inbound_text: str, released_text: str,
                  disconnected_at: int) -> str:
        return (f'{{"client_id":{_json_string(self.client_id)},"topic":{_json_string(self.topic)},'
                f'"level":{level},"expiry":{expiry},"subs":{subs_text},"inbound_qos2":{inbound_text},'
                f'"released":{released_text},"disconnected_at":{disconnected_at},'
                f'"owner":{_json_string(self.owner)}}}')

    def _take_stored_subs_text(self, stored_text: str) -> None:
        """Keep the subscriptions' part of the text the row was stored as (`subs_text`), so the first write after
        a restart does not encode them again. Taken only when the whole stored text is what `to_row` would write
        with it (the row was written by this writer, nothing in it differs): then that part is the subscriptions'
        JSON. Anything else (an older writer's row, odd spacing) leaves them to be encoded at the first write."""
        start = stored_text.find(',"subs":')
        end = stored_text.find(',"inbound_qos2":', start)
        if start < 0 or end < 0:
            return
        subs_text = stored_text[start + 8:end]
        _, inbound_text, _, released_text = self._packet_ids_json()
        if self._row_text(self.protocol_level, self.expiry_interval, subs_text, inbound_text, released_text,
                          self.disconnected_at) == stored_text:
            self.subs_text = subs_text

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Session:
        session = cls(row["client_id"], row["topic"], int(row["level"]), int(row["expiry"]))
        subs = row.get("subs", [])
        for sub in subs:
            entry = SubscriptionEntry.from_row(sub)
            session.subscriptions[entry.topic_filter] = entry  # the trie is built when first matched against
        session.subs_row = subs if len(subs) == len(session.subscriptions) else None  # as stored, unless duplicated
        session.packets = PacketIds({int(pid) for pid in row.get("inbound_qos2", [])},
                                    {int(pid): topic for pid, topic in row.get("released", [])})
        session.disconnected_at = int(row.get("disconnected_at") or 0)
        session.owner = str(row.get("owner") or "")
        session.persisted = True
        stored_text = getattr(row, "stored_text", None)  # a `StoredRow` read from the metadata store
        if stored_text is not None and session.subs_row is not None:
            session._take_stored_subs_text(stored_text)
        return session


def write_rows(rows: AdapterStateStore, changes: dict[str, Any]) -> None:
    """Apply puts (value) and deletes (None) to a namespace, in one transaction where the store offers one."""
    apply = getattr(rows, "apply", None)
    if apply is not None:
        apply(changes)
        return
    for key, value in changes.items():
        if value is None:
            rows.delete(key)
        else:
            rows.put(key, value)


class SessionManager:
    """Owns every session of one listener: creation, persistence, core bindings, shares and expiry.

    `system` is the adapter's system session (housekeeping); `rows` and `share_rows` are the adapter state
    namespaces `mqtt.sessions` and `mqtt.shares`.
    """

    def __init__(self, system: CoreSession, clock: Any, settings: MqttSettings,
                 publish_will: Callable[[Session, PendingWill], None], *, rows: AdapterStateStore,
                 share_rows: AdapterStateStore) -> None:
        self.system = system
        self.rows = rows
        self.share_rows = share_rows
        self.clock = clock
        self.settings = settings
        self._publish_will = publish_will
        self.sessions: dict[str, Session] = {}
        self._owned_counts: dict[str, int] = {}  # principal name -> sessions it owns (max_sessions_per_user)
        self._shares: dict[str, dict[str, Any]] = dict(share_rows.items())
        self._client_log = ClientLog(log, clock.seconds)  # expiries follow what clients chose: rate-limited
        # write-behind of session rows: client id -> the session whose row to put (None: delete), committed once
        # per reactor turn; the row is made at the commit, once however often the session changed in the turn
        self._pending_rows: dict[str, Session | None] = {}
        self._flush_call: Any = None
        self._flush_failures = 0

    def now_ms(self) -> int:
        return int(self.clock.seconds() * 1000)

    # ----------------------------------------------------------------------------------------- startup
    def load(self) -> None:
        """Read persisted sessions; expire those whose time ran out while the broker was down."""
        now = self.now_ms()
        for client_id, row in self.rows.items():
            try:
                session = Session.from_row(row)
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("dropping unreadable MQTT session row %r: %s", client_id, exc)
                self.rows.delete(client_id)
                continue
            self.sessions[session.client_id] = session
            self._count_owner(session.owner, 1)
            if not session.disconnected_at:
                # the broker stopped while the client was connected: its expiry starts now
                session.disconnected_at = now
                self.save(session)
            remaining_ms = session.disconnected_at + self._expiry_seconds(session) * 1000 - now
            if session.expiry_interval == 0 or remaining_ms <= 0:
                self.destroy(session)
            else:
                self._schedule_expiry(session, remaining_ms / 1000.0)
        known = {s.topic for s in self.sessions.values()}
        for cfg in self.system.list_topics(include_internal=True):
            if cfg.name.startswith(SESSION_TOPIC_PREFIX) and not cfg.name.startswith(SHARE_TOPIC_PREFIX) \
                    and cfg.name not in known:
                log.info("removing MQTT session topic %s without a session", cfg.name)
                self._drop_core_state(cfg.name, cfg.name)
        for topic, row in list(self._shares.items()):
            members = [m for m in row.get("members", []) if m in self.sessions]
            group = share_group(str(row.get("share", "")))
            if members != row.get("members") or row.get("group") != group:
                # rows written before shares had their own group namespace named a public group: move them to
                # the private one (never deleting the public group, which may belong to a native application)
                row["members"] = members
                row["group"] = group
                self._save_share(topic, row)
        self.flush_rows()  # what loading changed, in one transaction

    # ----------------------------------------------------------------------------------------- lifecycle
    def get(self, client_id: str) -> Session | None:
        return self.sessions.get(client_id)

    def may_use(self, session: Session, principal_name: str) -> bool:
        """Whether `principal_name` may resume, take over or wipe `session` (`client_id_binding`)."""
        return self.settings.client_id_binding == "none" or session.owner in ("", principal_name)

    def sessions_owned(self, principal_name: str) -> int:
        return self._owned_counts.get(principal_name, 0)

    def set_owner(self, session: Session, principal_name: str) -> None:
        if session.owner != principal_name:
            self._count_owner(session.owner, -1)
            session.owner = principal_name
            self._count_owner(principal_name, 1)

    def _count_owner(self, principal_name: str, delta: int) -> None:
        if not principal_name:
            return
        count = self._owned_counts.get(principal_name, 0) + delta
        if count > 0:
            self._owned_counts[principal_name] = count
        else:
            self._owned_counts.pop(principal_name, None)

    def create(self, client_id: str, protocol_level: int, expiry_interval: int, owner: CoreSession) -> Session:
        """A new session, bound to `owner`'s principal, whose queue `owner` (the connecting client's core session)
        creates and may consume.

        A session that ends with its connection (expiry 0) gets its queue at its first SUBSCRIBE
        (`ensure_queue`) and no row: connecting it writes nothing to the metadata store."""
        topic = session_topic(client_id)
        session = Session(client_id, topic, protocol_level, expiry_interval, has_queue=expiry_interval != 0)
        self.set_owner(session, owner.principal.name)
        if not session.expiry_interval:
            self.sessions[client_id] = session
            return session
        owner.claim_private(topic, queues=1)
        session.persisted = True
        self._pending_rows[client_id] = session
        try:
            self.flush_rows(raise_errors=True)  # durable before the CONNACK, with whatever else is pending
        except TidegateError:
            session.persisted = False
            self._pending_rows[client_id] = None  # no session: also deletes a row an earlier one of the id left
            self._drop_core_state(topic, topic)
            self.set_owner(session, "")
            raise
        self.sessions[client_id] = session
        return session

    def ensure_queue(self, session: Session, owner: CoreSession) -> None:
        """Create the session's core topic if it has none yet (the first SUBSCRIBE of an expiry-0 session)."""
        if not session.has_queue:
            owner.claim_private(session.topic, queues=1)
            session.has_queue = True

    def save(self, session: Session) -> None:
        """Persist the session's row, written behind (committed at the end of this reactor turn). A session with
        expiry 0 has nothing to persist (it ends with its connection): its row, if it had one, is deleted."""
        if session.expiry_interval:
            session.persisted = True
            self._write_row(session.client_id, session)
        elif session.persisted:
            session.persisted = False
            self._write_row(session.client_id, None)

    def _write_row(self, client_id: str, session: Session | None) -> None:
        self._pending_rows[client_id] = session
        if self._flush_call is None:
            self._flush_call = self.clock.callLater(0, self.flush_rows)

    def flush_rows(self, raise_errors: bool = False) -> None:
        """Commit every pending session row in one transaction. On failure (disk full, I/O error) the rows stay
        pending and are retried with backoff; `raise_errors` also raises the error (a CONNECT waiting for it)."""
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        pending = self._pending_rows
        if not pending:
            return
        self._pending_rows = {}
        try:
            write_rows(self.rows, {client_id: None if session is None else session.to_row()
                                   for client_id, session in pending.items()})
        except TidegateError as exc:
            for client_id, session in pending.items():
                self._pending_rows.setdefault(client_id, session)  # newer writes made meanwhile win
            self._flush_failures += 1
            delay = min(ROW_RETRY_MAX_S, ROW_RETRY_FIRST_S * 2 ** (self._flush_failures - 1))
            self._client_log.log(logging.ERROR, "session-rows-failed",
                                 "writing %d MQTT session rows failed (%s); retrying in %.1fs", len(pending),
                                 str(exc), delay)
            self._flush_call = self.clock.callLater(delay, self.flush_rows)
            if raise_errors:
                raise
            return
        self._flush_failures = 0

    def attach(self, session: Session, connection: Any, owner: CoreSession) -> None:
        """A connection takes the session (its core session `owner` may use the session queue): stop the expiry
        timer and any delayed will."""
        owner.own(session.topic, own_queue=True)
        session.connection = connection
        session.disconnected_at = 0
        expiry_call = session.expiry_call
        if expiry_call is not None:
            if expiry_call.active():
                expiry_call.cancel()
            session.expiry_call = None
        if session.pending_will is not None:
            if session.pending_will.call is not None and session.pending_will.call.active():
                session.pending_will.call.cancel()
            session.pending_will = None

    def detach(self, session: Session, will: PendingWill | None, will_delay: int) -> None:
        """The connection is gone: start the expiry timer (or end the session) and handle the will."""
        session.connection = None
        session.disconnected_at = self.now_ms()
        expiry = self._expiry_seconds(session)
        if will is not None:
            delay = min(will_delay, expiry)
            if delay <= 0:
                self._publish_will(session, will)
            else:
                session.pending_will = will
                will.call = self.clock.callLater(delay, self._fire_will, session)
        if expiry == 0:
            self.destroy(session)
            return
        self.save(session)
        self._schedule_expiry(session, expiry)

    def _fire_will(self, session: Session) -> None:
        will, session.pending_will = session.pending_will, None
        if will is not None:
            self._publish_will(session, will)

    def destroy(self, session: Session, *, send_will: bool = True) -> None:
        """Remove a session with everything it holds in the core; sends a will still waiting for its delay unless
        `send_will` is false (another user wiped the session: its owner's will is not theirs to trigger)."""
        self._cancel(session, "expiry_call")
        if session.pending_will is not None:
            if session.pending_will.call is not None and session.pending_will.call.active():
                session.pending_will.call.cancel()
            if send_will:
                self._fire_will(session)
            session.pending_will = None
        for entry in list(session.subscriptions.values()):
            if entry.share:
                self.leave_share(session, entry)
        session.clear_subscriptions()
        if session.has_queue:
            self._drop_core_state(session.topic, session.topic)
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]
            self._count_owner(session.owner, -1)
        if session.persisted:
            session.persisted = False
            self._write_row(session.client_id, None)

    def _drop_core_state(self, topic: str, group: str) -> None:
        try:
            self.system.delete_topic(topic)  # also removes every binding to its queue
        except TidegateError:
            pass
        try:
            self.system.delete_group(group)
        except TidegateError:
            pass

    def _expiry_seconds(self, session: Session) -> int:
        expiry = session.expiry_interval
        if expiry == NEVER_EXPIRES or expiry > self.settings.session_expiry_max:
            expiry = self.settings.session_expiry_max
        return expiry

    def _schedule_expiry(self, session: Session, seconds: float) -> None:
        self._cancel(session, "expiry_call")
        session.expiry_call = self.clock.callLater(seconds, self._expire, session)

    def _expire(self, session: Session) -> None:
        session.expiry_call = None
        if session.connection is None and self.sessions.get(session.client_id) is session:
            self._client_log.info("session-expired", "MQTT session %s expired", session.client_id)
            self.destroy(session)

    @staticmethod
    def _cancel(session: Session, attribute: str) -> None:
        call = getattr(session, attribute)
        if call is not None and call.active():
            call.cancel()
        setattr(session, attribute, None)

    def stop(self) -> None:
        """Cancel timers and commit pending rows (broker shutdown); persisted sessions are picked up again by `load`
        on the next start."""
        self.flush_rows()
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()  # still failing: what is not on disk now is lost with the process
        self._flush_call = None
        for session in self.sessions.values():
            self._cancel(session, "expiry_call")
            if session.pending_will is not None and session.pending_will.call is not None \
                    and session.pending_will.call.active():
                session.pending_will.call.cancel()

    # ----------------------------------------------------------------------------------------- subscriptions
    def add_subscription(self, session: Session, entry: SubscriptionEntry, owner: CoreSession, *,
                         save: bool = True) -> bool:
        """Record and bind a subscription as the client's core session `owner` (which raises NotAuthorized when
        the gate refuses the filter: nothing is recorded then); returns whether the filter existed already.
        `save=False` leaves writing the session row to the caller (once for a whole SUBSCRIBE packet)."""
        if entry.share:
            self.join_share(session, entry, owner)
        else:
            self.ensure_queue(session, owner)  # also for $SYS: the connection consumes its session queue
            if not is_sys_name(entry.topic_filter):
                owner.bind(core_pattern(entry.topic_filter), session.queue)
            else:
                # $SYS topics are generated by the adapter and never go through the core router; reading them is
                # a permission all the same (Sub on the filter as MQTT writes it)
                owner.authorize(Action.SUB, Resource.topic_filter(entry.topic_filter))
        existed = session.put_subscription(entry)
        if save:
            self.save(session)
        return existed

    def remove_subscription(self, session: Session, topic_filter: str, owner: CoreSession | None = None, *,
                            save: bool = True) -> SubscriptionEntry | None:
        """Forget and unbind a subscription (as `owner`, or as the system for housekeeping); `save=False` leaves
        writing the session row to the caller."""
        entry = session.pop_subscription(topic_filter)
        if entry is None:
            return None
        if entry.share:
            self.leave_share(session, entry)
        elif not is_sys_name(topic_filter):
            (owner or self.system).unbind(core_pattern(topic_filter), session.queue)
        if save:
            self.save(session)
        return entry

    def join_share(self, session: Session, entry: SubscriptionEntry, owner: CoreSession) -> None:
        """Make `owner` a member of the share's queue, binding the inner filter to it (the gate decides)."""
        assert entry.share is not None
        share_name, inner = entry.share
        topic = make_share_topic(share_name, inner)
        owner.claim_private(topic, queues=1)
        if not is_sys_name(inner):
            owner.bind(core_pattern(inner), QueueRef(topic, 0))
        row = self._shares.get(topic) or {"group": share_group(share_name), "share": share_name, "filter": inner,
                                          "members": []}
        if session.client_id not in row["members"]:
            row["members"].append(session.client_id)
        self._save_share(topic, row)

    def leave_share(self, session: Session, entry: SubscriptionEntry) -> None:
        assert entry.share is not None
        topic = make_share_topic(*entry.share)
        row = self._shares.get(topic)
        if row is None:
            return
        if session.client_id in row["members"]:
            row["members"].remove(session.client_id)
        if row["members"]:
            self._save_share(topic, row)
            return
        del self._shares[topic]
        self.share_rows.delete(topic)
        try:
            self.system.delete_topic(topic)
        except TidegateError:
            pass
        group = row["group"]
        if not any(other["group"] == group for other in self._shares.values()):
            try:
                self.system.delete_group(group)
            except TidegateError:
                pass  # still has online members elsewhere, or never consumed

    def share_group_of(self, entry: SubscriptionEntry) -> str:
        assert entry.share is not None
        return share_group(entry.share[0])

    def _save_share(self, topic: str, row: dict[str, Any]) -> None:
        self._shares[topic] = row
        self.share_rows.put(topic, row)
