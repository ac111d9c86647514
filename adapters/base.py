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

    def open_session(self, principal: Principal, source: str, client_id: str = "") -> CoreSession:
        """The per-connection door into the core, opened once the connection has authenticated."""
        limiter = self.limiter
        quota = limiter.session_quota(self.listener, principal.name) if limiter is not None else None
        return CoreSession(self.core, self.gate, principal, source=source, listener=self.listener,
                           client_id=client_id, quota=quota)

    def stop(self) -> None:
        """Broker shutdown: cancel timers the adapter owns (override)."""


def peer_host(transport: Any) -> str:
    """The client's address as the gate sees it (`127.0.0.1`, `::1`), or '' for transports without one."""
    try:
        peer = transport.getPeer()
    except Exception:
        return ""
    return str(getattr(peer, "host", "") or "")


@implementer(IPushProducer)
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


class AdapterConnection(Protocol):
    factory: AdapterFactory
    max_held_bytes = DEFAULT_MAX_HELD_BYTES
    output_budget = DEFAULT_OUTPUT_BUDGET

    def __init__(self) -> None:
        self.session: CoreSession | None = None
        self.source = ""
        self.connected_ = False
        self.closing = False
        self.paused = False
        self.authenticating = False
        self._batch: list[bytes] | None = None
        self._held_frames: list[Any] = []
        self._held_bytes: list[bytes] = []
        self._held_size = 0
        self._idle_timer: Any = None
        self._idle_limit = 0.0
        self._written_while_paused = 0
        self.last_seen = 0.0
        self._source_ticket: SourceTicket | None = None
        self._user_ticket: UserTicket | None = None
        self._admission_refused: QuotaExceeded | None = None

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
        self._held_frames, self._held_bytes = [], []
        limiter = self.factory.limiter
        if limiter is not None:
            limiter.release_source(self._source_ticket)
            limiter.release_user(self._user_ticket)
        self.connection_ended(reason)

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        self.last_seen = self.factory.clock.seconds()
        if self.authenticating:
            self._hold_bytes(data)
            return
        self._run_batched(self.bytes_received, data)

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
            decision = self.factory.gate.authenticate(credentials)
        decision.addCallbacks(self._authenticated, self._authentication_failed)

    def hold_frames(self, frames: list[Any]) -> None:
        self._held_frames.extend(frames)

    def _hold_bytes(self, data: bytes) -> None:
        self._held_size += len(data)
        if self._held_size > self.max_held_bytes:
            log.info("{label}: {source} sent {n} bytes before its login was decided; closing",
                     label=self.factory.protocol_label, source=self.source, n=self._held_size)
            self._held_bytes = []
            self.closing = True
            self.transport.abortConnection()
            return
        self._held_bytes.append(data)

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
        frames, self._held_frames = self._held_frames, []
        if frames and not self.closing:
            self.frames_resumed(frames)
        data, self._held_bytes, self._held_size = b"".join(self._held_bytes), [], 0
        if data and not self.closing:
            if self.authenticating:  # a frame resumed above started another authentication (AMQP re-auth)
                self._hold_bytes(data)
            else:
                self.bytes_received(data)

    def _authentication_failed(self, failure: Failure) -> None:
        self.authenticating = False
        self._held_frames, self._held_bytes, self._held_size = [], [], 0
        if self.connected_:
            self._run_batched(self.on_authentication_failed, failure)

    # ------------------------------------------------------------------ idle timer
    def start_idle_timer(self, seconds: float) -> None:
        """Call `idle_timed_out` once nothing has arrived for `seconds` (0 = never)."""
        self.stop_idle_timer()
        self._idle_limit = seconds
        if seconds > 0:
            self._idle_timer = self.factory.clock.callLater(seconds, self._check_idle)

    def stop_idle_timer(self) -> None:
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.cancel()
        self._idle_timer = None

    def _check_idle(self) -> None:
        # One timer per connection that re-arms for the remaining time, instead of a reset on every read.
        idle = self.factory.clock.seconds() - self.last_seen
        if idle >= self._idle_limit:
            self._idle_timer = None
            self._run_batched(self.idle_timed_out, idle)
            return
        self._idle_timer = self.factory.clock.callLater(self._idle_limit - idle, self._check_idle)

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
