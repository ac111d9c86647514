"""`send_now` (adapters/base.py): a write that finds a plain TCP transport's buffer empty goes straight to the
socket; anything buffered, any other transport and whatever the kernel does not take go through Twisted, in order."""

import socket

import pytest
from twisted.internet import tcp
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactor, StringTransport

from tidegate.adapters.base import send_now


def tcp_pair() -> tuple[tcp.Connection, socket.socket, MemoryReactor]:
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    peer.settimeout(5)
    reactor = MemoryReactor()
    transport = tcp.Connection(ours, Protocol(), reactor)
    transport.connected = 1
    return transport, peer, reactor


def test_an_idle_tcp_transport_is_written_at_once_without_registering_for_writes():
    transport, peer, reactor = tcp_pair()
    send_now(transport, [b"one ", b"write"])
    assert peer.recv(100) == b"one write"
    assert not transport._tempDataBuffer and not transport.dataBuffer
    assert transport not in reactor.getWriters()


def test_a_buffered_tcp_transport_keeps_the_order_through_twisted():
    transport, peer, reactor = tcp_pair()
    transport.write(b"first ")  # waiting in Twisted's buffer for the next doWrite
    send_now(transport, [b"second"])
    peer.setblocking(False)  # a socketpair delivers what was sent at once: nothing readable means nothing sent
    with pytest.raises(BlockingIOError):
        peer.recv(100)  # nothing may overtake the buffered bytes
    transport.doWrite()
    peer.settimeout(5)
    assert peer.recv(100) == b"first second"


def test_what_a_full_socket_does_not_take_is_buffered_by_twisted():
    transport, peer, reactor = tcp_pair()
    transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    data = bytes(range(256)) * 4096  # 1 MiB: more than the socket buffers hold
    send_now(transport, [data])
    assert transport._tempDataLen > 0 and transport in reactor.getWriters()
    received = bytearray()
    while len(received) < len(data):
        try:
            received += peer.recv(1 << 16)
        except TimeoutError:
            break
        if transport.dataBuffer or transport._tempDataBuffer:
            transport.doWrite()
    assert bytes(received) == data


def test_other_transports_get_one_write_call():
    transport = StringTransport()
    writes = []
    transport.writeSequence = lambda chunks: writes.append(list(chunks))
    send_now(transport, [b"a", b"b"])
    assert writes == [[b"a", b"b"]]
    send_now(transport, [b"c"])
    assert transport.value() == b"c"


def test_a_closing_transport_is_left_to_twisted():
    transport, peer, reactor = tcp_pair()
    transport.disconnecting = True
    send_now(transport, [b"late"])
    assert transport._tempDataBuffer == [b"late"]
