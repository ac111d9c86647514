"""The idleness probe behind the inline fsync (gateway/reactor_lag.py `reactor_idle_probe`): true when the
reactor's epoll has nothing ready, false when a socket has data or a thread's call is waiting, and it does not
consume the event (the reactor still sees it)."""

from __future__ import annotations

import socket

import pytest
from twisted.internet.testing import MemoryReactorClock

from tidegate.gateway.reactor_lag import reactor_idle_probe

epollreactor = pytest.importorskip("twisted.internet.epollreactor")


class Reader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "reader"


@pytest.fixture
def reactor():
    reactor = epollreactor.EPollReactor()
    yield reactor
    reactor._poller.close()


def test_a_reactor_with_nothing_ready_is_idle_and_one_with_data_waiting_is_not(reactor):
    probe = reactor_idle_probe(reactor)
    assert probe is not None
    left, right = socket.socketpair()
    try:
        reader = Reader(left)
        reactor.addReader(reader)
        assert probe()
        right.send(b"x")
        assert not probe()
        assert not probe()  # looking does not consume: the reactor's own poll still sees the data
        assert any(fd == left.fileno() for fd, _ in reactor._poller.poll(0))
        left.recv(1)
        assert probe()
        reactor.removeReader(reader)
    finally:
        left.close()
        right.close()


def test_a_pending_call_from_a_thread_makes_the_reactor_busy(reactor):
    probe = reactor_idle_probe(reactor)
    assert probe()
    reactor.callFromThread(lambda: None)  # writes the waker, which is in the reactor's epoll set
    assert not probe()


def test_a_reactor_without_epoll_gets_no_probe_so_fsyncs_stay_in_the_thread():
    assert reactor_idle_probe(MemoryReactorClock()) is None


def test_inline_sync_settings_default_on_with_a_2_ms_stall_limit_and_reject_a_negative_limit():
    from tidegate.gateway.config import ConfigError, load_config, parse_set_option

    storage = load_config().config.storage
    assert (storage.inline_sync_when_idle, storage.inline_sync_stall_ms) == (True, 2.0)
    storage = load_config(overrides=[parse_set_option("storage.inline_sync_when_idle=false"),
                                     parse_set_option("storage.inline_sync_stall_ms=0.5")]).config.storage
    assert (storage.inline_sync_when_idle, storage.inline_sync_stall_ms) == (False, 0.5)
    with pytest.raises(ConfigError, match="inline_sync_stall_ms"):
        load_config(overrides=[parse_set_option("storage.inline_sync_stall_ms=-1")])
