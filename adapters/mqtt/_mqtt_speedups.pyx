# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""Compiled twins of the MQTT adapter's hot path: the whole-read decoder of plain PUBLISH and PUBACK packets
(`MqttCodec._decode_fast`, codec.py) and the one-pass 3.1.1 PUBLISH writer (`Outbound._deliver_v311`,
outbound.py): the same packets, bytes, state changes and exceptions.

Optional: built at install time when Cython and a C compiler are available (setup.py); codec.py and outbound.py
take these functions unless TIDEGATE_NO_EXTENSIONS is set or this module does not import
(tidegate.core.storage.accelerator.load_extension), and keep their pure-Python functions as `py_*`.
tests/mqtt/test_mqtt_speedups.py compares the two decoders on random packet streams; the MQTT tests run against
both variants (`make test` reruns them with TIDEGATE_NO_EXTENSIONS=1).

Why it pays: per message the Python decoder is a dozen bytecode-level index, slice and compare steps on a bytes
object (and a call for every two-byte remaining length); here the fixed header, topic and packet id are read from
the buffer in C, a topic equal to the previous packet's reuses its str without a lookup, and only the payload and
the result tuple are allocated. The writer builds each PUBLISH head (fixed header, topic, packet id) as one bytes
object instead of three pieces (docs/performance.md, "MQTT adapter pass 3").
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.string cimport memcmp, memcpy

# codec.py's and outbound.py's module-level helpers, handed over by bind_codec() / bind_outbound() (they import
# this module, so it cannot import them)
cdef object _remaining_length = None  # codec._remaining_length: raises the exact error for a bad length
cdef object _too_large = None  # codec._packet_too_large(size, maximum) -> the exception to raise
cdef dict _topics = None  # codec._PLAIN_TOPICS
cdef object _plain_topic = None  # codec._plain_topic

cdef dict _qos_of_flags = None  # outbound._QOS_OF_FLAGS
cdef object _message_qos = None  # outbound._message_qos
cdef object _Inflight = None  # state.Inflight
cdef object _prop_retain = None  # mapping.PROP_RETAIN
cdef object _allocate_id = None  # state.PacketIds.allocate (unbound)


def bind_codec(remaining_length, too_large, dict topics, plain_topic) -> None:
    """Take codec.py's helpers (called once by codec.py)."""
    global _remaining_length, _too_large, _topics, _plain_topic
    _remaining_length = remaining_length
    _too_large = too_large
    _topics = topics
    _plain_topic = plain_topic


def bind_outbound(dict qos_of_flags, message_qos, inflight, prop_retain) -> None:
    """Take outbound.py's helpers (called once by outbound.py)."""
    global _qos_of_flags, _message_qos, _Inflight, _prop_retain
    _qos_of_flags = qos_of_flags
    _message_qos = message_qos
    _Inflight = inflight
    _prop_retain = prop_retain


def decode_fast(codec, buffer, list packets) -> int:
    """MqttCodec._decode_fast: decode the whole packets at the start of `buffer` into `packets` (plain PUBLISH as
    `(topic, packet id or None, payload)`, Success PUBACK as its id, anything else through the codec's
    decoders); returns how many bytes were consumed."""
    cdef Py_buffer view
    cdef const unsigned char *data
    cdef Py_ssize_t available, position = 0, start, end, topic_end, body, remaining, header_length, packet_size
    cdef Py_ssize_t max_packet_size = codec.max_packet_size
    cdef Py_ssize_t topic_len, last_len = -1
    cdef unsigned int first_byte, length_byte, second
    cdef long packet_id
    cdef bint v5 = codec._protocol_level == 5
    cdef bytes last_raw = None
    cdef object last_topic = None
    cdef object topic, raw, payload
    dispatch = codec._dispatch
    PyObject_GetBuffer(buffer, &view, PyBUF_SIMPLE)
    try:
        data = <const unsigned char *>view.buf
        available = view.len
        while available - position >= 2:
            first_byte = data[position]
            length_byte = data[position + 1]
            if length_byte < 0x80:
                remaining = length_byte
                header_length = 2
            elif position + 2 < available and 0 < data[position + 2] < 0x80:
                remaining = (length_byte & 0x7F) | (<Py_ssize_t>data[position + 2] << 7)
                header_length = 3
            else:
                parsed = _remaining_length(buffer, position + 1, available)  # longer, incomplete or malformed
                if parsed is None:
                    break
                remaining, header_length = parsed
            packet_size = header_length + remaining
            if packet_size > max_packet_size:
                raise _too_large(packet_size, max_packet_size)
            end = position + packet_size
            if end > available:
                break
            start = position + header_length
            if first_byte == 0x32 or first_byte == 0x30:  # PUBLISH QoS 1 / QoS 0, no DUP, no retain
                if remaining >= 2:
                    topic_len = (<Py_ssize_t>data[start] << 8) | data[start + 1]
                    topic_end = start + 2 + topic_len
                else:
                    topic_len = 0
                    topic_end = end + 1
                body = topic_end + 2 if first_byte == 0x32 else topic_end
                if body + v5 <= end and (not v5 or data[body] == 0):
                    if topic_len == last_len and memcmp(PyBytes_AS_STRING(last_raw), data + start + 2, topic_len) == 0:
                        topic = last_topic
                    else:
                        raw = PyBytes_FromStringAndSize(<const char *>(data + start + 2), topic_len)
                        topic = _topics.get(raw)
                        if topic is None:
                            topic = _plain_topic(raw)
                        if topic is not None:
                            last_raw = raw
                            last_len = topic_len
                            last_topic = topic
                    if topic is not None:
                        if first_byte == 0x32:
                            packet_id = (<long>data[topic_end] << 8) | data[topic_end + 1]
                        else:
                            packet_id = -1
                        if packet_id != 0:
                            payload = PyBytes_FromStringAndSize(<const char *>(data + body + v5), end - body - v5)
                            packets.append((topic, None if packet_id < 0 else packet_id, payload))
                            position = end
                            continue
            elif first_byte == 0x40 and remaining == 2:  # PUBACK, reason Success
                packet_id = (<long>data[start] << 8) | data[start + 1]
                if packet_id:
                    packets.append(packet_id)
                    position = end
                    continue
            packets.append(dispatch[first_byte >> 4](first_byte & 0x0F, buffer, start, end))
            position = end
            dispatch = codec._dispatch
    finally:
        PyBuffer_Release(&view)
    return position


cdef bytes _publish_head(unsigned int first_byte, Py_ssize_t remaining, bytes topic_header, long packet_id):
    """Fixed header, topic header and (packet_id >= 0) packet id of a PUBLISH in one bytes object; `remaining`
    is at most MAX_VARIABLE_BYTE_INTEGER (one to four length bytes)."""
    cdef Py_ssize_t topic_size = len(topic_header)
    cdef Py_ssize_t length_bytes = 1 if remaining < 0x80 else 2 if remaining < 0x4000 else (
        3 if remaining < 0x200000 else 4)
    cdef Py_ssize_t size = 1 + length_bytes + topic_size + (2 if packet_id >= 0 else 0)
    cdef bytes head = PyBytes_FromStringAndSize(NULL, size)
    cdef unsigned char *p = <unsigned char *>PyBytes_AS_STRING(head)
    cdef Py_ssize_t left = remaining
    p[0] = first_byte
    p += 1
    while True:
        if left < 0x80:
            p[0] = left
            p += 1
            break
        p[0] = (left & 0x7F) | 0x80
        left >>= 7
        p += 1
    memcpy(p, PyBytes_AS_STRING(topic_header), topic_size)
    p += topic_size
    if packet_id >= 0:
        p[0] = (packet_id >> 8) & 0xFF
        p[1] = packet_id & 0xFF
    return head


def deliver_v311(self, key, list deliveries) -> int:
    """Outbound._deliver_v311: write the leading deliveries of a batch that need nothing but a cached 3.1.1 route,
    as one write; returns how many it took (the same bytes, packet ids, in-flight entries, credit and acks)."""
    cdef Py_ssize_t taken = 0, released_count = 0, remaining, receive_maximum, max_queued
    cdef unsigned int first_byte
    cdef long qos, route_qos
    conn = self.conn
    if self.pending or conn.paused or conn.state != "connected" or not deliveries:
        return 0
    session = conn.mqtt_session
    packets = session.packets
    tables = packets.outbound_tables()
    cdef dict inflight = tables[0]
    cdef dict sent = tables[1]
    cdef set sent_ids = tables[2]
    released = packets.released
    receive_maximum = self.receive_maximum
    max_queued = self.settings.max_queued_messages if session.expiry_interval == 0 else 0
    cdef dict queue_ends = {}
    acks_back = self.acks_back
    settled = acks_back[1] if acks_back is not None else None
    back = self.credit_back
    first = deliveries[0].message
    route = self._route(key, first)
    cdef dict routes = self.routes
    route_topic, route_subject = first.topic, first.subject  # of `route`: most batches are one name
    cdef list chunks = []
    cdef dict qos_of_flags = _qos_of_flags
    Inflight = _Inflight
    prop_retain = _prop_retain
    for delivered in deliveries:
        message = delivered.message
        topic = message.topic
        subject = message.subject
        if topic != route_topic or subject != route_subject:
            route = routes.get((key, topic, subject)) or self._route(key, message)
            route_topic, route_subject = topic, subject
        header = route.topic_header
        if header is None or route.no_local or message.expires_at:
            break
        flags = message.flags
        qos_obj = qos_of_flags.get(flags)
        if qos_obj is None:
            qos_obj = _message_qos(flags)
        qos = qos_obj
        route_qos = route.qos
        if route_qos < qos:
            qos = route_qos
        body = message.body
        remaining = len(<bytes>header) + len(body)
        if qos:
            remaining += 2
            if len(inflight) + len(released) >= receive_maximum:
                break  # the general path queues it in `pending`
        elif max_queued:
            queue = delivered.queue
            end = queue_ends.get(queue)
            if end is None:
                end = queue_ends[queue] = conn.session.queue_offsets(queue)[1]
            if end - delivered.queue_offset - 1 > max_queued:
                break  # dropped by the general path
        if remaining > 268435455:  # MAX_VARIABLE_BYTE_INTEGER
            break  # the general path refuses it
        props = message.properties
        first_byte = 0x30 | (qos << 1)
        if route.retain_as_published and props and prop_retain in props:
            first_byte |= 0x01
        if qos:
            sent_key = (delivered.queue.topic, delivered.queue_offset)
            packet_id = sent.get(sent_key)
            if packet_id is not None or delivered.attempt > 1:
                first_byte |= 0x08  # DUP
            if packet_id is None:
                packet_id = packets.allocate()
            inflight[packet_id] = Inflight(key, delivered.receipt, qos, sent_key, delivered)
            sent[sent_key] = packet_id
            sent_ids.add(packet_id)
            chunks.append(_publish_head(first_byte, remaining, header, packet_id))
        else:
            chunks.append(_publish_head(first_byte, remaining, header, -1))
            if settled is not None:
                settled.append(delivered)
            released_count += 1
        chunks.append(body)
        taken += 1
    if chunks:
        conn.write_chunks(chunks)
        conn.factory.stats.messages_sent += taken
    if released_count and back is not None:
        back[key] = back.get(key, 0) + released_count
    return taken


# inbound.py's helpers, handed over by bind_inbound()
cdef dict _addresses = None  # inbound._ADDRESSES
cdef object _prop_publisher = None  # mapping.PROP_PUBLISHER
cdef object _Message = None  # core.model.Message
cdef object _transient = None  # inbound._TRANSIENT
cdef object _persistent = None  # inbound._PERSISTENT
cdef object _Publish = None  # packets.Publish
cdef object _window_exceeded = None  # inbound._window_exceeded() -> the exception to raise
cdef object _TidegateError = None  # core.errors.TidegateError


def bind_inbound(dict addresses, prop_publisher, message, transient, persistent, publish, window_exceeded,
                 tidegate_error) -> None:
    """Take inbound.py's and outbound.py's remaining helpers (called once)."""
    global _addresses, _prop_publisher, _Message, _transient, _persistent, _Publish, _window_exceeded
    global _TidegateError
    _addresses = addresses
    _prop_publisher = prop_publisher
    _Message = message
    _transient = transient
    _persistent = persistent
    _Publish = publish
    _window_exceeded = window_exceeded
    _TidegateError = tidegate_error


def stage_plain(self, list items, Py_ssize_t start, Py_ssize_t stop) -> None:
    """Inbound.stage_plain: stage the plain PUBLISHes `items[start:stop]` as `on_publish` would, without building
    a `Publish` for the ones it can take; anything else goes through `on_publish` unchanged."""
    cdef Py_ssize_t index, limit
    cdef set open_ids
    cdef dict properties
    conn = self.conn
    stats = conn.factory.stats
    window = self.window
    open_ids = window.open_ids()
    limit = window.limit if window.enforced else 0
    maximum_qos = self.settings.maximum_qos
    cdef dict addresses = _addresses
    Message = _Message
    # No Local needs the publisher on every message of this run, whichever path started the batch
    properties = {_prop_publisher: conn.client_id} if conn.mqtt_session.has_no_local else None
    for index in range(start, stop):
        topic, packet_id, payload = items[index]
        batch = self.batch
        address = addresses.get(topic)
        try:
            if address is None or address[0] != self.known_topic or (packet_id is not None and (
                    maximum_qos == 0 or (batch is not None and (
                        packet_id in self.batch_ids
                        or (limit and packet_id not in open_ids and len(open_ids) >= limit))))):  # full_for
                self.on_publish(_Publish(topic, payload, 0 if packet_id is None else 1, packet_id=packet_id))
            else:
                if packet_id is not None:
                    open_ids.add(packet_id)  # ReceiveWindow.admit
                    if limit and len(open_ids) > limit:
                        if batch is not None:
                            self.publish_batch()
                        raise _window_exceeded()
                stats.messages_received += 1
                if batch is None:
                    self.batch = batch = []
                    self.batch_ids = set()
                if packet_id is None:
                    batch.append((None, topic, Message(
                        topic=address[0], subject=address[1], body=payload,
                        properties={} if properties is None else properties.copy(), flags=_transient), 0, None))
                else:
                    batch.append((None, topic, Message(
                        topic=address[0], subject=address[1], body=payload,
                        properties={} if properties is None else properties.copy(), flags=_persistent), 1,
                        packet_id))
                    self.batch_ids.add(packet_id)
        except Exception as error:
            conn.handle_error(error)
        if conn.state == "closed":
            return


def on_pubacks(self, list packet_ids) -> None:
    """Outbound.on_pubacks: the Success PUBACKs of one read, with one core ack, one credit grant per subscription
    and one drain of `pending` for all of them."""
    packets = self.conn.mqtt_session.packets
    inflight = packets.inflight  # a read-only placeholder until the first delivery
    sent = packets.sent
    sent_ids = packets.sent_ids
    cdef dict done = {}
    cdef list group
    for packet_id in packet_ids:
        item = inflight.get(packet_id)
        if item is None or item.qos != 1:
            continue  # unknown or duplicate acknowledgement: nothing to do (PacketIds.acknowledged)
        del inflight[packet_id]
        if item.sent_key is not None:
            sent.pop(item.sent_key, None)
            sent_ids.discard(packet_id)
        key = item.sub_key
        if key is not None:
            group = done.get(key)
            if group is None:
                done[key] = [item]
            else:
                group.append(item)
    for key, group in done.items():
        sub = self.subs.get(key)
        if sub is not None and not sub.closed:
            deliveries = [item.delivered for item in group if item.delivered is not None]
            try:
                sub.ack_delivered(deliveries)
            except _TidegateError:
                pass
            for item in group:
                if item.delivered is None:
                    self._ack_core(item)
        self._regrant(key, len(group))
    self._drain_pending()
