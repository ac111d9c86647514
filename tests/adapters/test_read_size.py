"""Read sizes on plain TCP (issue 10, large messages): a connection whose reads come back full reads more at a
time (doubling up to MAX_READ_BYTES), so a stream of 64 KiB messages is handled many per read; once the stream
slows its reads shrink back to MIN_READ_BYTES; other transports are left alone."""

import socket

from twisted.internet import tcp
from twisted.internet.testing import MemoryReactorClock, StringTransport

from tidegate.adapters.base import MAX_READ_BYTES, MIN_READ_BYTES, AdapterConnection
from tidegate.core.security import AllowAllGate
from tidegate.core.testing import make_broker

from .test_base import LineFactory, connect


def tcp_connection() -> tuple[AdapterConnection, tcp.Connection, socket.socket]:
    listener = socket.create_server(("127.0.0.1", 0))
    peer = socket.create_connection(listener.getsockname())
    ours, _ = listener.accept()
    listener.close()
    ours.setblocking(False)
    reactor = MemoryReactorClock()
    factory = LineFactory(make_broker(reactor), AllowAllGate(), reactor, None)
    protocol = factory.buildProtocol(None)
    transport = tcp.Connection(ours, protocol, reactor)
    transport.connected = 1
    protocol.makeConnection(transport)
    return protocol, transport, peer


def test_full_reads_double_the_read_size_up_to_the_maximum():
    protocol, transport, peer = tcp_connection()
    assert transport.bufferSize == MIN_READ_BYTES  # Twisted's default, untouched until a read fills it
    sizes = []
    for _ in range(6):
        protocol.dataReceived(b"x" * transport.bufferSize)
        sizes.append(transport.bufferSize)
    assert sizes == [128 * 1024, 256 * 1024, 512 * 1024, MAX_READ_BYTES, MAX_READ_BYTES, MAX_READ_BYTES]
    peer.close()


def test_short_reads_shrink_the_read_size_back_to_the_default():
    protocol, transport, peer = tcp_connection()
    for _ in range(4):
        protocol.dataReceived(b"x" * transport.bufferSize)
    assert transport.bufferSize == MAX_READ_BYTES
    protocol.dataReceived(b"x" * (MAX_READ_BYTES // 2))  # not full, not short: kept
    assert transport.bufferSize == MAX_READ_BYTES
    for _ in range(6):
        protocol.dataReceived(b"ping\n")
    assert transport.bufferSize == MIN_READ_BYTES
    assert not protocol._reads_grown  # back on the class default: nothing checked per small read
    peer.close()


def test_a_paced_connection_never_grows_its_reads():
    protocol, transport, peer = tcp_connection()
    for _ in range(100):
        protocol.dataReceived(b"x" * 1000)
    assert transport.bufferSize == MIN_READ_BYTES and "bufferSize" not in vars(transport)
    peer.close()


def test_other_transports_are_left_alone():
    proto, transport, _, _ = connect(AllowAllGate())
    assert isinstance(transport, StringTransport)
    proto.dataReceived(b"x" * MIN_READ_BYTES)
    assert not hasattr(transport, "bufferSize") and not proto._reads_grown
