"""What every protocol adapter's connection and listener share: one shape, written once.

- `AdapterFactory(core, gate, clock, settings, *, metrics, listener)`: the one listener shape every protocol uses,
  so gateway/app.py builds native, MQTT and AMQP listeners (plain TCP, TLS, WebSocket) from one table.
- `AdapterConnection`: a Twisted protocol with
  * one outbound write point (`write`/`write_chunks`): inside `dataReceived` (or a core callback run through
    `_run_batched`) everything caused goes out as one write, outside it straight to the transport; a write that
    finds a plain TCP transport's buffer empty is sent on the socket at once (`send_now`), so paced traffic does not
    pay Twisted's epoll register/unregister and an extra reactor turn per write;
  * connection metrics by protocol label, TCP_NODELAY, an idle timer;
  * back-pressure: registered as a streaming producer on its transport (TCP, TLS, and WebSocket wrappers that
    forward registration), `paused` tells the adapter to stop delivering, `on_pause`/`on_resume` hooks;
  * an *authenticating* state: `authenticate(credentials)` asks the gate asynchronously; frames that were already
    parsed after CONNECT/HELLO (`hold_frames`) and bytes that arrive meanwhile wait, bounded, until the decision
    fires; then `on_authenticated`/`on_authentication_failed` run and the held work resumes in order;
  * admission against the limits (core/security/limits.py, `ConnectionLimits.limiter`): connections and connection
    rate per source address are counted when the TCP connection is made, connections per user once the gate has
    named the principal. A refused connection is answered when its client first speaks: `authenticate` fails
    with `QuotaExceeded`, which each adapter reports its way (MQTT CONNACK 0x97 / 3.1.1 return code 3, AMQP
    connection.close 530, native error QUOTA_EXCEEDED).

Subclasses implement `bytes_received(data)` (feed the codec, dispatch frames) and, if they authenticate,
`frames_resumed(frames)` and the two authentication hooks.

Reading is paused and resumed by reason (`pause_reading(reason)`/`resume_reading(reason)`): a resource alarm
(`ALARM`), a publish-rate throttle, ...; the transport is read again only once every reason is lifted, and the idle
(keepalive/heartbeat) check is suspended meanwhile, since the client's keepalives wait unread in the socket. This is
separate from `paused`, which is about our output (the transport's buffer is full).

Read sizes: Twisted reads at most `bufferSize` bytes (64 KiB) per wake-up, so a 64 KiB message never arrived in
one read and each one cost a read, a batch, an append and an fsync round of its own. On plain TCP a connection's
reads grow (doubling, up to `MAX_READ_BYTES`) while they come back full and shrink back to `MIN_READ_BYTES` once
the stream slows (`_adapt_read_size`): a stream of large messages is handled many per read, an idle or paced
connection keeps the default.

Resource alarms (core/alarms.py): the factory follows the core's `ResourceAlarms` (`alarmed`, `alarm_reason`) and
tells every connection that has published (`publish_seen()` marks it) when the state changes (`alarm_changed`).
While an alarm is raised, a connection that publishes is no longer read after the read that held the publish (what
that read held is still handled), as RabbitMQ does; connections that only consume are read and served as usual.
When the alarm clears, reading resumes. Protocol hooks: `on_alarm_changed` (AMQP: connection.blocked/unblocked)
and `on_alarm_block`; `block_at_alarm` says whether a connection that published before the alarm stops being read
at once (MQTT, native, as RabbitMQ's MQTT plugin) or only at its next publish (AMQP, as RabbitMQ's AMQP reader).

Delivery before ingest (internal flow control, as RabbitMQ's credit flow between reader and queue): a read of a
fast publisher (up to MAX_READ_BYTES, thousands of small publishes) is ingested in one reactor turn, while the
core delivers in credit-sized pumps; left alone the publisher runs far ahead of its subscribers, the recent-message
cache evicts what they have not received, and every delivery then reads the log. So a connection whose read held a
publish (adapters set `published_this_read`) and was a full one (at least MIN_READ_BYTES: more was waiting; a
windowed publisher, QoS 1 with a bounded inflight, never gets there and pays nothing) is not read again while the
core has due deliveries (a woken subscription with credit: `Core.deliveries_due()`), and is read again once those
pumps have run
(`Core.when_deliveries_drained`, bounded: at most `MAX_YIELD_TURNS` turns of wake rounds or `MAX_YIELD_SECONDS`,
core/delivery.py). A subscriber without credit (its client does not keep up, its transport is paused) is never
due, so slow consumers do not throttle publishers; reason `DELIVERY`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.tcp import Connection as TcpConnection
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tidegate.adapters.certificates import certificate_identity, peer_certificate
from tidegate.adapters.idle_timers import IdleTimers
from tidegate.adapters.transport import disable_nagle
from tidegate.core.errors import QuotaExceeded
from tidegate.core.interfaces import Core
from tidegate.core.metrics import CoreMetrics
from tidegate.core.security.gate import Credentials, Gate, Principal
from tidegate.core.security.limits import Limiter, SourceTicket, UserTicket
from tidegate.core.session import CoreSession, system_session

log = Logger(namespace="tidegate.adapters")

# Bytes a connection may send while its authentication is being decided before it is dropped: a client that
# pipelines its first publishes behind CONNECT is fine, one that streams megabytes without an answer is not.
DEFAULT_MAX_HELD_BYTES = 1024 * 1024
# Bytes the broker may write to a connection whose transport said "pause" (its send buffer is full: the client
# does not read) before the connection is closed. Delivery stops on pause, so only replies and what was already
# decided pile up here; a client that keeps asking without reading hits this.
DEFAULT_OUTPUT_BUDGET = 8 * 1024 * 1024
# Bytes read per wake-up on plain TCP: Twisted's default, and the most a fast stream grows it to (see above).
MIN_READ_BYTES = 64 * 1024
MAX_READ_BYTES = 1024 * 1024
# A multi-chunk write this large is handed to the kernel as its pieces (`sendmsg`) instead of being joined first:
# joining would copy every payload once more; below it the join is cheaper than the per-piece work.
SCATTER_MIN_BYTES = 64 * 1024
# Linux's IOV_MAX: the most pieces one `sendmsg` takes. A write of more pieces is sent in groups of this many when
# its pieces average SCATTER_MIN_AVERAGE_BYTES or more (a batch of large deliveries: head pieces and bodies), and
# joined when they are small (a long batch of small packets, where one copy is cheaper than the extra calls).
MAX_SCATTER_PIECES = 1024
SCATTER_MIN_AVERAGE_BYTES = 1024
# Why reading is paused (`AdapterConnection.pause_reading`): a resource alarm is raised and the connection publishes.
ALARM = "alarm"
# ... or deliveries are due and go first (delivery before ingest, see above).
DELIVERY = "delivery"
# The reasons of a connection that is read (nearly all of them): shared, since an empty set costs 216 bytes.
NOT_PAUSED: frozenset[str] = frozenset()
# What a connection holds while its login is decided, when it holds nothing (every connection, nearly always).
_NOTHING_HELD: tuple[()] = ()


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """What every connection of every protocol is held to (config section `[connections]`)."""

    output_budget: int = DEFAULT_OUTPUT_BUDGET
    max_held_bytes: int = DEFAULT_MAX_HELD_BYTES
    limiter: Limiter | None = None  # limits against abuse, shared by every listener of the process (`[limits]`)


class AdapterFactory(Factory):
    """Listener factory of one protocol: `Factory(core, gate, clock, settings, *, metrics, listener, limits)`."""

    protocol_label: ClassVar[str] = "adapter"
    # Which field of a verified client certificate names the user ([tls] identity; set by gateway/listeners.py).
    certificate_identity_rule: str = "cn"

    def __init__(self, core: Core, gate: Gate, clock: Any, settings: Any, *, metrics: CoreMetrics | None = None,
                 listener: str = "", limits: ConnectionLimits | None = None) -> None:
        self.core = core
        self.gate = gate
        self.clock = clock
        self.settings = settings
        self.metrics = metrics if metrics is not None else core.metrics
        self.listener = listener or self.protocol_label
        self.limits = limits or ConnectionLimits()
        self.limiter = self.limits.limiter
        self.noisy = False
        # The broker acting for this adapter (housekeeping of its private topics, wills); never a client's.
        self.system = system_session(core, gate, self.listener)
        # Resource alarms (core/alarms.py): plain attributes, read on every publish; only connections that have
        # published are told of changes (a consumer-only connection is never blocked).
        alarms = getattr(core, "alarms", None)
        self.alarmed = bool(alarms is not None and alarms.alarmed)
        self.alarm_reason = alarms.reason if alarms is not None else ""
        self.publishers: set[AdapterConnection] = set()
        # Delivery before ingest (see above); absent on a core without it (the feature is then off)
        self.deliveries_due: Any = getattr(core, "deliveries_due", None)
        self.when_deliveries_drained: Any = getattr(core, "when_deliveries_drained", None)
        # every connection's idle (keepalive/heartbeat) deadline, behind one reactor timer
        self.idle_timers = IdleTimers(clock)
        self._unsubscribe_alarms = alarms.subscribe(self.alarm_changed) if alarms is not None else None

    def open_session(self, principal: Principal, source: str, client_id: str = "") -> CoreSession:
        """The per-connection door into the core, opened once the connection has authenticated."""
        limiter = self.limiter
        quota = limiter.session_quota(self.listener, principal.name) if limiter is not None else None
        return CoreSession(self.core, self.gate, principal, source=source, listener=self.listener,
                           client_id=client_id, quota=quota)

    def limit_hit(self, cause: str, *, user: str = "", source: str = "", reason: str = "") -> None:
        """An adapter-side limit refused something: counted in `tidegate_security_limit_hits` and (with a limiter)
        audited like the core's own limits."""
        if self.limiter is not None:
            self.limiter.hit(self.listener, cause, user=user, source=source, reason=reason)
        else:
            self.metrics.security.limit_hit(self.listener, cause)

    def stop(self) -> None:
        """Broker shutdown: cancel timers the adapter owns (override, and call `super().stop()`)."""
        self.idle_timers.stop()
        if self._unsubscribe_alarms is not None:
            self._unsubscribe_alarms()
            self._unsubscribe_alarms = None

    def alarm_changed(self, alarmed: bool, reason: str) -> None:
        """A resource alarm was raised or cleared (or the reason changed): every connection that has published
        hears it, each with its writes batched as in a read."""
        self.alarmed = alarmed
        self.alarm_reason = reason
        for connection in list(self.publishers):
            connection._run_batched(lambda _, c=connection: c.alarm_changed(alarmed, reason), None)


def peer_host(transport: Any) -> str:
    """The client's address as the gate sees it (`127.0.0.1`, `::1`), or '' for transports without one."""
    try:
        peer = transport.getPeer()
    except Exception:
        return ""
    return str(getattr(peer, "host", "") or "")


def send_now(transport: Any, chunks: list[bytes]) -> None:
    """Write `chunks` (in order, as one write) to `transport`, straight on the socket when that is safe.

    Twisted's `write` only buffers: the bytes leave on the next reactor turn, after an `epoll_ctl` that registers
    the socket for writing and another that unregisters it once drained. When the transport is plain TCP, open,
    and has nothing buffered, a non-blocking `send` now keeps the order and skips both; whatever the kernel does not
    take (a full socket buffer) and every other case go through `transport.write`/`writeSequence`, which keep
    back-pressure (producer pause) and error handling as they were.
    """
    if (isinstance(transport, TcpConnection) and transport.connected and not transport.disconnecting
            and not transport._tempDataBuffer and transport.offset == len(transport.dataBuffer)
            and not transport._writeDisconnected):
        if len(chunks) > 1:
            total = sum(map(len, chunks))
            if total >= SCATTER_MIN_BYTES and (len(chunks) <= MAX_SCATTER_PIECES
                                               or total >= SCATTER_MIN_AVERAGE_BYTES * len(chunks)):
                _send_pieces(transport, chunks, total)
                return
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        try:
            sent = transport.socket.send(data)
        except OSError:
            sent = 0  # EAGAIN: Twisted waits for the socket; other errors: Twisted meets them and closes its way
        if sent < len(data):
            transport.write(data[sent:])
    elif len(chunks) == 1:
        transport.write(chunks[0])
    else:
        transport.writeSequence(chunks)


def _send_pieces(transport: TcpConnection, chunks: list[bytes], total: int) -> None:
    """`send_now` of a large multi-chunk write: the pieces go to the kernel as they are (one `sendmsg` per
    MAX_SCATTER_PIECES pieces, no join); what it does not take is handed to Twisted as the remaining pieces (only
    a piece cut in two is copied)."""
    send = transport.socket.sendmsg
    sent = 0
    try:
        if len(chunks) <= MAX_SCATTER_PIECES:
            sent = send(chunks)
        else:
            for start in range(0, len(chunks), MAX_SCATTER_PIECES):
                group = chunks[start:start + MAX_SCATTER_PIECES]
                taken = send(group)
                sent += taken
                if taken < sum(map(len, group)):
                    break  # the socket is full: the rest waits in Twisted's buffer
    except OSError:
        pass  # EAGAIN: Twisted waits for the socket; other errors: Twisted meets them and closes its way
    if sent >= total:
        return
    index = 0
    while sent >= len(chunks[index]):
        sent -= len(chunks[index])
        index += 1
    rest = chunks[index:]
    if sent:
        rest[0] = rest[0][sent:]
    transport.writeSequence(rest)


@implementer(IPushProducer)
class AdapterConnection(Protocol):
    factory: AdapterFactory
    max_held_bytes = DEFAULT_MAX_HELD_BYTES
    output_budget = DEFAULT_OUTPUT_BUDGET
    _reads_grown = False  # set on the instance while its transport reads more than MIN_READ_BYTES at a time

    # Slots for what every connection sets: Twisted's Protocol has no __slots__, so instances keep a __dict__ (for
    # `transport`, `factory`, subclasses' own attributes, tests' monkeypatches), but once an instance dict holds more
    # than 30 keys CPython gives up key sharing and each connection pays a 1.6 KB private dict. Subclasses with
    # many attributes of their own (MQTT) declare slots too.
    __slots__ = ("session", "source", "connected_", "closing", "paused", "authenticating", "_batch", "_held_frames",
                 "_held_bytes", "_held_size", "_idle_timer", "_idle_limit", "_written_while_paused", "last_seen",
                 "_source_ticket", "_user_ticket", "_admission_refused", "has_published", "_reading_paused_for",
                 "published_this_read")

    def __init__(self) -> None:
        self.session: CoreSession | None = None
        self.source = ""
        self.connected_ = False
        self.closing = False
        self.paused = False
        self.authenticating = False
        self._batch: list[bytes] | None = None
        # frames and bytes held while a login is decided: lists only while there is something to hold
        self._held_frames: list[Any] | tuple[()] = _NOTHING_HELD
        self._held_bytes: list[bytes] | tuple[()] = _NOTHING_HELD
        self._held_size = 0
        self._idle_timer: Any = None  # this connection's entry in `factory.idle_timers`, None when not armed
        self._idle_limit = 0.0
        self._written_while_paused = 0
        self.last_seen = 0.0
        self._source_ticket: SourceTicket | None = None
        self._user_ticket: UserTicket | None = None
        self._admission_refused: QuotaExceeded | None = None
        self.has_published = False  # set by `publish_seen`: the connection is one the resource alarms block
        self._reading_paused_for: frozenset[str] = NOT_PAUSED  # why the transport is not read (`pause_reading`)
        self.published_this_read = False  # set by the adapter's publish path; read after each read (DELIVERY)

    # ------------------------------------------------------------------ transport events
    def connectionMade(self) -> None:
        factory = self.factory
        self.connected_ = True
        limits = factory.limits
        if limits.output_budget != DEFAULT_OUTPUT_BUDGET:
            self.output_budget = limits.output_budget
        if limits.max_held_bytes != DEFAULT_MAX_HELD_BYTES:
            self.max_held_bytes = limits.max_held_bytes
        self.source = peer_host(self.transport)
        if factory.limiter is not None:
            try:
                self._source_ticket = factory.limiter.admit_source(factory.listener, self.source)
            except QuotaExceeded as refused:
                self._admission_refused = refused  # answered at CONNECT/HELLO/start-ok, the protocol's way
        label = factory.protocol_label
        factory.metrics.connections[label] += 1
        factory.metrics.connections_total[label] += 1
        disable_nagle(self.transport)
        self.last_seen = factory.clock.seconds()
        try:
            self.transport.registerProducer(self, True)
        except (AttributeError, RuntimeError) as exc:
            log.warn("{label}: no back-pressure on this transport ({exc})", label=label, exc=exc)
        self.connection_started()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.connected_:
            return
        self.connected_ = False
        self.factory.metrics.connections[self.factory.protocol_label] -= 1
        self.stop_idle_timer()
        if self.has_published:
            self.factory.publishers.discard(self)
        self._held_frames = self._held_bytes = _NOTHING_HELD
        limiter = self.factory.limiter
        if limiter is not None:
            limiter.release_source(self._source_ticket)
            limiter.release_user(self._user_ticket)
        self.connection_ended(reason)

    def dataReceived(self, data: bytes) -> None:
        if len(data) >= MIN_READ_BYTES or self._reads_grown:
            self._adapt_read_size(len(data))
        if self.closing:
            return
        self.last_seen = self.factory.clock.seconds()
        if self.authenticating:
            self._hold_bytes(data)
            return
        self._run_batched(self.bytes_received, data)
        if self.published_this_read:
            self.published_this_read = False
            if len(data) >= MIN_READ_BYTES:  # a full read: the client sends faster than it is read (see above)
                self._yield_to_delivery()

    def _adapt_read_size(self, received: int) -> None:
        """Double a plain TCP transport's read size after a full read (up to MAX_READ_BYTES), halve it after a
        read of at most an eighth of it (down to MIN_READ_BYTES). Only connections that streamed get the
        instance attribute; the rest keep the class defaults (idle connections stay small)."""
        transport = self.transport
        if not isinstance(transport, TcpConnection):
            return
        size = transport.bufferSize
        if received >= size:
            if size < MAX_READ_BYTES:
                transport.bufferSize = min(size * 2, MAX_READ_BYTES)
                self._reads_grown = True
        elif received <= size >> 3 and size > MIN_READ_BYTES:
            size = max(size >> 1, MIN_READ_BYTES)
            transport.bufferSize = size
            self._reads_grown = size > MIN_READ_BYTES

    def peer_certificate_identity(self) -> str:
        """The user name the client's verified TLS certificate carries ('' on plain connections or without a
        certificate): the one place every adapter reads it (MQTT/native without a user name, AMQP EXTERNAL)."""
        certificate = peer_certificate(self.transport)
        if certificate is None:
            return ""
        return certificate_identity(certificate, self.factory.certificate_identity_rule)

    # ------------------------------------------------------------------ hooks for subclasses
    def connection_started(self) -> None:
        """After connectionMade's common work."""

    def connection_ended(self, reason: Failure) -> None:
        """After connectionLost's common work."""

    def bytes_received(self, data: bytes) -> None:
        raise NotImplementedError

    def frames_resumed(self, frames: list[Any]) -> None:
        """Handle frames held while authenticating, in order (only for adapters that call `hold_frames`)."""
        raise NotImplementedError

    def on_authenticated(self, principal: Principal) -> None:
        """Authentication succeeded: open the session (`self.factory.open_session`) and answer the client."""

    def on_authentication_failed(self, failure: Failure) -> None:
        """Authentication failed: answer the protocol's way and close."""

    def idle_timed_out(self, idle: float) -> None:
        """Nothing arrived for the idle limit (override: protocol-specific close)."""
        self.close()

    def on_pause(self) -> None:
        """The transport's buffer is full: stop delivering until `on_resume`."""

    def on_resume(self) -> None:
        """The transport drained: deliver again."""

    def output_budget_exceeded(self) -> None:
        """The client stopped reading and the output budget is used up (`closing` is already set, so writes
        still go through): say so the protocol's way if it can (MQTT 5 DISCONNECT 0x97, native error) by
        overriding, then call `super()` to drop the connection without waiting for the buffer to drain."""
        self.transport.abortConnection()

    # ------------------------------------------------------------------ output
    def write(self, data: bytes) -> None:
        """The one write point for a single chunk."""
        if not self.connected_:
            return
        if self.paused and self._over_budget(len(data)):
            return
        if self._batch is not None:
            self._batch.append(data)
        else:
            send_now(self.transport, [data])

    def write_chunks(self, chunks: list[bytes]) -> None:
        """The one write point: inside a read the chunks join that read's batch, else go out now."""
        if not self.connected_ or not chunks:
            return
        if self.paused and self._over_budget(sum(map(len, chunks))):
            return
        if self._batch is not None:
            self._batch.extend(chunks)
        else:
            send_now(self.transport, chunks)

    def _over_budget(self, size: int) -> bool:
        self._written_while_paused += size
        if self._written_while_paused <= self.output_budget or self.closing:
            return False
        log.info("{label}: {source} does not read; {n} bytes waiting exceed the output budget of {budget}; "
                 "closing", label=self.factory.protocol_label, source=self.source, n=self._written_while_paused,
                 budget=self.output_budget)
        self.closing = True
        self.output_budget_exceeded()
        return True

    def close(self) -> None:
        """Close once what was written is sent (after the current read's batch, if inside one)."""
        self.closing = True
        if self._batch is None and self.connected_:
            self.transport.loseConnection()

    def _run_batched(self, work: Any, arg: Any) -> None:
        if self._batch is not None:  # re-entered from inside a batch: join it
            work(arg)
            return
        batch: list[bytes] = []
        self._batch = batch
        try:
            work(arg)
        finally:
            self._batch = None
            if batch and self.connected_:
                send_now(self.transport, batch)
            if self.closing and self.connected_:
                self.transport.loseConnection()

    # ------------------------------------------------------------------ authentication
    def authenticate(self, credentials: Credentials) -> None:
        """Ask the gate; until it answers, later frames of this read (`hold_frames`) and new bytes wait."""
        self.authenticating = True
        decision: Deferred[Principal]
        if self._admission_refused is not None:
            decision = fail(self._admission_refused)
        else:
            gate = self.factory.gate
            # a login the gate admits on the spot (anonymous, certificate) skips the Deferred chain
            login_now = getattr(gate, "login_now", None)
            principal = login_now(credentials) if login_now is not None else None
            if principal is not None:
                self._authenticated(principal)
                return
            decision = gate.authenticate(credentials)
        decision.addCallbacks(self._authenticated, self._authentication_failed)

    def hold_frames(self, frames: list[Any]) -> None:
        if self._held_frames is _NOTHING_HELD:
            self._held_frames = list(frames)
        else:
            self._held_frames.extend(frames)  # type: ignore[union-attr]

    def _hold_bytes(self, data: bytes) -> None:
        self._held_size += len(data)
        if self._held_size > self.max_held_bytes:
            log.info("{label}: {source} sent {n} bytes before its login was decided; closing",
                     label=self.factory.protocol_label, source=self.source, n=self._held_size)
            self._held_bytes = _NOTHING_HELD
            self.closing = True
            self.transport.abortConnection()
            return
        if self._held_bytes is _NOTHING_HELD:
            self._held_bytes = [data]
        else:
            self._held_bytes.append(data)  # type: ignore[union-attr]

    def _authenticated(self, principal: Principal) -> None:
        if not self.connected_:
            self.authenticating = False
            return
        limiter = self.factory.limiter
        if limiter is not None and not principal.system:
            limiter.release_user(self._user_ticket)  # a re-authentication (AMQP) replaces the first login
            self._user_ticket = None
            try:
                self._user_ticket = limiter.admit_user(self.factory.listener, principal.name)
            except QuotaExceeded as refused:
                self._authentication_failed(Failure(refused))
                return
        self.authenticating = False
        self._run_batched(self._resume_after_login, principal)

    def _resume_after_login(self, principal: Principal) -> None:
        self.on_authenticated(principal)
        frames, self._held_frames = self._held_frames, _NOTHING_HELD
        if frames and not self.closing:
            self.frames_resumed(frames)  # type: ignore[arg-type]
        data, self._held_bytes, self._held_size = b"".join(self._held_bytes), _NOTHING_HELD, 0
        if data and not self.closing:
            if self.authenticating:  # a frame resumed above started another authentication (AMQP re-auth)
                self._hold_bytes(data)
            else:
                self.bytes_received(data)

    def _authentication_failed(self, failure: Failure) -> None:
        self.authenticating = False
        self._held_frames, self._held_bytes, self._held_size = _NOTHING_HELD, _NOTHING_HELD, 0
        if self.connected_:
            self._run_batched(self.on_authentication_failed, failure)

    # ------------------------------------------------------------------ idle timer
    def start_idle_timer(self, seconds: float) -> None:
        """Call `idle_timed_out` once nothing has arrived for `seconds` (0 = never)."""
        self.stop_idle_timer()
        self._idle_limit = seconds
        if seconds > 0:
            self.factory.idle_timers.arm(self, seconds)

    def stop_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self.factory.idle_timers.cancel(self)

    def _check_idle(self) -> None:
        # Called by the listener's `IdleTimers` at the deadline: one deadline per connection that re-arms for the
        # remaining time, instead of a reset on every read.
        timers = self.factory.idle_timers
        if self._reading_paused_for:
            # We do not read: the client's keepalives wait in the socket. Judged again once reading resumes
            # (`resume_reading` restarts the count).
            timers.arm(self, self._idle_limit)
            return
        idle = self.factory.clock.seconds() - self.last_seen
        if idle >= self._idle_limit:
            self._run_batched(self.idle_timed_out, idle)
            return
        timers.arm(self, self._idle_limit - idle)

    # ------------------------------------------------------------------ reading: paused by reason
    @property
    def reading_paused(self) -> bool:
        return bool(self._reading_paused_for)

    def reading_paused_for(self, reason: str) -> bool:
        return reason in self._reading_paused_for

    def pause_reading(self, reason: str) -> None:
        """Stop reading from the transport because of `reason` (`ALARM`, a throttle, ...). The transport stays
        paused until every reason is lifted; meanwhile the idle check does not count the silence against the
        client. Our output (`paused`, deliveries) is not affected."""
        reasons = self._reading_paused_for
        if reason in reasons:
            return
        self._reading_paused_for = reasons = reasons | {reason}
        if len(reasons) == 1 and self.connected_:
            pause = _reading_control(self.transport, "pauseProducing")
            if pause is not None:
                pause()

    def resume_reading(self, reason: str) -> None:
        """Lift `reason`; the transport is read again once no reason is left, and the idle check counts from now
        (the silence was ours)."""
        reasons = self._reading_paused_for
        if reason not in reasons:
            return
        self._reading_paused_for = reasons = (reasons - {reason}) or NOT_PAUSED
        if reasons or not self.connected_:
            return
        self.last_seen = self.factory.clock.seconds()
        resume = _reading_control(self.transport, "resumeProducing")
        if resume is not None:
            resume()

    # ------------------------------------------------------------------ delivery before ingest
    def _yield_to_delivery(self) -> None:
        """This read published: if deliveries are due, stop reading until the core has run them (bounded)."""
        factory = self.factory
        due = factory.deliveries_due
        if (due is None or not self.connected_ or self.closing or DELIVERY in self._reading_paused_for
                or not due()):
            return
        self.pause_reading(DELIVERY)
        if self._reads_grown:
            # A grown read (up to MAX_READ_BYTES: thousands of small publishes) is ingested whole in one turn,
            # however many deliveries are due; back to the default size, so that what is read between two
            # delivery rounds stays in proportion to what the pumps hand out.
            self.transport.bufferSize = MIN_READ_BYTES
            self._reads_grown = False
        factory.when_deliveries_drained(self._deliveries_drained)

    def _deliveries_drained(self) -> None:
        # also after the connection was lost meanwhile: resume_reading then only forgets the reason
        self.resume_reading(DELIVERY)

    # ------------------------------------------------------------------ resource alarms
    # Whether a connection that published before the alarm was raised stops being read at once (MQTT, native) or
    # only when it publishes again (AMQP: it is told with connection.blocked first, as RabbitMQ does).
    block_at_alarm: ClassVar[bool] = True

    def publish_seen(self) -> None:
        """The client publishes. Adapters call it for a publish when `not self.has_published or
        self.factory.alarmed` (two attribute reads on the hot path): the first publish makes the connection one the
        alarms block; one during an alarm stops the reading after the current read."""
        if not self.has_published:
            self.has_published = True
            self.factory.publishers.add(self)
        factory = self.factory
        if factory.alarmed and ALARM not in self._reading_paused_for and self.connected_ and not self.closing:
            self._block_for_alarm(factory.alarm_reason)

    def alarm_changed(self, alarmed: bool, reason: str) -> None:
        """The factory's alarm state changed (only connections that published hear it): raised, a connection that
        blocks at once is no longer read (`block_at_alarm`); cleared, reading resumes."""
        if not self.connected_ or self.closing:
            return
        self.on_alarm_changed(alarmed, reason)
        if alarmed:
            if self.block_at_alarm and ALARM not in self._reading_paused_for:
                self._block_for_alarm(reason)
        elif ALARM in self._reading_paused_for:
            log.debug("{label}: {source}: resource alarms cleared; reading again",
                      label=self.factory.protocol_label, source=self.source)
            self.resume_reading(ALARM)

    def _block_for_alarm(self, reason: str) -> None:
        log.debug("{label}: {source} publishes while a resource alarm is raised ({reason}); not reading until it "
                  "clears", label=self.factory.protocol_label, source=self.source, reason=reason)
        self.pause_reading(ALARM)
        self.on_alarm_block(reason)

    def on_alarm_changed(self, alarmed: bool, reason: str) -> None:
        """Hook: an alarm was raised or cleared, this connection has published (AMQP: connection.blocked/unblocked)."""

    def on_alarm_block(self, reason: str) -> None:
        """Hook: the connection is no longer read because of a resource alarm."""

    # ------------------------------------------------------------------ IPushProducer
    def pauseProducing(self) -> None:
        self.paused = True
        self.on_pause()

    def resumeProducing(self) -> None:
        self.paused = False
        self._written_while_paused = 0
        self.on_resume()

    def stopProducing(self) -> None:
        pass


def _reading_control(transport: Any, name: str) -> Any:
    """The transport's `pauseProducing`/`resumeProducing` (the reading side of TCP and TLS transports), or that of
    the transport under a wrapper without them (MQTT over WebSocket: autobahn's protocol wraps the TCP or TLS
    transport); None if neither has one."""
    control = getattr(transport, name, None)
    if control is None:
        control = getattr(getattr(transport, "transport", None), name, None)
    return control
