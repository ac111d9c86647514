"""The accept path in a reconnect storm: the garbage collector held off while a storm is accepted, and the lean
listening socket and accepted connection (gateway/listeners.py)."""

from __future__ import annotations

import gc
import socket
from collections.abc import Iterator

import pytest
from twisted.internet import epollreactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock

from tidegate.gateway import listeners


@pytest.fixture
def collector_on() -> Iterator[None]:
    """Every test starts and ends with the collector on, whatever it did to it."""
    was_enabled = gc.isenabled()
    gc.enable()
    yield
    if was_enabled:
        gc.enable()
    else:
        gc.disable()


def test_a_small_wake_up_leaves_the_collector_alone(collector_on) -> None:
    clock = Clock()
    pause = listeners.StormCollectorPause(threshold=10, quiet_s=1.0)
    pause.accepted(9, clock)
    assert gc.isenabled() and pause.pauses == 0 and not clock.getDelayedCalls()


def test_a_storm_holds_the_collector_off_until_a_quiet_second(collector_on) -> None:
    clock = Clock()
    pause = listeners.StormCollectorPause(threshold=10, quiet_s=1.0, max_pause_s=10.0)
    pause.accepted(10, clock)
    assert not gc.isenabled() and pause.pauses == 1
    clock.advance(0.6)
    pause.accepted(500, clock)  # the storm goes on: the quiet second starts again
    clock.advance(0.6)
    assert not gc.isenabled()
    clock.advance(0.5)
    assert gc.isenabled() and pause.paused_at is None
    assert not clock.getDelayedCalls()


def test_an_endless_storm_pauses_the_collector_for_max_pause_s_then_lets_it_run(collector_on) -> None:
    clock = Clock()
    pause = listeners.StormCollectorPause(threshold=10, quiet_s=1.0, max_pause_s=3.0)
    for _ in range(7):  # a big wake-up every half second for 3.5 s
        pause.accepted(100, clock)
        clock.advance(0.5)
    assert gc.isenabled()  # back on at 3 s although the storm went on
    pause.accepted(100, clock)
    assert gc.isenabled()  # and not held off again within quiet_s of that
    clock.advance(0.5)
    pause.accepted(100, clock)
    assert not gc.isenabled() and pause.pauses == 2
    pause.release()
    assert gc.isenabled()


def test_a_collector_turned_off_by_the_process_stays_off(collector_on) -> None:
    clock = Clock()
    pause = listeners.StormCollectorPause(threshold=10, quiet_s=1.0)
    gc.disable()
    pause.accepted(100, clock)
    clock.advance(5)
    assert not gc.isenabled() and pause.pauses == 0


class _Recording(Factory):
    def __init__(self) -> None:
        self.built: list[Protocol] = []
        self.addresses: list[object] = []

    def buildProtocol(self, addr):  # noqa: N802 (Twisted's name)
        self.addresses.append(addr)
        protocol = Protocol()
        self.built.append(protocol)
        return protocol


def _close(reactor: epollreactor.EPollReactor, port: listeners.EagerAcceptPort) -> None:
    for reader in reactor.getReaders():
        if isinstance(reader, listeners.tcp.Server):
            reader.socket.close()
    for call in reactor.getDelayedCalls():
        call.cancel()
    port.socket.close()
    reactor._poller.close()


def test_a_wake_up_that_accepts_a_storm_pauses_the_collector(collector_on) -> None:
    reactor = epollreactor.EPollReactor()
    factory = _Recording()
    port = listeners.EagerAcceptPort(0, factory, 64, "127.0.0.1", reactor)
    port.collector_pause = pause = listeners.StormCollectorPause(threshold=5, quiet_s=1.0)
    port.startListening()
    clients: list[socket.socket] = []
    try:
        address = port.getHost()
        for _ in range(5):
            clients.append(socket.create_connection((address.host, address.port), timeout=5))
        port.doRead()
        assert len(factory.built) == 5
        assert not gc.isenabled() and pause.pauses == 1
    finally:
        pause.release()
        for client in clients:
            client.close()
        _close(reactor, port)


def test_accepted_connections_are_what_twisted_makes(collector_on) -> None:
    """The lean accept gives each protocol a non-blocking socket of the listener's family, the peer address the
    factory saw (`getPeer` returns it), and Twisted's log prefix and repr."""
    reactor = epollreactor.EPollReactor()
    factory = _Recording()
    port = listeners.EagerAcceptPort(0, factory, 64, "127.0.0.1", reactor)
    port.startListening()
    assert isinstance(port.socket, listeners.LeanListeningSocket)
    client = socket.create_connection((port.getHost().host, port.getHost().port), timeout=5)
    try:
        port.doRead()
        (protocol,) = factory.built
        transport = protocol.transport
        assert isinstance(transport, listeners.LeanServer)
        assert transport.getPeer() is factory.addresses[0]
        assert (transport.getPeer().host, transport.getPeer().port) == client.getsockname()
        assert transport.socket.family is socket.AF_INET and transport.socket.getblocking() is False
        assert transport.logPrefix() == f"Protocol,{transport.sessionno},127.0.0.1"
        assert repr(transport) == f"<Protocol #{transport.sessionno} on {port.getHost().port}>"
        client.sendall(b"x")
        assert transport.socket.recv(1) == b"x"
    finally:
        client.close()
        _close(reactor, port)


def test_a_pause_begun_on_an_abandoned_reactor_is_released_on_the_one_accepting_now(collector_on) -> None:
    """A broker restarted in one process (tests, embedding): the first reactor's release timer never runs, so the
    next storm schedules the release on its own clock instead of leaving the collector off for good."""
    abandoned, current = Clock(), Clock()
    pause = listeners.StormCollectorPause(threshold=10, quiet_s=1.0, max_pause_s=10.0)
    pause.accepted(64, abandoned)
    pause.accepted(64, current)
    assert not gc.isenabled() and not abandoned.getDelayedCalls()
    current.advance(1.0)
    assert gc.isenabled() and not current.getDelayedCalls()


def test_release_on_shutdown_turns_the_collector_back_on(collector_on) -> None:
    clock = Clock()
    pause = listeners.StormCollectorPause(threshold=10, quiet_s=1.0)
    pause.accepted(64, clock)
    pause.release()
    assert gc.isenabled() and not clock.getDelayedCalls()


def test_accepted_sockets_inherit_tcp_nodelay_from_the_listener(collector_on) -> None:
    """The listener sets TCP_NODELAY once; on Linux each accepted socket inherits it (read here with getsockopt),
    so `setTcpNoDelay(True)` at connect makes no syscall. Turning it off and on again still works."""
    reactor = epollreactor.EPollReactor()
    factory = _Recording()
    port = listeners.EagerAcceptPort(0, factory, 64, "127.0.0.1", reactor)
    port.startListening()
    clients = [socket.create_connection((port.getHost().host, port.getHost().port), timeout=5) for _ in range(2)]
    try:
        assert port.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        port.doRead()
        first, second = (protocol.transport for protocol in factory.built)
        for transport in (first, second):  # as accepted, before any setTcpNoDelay
            assert transport.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        first.setTcpNoDelay(True)
        assert port.accepted_no_delay is True  # checked once, on the first accepted socket
        calls: list[bool] = []
        real_setsockopt = listeners.tcp.Server.setTcpNoDelay

        def counting(self, enabled):  # noqa: ANN001 - Twisted's signature
            calls.append(enabled)
            real_setsockopt(self, enabled)

        listeners.tcp.Server.setTcpNoDelay = counting
        try:
            second.setTcpNoDelay(True)
            assert calls == []  # inherited: no setsockopt
            assert second.getTcpNoDelay()
            second.setTcpNoDelay(False)
            assert not second.getTcpNoDelay()
            second.setTcpNoDelay(True)  # once turned off, set again for real
            assert second.getTcpNoDelay()
            assert calls == [False, True]
        finally:
            listeners.tcp.Server.setTcpNoDelay = real_setsockopt
    finally:
        for client in clients:
            client.close()
        _close(reactor, port)


def test_without_an_inherited_tcp_nodelay_each_connection_sets_it(collector_on) -> None:
    """Where the first accepted socket does not come with TCP_NODELAY, every connection sets it itself."""
    reactor = epollreactor.EPollReactor()
    factory = _Recording()
    port = listeners.EagerAcceptPort(0, factory, 64, "127.0.0.1", reactor)
    port.startListening()
    port.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)  # as a kernel that does not inherit it
    client = socket.create_connection((port.getHost().host, port.getHost().port), timeout=5)
    try:
        port.doRead()
        (protocol,) = factory.built
        transport = protocol.transport
        assert not transport.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        transport.setTcpNoDelay(True)
        assert port.accepted_no_delay is False
        assert transport.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        client.close()
        _close(reactor, port)


class _ConnectingMore(_Recording):
    """Opens `more` new client connections while the first accepted ones are being set up (as the rest of a storm
    arriving during a long wake-up)."""

    def __init__(self, address, more: int) -> None:
        super().__init__()
        self.address = address
        self.more = more
        self.clients: list[socket.socket] = []

    def buildProtocol(self, addr):  # noqa: N802 (Twisted's name)
        if self.more:
            self.more -= 1
            self.clients.append(socket.create_connection((self.address.host, self.address.port), timeout=5))
        return super().buildProtocol(addr)


def _storm_port(backlog: int, more: int, first: int):
    """A port that drains after every set-up, whose factory opens `more` connections while the first accepted ones
    are set up, and `first` clients already queued."""
    reactor = epollreactor.EPollReactor()
    port = listeners.EagerAcceptPort(0, _Recording(), backlog, "127.0.0.1", reactor)
    port.collector_pause = None
    port.drain_every = 1
    port.startListening()
    factory = port.factory = _ConnectingMore(port.getHost(), more=more)
    clients = [socket.create_connection((port.getHost().host, port.getHost().port), timeout=5) for _ in range(first)]
    return reactor, port, factory, clients


def test_connections_queued_while_a_wake_up_sets_up_others_are_accepted_in_it(collector_on) -> None:
    """The accept queue is drained again after every `drain_every` set-ups, so what arrives meanwhile is taken in
    the same wake-up (the kernel's queue does not fill and drop SYNs while the broker is busy setting up
    connections)."""
    reactor, port, factory, first = _storm_port(64, more=6, first=2)
    try:
        port.doRead()
        assert len(factory.built) == 8  # the 2 queued at the wake-up and the 6 that connected during it
        assert port.numberAccepts == 8
        assert all(isinstance(protocol.transport, listeners.LeanServer) for protocol in factory.built)
    finally:
        for client in first + factory.clients:
            client.close()
        _close(reactor, port)


def test_a_wake_up_accepts_at_most_twice_the_backlog(collector_on) -> None:
    """However fast connections keep coming, one wake-up ends: the reactor gets its turn between batches."""
    reactor, port, factory, first = _storm_port(3, more=10, first=3)
    port.numberAccepts = 1  # as after a quiet spell (Twisted's startListening sets it to 100)
    try:
        port.doRead()
        assert len(factory.built) == 6  # 2 x backlog 3; the rest waits for the next wake-up
        port.doRead()
        assert len(factory.built) > 6
    finally:
        for client in first + factory.clients:
            client.close()
        _close(reactor, port)


def test_no_further_drain_once_the_wake_up_has_spent_its_time(collector_on, monkeypatch) -> None:
    """With a large backlog, a drain bounded only by count could hold the reactor for a very long turn: after
    MAX_DRAIN_SECONDS of set-ups the wake-up finishes what it accepted and takes no more."""
    monkeypatch.setattr(listeners, "MAX_DRAIN_SECONDS", 0.0)
    reactor, port, factory, first = _storm_port(64, more=6, first=2)
    try:
        port.doRead()
        assert len(factory.built) == 2  # the two queued at the wake-up; those that came during it wait
        for _ in range(10):  # each later wake-up takes what was queued when it began
            port.doRead()
            if len(factory.built) == 8:
                break
        assert len(factory.built) == 8
    finally:
        for client in first + factory.clients:
            client.close()
        _close(reactor, port)


class _FailingSecond(_Recording):
    def buildProtocol(self, addr):  # noqa: N802 (Twisted's name)
        if len(self.addresses) == 1:
            self.addresses.append(addr)
            raise RuntimeError("set-up of this one connection fails")
        return super().buildProtocol(addr)


def test_a_failed_set_up_closes_that_connection_alone(collector_on) -> None:
    """Sockets accepted in the same wake-up as one whose set-up raises are set up as usual, not closed with it."""
    reactor = epollreactor.EPollReactor()
    factory = _FailingSecond()
    port = listeners.EagerAcceptPort(0, factory, 64, "127.0.0.1", reactor)
    port.collector_pause = None
    port.startListening()
    host = port.getHost()
    clients = [socket.create_connection((host.host, host.port), timeout=5) for _ in range(6)]
    try:
        for _ in range(3):  # until every client is seen (a SYN may land after the first wake-up)
            port.doRead()
            if len(factory.addresses) == 6:
                break
        assert len(factory.addresses) == 6
        assert len(factory.built) == 5
        assert sum(protocol.transport is not None and protocol.transport.connected for protocol in factory.built) == 5
        clients[1].settimeout(5)
        assert clients[1].recv(1) == b""  # the failed one was closed
    finally:
        for client in clients:
            client.close()
        _close(reactor, port)
