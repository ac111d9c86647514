"""One AMQP 0-9-1 connection: the handshake, heartbeats, channels and the mapping of errors onto close methods.

States: `header` (waiting for the protocol header) -> `start` (sent connection.start) -> authenticating (the base
class holds frames while the gate decides) -> `tune` (sent connection.tune) -> `open-wait` (got tune-ok) -> `open`.
After a connection exception we send connection.close and ignore everything but close/close-ok (`close_sent`).
"""

from __future__ import annotations

import itertools
import logging
import struct
from typing import TYPE_CHECKING, Any

from pamqp import commands, decode
from twisted.python.failure import Failure

from tidegate.adapters.amqp.channel import Channel, class_and_method_ids
from tidegate.adapters.amqp.codec import (
    AmqpServerCodec,
    ContentEvent,
    ContentRejectedEvent,
    HeartbeatEvent,
    MethodEvent,
    ProtocolHeaderEvent,
)
from tidegate.adapters.amqp.errors import VHOST, AmqpError, ChannelError, ConnectionError_
from tidegate.adapters.amqp.reply_codes import AmqpProtocolError, ProtocolHeaderMismatch, ReplyCode
from tidegate.adapters.base import AdapterConnection
from tidegate.core.errors import NotAuthorized, QuotaExceeded, TidegateError
from tidegate.core.security.gate import Credentials, Principal

if TYPE_CHECKING:
    from tidegate.adapters.amqp.server import AmqpServerFactory

log = logging.getLogger("tidegate.amqp")

_connection_ids = itertools.count(1)
CLOSE_OK_TIMEOUT_S = 10.0  # after our connection.close, how long the peer has to answer before the socket drops
MAX_HELD_EVENTS = 10_000  # commands a client may pipeline on a channel whose basic.get waits for an fsync
THROTTLE = "throttle"  # why reading is paused (adapters/base.py pause_reading): the user's publish rate is in debt

SERVER_CAPABILITIES = {
    "publisher_confirms": True,
    "exchange_exchange_bindings": True,
    "basic.nack": True,
    "consumer_cancel_notify": True,
    "connection.blocked": True,
    "authentication_failure_close": True,
    "per_consumer_qos": True,
    "consumer_priorities": False,
    "direct_reply_to": False,
}


class AmqpConnection(AdapterConnection):
    factory: AmqpServerFactory

    def __init__(self) -> None:
        super().__init__()
        self.codec = AmqpServerCodec()
        self.state = "header"
        self.close_sent = False
        self.connection_id = next(_connection_ids)
        self.channels: dict[int, Channel] = {}
        self.channel_max = 0
        self.heartbeat = 0
        self.cancel_notify = False
        self.client_name = ""
        self.exclusive_queues: set[str] = set()
        self.confirms_waiting: set[Channel] = set()
        self.publish_batches: list[Channel] = []  # channels with publishes of this read not stored yet
        self.last_publish_end = 0  # commit-log end of this connection's latest publish
        self._heartbeat_timer: Any = None
        self._close_timer: Any = None
        self._throttle_timer: Any = None  # reads paused while the user's publish rate is in debt
        self._mechanism = ""
        self._certificate_identity = ""  # from a verified client certificate; offers SASL EXTERNAL
        # Resource alarms (core/alarms.py; reading paused by the base class, as RabbitMQ: a connection that
        # publishes while an alarm is raised is no longer read until it clears): clients that announced the
        # `connection.blocked` capability hear connection.blocked / connection.unblocked.
        self.blocked_capable = False
        self.blocked_sent = False  # connection.blocked went out, connection.unblocked did not yet

    # ------------------------------------------------------------------ transport
    def connection_started(self) -> None:
        settings = self.factory.settings
        self.codec = AmqpServerCodec(max_body_size=settings.max_message_bytes)
        # Until the handshake is through, a silent peer is dropped (RabbitMQ's handshake_timeout).
        self.start_idle_timer(settings.handshake_timeout_s)

    def connection_ended(self, reason: Failure) -> None:
        self.state = "closed"
        self._stop_timers()
        self._release_all()

    def bytes_received(self, data: bytes) -> None:
        try:
            events = self.codec.receive_data(data)
        except ProtocolHeaderMismatch as error:
            self.write(error.reply_header)
            self.close()
            return
        except AmqpProtocolError as error:
            self.dispatch(error.events_before_error)
            if not self.closing and not self.close_sent:
                log.info("amqp %s: %s", self.source, error)
                self.send_connection_close(error.reply_code, error.reply_text, error.class_id, error.method_id)
            return
        self.dispatch(events)

    def frames_resumed(self, frames: list[Any]) -> None:
        self.dispatch(frames)

    def dispatch(self, events: list[Any]) -> None:
        for index, event in enumerate(events):
            if self.authenticating:
                self.hold_frames(events[index:])
                break
            if self.closing:
                break
            if self.publish_batches and event.__class__ is not ContentEvent:
                self.flush_publishes()  # whatever comes next sees the publishes before it
            try:
                self.handle_event(event)
            except ConnectionError_ as error:
                self._connection_exception(error, getattr(event, "method", None))
            except ChannelError as error:
                self.channel_exception(event.channel, error, getattr(event, "method", None))
            except NotAuthorized as error:
                self.channel_exception(getattr(event, "channel", 0),
                                        ChannelError(ReplyCode.ACCESS_REFUSED, str(error)),
                                        getattr(event, "method", None))
            except TidegateError as error:
                self.channel_exception(getattr(event, "channel", 0),
                                        ChannelError(ReplyCode.PRECONDITION_FAILED, str(error)),
                                        getattr(event, "method", None))
        if self.publish_batches:
            self.flush_publishes()
        if self.confirms_waiting:
            waiting, self.confirms_waiting = self.confirms_waiting, set()
            for channel in waiting:
                channel.register_confirms()
        if self._throttle_timer is None and self.session is not None and self.session.publish_wait() > 0:
            self._throttle_reads()

    # Longest single pause: reads resume (and the idle clock is reset, the silence being ours) at least this often.
    THROTTLE_STEP_S = 1.0

    def _throttle_reads(self) -> None:
        """Publish rate or bandwidth of the user over its limit: stop reading from the socket until the debt is
        paid, as RabbitMQ's credit flow blocks a publisher, instead of closing or buffering (TCP pushes back)."""
        session = self.session
        wait = session.publish_wait() if session is not None else 0.0
        if wait <= 0 or not self.connected_ or self.closing:
            if self._throttle_timer is not None:
                self._throttle_timer = None
                self._resume_reading()
            return
        # Paused by reason (adapters/base.py): a resource alarm may hold the reading too, and outlasts this pause.
        self.pause_reading(THROTTLE)
        self._throttle_timer = self.factory.clock.callLater(min(wait, self.THROTTLE_STEP_S), self._throttle_reads)

    def _resume_reading(self) -> None:
        self.resume_reading(THROTTLE)

    def flush_publishes(self) -> None:
        batches, self.publish_batches = self.publish_batches, []
        for channel in batches:
            try:
                channel.flush_publishes()
            except ChannelError as error:
                self.channel_exception(channel.number, error, commands.Basic.Publish())

    def run_batched(self, work: Any) -> None:
        """Run `work(None)` outside a read with its writes batched like a read's (timers, fsync callbacks)."""
        self._run_batched(work, None)

    def _connection_exception(self, error: AmqpError, method: Any) -> None:
        log.info("amqp %s: connection error %s", self.source, error.text)
        class_id, method_id = class_and_method_ids(method)
        self.send_connection_close(error.code, error.text, class_id, method_id)

    def channel_exception(self, number: int, error: AmqpError, method: Any) -> None:
        channel = self.channels.get(number)
        if number == 0 or channel is None:
            self._connection_exception(error, method)
            return
        log.info("amqp %s: channel %d error %s", self.source, number, error.text)
        channel.release()
        channel.closing = True
        self.codec.discard_channel(number)  # what the client still sends on it is dropped, not assembled
        class_id, method_id = class_and_method_ids(method)
        self.write(self.codec.send_method(number, commands.Channel.Close(error.code, error.text[:255], class_id,
                                                                         method_id)))

    # ------------------------------------------------------------------ events
    def handle_event(self, event: Any) -> None:
        if self.close_sent:
            if isinstance(event, MethodEvent) and event.channel == 0:
                if isinstance(event.method, commands.Connection.Close):
                    self.write(self.codec.send_method(0, commands.Connection.CloseOk()))
                    self.close()
                elif isinstance(event.method, commands.Connection.CloseOk):
                    self.close()
            return
        if isinstance(event, HeartbeatEvent):
            return
        if isinstance(event, ProtocolHeaderEvent):
            self._send_start()
            return
        if event.channel == 0:
            self._connection_method(event.method)
            return
        if self.state != "open":
            raise ConnectionError_(ReplyCode.CHANNEL_ERROR, "expected 'connection.open'")
        self._channel_event(event)

    def _send_start(self) -> None:
        self.state = "start"
        properties = {
            "product": "Tidegate",
            "version": self.factory.version,
            "platform": "Python/Twisted",
            "copyright": "Tidegate authors",
            "information": "Apache-2.0; AMQP 0-9-1 adapter, see docs/amqp.md",
            "cluster_name": "tidegate",
            "capabilities": dict(SERVER_CAPABILITIES),
        }
        # SASL EXTERNAL (RabbitMQ's rabbitmq_auth_mechanism_ssl) only where a verified client certificate names
        # a user: a connection without one has nothing EXTERNAL could log in as.
        self._certificate_identity = self.peer_certificate_identity()
        mechanisms = "PLAIN AMQPLAIN EXTERNAL" if self._certificate_identity else "PLAIN AMQPLAIN"
        self.write(self.codec.send_method(0, commands.Connection.Start(
            0, 9, properties, mechanisms, "en_US")))

    def _connection_method(self, method: Any) -> None:
        if isinstance(method, commands.Connection.StartOk) and self.state == "start":
            self._start_ok(method)
        elif isinstance(method, commands.Connection.TuneOk) and self.state == "tune":
            self._tune_ok(method)
        elif isinstance(method, commands.Connection.Open) and self.state == "open-wait":
            if method.virtual_host != VHOST:
                raise ConnectionError_(ReplyCode.NOT_ALLOWED, f"vhost {method.virtual_host} not found")
            self.state = "open"
            self.write(self.codec.send_method(0, commands.Connection.OpenOk()))
        elif isinstance(method, commands.Connection.Close):
            self.write(self.codec.send_method(0, commands.Connection.CloseOk()))
            self.state = "closed"
            self._release_all()
            self.close()
        elif isinstance(method, commands.Connection.CloseOk):
            self.close()
        else:
            raise ConnectionError_(ReplyCode.COMMAND_INVALID,
                                   f"method {method.name} is not allowed in connection state '{self.state}'")

    # ------------------------------------------------------------------ handshake
    def _start_ok(self, method: commands.Connection.StartOk) -> None:
        client = method.client_properties or {}
        capabilities = client.get("capabilities") or {}
        self.cancel_notify = bool(capabilities.get("consumer_cancel_notify"))
        self.blocked_capable = bool(capabilities.get("connection.blocked"))
        self.client_name = str(client.get("connection_name") or "")
        self._mechanism = method.mechanism
        response = method.response.encode("utf-8") if isinstance(method.response, str) else method.response
        if method.mechanism == "PLAIN":
            parts = response.split(b"\x00")
            if len(parts) != 3:
                self._refuse("PLAIN response is not authzid NUL user NUL password")
                return
            username, password = parts[1], parts[2]
        elif method.mechanism == "AMQPLAIN":
            try:
                _, table = decode.field_table(struct.pack(">I", len(response)) + response)
            except Exception:  # noqa: BLE001 - whatever the table decoder raises on garbage
                self._refuse("AMQPLAIN response is not a field table")
                return
            username = _as_bytes(table.get("LOGIN", b""))
            password = _as_bytes(table.get("PASSWORD", b""))
        elif method.mechanism == "EXTERNAL" and self._certificate_identity:
            # The response (an optional authorization id) is not a second claim: the certificate names the user.
            identity = self._certificate_identity
            self.state = "authenticating"
            self.authenticate(Credentials("certificate", username=identity, certificate_identity=identity,
                                          client_id=self.client_name, source=self.source,
                                          listener=self.factory.listener))
            return
        else:
            raise ConnectionError_(ReplyCode.COMMAND_INVALID,
                                   f"unknown authentication mechanism '{method.mechanism}'")
        user = username.decode("utf-8", "replace")
        # The gate decides, as for every protocol: users and passwords, and `guest`/`guest` from loopback only.
        self.state = "authenticating"
        self.authenticate(Credentials("password", username=user, password=password, client_id=self.client_name,
                                      source=self.source, listener=self.factory.listener))

    def _refuse(self, why: str) -> None:
        log.info("amqp %s: login refused: %s", self.source, why)
        text = (f"ACCESS_REFUSED - Login was refused using authentication mechanism {self._mechanism}. For details "
                "see the broker logfile.")
        self.write(self.codec.send_method(0, commands.Connection.Close(ReplyCode.ACCESS_REFUSED, text, 0, 0)))
        self.close()

    def on_authenticated(self, principal: Principal) -> None:
        self.session = self.factory.open_session(principal, self.source, self.client_name)
        self.session.throttle_publishes()  # over the publish rate: pause reads, never refuse (see _throttle_reads)
        settings = self.factory.settings
        self.state = "tune"
        self.write(self.codec.send_method(0, commands.Connection.Tune(
            settings.channel_max, settings.frame_max, settings.heartbeat)))

    def on_authentication_failed(self, failure: Failure) -> None:
        if failure.check(QuotaExceeded):  # a connection limit: RabbitMQ answers those with 530 NOT_ALLOWED
            log.info("amqp %s: connection refused: %s", self.source, failure.value)
            self.write(self.codec.send_method(0, commands.Connection.Close(
                ReplyCode.NOT_ALLOWED, f"NOT_ALLOWED - {failure.value.message}"[:255], 0, 0)))
            self.close()
            return
        self._refuse(failure.getErrorMessage())

    def _tune_ok(self, method: commands.Connection.TuneOk) -> None:
        settings = self.factory.settings
        self.channel_max = min(method.channel_max or settings.channel_max, settings.channel_max) \
            if settings.channel_max else method.channel_max
        self.heartbeat = method.heartbeat
        self.state = "open-wait"
        self.stop_idle_timer()
        if self.heartbeat:
            # RabbitMQ: two missed heartbeats close the connection; ours go out every half interval.
            self.start_idle_timer(2 * self.heartbeat)
            self._heartbeat_timer = self.factory.clock.callLater(self.heartbeat / 2, self._send_heartbeat)

    def _send_heartbeat(self) -> None:
        self._heartbeat_timer = None
        if not self.connected_ or self.closing:
            return
        self.write(self.codec.send_heartbeat())
        self._heartbeat_timer = self.factory.clock.callLater(self.heartbeat / 2, self._send_heartbeat)

    def idle_timed_out(self, idle: float) -> None:
        log.info("amqp %s: nothing received for %.0fs (heartbeat %ds); closing", self.source, idle, self.heartbeat)
        self.closing = True
        self.transport.abortConnection()

    # ------------------------------------------------------------------ channels
    def _channel_event(self, event: Any) -> None:
        number = event.channel
        channel = self.channels.get(number)
        if channel is not None and channel.held is not None:
            if len(channel.held) >= MAX_HELD_EVENTS:
                raise ConnectionError_(ReplyCode.RESOURCE_ERROR,
                                       f"more than {MAX_HELD_EVENTS} commands pipelined behind a basic.get")
            channel.held.append(event)  # behind a basic.get waiting for an fsync: keep the order
            return
        if isinstance(event, MethodEvent):
            method = event.method
            if isinstance(method, commands.Channel.Open):
                if channel is not None:
                    raise ConnectionError_(ReplyCode.CHANNEL_ERROR, "second 'channel.open' seen")
                if self.channel_max and number > self.channel_max:
                    raise ConnectionError_(ReplyCode.NOT_ALLOWED,
                                           f"channel {number} is over the negotiated channel_max {self.channel_max}")
                self.channels[number] = Channel(self, number)
                self.write(self.codec.send_method(number, commands.Channel.OpenOk()))
                return
            if channel is None:
                raise ConnectionError_(ReplyCode.CHANNEL_ERROR, "expected 'channel.open'")
            if isinstance(method, commands.Channel.Close):
                channel.release()
                del self.channels[number]
                self.codec.resume_channel(number)
                self.write(self.codec.send_method(number, commands.Channel.CloseOk()))
                return
            if isinstance(method, commands.Channel.CloseOk):
                if channel.closing:
                    del self.channels[number]
                    self.codec.resume_channel(number)
                return
            if channel.closing:
                return  # RabbitMQ ignores everything but close/close-ok on a closing channel
            channel.handle_method(method)
            return
        if channel is None:
            raise ConnectionError_(ReplyCode.CHANNEL_ERROR, "expected 'channel.open'")
        if channel.closing:
            return
        if isinstance(event, ContentRejectedEvent):
            raise ChannelError(event.reply_code, event.reply_text)
        if isinstance(event, ContentEvent):
            if not isinstance(event.method, commands.Basic.Publish):
                raise ConnectionError_(ReplyCode.COMMAND_INVALID, f"method {event.method.name} is not allowed here")
            self.published_this_read = True  # delivery before ingest (adapters/base.py)
            if not self.has_published or self.factory.alarmed:
                self.publish_seen()  # during a resource alarm: the reading stops after this read
            channel.basic_publish(event.method, event.properties, event.raw_properties, event.body)

    def send_connection_close(self, code: int, text: str, class_id: int = 0, method_id: int = 0) -> None:
        self.close_sent = True
        self._release_all()
        self.write(self.codec.send_method(0, commands.Connection.Close(code, text[:255], class_id, method_id)))
        self._close_timer = self.factory.clock.callLater(CLOSE_OK_TIMEOUT_S, self._close_timed_out)

    def _close_timed_out(self) -> None:
        self._close_timer = None
        if self.connected_:
            self.closing = True
            self.transport.abortConnection()

    def _release_all(self) -> None:
        channels, self.channels = list(self.channels.values()), {}
        for channel in channels:
            channel.release()
            channel.closing = True
        for name in sorted(self.exclusive_queues):
            queue = self.factory.registry.queues.get(name)
            if queue is not None and queue.exclusive_owner is self:
                self.factory.delete_queue(queue)
        self.exclusive_queues.clear()

    def _stop_timers(self) -> None:
        for timer in (self._heartbeat_timer, self._close_timer, self._throttle_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._heartbeat_timer = self._close_timer = self._throttle_timer = None

    # ------------------------------------------------------------------ resource alarms
    # The base class pauses and resumes the reading (adapters/base.py); AMQP adds what RabbitMQ says. A connection
    # that published before the alarm is told at once but read until its next publish, as RabbitMQ's reader does.
    block_at_alarm = False

    def on_alarm_changed(self, alarmed: bool, reason: str) -> None:
        """Raised: a connection that has published hears connection.blocked now; cleared: connection.unblocked."""
        if self.close_sent:
            return
        if alarmed:
            self._send_blocked(reason)
        elif self.blocked_sent:
            self.blocked_sent = False
            self.write(self.codec.send_method(0, commands.Connection.Unblocked()))

    def on_alarm_block(self, reason: str) -> None:
        """A publish arrived while an alarm is raised and the reading stopped: say so if not said yet."""
        if not self.close_sent:
            self._send_blocked(reason)

    def _send_blocked(self, reason: str) -> None:
        if self.blocked_capable and not self.blocked_sent and self.state == "open":
            self.blocked_sent = True
            self.write(self.codec.send_method(0, commands.Connection.Blocked(reason[:255])))

    # ------------------------------------------------------------------ back-pressure
    def on_pause(self) -> None:
        for channel in self.channels.values():
            channel.stop_delivery()

    def on_resume(self) -> None:
        for channel in list(self.channels.values()):
            channel.replenish()

    def output_budget_exceeded(self) -> None:
        self._release_all()
        super().output_budget_exceeded()


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8")
