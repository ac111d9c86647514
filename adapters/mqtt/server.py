"""The MQTT 3.1 / 3.1.1 / 5.0 listener: a thin Twisted protocol per connection, and its factory.

`MqttServerFactory(core, gate, clock, settings, *, metrics, listener)` is the one listener shape (adapters/base.py).
A connection (`MqttProtocol`) feeds the sans-IO codec with each read and dispatches each packet; it owns the life
of the connection: CONNECT (negotiated by `state.negotiate`, then authenticated by the gate while later packets of
the read wait), keep alive, DISCONNECT, take-over, will, and closing on errors. The work is done elsewhere:

- inbound.py: PUBLISH (batched per read), PUBREL, SUBSCRIBE, UNSUBSCRIBE towards the core;
- outbound.py: deliveries to PUBLISH, PUBACK/PUBREC/PUBCOMP, credit;
- state.py: packet ids, Receive Maximum, topic aliases (sans-IO); sessions.py: sessions and shares;
  retained.py, sys_topics.py; mapping.py: names and messages; errors.py: core refusals as reason codes.

The connection reaches the core only through its `CoreSession` (opened once the gate authenticated the client);
the factory's housekeeping (session expiry, crash leftovers) goes through its system session. Everything one read
causes is written once, through the base class's single write point.

Errors: an `MqttProtocolError` from the codec or a handler closes the connection: v5 gets DISCONNECT (or CONNACK
before the connection is accepted) with the reason code, 3.1.1 gets CONNACK where 3.1.1 has a code, else just the
close. One log line per closed connection; never a traceback to the client.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from twisted.python.failure import Failure

from tidegate.adapters.base import AdapterConnection, AdapterFactory, ConnectionLimits
from tidegate.core.errors import NotAuthenticated, QuotaExceeded, TidegateError
from tidegate.core.interfaces import Core
from tidegate.core.metrics import CoreMetrics
from tidegate.core.ratelimit import ClientLog, clip
from tidegate.core.security.gate import Action, Credentials, Gate, Principal, Resource
from tidegate.core.security.limits import SESSIONS_PER_USER

from .codec import (
    MQTT_5,
    Auth,
    Connack,
    Connect,
    Disconnect,
    MqttCodec,
    MqttProtocolError,
    Pingreq,
    Pingresp,
    Properties,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    ReasonCode,
    Subscribe,
    Unsubscribe,
    Will,
)
from .errors import reason_for_core_error
from .inbound import Inbound
from .mapping import PublishFields, UnmappableName, is_sys_name, message_from_publish
from .outbound import Outbound
from .reason_codes import CONNACK_REASON_CODES, DISCONNECT_REASON_CODES
from .retained import RETAINED_NAMESPACE, RetainedStore
from .sessions import SESSIONS_NAMESPACE, SHARES_NAMESPACE, PendingWill, Session, SessionManager, SubscriptionEntry
from .settings import MqttSettings
from .speedups import compiled as _compiled_hot_path  # noqa: F401 - installs the compiled hot path if built
from .state import Negotiated, Refusal, negotiate
from .sys_topics import SysTopics

log = logging.getLogger("tidegate.mqtt")

__all__ = ["MqttProtocol", "MqttServerFactory", "MqttSettings"]

# 3.1.1 CONNACK has return codes only for these; other faults just close (MQTT-3.2.2-6)
# The CONNACK accepting a 3.1/3.1.1 connection: type 2, length 2, Session Present flag, return code 0.
_V311_CONNACK_PRESENT = b"\x20\x02\x01\x00"
_V311_CONNACK_NEW = b"\x20\x02\x00\x00"
_V311_CONNACK_REFUSALS = frozenset({
    ReasonCode.UNSUPPORTED_PROTOCOL_VERSION, ReasonCode.CLIENT_IDENTIFIER_NOT_VALID, ReasonCode.SERVER_UNAVAILABLE,
    ReasonCode.SERVER_SHUTTING_DOWN, ReasonCode.BAD_USER_NAME_OR_PASSWORD, ReasonCode.BAD_AUTHENTICATION_METHOD,
    ReasonCode.NOT_AUTHORIZED, ReasonCode.QUOTA_EXCEEDED,  # 0x97 goes out as return code 3 (server unavailable)
})


class MqttProtocol(AdapterConnection):
    """One MQTT connection: new -> (authenticating) -> connected -> closed."""

    factory: MqttServerFactory
    # what every connection sets (see AdapterConnection's slots: one connection's memory stays small)
    __slots__ = ("settings", "_addr", "codec", "state", "level", "client_id", "problem_information", "negotiated",
                 "mqtt_session", "inbound", "outbound", "_will")

    def __init__(self, factory: MqttServerFactory, addr: Any = None) -> None:
        super().__init__()
        self.factory = factory
        self.settings = factory.settings
        self._addr = addr  # its text (`peer`) is made only when a log line needs it
        self.codec = MqttCodec(max_packet_size=self.settings.max_packet_size)
        self.state = "new"  # new -> connected -> closed
        self.level = 4
        self.client_id = ""
        self.problem_information = True  # v5 clients may ask for reason strings to be left out
        self.negotiated: Negotiated | None = None
        self.mqtt_session: Session | None = None
        # `outbound` exists once the connection is accepted, `inbound` from the client's first PUBLISH, PUBREL,
        # SUBSCRIBE or UNSUBSCRIBE (`open_inbound`): a connection that never sends one stays smaller
        self.inbound: Inbound | None = None
        self.outbound: Outbound | None = None
        self._will: PendingWill | None = None

    @property
    def peer(self) -> str:
        """The client's address as log lines show it."""
        return str(self._addr) if self._addr is not None else "?"

    # ------------------------------------------------------------------------------------------ transport
    def connection_started(self) -> None:
        self.factory.connections.add(self)
        self.factory.connect_deadlines.add(self)

    def connection_ended(self, reason: Failure) -> None:
        self.factory.connections.discard(self)
        if self.state != "closed":
            self._end(send_will=True)

    def bytes_received(self, data: bytes) -> None:
        if self.state == "closed":
            return
        try:
            packets = self.codec.receive_batch(data)  # plain PUBLISHes and PUBACKs as tuples and ints
        except MqttProtocolError as error:
            if self._handle_all(error.packets_before_error):
                return
            if self.authenticating:
                self.hold_frames([error])  # the fault is answered once the CONNECT before it is decided
                return
            self._fail(error)
            return
        self._handle_all(packets)

    def frames_resumed(self, frames: list[Any]) -> None:
        error = frames.pop() if frames and isinstance(frames[-1], MqttProtocolError) else None
        if self._handle_all(frames) or error is None:
            return
        self._fail(error)

    def _handle_all(self, packets: list[Any]) -> bool:
        """Handle the packets of one read in order, storing staged PUBLISHes before any other packet and at the end;
        packets after a CONNECT whose authentication is pending wait for it. True if the connection was closed.

        `MqttCodec.receive_batch` gives plain PUBLISHes as tuples (staged by `Inbound.stage_plain`) and Success
        PUBACKs as ints (a run of them is settled by one `Outbound.on_pubacks`); before the connection is
        accepted they become packets again, so the general handlers refuse them as always."""
        publish = Publish
        count = len(packets)
        index = 0
        while index < count:
            packet = packets[index]
            if self.authenticating:
                self.hold_frames(packets[index:])
                return False
            inbound = self.inbound
            kind = packet.__class__
            if kind is tuple or kind is int:
                if self.state != "connected" or inbound is None:
                    packet = kind = _as_packet(packet)
                elif kind is tuple:
                    self.published_this_read = True  # delivery before ingest (adapters/base.py)
                    if not self.has_published or self.factory.alarmed:
                        self.publish_seen()  # as _on_publish (once for the run: it only marks and blocks)
                    stop = index + 1
                    while stop < count and packets[stop].__class__ is tuple:
                        stop += 1
                    inbound.stage_plain(packets, index, stop)  # handles its own errors, as _handle does
                    index = stop
                    if self.state == "closed":
                        inbound.drop_batch()
                        return True
                    continue
                else:
                    if inbound.batch is not None:
                        inbound.publish_batch()
                        if self.state == "closed":
                            return True
                    stop = index + 1
                    while stop < count and packets[stop].__class__ is int:
                        stop += 1
                    try:
                        self.outbound.on_pubacks(packets[index:stop])  # type: ignore[union-attr]
                    except Exception as error:
                        self.handle_error(error)
                    index = stop
                    if self.state == "closed":
                        inbound.drop_batch()
                        return True
                    continue
            if inbound is not None and inbound.batch is not None and kind is not publish:
                inbound.publish_batch()
                if self.state == "closed":
                    return True
            self._handle(packet)
            index += 1
            if self.state == "closed":
                if self.inbound is not None:
                    self.inbound.drop_batch()  # packets after a close are not acted on
                return True
        inbound = self.inbound
        if inbound is not None and inbound.batch is not None:
            inbound.publish_batch()
            return self.state == "closed"
        return False

    def on_pause(self) -> None:
        outbound = self.outbound
        if outbound is not None:
            outbound.pause()

    def on_resume(self) -> None:
        outbound = self.outbound
        if outbound is not None and self.state == "connected":
            self.batched(lambda _: outbound.resume(), None)  # what waited goes out in one write

    def output_budget_exceeded(self) -> None:
        """The client does not read: tell a v5 client why (DISCONNECT 0x97 Quota exceeded), end the session as a
        network failure would (the will is sent), and drop the connection."""
        if self.state == "connected" and self.level == MQTT_5:
            self.send(Disconnect(ReasonCode.QUOTA_EXCEEDED))
        if self.state != "closed":
            self._end(send_will=True)
        super().output_budget_exceeded()

    # ------------------------------------------------------------------------------------------ output
    def open_inbound(self) -> Inbound:
        """The inbound half, made on the first packet that needs it (the same state it would have had from CONNACK:
        it depends only on the negotiated level and the settings)."""
        inbound = self.inbound
        if inbound is None:
            inbound = self.inbound = Inbound(self)
        return inbound

    def send(self, packet: Any) -> None:
        self.write(self.codec.encode(packet))

    def batched(self, work: Any, arg: Any) -> None:
        """Run `work(arg)` (a core callback: deliveries, durable acknowledgements) so that what it writes goes out in
        one write, joining the current read's write if there is one."""
        self._run_batched(work, arg)

    def who(self) -> str:
        """The client for a log line; a long client id (up to 64 KB) is clipped."""
        return f"client {clip(self.client_id, 100)} ({self.peer})" if self.client_id else f"connection {self.peer}"

    # ------------------------------------------------------------------------------------------ errors
    def _fail(self, error: MqttProtocolError) -> None:
        """Close the connection for a protocol fault, telling the client why where its protocol level can."""
        if self.state == "closed":
            return
        self.factory.client_log.info(f"protocol-error-{int(error.reason_code)}", "mqtt %s: closing: %s", self.who(),
                                     str(error))
        if self.state == "new":
            self._refuse(error.reason_code, error.protocol_level, error.message)
            return
        self._disconnect(error.reason_code, error.message)

    def _refuse(self, reason: ReasonCode, level: int | None, text: str = "") -> None:
        """Answer a CONNECT that cannot be accepted, then close (no session, no will)."""
        self.state = "closed"
        self._cancel_timers()
        if level == MQTT_5:
            code = reason if reason in CONNACK_REASON_CODES else ReasonCode.UNSPECIFIED_ERROR
            self.codec.protocol_level = MQTT_5
            props = Properties(reason_string=text[:200]) if text and self.problem_information else Properties()
            self.send(Connack(False, code, props))
        elif level in (3, 4) or reason == ReasonCode.UNSUPPORTED_PROTOCOL_VERSION:
            if reason in _V311_CONNACK_REFUSALS:
                self.codec.protocol_level = level if level in (3, 4) else 4
                self.send(Connack(False, reason))
        self.close()

    def _disconnect(self, reason: ReasonCode, text: str = "", send_will: bool = True) -> None:
        """Server-side close of an accepted connection (DISCONNECT with a reason for v5)."""
        if self.state == "closed":
            return
        if self.level == MQTT_5:
            code = reason if reason in DISCONNECT_REASON_CODES else ReasonCode.UNSPECIFIED_ERROR
            props = Properties(reason_string=text[:200]) if text and self.problem_information else Properties()
            try:
                self.send(Disconnect(code, props))
            except MqttProtocolError:
                self.send(Disconnect(code))
        self._end(send_will=send_will)
        self.close()

    def _handle(self, packet: Any) -> None:
        handler = _HANDLERS.get(type(packet))
        try:
            if handler is None:
                raise MqttProtocolError(f"unexpected {type(packet).__name__}", ReasonCode.PROTOCOL_ERROR)
            handler(self, packet)
        except Exception as error:
            self.handle_error(error)

    def handle_error(self, error: Exception) -> None:
        """A handler failed (called inside its `except` block): close the connection as its kind of error asks."""
        if isinstance(error, MqttProtocolError):
            self._fail(error)
        elif isinstance(error, TidegateError):
            self.factory.client_log.info(f"core-refused-{type(error).__name__}", "mqtt %s: closing: core refused: %s",
                                         self.who(), str(error))
            self._fail_code(reason_for_core_error(error), error.message)
        else:
            log.exception("mqtt %s: internal error; closing the connection", self.who())
            self._fail_code(ReasonCode.UNSPECIFIED_ERROR, "internal error")

    def _fail_code(self, reason: ReasonCode, text: str) -> None:
        if self.state == "new":
            self._refuse(reason, self.level, text)
        else:
            self._disconnect(reason, text)

    # ------------------------------------------------------------------------------------------ CONNECT
    def connect(self, packet: Connect) -> None:
        """CONNECT: negotiate, then ask the gate; `on_authenticated` accepts the connection."""
        self.level = packet.protocol_level
        assigned = self.factory.assign_client_id() if not packet.client_id else None
        result = negotiate(packet, self.settings, assigned)
        self.problem_information = result.problem_information
        if isinstance(result, Refusal):
            self.factory.client_log.info("connect-refused", "mqtt connection %s: refused: %s", self.peer, result.text)
            self._refuse(result.reason, result.level, result.text)
            return
        self.negotiated = result
        self.client_id = result.client_id
        # Nothing of the session is touched before the gate answers (a take-over needs a valid login).
        # Without a user name, a verified client certificate names the user (Mosquitto's use_identity_as_username).
        identity = "" if packet.username else self.peer_certificate_identity()
        if identity:
            credentials = Credentials(mechanism="certificate", username=identity, certificate_identity=identity,
                                      client_id=result.client_id, source=self.source, listener=self.factory.listener)
        else:
            credentials = Credentials(
                mechanism="password" if packet.username else "anonymous", username=packet.username or "",
                password=packet.password or b"", client_id=result.client_id, source=self.source,
                listener=self.factory.listener)
        self.authenticate(credentials)

    def on_authenticated(self, principal: Principal) -> None:
        negotiated = self.negotiated
        if self.state != "new" or negotiated is None:
            return  # closed meanwhile (connect timeout, shutdown)
        try:
            self.session = self.factory.open_session(principal, self.source, self.client_id)
            self._accept(negotiated)
        except Exception as error:
            self.handle_error(error)

    def on_authentication_failed(self, failure: Failure) -> None:
        if self.state != "new":
            return
        error = failure.value
        if isinstance(error, TidegateError):
            reason = reason_for_core_error(error, ReasonCode.BAD_USER_NAME_OR_PASSWORD)
            text = error.message if isinstance(error, NotAuthenticated | QuotaExceeded) else "not authorized"
        else:
            self.factory.client_log.log(logging.ERROR, "authentication-unavailable",
                                        "mqtt connection %s: authentication failed: %s", self.peer,
                                        failure.getErrorMessage())
            reason, text = ReasonCode.SERVER_UNAVAILABLE, "authentication is unavailable"
        self.factory.client_log.info("login-refused", "mqtt %s: login refused: %s", self.who(), text)
        self._refuse(reason, self.level, text)

    def _accept(self, negotiated: Negotiated) -> None:
        """The client is authenticated: take (or create) its session, answer CONNACK, resume the session."""
        factory = self.factory
        core = self.session
        assert core is not None
        client_id, level = negotiated.client_id, negotiated.level
        sessions = factory.sessions
        user = core.principal.name
        existing = sessions.get(client_id)
        # Every refusal comes before anything of an existing session is touched (no take-over, no wipe, no will).
        if existing is not None and not sessions.may_use(existing, user):
            factory.client_log.info("client-id-bound", "mqtt %s: refused: the client id belongs to another user",
                                    self.who())
            self._refuse(ReasonCode.NOT_AUTHORIZED, level, "the client identifier is in use by another user")
            return
        if existing is None and self.settings.max_sessions_per_user \
                and sessions.sessions_owned(user) >= self.settings.max_sessions_per_user:
            factory.client_log.info("sessions-quota", "mqtt %s: refused: user %s has %d sessions "
                                    "(max_sessions_per_user)", self.who(), clip(user, 100),
                                    sessions.sessions_owned(user))
            factory.limit_hit(SESSIONS_PER_USER, user=user, source=self.source,
                              reason="too many sessions for this user (max_sessions_per_user)")
            self._refuse(ReasonCode.QUOTA_EXCEEDED if level == MQTT_5 else ReasonCode.SERVER_UNAVAILABLE, level,
                         "too many sessions for this user")
            return
        if negotiated.will is not None and not self._will_allowed(negotiated.will):
            return
        # a take-over by another user (possible only with client_id_binding = "none") never fires the owner's will
        foreign = existing is not None and existing.owner not in ("", user)
        if existing is not None and existing.connection is not None:
            existing.connection.take_over(send_will=not foreign)
            existing = sessions.get(client_id)  # ended if its expiry was 0
        if existing is not None and negotiated.clean_start:
            sessions.destroy(existing, send_will=not foreign)
            existing = None
        session_present = existing is not None
        session = existing if existing is not None else sessions.create(client_id, level, negotiated.session_expiry,
                                                                         core)
        sessions.set_owner(session, user)
        sessions.attach(session, self, core)
        session.protocol_level = level
        session.expiry_interval = negotiated.session_expiry
        sessions.save(session)
        self.mqtt_session = session
        if negotiated.will is not None:
            self._will = PendingWill(negotiated.will, level, core)
        self.outbound = outbound = Outbound(self, negotiated.client_receive_maximum,
                                            negotiated.client_maximum_packet_size,
                                            negotiated.client_topic_alias_maximum)

        if level == MQTT_5:
            self.send(negotiated.connack(self.settings, session_present))
        else:  # 3.1/3.1.1: two fixed bytes, no properties (what the codec would encode, without the packet object)
            self.write(_V311_CONNACK_PRESENT if session_present else _V311_CONNACK_NEW)
        self.state = "connected"
        if negotiated.will is None:
            self.negotiated = None  # `_end` needs it only for the will delay: an idle connection drops 144 bytes
        factory.connect_deadlines.discard(self)
        if negotiated.keep_alive:
            self.start_idle_timer(negotiated.keep_alive * 1.5)
        factory.stats.clients_total += 1

        outbound.resend_releases()
        if session_present or session.subscriptions:
            # a fresh session has nothing queued until its first SUBSCRIBE binds a filter: attach to the core
            # then, so idle connections (sensors that only publish) hold no consumer state
            outbound.open_session_queue()
        for entry in session.subscriptions.values():
            if entry.share:
                outbound.open_share(entry)
            elif is_sys_name(entry.topic_filter):
                outbound.sys_filters.append(entry)
        if outbound.sys_filters:
            factory.sys.listeners.add(self)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("mqtt %s connected (level %d, session present %s)", self.who(), level, session_present)

    def _will_allowed(self, will: Will) -> bool:
        """A will is checked at CONNECT like the publish it will become (the gate, `$SYS`, the name's core
        spelling); a refused will refuses the connection (v5 CONNACK 0x87/0x90, 3.1.1 return code 5)."""
        core = self.session
        assert core is not None
        if is_sys_name(will.topic):
            reason, text = ReasonCode.NOT_AUTHORIZED, "$SYS topics are written by the broker only"
        else:
            try:
                message = message_from_publish(will.topic, will.payload, will.qos, will.retain,
                                               PublishFields.from_properties(will.properties), core.now_ms())
            except UnmappableName as exc:
                reason, text = ReasonCode.TOPIC_NAME_INVALID, str(exc)
            else:
                if core.may(Action.PUB, Resource.topic(message.full_name)):
                    return True
                reason, text = ReasonCode.NOT_AUTHORIZED, "not authorized to publish the will message"
        self.factory.client_log.info("will-refused", "mqtt %s: refused: will to %s: %s", self.who(),
                                     clip(will.topic, 100), text)
        if self.level != MQTT_5 and reason not in _V311_CONNACK_REFUSALS:
            reason = ReasonCode.NOT_AUTHORIZED  # 3.1.1 return code 5
        self._refuse(reason, self.level, text)
        return False

    def take_over(self, send_will: bool = True) -> None:
        """Another connection uses this client id: close this one (v5: DISCONNECT 0x8E) and release the session;
        `send_will=False` when another user took it over (its will is this client's, not theirs to trigger)."""
        self.factory.client_log.info("taken-over", "mqtt %s: session taken over by a new connection", self.who())
        self._disconnect(ReasonCode.SESSION_TAKEN_OVER, "another connection uses this client identifier",
                         send_will=send_will)

    def connect_timed_out(self) -> None:
        """No CONNECT was accepted within `connect_timeout` (called by the factory's `ConnectDeadlines`)."""
        if self.state == "new":
            self.factory.client_log.info("connect-timeout", "mqtt connection %s: no CONNECT within %ss; closing",
                                         self.peer, self.settings.connect_timeout)
            self.state = "closed"
            self.close()

    def idle_timed_out(self, idle: float) -> None:
        """Nothing arrived for 1.5 times the keep alive."""
        if self.state != "connected":
            return
        self.factory.client_log.info("keep-alive-timeout", "mqtt %s: keep alive timeout (%.1fs without a packet)",
                                     self.who(), idle)
        self._disconnect(ReasonCode.KEEP_ALIVE_TIMEOUT, "keep alive timeout")

    def _cancel_timers(self) -> None:
        self.stop_idle_timer()
        self.factory.connect_deadlines.discard(self)

    def _end(self, send_will: bool) -> None:
        """Leave the session: close core subscriptions (releasing in-flight messages) and hand it back."""
        was_connected = self.state == "connected"
        self.state = "closed"
        self._cancel_timers()
        self.factory.sys.listeners.discard(self)
        if self.outbound is not None:
            self.outbound.close()
        session = self.mqtt_session
        if not was_connected or session is None or session.connection is not self:
            return
        session.packets.connection_ended()
        will = self._will if send_will else None
        self.factory.sessions.detach(session, will, self.negotiated.will_delay if self.negotiated else 0)

    def send_sys(self, values: dict[str, str], retain: bool, only: SubscriptionEntry | None = None) -> None:
        """Deliver $SYS values (QoS 0) to this client's $SYS subscriptions."""
        if self.state != "connected" or self.outbound is None:
            return
        self.batched(lambda _: self.outbound.send_sys(values, retain, only), None)  # type: ignore[union-attr]

    # ------------------------------------------------------------------------------------------ the rest
    def _on_disconnect(self, packet: Disconnect) -> None:
        session = self.mqtt_session
        assert session is not None
        new_expiry = packet.properties.session_expiry_interval
        if new_expiry is not None and self.level == MQTT_5:
            if session.expiry_interval == 0 and new_expiry != 0:
                raise MqttProtocolError("DISCONNECT sets a session expiry after CONNECT set 0",
                                        ReasonCode.PROTOCOL_ERROR)  # MQTT-3.14.2-2
            session.expiry_interval = min(new_expiry, self.settings.session_expiry_max)
        send_will = packet.reason_code == ReasonCode.DISCONNECT_WITH_WILL_MESSAGE
        self._end(send_will=send_will)
        self.close()


def _as_packet(item: tuple[str, int | None, bytes] | int) -> Publish | Puback:
    """The packet `MqttCodec.receive_data` gives for an item of `receive_batch`."""
    if item.__class__ is int:
        return Puback(item)  # type: ignore[arg-type]
    topic, packet_id, payload = item  # type: ignore[misc]
    return Publish(topic, payload, 0 if packet_id is None else 1, packet_id=packet_id)


def _on_connect(conn: MqttProtocol, packet: Connect) -> None:
    if conn.state == "new" and conn.negotiated is None:
        conn.connect(packet)
    else:
        raise MqttProtocolError("second CONNECT", ReasonCode.PROTOCOL_ERROR)


def _on_auth(conn: MqttProtocol, packet: Auth) -> None:
    # 0x8C Bad authentication method is not a DISCONNECT reason code (spec 3.14.2.1); AUTH without an
    # authentication method agreed in CONNECT is a Protocol Error (4.12).
    raise MqttProtocolError("AUTH without enhanced authentication (none is configured)", ReasonCode.PROTOCOL_ERROR)


def _on_publish(conn: MqttProtocol, packet: Publish) -> None:
    conn.published_this_read = True  # delivery before ingest: not read on while deliveries are due (adapters/base.py)
    if not conn.has_published or conn.factory.alarmed:
        conn.publish_seen()  # during a resource alarm the connection is not read after this read (adapters/base.py)
    (conn.inbound or conn.open_inbound()).on_publish(packet)


def _connected(handler: Any) -> Any:
    """A handler for packets that only an accepted connection may send."""

    def guarded(conn: MqttProtocol, packet: Any) -> None:
        if conn.state != "connected":
            raise MqttProtocolError(f"{type(packet).__name__} before CONNACK", ReasonCode.PROTOCOL_ERROR)
        handler(conn, packet)

    return guarded


_HANDLERS: dict[type, Any] = {
    Connect: _on_connect,
    Publish: _connected(_on_publish),
    Puback: _connected(lambda conn, packet: conn.outbound.on_puback(packet)),
    Pubrec: _connected(lambda conn, packet: conn.outbound.on_pubrec(packet)),
    Pubrel: _connected(lambda conn, packet: conn.open_inbound().on_pubrel(packet)),
    Pubcomp: _connected(lambda conn, packet: conn.outbound.on_pubcomp(packet)),
    Subscribe: _connected(lambda conn, packet: conn.open_inbound().on_subscribe(packet)),
    Unsubscribe: _connected(lambda conn, packet: conn.open_inbound().on_unsubscribe(packet)),
    Pingreq: _connected(lambda conn, packet: conn.send(Pingresp())),
    Disconnect: _connected(MqttProtocol._on_disconnect),
    Auth: _on_auth,
}


class ConnectDeadlines:
    """Connections still waiting for their CONNECT to be accepted, watched by one timer for the whole listener.

    A timer per connection (scheduled at accept, cancelled at CONNACK) costs a heap insertion and a cancellation
    among the reactor's other timers for every connection, which a reconnect storm pays 10,000 times. Every
    connection of a listener gets the same timeout, so arrival order is deadline order: an insertion-ordered dict
    gives O(1) add and discard, and the one timer always points at the oldest entry's deadline.
    """

    __slots__ = ("_clock", "_timeout", "_waiting", "_call")

    def __init__(self, clock: Any, timeout: float) -> None:
        self._clock = clock
        self._timeout = timeout  # 0 or less: never time out
        self._waiting: dict[MqttProtocol, float] = {}
        self._call: Any = None

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, connection: MqttProtocol) -> None:
        if self._timeout <= 0:
            return
        self._waiting[connection] = self._clock.seconds() + self._timeout
        if self._call is None:
            self._call = self._clock.callLater(self._timeout, self._expire)

    def discard(self, connection: MqttProtocol) -> None:
        self._waiting.pop(connection, None)

    def _expire(self) -> None:
        self._call = None
        now = self._clock.seconds()
        expired: list[MqttProtocol] = []
        next_deadline = None
        # one pass from the oldest entry: stop at the first that still has time (every later one has more)
        for connection, deadline in self._waiting.items():
            if deadline > now:
                next_deadline = deadline
                break
            expired.append(connection)
        for connection in expired:
            del self._waiting[connection]
        if next_deadline is not None:
            self._call = self._clock.callLater(next_deadline - now, self._expire)
        for connection in expired:
            connection.connect_timed_out()

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._waiting.clear()


class MqttServerFactory(AdapterFactory):
    """The MQTT listener: builds one `MqttProtocol` per connection; owns the state shared by all connections.

    `core` is the broker's `Core`, `gate` decides logins and actions, `clock` an `IReactorTime` (the reactor, or a
    `MemoryReactorClock` in tests). Persisted sessions and retained messages are loaded here (adapter state
    namespaces `mqtt.sessions`, `mqtt.shares`, `mqtt.retained`), and sessions whose expiry passed while the broker
    was down are removed. Call `stop()` on shutdown.
    """

    protocol = MqttProtocol  # type: ignore[assignment]
    protocol_label = "mqtt"

    def __init__(self, core: Core, gate: Gate, clock: Any, settings: MqttSettings | None = None, *,
                 metrics: CoreMetrics | None = None, listener: str = "mqtt",
                 limits: ConnectionLimits | None = None) -> None:
        settings = settings or MqttSettings()
        super().__init__(core, gate, clock, settings, metrics=metrics, listener=listener,
                         limits=limits)
        self.settings: MqttSettings = settings
        self.connections: set[MqttProtocol] = set()
        self.connect_deadlines = ConnectDeadlines(clock, settings.connect_timeout)
        # every log line a client can cause goes through here: rate-limited per cause, client data clipped
        self.client_log = ClientLog(log, clock.seconds)
        self.retained = RetainedStore(core.adapter_state(RETAINED_NAMESPACE))
        self.sessions = SessionManager(self.system, clock, settings, self._publish_will,
                                       rows=core.adapter_state(SESSIONS_NAMESPACE),
                                       share_rows=core.adapter_state(SHARES_NAMESPACE))
        self.sys = SysTopics(self)
        self.stats = self.sys.stats
        self.sessions.load()
        self.sys.start()

    def buildProtocol(self, addr: Any) -> MqttProtocol:
        return MqttProtocol(self, addr)

    def assign_client_id(self) -> str:
        while True:
            client_id = "tidegate-" + os.urandom(8).hex()
            if client_id not in self.sessions.sessions:
                return client_id

    def _publish_will(self, session: Session, pending: PendingWill) -> None:
        """Publish a will as the client that set it (its core session: the gate decides as for its publishes)."""
        will = pending.will
        publisher = pending.publisher
        if is_sys_name(will.topic):  # refused at CONNECT; kept here so no path writes a retained $SYS value
            return
        try:
            message = message_from_publish(will.topic, will.payload, will.qos, will.retain,
                                    PublishFields.from_properties(will.properties), publisher.now_ms())
            publisher.publish([message])
        except (UnmappableName, TidegateError) as exc:
            self.client_log.info("will-not-published", "mqtt client %s: will message to %s not published: %s",
                                 session.client_id, will.topic, str(exc))
            return
        if will.retain:
            self.retained.set(will.topic, message)
        log.debug("mqtt client %s: will published to %s", clip(session.client_id), clip(will.topic))

    def stop(self) -> None:
        """Shutdown: tell v5 clients (DISCONNECT 0x8B), close every connection, stop timers."""
        self.sys.stop()
        self.connect_deadlines.stop()
        for connection in list(self.connections):
            if connection.state == "connected":
                connection._disconnect(ReasonCode.SERVER_SHUTTING_DOWN, "server shutting down", send_will=False)
            elif connection.state == "new":
                connection.state = "closed"
                connection.close()
        self.sessions.stop()
        super().stop()  # stops following the resource alarms
