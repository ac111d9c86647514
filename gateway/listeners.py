"""One table that builds every protocol listener from config: plain TCP, TLS and WebSocket, the same way for all.

Every adapter has the one listener shape `Factory(core, gate, clock, settings, *, metrics, listener)`
(adapters/base.py). A row of `PROTOCOLS` names the factory, how its settings come from the config section, and,
for protocols that have one, how to wrap the factory as a WebSocket resource. The endpoints of a protocol follow from
its config section's fields alone: `port` (unless `plain_enabled` is false), then `tls_enabled`/`tls_port`,
`ws_enabled`/`ws_port`/`ws_path` and `wss_enabled`/`wss_port` where the section has them; the bound addresses are
named `native`, `mqtt_tls`, `mqtt_ws`, ... in `listeners.json`. Every factory learns from `[tls] identity` which
part of a verified client certificate names the user (`AdapterFactory.certificate_identity_rule`).

A row whose adapter module is not part of the build is skipped with one log line.
"""

from __future__ import annotations

import _socket
import gc
import importlib
import importlib.util
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import address, tcp
from twisted.internet.interfaces import IListeningPort
from twisted.internet.posixbase import PosixReactorBase

from tidegate.adapters.base import ConnectionLimits
from tidegate.gateway.config import DEFAULT_BACKLOG, Config

log = logging.getLogger("tidegate.app")

# A native frame carries one message plus its properties, or a batch: allow twice the largest body.
NATIVE_FRAME_TO_BODY_RATIO = 2
SOMAXCONN_PATH = Path("/proc/sys/net/core/somaxconn")


def native_settings(config: Config, section: Any) -> Any:
    from tidegate.adapters.native.server import NativeSettings

    return NativeSettings(max_frame=config.broker.max_message_bytes * NATIVE_FRAME_TO_BODY_RATIO,
                          heartbeat_s=float(section.heartbeat_s), max_credit=section.max_credit)


def mqtt_settings(config: Config, section: Any) -> Any:
    from tidegate.adapters.mqtt.settings import MqttSettings

    return MqttSettings.from_config(section)


def amqp_settings(config: Config, section: Any) -> Any:
    return section  # the AMQP adapter reads its limits straight from [listeners.amqp]


@dataclass(frozen=True, slots=True)
class ProtocolListener:
    name: str  # config section `[listeners.<name>]` and the protocol's label
    factory: str  # "module:attribute" of the AdapterFactory subclass
    settings: Callable[[Config, Any], Any]
    websocket: str = ""  # "module:function(factory, url, reactor) -> twisted.web resource", for protocols with one


PROTOCOLS: tuple[ProtocolListener, ...] = (
    ProtocolListener("native", "tidegate.adapters.native.server:NativeServerFactory", native_settings),
    ProtocolListener("mqtt", "tidegate.adapters.mqtt.server:MqttServerFactory", mqtt_settings,
                     websocket="tidegate.adapters.mqtt.websocket:websocket_resource"),
    ProtocolListener("amqp", "tidegate.adapters.amqp.server:AmqpServerFactory", amqp_settings),
)


@dataclass(frozen=True, slots=True)
class Endpoint:
    name: str  # key in listeners.json
    port: int
    tls: bool = False
    websocket: bool = False


def endpoints(name: str, section: Any) -> list[Endpoint]:
    """Where a protocol listens, read from its config section."""
    out = [Endpoint(name, section.port)] if getattr(section, "plain_enabled", True) else []
    if getattr(section, "tls_enabled", False):
        out.append(Endpoint(f"{name}_tls", section.tls_port, tls=True))
    if getattr(section, "ws_enabled", False):
        out.append(Endpoint(f"{name}_ws", section.ws_port, websocket=True))
    if getattr(section, "wss_enabled", False):
        out.append(Endpoint(f"{name}_wss", section.wss_port, tls=True, websocket=True))
    return out


def effective_backlog(requested: int = DEFAULT_BACKLOG, somaxconn_path: Path = SOMAXCONN_PATH) -> int:
    """The accept backlog to ask for: the kernel caps it at net.core.somaxconn anyway. The default asks for all of
    it, silently; an explicit larger request is capped with one log line saying how to raise the cap."""
    try:
        cap = int(somaxconn_path.read_text().strip())
    except (OSError, ValueError):
        return requested  # not Linux (or no /proc): the kernel still caps it at its own maximum
    if requested > cap:
        if requested != DEFAULT_BACKLOG:
            log.info("listener backlog %d is capped by net.core.somaxconn=%d (raise it with sysctl for larger "
                     "reconnect storms)", requested, cap)
        return cap
    return requested


# A wake-up of the listener that accepts at least this many connections is a storm: the garbage collector is held
# off until no such wake-up came for STORM_GC_QUIET_S (at most STORM_GC_MAX_PAUSE_S in a row, then it runs again for
# at least STORM_GC_QUIET_S before it can be held off again, so a never-ending flood of connects still collects).
STORM_GC_ACCEPTS = 64
STORM_GC_QUIET_S = 1.0
STORM_GC_MAX_PAUSE_S = 10.0

# While a wake-up sets up accepted connections, the accept queue is drained again after this many (see
# `EagerAcceptPort.doRead`)
ACCEPT_DRAIN_EVERY = 256
# ... but no further drain once a wake-up has spent this long setting connections up: with a large somaxconn a
# drain could otherwise hold fsync completions, acknowledgements and keepalives for a very long turn.
MAX_DRAIN_SECONDS = 0.05

_raw_family = _socket.socket.family.__get__  # the int, without `socket.socket.family`'s enum conversion
_raw_type = _socket.socket.type.__get__


class StormCollectorPause:
    """Holds CPython's cyclic garbage collector off while a reconnect storm is being accepted.

    Every accepted connection allocates a few dozen objects that live as long as it does, so a storm of 10,000
    connections runs generation-0 collections that each walk tens of thousands of young objects, and
    generation-1 collections that walk hundreds of thousands, all of which survive: about 5-10 % of the broker's
    CPU in a storm, spent while clients wait for their CONNACK. Reference counting still frees everything that is
    not in a cycle; the collections that were skipped run as one when the collector is back on, after the storm.
    Only a collector that was on is paused (a process that turned it off keeps it off).
    """

    def __init__(self, threshold: int = STORM_GC_ACCEPTS, quiet_s: float = STORM_GC_QUIET_S,
                 max_pause_s: float = STORM_GC_MAX_PAUSE_S) -> None:
        self.threshold = threshold
        self.quiet_s = quiet_s
        self.max_pause_s = max_pause_s
        self.paused_at: float | None = None  # when this pause began (None: the collector is not held off by us)
        self.resume_at = 0.0
        self.not_before = 0.0  # after a pause that hit `max_pause_s`, no new pause until then
        self.pauses = 0  # how many storms paused it (for tests and the curious)
        self._call: Any = None
        self._clock: Any = None

    def accepted(self, count: int, clock: Any) -> None:
        """A wake-up of a listener accepted `count` connections; `clock` is its reactor."""
        if count < self.threshold:
            return
        now = clock.seconds()
        if self.paused_at is None:
            if now < self.not_before or not gc.isenabled():
                return
            gc.disable()
            self.paused_at = now
            self.pauses += 1
        self.resume_at = min(now + self.quiet_s, self.paused_at + self.max_pause_s)
        if self._call is not None and self._clock is not clock:
            # Another reactor paused it (tests, an embedded broker restarted in one process): its timer may never
            # run, so the release is scheduled on the clock that is accepting now.
            if self._call.active():
                self._call.cancel()
            self._call = None
        if self._call is None:
            self._clock = clock
            self._call = clock.callLater(self.resume_at - now, self._check)

    def _check(self) -> None:
        self._call = None
        now = self._clock.seconds()
        if now < self.resume_at:
            self._call = self._clock.callLater(self.resume_at - now, self._check)
            return
        self.release(now)

    def release(self, now: float | None = None) -> None:
        """Turn the collector back on now (the end of a storm; also on shutdown)."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self.paused_at is None:
            return
        if now is not None and now - self.paused_at >= self.max_pause_s:
            self.not_before = now + self.quiet_s
        self.paused_at = None
        gc.enable()


storm_collector_pause = StormCollectorPause()  # one per process: the collector is the process's


class LeanServer(tcp.Server):
    """Twisted's accepted TCP connection without the texts it formats for every connection at accept (`repstr`,
    `logstr`: about 150 bytes each; the log prefix is made at the first event instead, the repr when asked); `getPeer`
    returns the address built at accept instead of a new one per call."""

    peer: Any = None  # the IPv4Address/IPv6Address the port built for `buildProtocol`
    _log_prefix: str | None = None  # `logstr`, made at the first event
    no_delay_changed = False  # True once `setTcpNoDelay(False)` ran: the inherited TCP_NODELAY no longer holds

    @property  # type: ignore[override]
    def repstr(self) -> str:
        return f"<{self.protocol.__class__.__name__} #{self.sessionno} on {self.server._realPortNumber}>"

    @repstr.setter
    def repstr(self, value: str) -> None:
        pass  # for code that assigns it as on tcp.Server; the property above computes the same text

    def __init__(self, sock: socket.socket, protocol: Any, client: tuple[Any, ...], server: tcp.Port,
                 sessionno: int, reactor: Any) -> None:
        # tcp.Server.__init__ without the two texts (see the class docstring)
        tcp.Connection.__init__(self, sock, protocol, reactor)
        if len(client) != 2:
            self._addressType = address.IPv6Address
        self.server = server
        self.client = client
        self.sessionno = sessionno
        self.hostname = client[0]
        self.startReading()
        self.connected = 1

    def logPrefix(self) -> str:  # noqa: N802 - Twisted's name
        """Twisted's log prefix of this connection (`logstr`): asked by the reactor at every event of the connection,
        so made once, at the first. Kept in a plain attribute: Python 3.11's `functools.cached_property` takes a lock
        on every read, a visible cost per connection in a storm."""
        prefix = self._log_prefix
        if prefix is None:
            prefix = self._log_prefix = f"{self._getLogPrefix(self.protocol)},{self.sessionno},{self.hostname}"
        return prefix

    @property  # type: ignore[override]
    def logstr(self) -> str:
        return self.logPrefix()

    @logstr.setter
    def logstr(self, value: str) -> None:
        self._log_prefix = value  # for code that assigns it as on tcp.Server

    def getPeer(self) -> Any:  # noqa: N802 - Twisted's name
        peer = self.peer
        return peer if peer is not None else super().getPeer()

    def setTcpNoDelay(self, enabled: bool) -> None:  # noqa: N802 - Twisted's name
        """Every adapter turns Nagle off at connect (adapters/transport.py `disable_nagle`): a `setsockopt` per
        connection, which a socket accepted from a listener with TCP_NODELAY does not need on Linux (it inherits
        the option). Whether it does is read once per listener from its first accepted socket (`getsockopt`);
        where it does not, or once this connection turned it off, the option is set as Twisted sets it."""
        if enabled and not self.no_delay_changed:
            inherited = self.server.accepted_no_delay
            if inherited is None:
                inherited = self.server.accepted_no_delay = bool(
                    self.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            if inherited:
                return
        elif not enabled:
            self.no_delay_changed = True
        super().setTcpNoDelay(enabled)


class LeanListeningSocket(socket.socket):
    """The listening socket: `accept` as Python's, without converting the family and type to enums for each
    accepted socket (two `IntEnum` look-ups per connection, a visible share of a storm's accept loop)."""

    __slots__ = ()

    def accept(self) -> tuple[socket.socket, Any]:
        fd, address = self._accept()  # type: ignore[attr-defined]
        accepted = socket.socket(_raw_family(self), _raw_type(self), self.proto, fileno=fd)
        if socket.getdefaulttimeout() is None and self.gettimeout():
            accepted.setblocking(True)  # what socket.accept does (a listener in Twisted is non-blocking)
        return accepted, address


class EagerAcceptPort(tcp.Port):
    """A listening TCP port that accepts every queued connection at each wake-up.

    Twisted's `tcp.Port` accepts at most `numberAccepts` connections per readiness event and then sets it to how
    many it just accepted (plus 20 when it hit the limit). After a quiet spell that is 1, so the first wake-ups of a
    reconnect storm accept 1, 21, 41, ... connections while the kernel's accept queue overflows and drops SYNs that
    clients retry only after 1 s, 3 s, 7 s. Here each wake-up may accept up to the backlog (the accept queue's
    size): the loop still stops as soon as `accept()` says nothing is queued, so a quiet listener pays nothing.
    Accepted connections are `LeanServer`s; a wake-up that accepts a storm holds the garbage collector off
    (`storm_collector_pause`).
    """

    transport = LeanServer
    collector_pause: StormCollectorPause | None = storm_collector_pause
    drain_every = ACCEPT_DRAIN_EVERY
    # whether accepted sockets come with TCP_NODELAY from the listener (Linux: yes); None until the first accept
    accepted_no_delay: bool | None = None

    def createInternetSocket(self) -> socket.socket:  # noqa: N802 - Twisted's name
        skt = super().createInternetSocket()
        lean = LeanListeningSocket(_raw_family(skt), _raw_type(skt), skt.proto, fileno=skt.detach())
        lean.setblocking(False)
        try:
            lean.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accepted sockets (Linux)
        except OSError:
            self.accepted_no_delay = False  # every connection sets it itself, as with Twisted's port
        return lean

    def doRead(self) -> None:
        """Twisted's `Port.doRead` (same EMFILE recovery and error handling), accepting up to the backlog, with the
        peer address built once per connection.

        The accept queue is drained before connections are set up, and again after every `drain_every` set-ups (up
        to twice the backlog per wake-up, none after MAX_DRAIN_SECONDS): setting a connection up costs several
        times its `accept`, and while a wake-up sets up thousands, SYNs of the same storm keep arriving; each one
        the full queue drops waits a second for its retransmission. Accepted sockets wait in a list instead, where
        nothing is dropped. A connection whose set-up fails is closed alone; the others are set up as usual."""
        accepted = 0
        pause = self.collector_pause
        pause_at = pause.threshold if pause is not None else 0  # held off as soon as a storm shows, not after it
        queued: list[Any] = []
        try:
            with tcp._BuffersLogs(self._logger.namespace, self._logger.observer) as buffering_logger:
                limit = max(self.numberAccepts, self.backlog)
                most = max(limit, 2 * self.backlog)
                queued += tcp._accept(buffering_logger, range(limit), self.socket, tcp._reservedFD)
                drain_every, drained_at = self.drain_every, 0
                drain_until = time.monotonic() + MAX_DRAIN_SECONDS
                while True:
                    if (accepted - drained_at >= drain_every and len(queued) < most
                            and time.monotonic() < drain_until):
                        drained_at = accepted
                        queued += tcp._accept(buffering_logger, range(most - len(queued)), self.socket,
                                              tcp._reservedFD)
                    if accepted == len(queued):
                        break
                    skt, addr = queued[accepted]
                    queued[accepted] = None  # the list no longer keeps it alive
                    accepted += 1
                    if accepted == pause_at:
                        pause.accepted(accepted, self.reactor)  # type: ignore[union-attr]
                    try:
                        self._set_up(skt, addr)
                    except Exception:  # this connection only: the others accepted with it are set up as usual
                        log.exception("setting up a connection on port %s failed", self._realPortNumber)
                        skt.close()
            self.numberAccepts = max(1, accepted)
        except BaseException:
            log.exception("accepting connections on port %s failed", self._realPortNumber)
            for entry in queued[accepted:]:  # accepted, never set up: closed now, not whenever collected
                entry[0].close()
        if pause is not None and accepted > pause_at:
            pause.accepted(accepted, self.reactor)  # the quiet time counts from the end of this wake-up

    def _set_up(self, skt: Any, addr: Any) -> None:
        """One accepted socket: its protocol and transport (closed when the factory refuses it)."""
        if len(addr) == 4:  # IPv6: with the scope id, as Twisted does
            host = socket.getnameinfo(addr, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)
            addr = (host[0], *addr[1:])
        peer = self._buildAddr(addr)
        protocol = self.factory.buildProtocol(peer)
        if protocol is None:
            skt.close()
            return
        session_number = self.sessionno
        self.sessionno = session_number + 1
        transport = self.transport(skt, protocol, addr, self, session_number, self.reactor)
        transport.peer = peer
        protocol.makeConnection(transport)


def listen_tcp(reactor: Any, port: int, factory: Any, *, backlog: int, interface: str,
               tls_options: Any = None) -> IListeningPort:
    """`reactor.listenTCP`/`listenSSL` with an `EagerAcceptPort` on the real (POSIX) reactors; any other reactor
    (tests' memory reactors) gets its own listen call unchanged."""
    if not isinstance(reactor, PosixReactorBase):
        if tls_options is not None:
            return reactor.listenSSL(port, factory, tls_options, backlog=backlog, interface=interface)
        return reactor.listenTCP(port, factory, backlog=backlog, interface=interface)
    if tls_options is not None:
        from twisted.protocols.tls import TLSMemoryBIOFactory

        factory = TLSMemoryBIOFactory(tls_options, False, factory)
    listening = EagerAcceptPort(port, factory, backlog, interface, reactor)
    if tls_options is not None:
        listening._type = "TLS"  # what Twisted's listenSSL names it in its log lines
    listening.startListening()
    return listening


def resolve(target: str) -> Any | None:
    """The attribute a `module:attribute` string names, or None when the module is not part of this build."""
    module_name, attribute = target.split(":")
    try:
        if importlib.util.find_spec(module_name) is None:
            return None
    except ModuleNotFoundError:  # a parent package is missing (tidegate.adapters.amqp itself)
        return None
    return getattr(importlib.import_module(module_name), attribute)


class ListenerBuilder:
    """Builds and binds every enabled protocol's factory and endpoints; `listen` is the process's bind call."""

    def __init__(self, config: Config, core: Any, gate: Any, reactor: Any, metrics: Any,
                 listen: Callable[[str, Any, str, int, bool, int], None], *, limiter: Any = None) -> None:
        self.config = config
        self.limiter = limiter  # core/security/limits.Limiter shared by every listener, or None
        self.core = core
        self.gate = gate
        self.reactor = reactor
        self.metrics = metrics
        self._listen = listen

    def build_all(self) -> list[Any]:
        """Bind every enabled protocol of `PROTOCOLS`; returns the factories (each has `stop()` for shutdown)."""
        factories = []
        for row in PROTOCOLS:
            section = getattr(self.config.listeners, row.name)
            if not section.enabled:
                continue
            factory = self.build(row, section)
            if factory is not None:
                factories.append(factory)
        return factories

    def build(self, row: ProtocolListener, section: Any) -> Any | None:
        factory_class = resolve(row.factory)
        if factory_class is None:
            log.info("%s listener skipped: %s is not part of this build yet", row.name, row.factory.split(":")[0])
            return None
        connections = self.config.connections
        limits = ConnectionLimits(output_budget=connections.output_budget_bytes,
                                  max_held_bytes=connections.login_hold_bytes, limiter=self.limiter)
        factory = factory_class(self.core, self.gate, self.reactor, row.settings(self.config, section),
                                metrics=self.metrics, listener=row.name, limits=limits)
        factory.certificate_identity_rule = self.config.tls.identity
        backlog = effective_backlog(getattr(section, "backlog", DEFAULT_BACKLOG))
        site = None
        for endpoint in endpoints(row.name, section):
            target = factory
            if endpoint.websocket:
                if site is None:
                    site = self._websocket_site(row, factory, section)
                target = site
            self._listen(endpoint.name, target, section.host, endpoint.port, endpoint.tls, backlog)
        return factory

    def _websocket_site(self, row: ProtocolListener, factory: Any, section: Any) -> Any:
        from twisted.web.resource import Resource
        from twisted.web.server import Site

        make_resource = resolve(row.websocket)
        path = getattr(section, "ws_path", f"/{row.name}")
        root = Resource()
        root.putChild(path.strip("/").encode(), make_resource(factory, f"ws://{section.host}{path}", self.reactor))
        site = Site(root)
        site.noisy = False
        return site
