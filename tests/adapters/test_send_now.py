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


def drain(transport, peer, size: int) -> bytes:
    """Read `size` bytes at the peer, letting Twisted write what it buffered as the socket drains (bounded by the
    peer's receive timeout: a stall ends the loop and the caller's comparison fails)."""
    received = bytearray()
    while len(received) < size:
        try:
            received += peer.recv(1 << 16)
        except TimeoutError:
            break
        if transport.dataBuffer or transport._tempDataBuffer:
            transport.doWrite()
    return bytes(received)


def test_what_a_full_socket_does_not_take_is_buffered_by_twisted():
    transport, peer, reactor = tcp_pair()
    transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    data = bytes(range(256)) * 4096  # 1 MiB: more than the socket buffers hold
    send_now(transport, [data])
    assert transport._tempDataLen > 0 and transport in reactor.getWriters()
    assert drain(transport, peer, len(data)) == data


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


def test_a_large_multi_chunk_write_goes_to_the_socket_as_its_pieces_without_a_join():
    transport, peer, reactor = tcp_pair()
    pieces = [b"head", bytes(range(256)) * 256, b"tail"]  # 64 KiB and more: scattered
    sent = []
    real_socket = transport.socket

    class RecordingSocket:
        def sendmsg(self, buffers):
            sent.append(list(buffers))
            return real_socket.sendmsg(buffers)

        def __getattr__(self, name):
            return getattr(real_socket, name)

    transport.socket = RecordingSocket()
    send_now(transport, pieces)
    assert len(sent) == 1 and sent[0][1] is pieces[1]  # the payload object itself reached sendmsg
    received = b""
    while len(received) < sum(map(len, pieces)):
        received += peer.recv(1 << 17)
    assert received == b"".join(pieces)
    assert transport not in reactor.getWriters()


def test_what_the_socket_does_not_take_of_a_scattered_write_is_buffered_by_twisted_in_order():
    transport, peer, reactor = tcp_pair()
    transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    pieces = [bytes([n]) * 100_000 for n in range(12)]  # 1.2 MB: more than the socket buffers hold
    send_now(transport, pieces)
    assert transport in reactor.getWriters()
    assert drain(transport, peer, sum(map(len, pieces))) == b"".join(pieces)


class RecordingSocket:
    """The transport's socket, recording what each sendmsg/send call was given."""

    def __init__(self, real_socket: socket.socket) -> None:
        self.real_socket = real_socket
        self.sendmsg_calls: list[list[bytes]] = []
        self.send_calls: list[bytes] = []

    def sendmsg(self, buffers):
        self.sendmsg_calls.append(list(buffers))
        return self.real_socket.sendmsg(buffers)

    def send(self, data):
        self.send_calls.append(data)
        return self.real_socket.send(data)

    def __getattr__(self, name):
        return getattr(self.real_socket, name)


def receive_all(transport, peer, size: int) -> bytes:
    received = bytearray()
    while len(received) < size:
        received += peer.recv(1 << 20)
        if transport.dataBuffer or transport._tempDataBuffer:
            transport.doWrite()
    return bytes(received)


def test_a_write_of_more_pieces_than_one_sendmsg_takes_goes_out_in_groups_without_a_join():
    """A batch of 600 large deliveries (head piece + body each: 1,200 pieces, over IOV_MAX) reaches the kernel as
    its pieces in groups of at most MAX_SCATTER_PIECES, each body the object itself."""
    from tidegate.adapters.base import MAX_SCATTER_PIECES

    transport, peer, reactor = tcp_pair()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    recording = transport.socket = RecordingSocket(transport.socket)
    bodies = [bytes([n % 256]) * 4096 for n in range(600)]
    pieces = [piece for n, body in enumerate(bodies) for piece in (b"head%d" % n, body)]
    send_now(transport, pieces)
    assert recording.send_calls == []
    assert all(len(call) <= MAX_SCATTER_PIECES for call in recording.sendmsg_calls)
    given = [piece for call in recording.sendmsg_calls for piece in call]
    assert given[1] is bodies[0]
    assert receive_all(transport, peer, sum(map(len, pieces))) == b"".join(pieces)


def test_a_write_of_many_small_pieces_is_joined_into_one_send():
    transport, peer, reactor = tcp_pair()
    recording = transport.socket = RecordingSocket(transport.socket)
    pieces = [b"%05d" % n * 20 for n in range(2000)]  # 2,000 pieces of 100 bytes: 200 KB
    send_now(transport, pieces)
    assert recording.sendmsg_calls == [] and len(recording.send_calls) == 1
    assert receive_all(transport, peer, sum(map(len, pieces))) == b"".join(pieces)


def test_what_the_socket_does_not_take_of_a_grouped_write_is_buffered_by_twisted_in_order():
    transport, peer, reactor = tcp_pair()
    transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    pieces = [piece for n in range(700) for piece in (b"h%d" % n, bytes([n % 256]) * 3000)]  # 1,400 pieces, 2 MB
    send_now(transport, pieces)
    assert transport in reactor.getWriters()
    assert drain(transport, peer, sum(map(len, pieces))) == b"".join(pieces)
