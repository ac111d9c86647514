"""Process settings for reconnect storms: the garbage-collector settings `tidegate serve` applies, the accept backlog
that defaults to the kernel's cap, and a listening port that accepts every queued connection per wake-up."""

from __future__ import annotations

import gc
import logging
import socket
from pathlib import Path

import pytest
from twisted.internet import epollreactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock

from tidegate.gateway import listeners
from tidegate.gateway.app import GC_OLDER_GENERATIONS, freeze_startup_objects, tune_garbage_collector
from tidegate.gateway.config import DEFAULT_BACKLOG, ConfigError, ProcessSection, load_config, parse_set_option
from tidegate.gateway.testing import START_TIMEOUT_S, BrokerProcess, wait_until


@pytest.fixture
def restore_gc():
    thresholds = gc.get_threshold()
    yield
    gc.set_threshold(*thresholds)
    gc.unfreeze()


def test_process_section_defaults_and_validation() -> None:
    config = load_config(environ={}).config
    assert config.process.gc_threshold == 50_000 and config.process.gc_freeze is True
    with pytest.raises(ConfigError, match="process.gc_threshold"):
        load_config(environ={}, overrides=[parse_set_option("process.gc_threshold=-1")])


def test_gc_threshold_zero_and_freeze_off_leave_the_interpreter_alone(restore_gc) -> None:
    before = gc.get_threshold()
    settings = ProcessSection(gc_threshold=0, gc_freeze=False)
    assert tune_garbage_collector(settings) == before
    assert freeze_startup_objects(settings) == 0
    assert gc.get_freeze_count() == 0


def test_gc_threshold_and_freeze_are_applied(restore_gc) -> None:
    settings = ProcessSection(gc_threshold=12_345, gc_freeze=True)
    assert tune_garbage_collector(settings) == (12_345, *GC_OLDER_GENERATIONS)
    assert freeze_startup_objects(settings) > 0
    assert gc.get_freeze_count() > 0


def test_serve_applies_the_gc_settings_once_started(tmp_path: Path) -> None:
    """`tidegate serve` sets the thresholds and freezes what start-up left alive, and says so in one log line."""
    for run, (extra, expected) in enumerate(((("--set", "process.gc_threshold=40000"), "thresholds (40000, 20, 100)"),
                                             (("--set", "process.gc_threshold=0", "--set", "process.gc_freeze=false"),
                                              " 0 start-up objects frozen"))):
        process = BrokerProcess(tmp_path / f"data{run}", *extra, "--log-level", "info",
                                log_path=tmp_path / f"serve{run}.log").spawn()
        try:
            process.wait_for_listeners()
            wait_until(lambda p=process: "garbage collector:" in p.log(), START_TIMEOUT_S, "the gc log line",
                       process.process, process.log_path)
            line = next(li for li in process.log().splitlines() if "garbage collector:" in li)
            assert expected in line
        finally:
            assert process.stop() == 0, process.log()


def test_default_backlog_is_the_somaxconn_cap_without_a_log_line(tmp_path: Path, caplog) -> None:
    somaxconn = tmp_path / "somaxconn"
    somaxconn.write_text("4096\n")
    caplog.set_level(logging.INFO, logger="tidegate.app")
    assert listeners.effective_backlog(DEFAULT_BACKLOG, somaxconn) == 4096
    assert listeners.effective_backlog(somaxconn_path=somaxconn) == 4096
    assert "somaxconn" not in caplog.text  # asking for "all there is" is not worth a line
    assert listeners.effective_backlog(8192, somaxconn) == 4096
    assert "net.core.somaxconn=4096" in caplog.text  # an explicit larger request is
    assert listeners.effective_backlog(DEFAULT_BACKLOG, tmp_path / "missing") == DEFAULT_BACKLOG


class _Counting(Factory):
    def __init__(self) -> None:
        self.built = 0

    def buildProtocol(self, addr):  # noqa: N802 (Twisted's name)
        self.built += 1
        return Protocol()


def close_eager_port(reactor: epollreactor.EPollReactor, port: listeners.EagerAcceptPort) -> None:
    """Close what a test's own epoll reactor holds: accepted sockets, the listening socket, the poller."""
    for reader in reactor.getReaders():
        if isinstance(reader, listeners.tcp.Server):
            reader.socket.close()
    port.socket.close()
    reactor._poller.close()


@pytest.mark.parametrize("port_class, accepted", [(listeners.EagerAcceptPort, 30), (listeners.tcp.Port, 1)],
                         ids=["eager", "twisted-default"])
def test_one_wake_up_accepts_every_queued_connection(port_class, accepted) -> None:
    """After a quiet spell Twisted's port accepts one connection per wake-up (then 21, 41, ...), which lets the
    kernel's accept queue overflow in a storm; `EagerAcceptPort` takes everything queued at once."""
    reactor = epollreactor.EPollReactor()
    factory = _Counting()
    port = port_class(0, factory, 64, "127.0.0.1", reactor)
    port.startListening()
    clients: list[socket.socket] = []
    try:
        address = port.getHost()
        port.numberAccepts = 1  # what a listener that saw one connection last time has
        for _ in range(30):  # the kernel completes each handshake and queues it for accept()
            clients.append(socket.create_connection((address.host, address.port), timeout=5))
        port.doRead()
        assert factory.built == accepted
    finally:
        for client in clients:
            client.close()
        close_eager_port(reactor, port)


def test_accepted_connections_format_their_repr_only_when_asked() -> None:
    """`LeanServer` does not keep Twisted's per-connection repr text (about 80 bytes each), and says the same."""
    reactor = epollreactor.EPollReactor()
    port = listeners.EagerAcceptPort(0, _Counting(), 64, "127.0.0.1", reactor)
    port.startListening()
    client = socket.create_connection((port.getHost().host, port.getHost().port), timeout=5)
    try:
        port.doRead()
        (server,) = [r for r in reactor.getReaders() if isinstance(r, listeners.tcp.Server)]
        assert isinstance(server, listeners.LeanServer) and "repstr" not in vars(server)
        assert repr(server) == f"<Protocol #{server.sessionno} on {port.getHost().port}>"
    finally:
        client.close()
        close_eager_port(reactor, port)


def test_listen_tcp_keeps_a_test_reactors_own_calls() -> None:
    reactor = MemoryReactorClock()
    factory = _Counting()
    listeners.listen_tcp(reactor, 1234, factory, backlog=77, interface="127.0.0.1")
    listeners.listen_tcp(reactor, 1235, factory, backlog=78, interface="127.0.0.1", tls_options="context")
    assert reactor.tcpServers[0][:3] == (1234, factory, 77)
    assert reactor.sslServers[0][:4] == (1235, factory, "context", 78)
