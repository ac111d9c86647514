# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""Compiled twins of the record codec (core/storage/record.py) and of the queue index's entry packing
(core/storage/queueindex.py): the same bytes, the same results, the same exceptions.

Optional: built at install time when Cython and a C compiler are available (setup.py); record.py and queueindex.py
pick these functions unless TIDEGATE_NO_EXTENSIONS is set or this module does not import (tidegate.core.storage.accelerator),
and keep their pure-Python functions as `py_*`. tests/storage/test_record_speedups.py compares the two variants on
random messages and records.

Why it pays: encoding a plain record in Python is ~12,000 instructions of interpreter work (three `struct.pack`
calls, a `crc32c` call, slicing and joining); here it is one allocation, direct little-endian stores and an SSE4.2
CRC32C (docs/performance.md, "Accelerator").
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.unicode cimport PyUnicode_DecodeASCII, PyUnicode_DecodeUTF8
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.string cimport memcpy

from crc32c import crc32c as _py_crc32c

from tidegate.core.errors import CorruptRecord, MessageTooLarge
from tidegate.core.model import IndexEntry, Message


cdef extern from "_crc32c.h":
    void tg_crc32c_init()
    uint32_t tg_crc32c(uint32_t crc, const unsigned char *p, size_t n)
    uint32_t tg_crc32c_sw(uint32_t crc, const unsigned char *p, size_t n)
    int tg_crc32c_hw_available()


tg_crc32c_init()

cdef enum:
    PREFIX_SIZE = 12
    HEADER_SIZE = 58  # record.HEADER: <IqqqqHHHHIIHI
    MIN_RECORD_SIZE = PREFIX_SIZE + HEADER_SIZE
    DEST_SIZE = 14  # record.DESTINATION: <HIQ
    FILLER_SIZE = 20
    ENTRY_SIZE = 20  # queueindex.ENTRY: <QIQ
    SMALL_BODY = 4096  # as record._SMALL_BODY: up to this size the body is copied next to its head
    SOFTWARE_CRC_LIMIT = 4096  # without SSE4.2, larger spans go to the crc32c package (faster there)

cdef uint32_t MESSAGE_MAGIC = 0x314D4754
cdef uint32_t FILLER_MAGIC = 0x46464754
cdef uint32_t ENCRYPTED_MAGIC = 0x31454754
cdef uint32_t U16_MAX = 0xFFFF
cdef uint64_t U32_MAX = 0xFFFFFFFF

# record.py's DecodedRecord, TornRecord and SealedRecord, handed over by bind() (record.py imports this module,
# so this module cannot import record.py)
cdef object DecodedRecord = None
cdef object TornRecord = CorruptRecord
cdef object SealedRecord = CorruptRecord

cdef object _tuple_new = tuple.__new__


def bind(decoded_record, torn_record, sealed_record) -> None:
    """Take record.py's result and exception classes (called once by record.py)."""
    global DecodedRecord, TornRecord, SealedRecord
    DecodedRecord = decoded_record
    TornRecord = torn_record
    SealedRecord = sealed_record


def crc_backend() -> str:
    """"sse4.2" or "table": how this build computes CRC32C on this CPU."""
    return "sse4.2" if tg_crc32c_hw_available() else "table"


def crc32c_software(data, uint32_t value=0) -> int:
    """The table-driven CRC32C whatever the CPU (tests check it against the crc32c package)."""
    cdef Py_buffer view
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        return tg_crc32c_sw(value, <const unsigned char *>view.buf, <size_t>view.len)
    finally:
        PyBuffer_Release(&view)


def crc32c(data, uint32_t value=0) -> int:
    """CRC32C of `data` continuing from `value`, as the crc32c package's `crc32c(data, value)`."""
    cdef Py_buffer view
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        return _crc(value, <const unsigned char *>view.buf, <size_t>view.len, data, 0)
    finally:
        PyBuffer_Release(&view)


cdef uint32_t _crc(uint32_t crc, const unsigned char *p, size_t n, object owner, Py_ssize_t start) except? 0xFFFFFFFF:
    """CRC32C of n bytes at p, which are bytes [start, start + n) of `owner`'s buffer."""
    if n <= SOFTWARE_CRC_LIMIT or tg_crc32c_hw_available():
        return tg_crc32c(crc, p, n)
    with memoryview(owner) as whole:
        with whole.cast("B")[start:start + <Py_ssize_t>n] as span:
            return _py_crc32c(span, crc)


# --- little-endian stores and loads, byte by byte so the host's byte order does not matter (GCC merges them)
cdef inline unsigned char *_put16(unsigned char *p, uint32_t v) noexcept:
    p[0] = v & 0xFF
    p[1] = (v >> 8) & 0xFF
    return p + 2


cdef inline unsigned char *_put32(unsigned char *p, uint32_t v) noexcept:
    p[0] = v & 0xFF
    p[1] = (v >> 8) & 0xFF
    p[2] = (v >> 16) & 0xFF
    p[3] = (v >> 24) & 0xFF
    return p + 4


cdef inline unsigned char *_put64(unsigned char *p, uint64_t v) noexcept:
    cdef int i
    for i in range(8):
        p[i] = (v >> (8 * i)) & 0xFF
    return p + 8


cdef inline unsigned char *_put_bytes(unsigned char *p, bytes data) noexcept:
    cdef Py_ssize_t n = len(data)
    if n:
        memcpy(p, PyBytes_AS_STRING(data), n)
    return p + n


cdef inline uint32_t _get16(const unsigned char *p) noexcept:
    return p[0] | (<uint32_t>p[1] << 8)


cdef inline uint32_t _get32(const unsigned char *p) noexcept:
    return p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)


cdef inline uint64_t _get64(const unsigned char *p) noexcept:
    return _get32(p) | (<uint64_t>_get32(p + 4) << 32)


# --- encoding
cdef extern from "Python.h":
    bint PyUnicode_IS_COMPACT_ASCII(object o)
    const char *PyUnicode_AsUTF8AndSize(object o, Py_ssize_t *size) except NULL


cdef struct Text:
    const char *data
    Py_ssize_t size


cdef object _view(object value, Text *text):
    """Point `text` at the UTF-8 bytes of `value` (a str; a false value reads as empty, as in record.py) and return
    the object owning them, to be kept alive while `text` is used. An ASCII str is its own UTF-8: no copy."""
    cdef object encoded
    if type(value) is str and PyUnicode_IS_COMPACT_ASCII(value):
        text.data = PyUnicode_AsUTF8AndSize(value, &text.size)
        return value
    if not value:
        text.data = NULL
        text.size = 0
        return None
    encoded = value.encode("utf-8", "surrogatepass")
    text.data = PyBytes_AS_STRING(encoded)
    text.size = len(<bytes>encoded)
    return encoded


cdef inline unsigned char *_put_text(unsigned char *p, Text *text) noexcept:
    if text.size:
        memcpy(p, text.data, text.size)
    return p + text.size


cdef inline void _too_large(str field, object value) except *:
    raise MessageTooLarge(f"a message field does not fit its length field in the record: {field} ({value})")


cdef list _strings(object values):
    """UTF-8 bytes of each string (keys; properties flattened key, value, key, value...)."""
    return [value.encode("utf-8", "surrogatepass") for value in values]


cdef Py_ssize_t _strings_len(list encoded):
    cdef Py_ssize_t total = 0
    cdef bytes data
    for data in encoded:
        total += 4 + len(data)
    return total


cdef unsigned char *_put_strings(unsigned char *p, list encoded):
    cdef bytes data
    for data in encoded:
        p = _put32(p, <uint32_t>len(data))
        p = _put_bytes(p, data)
    return p


cdef object _encode(list out, object message, object store_ts_obj, object destinations, bint whole):
    """One record: appended to `out` as three pieces (returns the length) or returned as one bytes object
    (`whole`)."""
    cdef Py_buffer body_view
    cdef Py_ssize_t head_len, length, body_len, dest_count, i
    cdef uint32_t flags, crc
    cdef int64_t born_ts, store_ts, deliver_at, expires_at
    cdef uint32_t queue_id
    cdef uint64_t queue_offset
    cdef unsigned char *base
    cdef unsigned char *p
    cdef bytes record
    cdef list keys = None
    cdef list props = None
    cdef Py_ssize_t keys_len = 0, props_len = 0
    cdef bint copy_body
    cdef Text topic, subject, tag, group, name

    # the owners keep the views' bytes alive until the record is written
    topic_owner = _view(message.topic, &topic)
    subject_owner = _view(message.subject, &subject)
    tag_owner = _view(message.tag, &tag)
    group_owner = _view(message.group, &group)
    if message.keys:
        keys = _strings(message.keys)
        keys_len = _strings_len(keys)
    properties = message.properties
    if properties:
        props = []
        for k, v in properties.items():
            props.append(k.encode("utf-8", "surrogatepass"))
            props.append(v.encode("utf-8", "surrogatepass"))
        props_len = _strings_len(props)
    try:
        flags = message.flags
        born_ts = message.born_ts
        store_ts = store_ts_obj
        deliver_at = message.deliver_at
        expires_at = message.expires_at
    except (OverflowError, TypeError) as exc:
        raise MessageTooLarge(f"a message field does not fit its length field in the record: {exc}") from None
    if topic.size > U16_MAX:
        _too_large("topic", topic.size)
    if subject.size > U16_MAX:
        _too_large("subject", subject.size)
    if tag.size > U16_MAX:
        _too_large("tag", tag.size)
    if group.size > U16_MAX:
        _too_large("group", group.size)
    if keys_len > U32_MAX:
        _too_large("keys", keys_len)
    if props_len > U32_MAX:
        _too_large("properties", props_len)
    dest_count = len(destinations)
    if dest_count > U16_MAX:
        _too_large("destinations", dest_count)
    head_len = HEADER_SIZE + topic.size + subject.size + tag.size + group.size + keys_len + props_len
    for destination in destinations:
        _view(destination[0], &name)  # destinations outlive this call: a view of an ASCII name stays valid
        if name.size > U16_MAX:
            _too_large("destination topic", name.size)
        head_len += DEST_SIZE + name.size

    body = message.body
    PyObject_GetBuffer(body, &body_view, PyBUF_SIMPLE)
    try:
        body_len = body_view.len
        if <uint64_t>body_len > U32_MAX:
            _too_large("body", body_len)
        length = PREFIX_SIZE + head_len + body_len
        if <uint64_t>length > U32_MAX:
            _too_large("record", length)
        copy_body = whole or body_len <= SMALL_BODY
        record = PyBytes_FromStringAndSize(NULL, length if copy_body else PREFIX_SIZE + head_len)
        base = <unsigned char *>PyBytes_AS_STRING(record)
        p = _put32(base, <uint32_t>length)
        p = _put32(p, MESSAGE_MAGIC)
        p += 4  # the CRC, once the rest is written
        p = _put32(p, flags)
        p = _put64(p, <uint64_t>born_ts)
        p = _put64(p, <uint64_t>store_ts)
        p = _put64(p, <uint64_t>deliver_at)
        p = _put64(p, <uint64_t>expires_at)
        p = _put16(p, <uint32_t>topic.size)
        p = _put16(p, <uint32_t>subject.size)
        p = _put16(p, <uint32_t>tag.size)
        p = _put16(p, <uint32_t>group.size)
        p = _put32(p, <uint32_t>keys_len)
        p = _put32(p, <uint32_t>props_len)
        p = _put16(p, <uint32_t>dest_count)
        p = _put32(p, <uint32_t>body_len)
        p = _put_text(p, &topic)
        p = _put_text(p, &subject)
        p = _put_text(p, &tag)
        p = _put_text(p, &group)
        if keys is not None:
            p = _put_strings(p, keys)
        if props is not None:
            p = _put_strings(p, props)
        for destination in destinations:
            name_owner = _view(destination[0], &name)
            try:
                queue_id = destination[1]
                queue_offset = destination[2]
            except (OverflowError, TypeError) as exc:
                raise MessageTooLarge(
                    f"a message field does not fit its length field in the record: {exc}") from None
            p = _put16(p, <uint32_t>name.size)
            p = _put32(p, queue_id)
            p = _put64(p, queue_offset)
            p = _put_text(p, &name)
        if copy_body:
            if body_len:
                memcpy(p, body_view.buf, body_len)
            crc = _crc(0, base + PREFIX_SIZE, length - PREFIX_SIZE, record, PREFIX_SIZE)
        else:
            crc = _crc(0, base + PREFIX_SIZE, head_len, record, PREFIX_SIZE)
            crc = _crc(crc, <const unsigned char *>body_view.buf, body_len, body, 0)
        _put32(base + 8, crc)
    finally:
        PyBuffer_Release(&body_view)
    if whole:
        return record
    if copy_body:
        out.append(record)
        out.append(b"")
        out.append(b"")
    else:
        # as record.py: prefix, head, and the body itself (not copied: the write joins it straight from the message)
        out.append(record[:PREFIX_SIZE])
        out.append(record[PREFIX_SIZE:])
        out.append(body)
    return length


def encode_record(message, store_ts, destinations) -> bytes:
    """record.encode_record: the bytes of one message record."""
    return _encode(None, message, store_ts, destinations, True)


def encode_record_parts(list out, message, store_ts, destinations) -> int:
    """record.encode_record_parts: append the record to `out` as three pieces whose concatenation is exactly
    `encode_record`'s result (here: the whole record and two empty pieces; for a body over 4 KiB prefix, head and
    the body object itself, as record.py does); return its length."""
    return _encode(out, message, store_ts, destinations, False)


# --- checking and decoding
cdef object _check(const unsigned char *data, Py_ssize_t size, Py_ssize_t pos, object owner):
    """record.check_record on a buffer: (magic, length)."""
    cdef Py_ssize_t available = size - pos
    cdef uint32_t length, magic, crc
    if available < PREFIX_SIZE:
        raise TornRecord(f"record prefix cut short: {available} bytes")
    length = _get32(data + pos)
    magic = _get32(data + pos + 4)
    crc = _get32(data + pos + 8)
    if magic == MESSAGE_MAGIC or magic == ENCRYPTED_MAGIC:
        if length < MIN_RECORD_SIZE:
            raise CorruptRecord(f"record length {length} is below the minimum {MIN_RECORD_SIZE}")
        if length > available:
            raise TornRecord(f"record of {length} bytes cut short at {available} bytes")
        if _crc(0, data + pos + PREFIX_SIZE, length - PREFIX_SIZE, owner, pos + PREFIX_SIZE) != crc:
            raise CorruptRecord("record CRC mismatch")
        return magic, length
    if magic == FILLER_MAGIC:
        if available < FILLER_SIZE:
            raise TornRecord(f"filler cut short: {available} of {FILLER_SIZE} bytes")
        if crc != tg_crc32c(0, data + pos + PREFIX_SIZE, FILLER_SIZE - PREFIX_SIZE):
            raise CorruptRecord("filler CRC mismatch")
        if length < FILLER_SIZE:
            raise CorruptRecord(f"filler length {length} is below its minimum {FILLER_SIZE}")
        return magic, length
    raise CorruptRecord(f"bad record magic {magic:#x}")


def check_record(buf, Py_ssize_t pos=0) -> tuple:
    """record.check_record: validate the record or filler starting at `pos`; returns (magic, length)."""
    cdef Py_buffer view
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    try:
        if pos < 0:
            raise ValueError(f"negative record position {pos}")
        return _check(<const unsigned char *>view.buf, view.len, pos, buf)
    finally:
        PyBuffer_Release(&view)


cdef inline str _utf8(const unsigned char *p, Py_ssize_t n):
    return PyUnicode_DecodeUTF8(<const char *>p, n, "surrogatepass")


cdef list _read_strings(const unsigned char *data, Py_ssize_t pos, Py_ssize_t end):
    cdef list out = []
    cdef Py_ssize_t n
    while pos < end:
        if pos + 4 > end:
            raise CorruptRecord("string runs past its field")
        n = _get32(data + pos)
        pos += 4
        if pos + n > end:
            raise CorruptRecord("string runs past its field")
        out.append(_utf8(data + pos, n))
        pos += n
    return out


cdef object _decode(const unsigned char *data, Py_ssize_t size):
    cdef Py_ssize_t pos, end, n
    cdef uint32_t flags, topic_len, subject_len, tag_len, group_len, keys_len, props_len, dest_count, body_len
    cdef uint32_t queue_id, i
    cdef uint64_t queue_offset
    cdef int64_t born_ts, store_ts, deliver_at, expires_at
    cdef const unsigned char *h
    cdef list destinations = []
    cdef list flat
    cdef dict properties = {}
    if size < MIN_RECORD_SIZE:
        raise CorruptRecord(f"undecodable record: {size} bytes, a header needs {MIN_RECORD_SIZE}")
    h = data + PREFIX_SIZE
    flags = _get32(h)
    born_ts = <int64_t>_get64(h + 4)
    store_ts = <int64_t>_get64(h + 12)
    deliver_at = <int64_t>_get64(h + 20)
    expires_at = <int64_t>_get64(h + 28)
    topic_len = _get16(h + 36)
    subject_len = _get16(h + 38)
    tag_len = _get16(h + 40)
    group_len = _get16(h + 42)
    keys_len = _get32(h + 44)
    props_len = _get32(h + 48)
    dest_count = _get16(h + 52)
    body_len = _get32(h + 54)
    pos = MIN_RECORD_SIZE
    if pos + <Py_ssize_t>topic_len + subject_len + tag_len + group_len + keys_len + props_len > size:
        raise CorruptRecord("record fields do not add up to its length")
    topic = _utf8(data + pos, topic_len)
    pos += topic_len
    subject = _utf8(data + pos, subject_len)
    pos += subject_len
    tag = _utf8(data + pos, tag_len)
    pos += tag_len
    group = _utf8(data + pos, group_len)
    pos += group_len
    keys = tuple(_read_strings(data, pos, pos + keys_len)) if keys_len else ()
    pos += keys_len
    if props_len:
        flat = _read_strings(data, pos, pos + props_len)
        if len(flat) % 2:
            raise CorruptRecord("properties hold an odd number of strings")
        for n in range(0, len(flat), 2):
            properties[flat[n]] = flat[n + 1]
    pos += props_len
    for i in range(dest_count):
        if pos + DEST_SIZE > size:
            raise CorruptRecord("undecodable record: a destination runs past the record")
        n = _get16(data + pos)
        queue_id = _get32(data + pos + 2)
        queue_offset = _get64(data + pos + 6)
        pos += DEST_SIZE
        if pos + n > size:
            raise CorruptRecord("record fields do not add up to its length")
        destinations.append((_utf8(data + pos, n), queue_id, queue_offset))
        pos += n
    if pos + <Py_ssize_t>body_len != size:
        raise CorruptRecord("record fields do not add up to its length")
    body = PyBytes_FromStringAndSize(<const char *>(data + pos), body_len)
    message = Message(
        topic=topic, body=body, subject=subject, tag=tag, keys=keys, properties=properties, born_ts=born_ts,
        deliver_at=deliver_at, expires_at=expires_at, group=group, flags=flags, store_ts=store_ts,
    )
    return DecodedRecord(message, destinations, size)


def decode_record(buf, bint verify=True):
    """record.decode_record: decode one whole message record (exactly its bytes)."""
    cdef Py_buffer view
    cdef uint32_t magic, length
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    try:
        if verify:
            magic, length = _check(<const unsigned char *>view.buf, view.len, 0, buf)
            if magic != MESSAGE_MAGIC:
                if magic == ENCRYPTED_MAGIC:
                    raise SealedRecord("the record is encrypted and the store has no encryption key")
                raise CorruptRecord("expected a message record, found a filler")
            if length != view.len:
                raise CorruptRecord(f"record length {length} does not match the {view.len} bytes read")
        try:
            return _decode(<const unsigned char *>view.buf, view.len)
        except UnicodeDecodeError as exc:
            raise CorruptRecord(f"undecodable record: {exc}") from None
    finally:
        PyBuffer_Release(&view)


# --- queue index entries
def entry_pack(uint64_t commit_offset, uint32_t size, uint64_t tag_hash) -> bytes:
    """queueindex.entry_pack: one index entry (commit offset u64, size u32, tag hash u64, little-endian)."""
    cdef bytes entry = PyBytes_FromStringAndSize(NULL, ENTRY_SIZE)
    cdef unsigned char *p = <unsigned char *>PyBytes_AS_STRING(entry)
    _put64(_put32(_put64(p, commit_offset), size), tag_hash)
    return entry


def index_entries(raw, Py_ssize_t first_offset) -> list:
    """QueueIndex.read's decoding: an IndexEntry per entry of `raw` (packed entries for queue offsets from
    `first_offset` on) that is not a hole (size 0)."""
    cdef Py_buffer view
    cdef const unsigned char *p
    cdef Py_ssize_t count, i
    cdef uint32_t size
    cdef list out = []
    PyObject_GetBuffer(raw, &view, PyBUF_SIMPLE)
    try:
        if view.len % ENTRY_SIZE:
            raise ValueError(f"index entries of {ENTRY_SIZE} bytes expected, got {view.len} bytes")
        p = <const unsigned char *>view.buf
        count = view.len // ENTRY_SIZE
        for i in range(count):
            size = _get32(p + 8)
            if size:
                out.append(_tuple_new(IndexEntry, (first_offset + i, _get64(p), size, _get64(p + 12))))
            p += ENTRY_SIZE
    finally:
        PyBuffer_Release(&view)
    return out


# --- whole batches (FileMessageStore.append_batch): record.py's encode_batch and index_batch
def encode_batch(list parts, list sizes, items, store_ts, resolve, list bases, list counts) -> list:
    """record.encode_batch: plan and encode every record of a batch in one call."""
    cdef dict resolved = {}
    cdef list plans = []
    cdef list dests
    cdef list queue_offsets
    cdef Py_ssize_t slot
    for item in items:
        message = item[0]
        destinations = item[1]
        key = id(destinations)
        plan = resolved.get(key)
        if plan is None:
            plan = resolved[key] = resolve(destinations)
        dests = []
        queue_offsets = []
        for triple in plan:
            slot = triple[0]
            claimed = counts[slot]
            queue_offset = bases[slot] + claimed
            counts[slot] = claimed + 1
            dests.append((triple[1], triple[2], queue_offset))
            queue_offsets.append(queue_offset)
        sizes.append(_encode(parts, message, store_ts, dests, False))
        plans.append((plan, tuple(queue_offsets)))
    return plans


cdef char *_HEX = b"0123456789ABCDEF"


def index_batch(items, list offsets, list sizes, list plans, list counts, dict tag_hashes, tag_hash, str suffix,
                store_ts, result_type) -> tuple:
    """record.index_batch: the index entries of a written batch as one bytes block per slot, the messages' ids
    and store timestamps stamped, an AppendResult per message, and the positions of the messages with keys."""
    cdef Py_ssize_t n_slots = len(counts)
    cdef Py_ssize_t i, j, n = len(offsets)
    cdef list blocks = []
    cdef list results = []
    cdef list keyed = []
    cdef bytes block
    cdef bytes suffix_bytes = suffix.encode("ascii")
    cdef char id_chars[64]
    cdef uint64_t offset, th = 0
    cdef uint32_t size
    cdef unsigned char *p
    cdef list cursors = []
    cdef object last_tag = None
    cdef bint first = True
    cdef Py_ssize_t suffix_len = len(suffix_bytes)
    if suffix_len > 40:
        raise ValueError("message id suffix too long")
    memcpy(id_chars + 16, PyBytes_AS_STRING(suffix_bytes), suffix_len)
    for j in range(n_slots):
        block = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>counts[j] * ENTRY_SIZE)
        blocks.append(block)
    cdef unsigned char **heads = <unsigned char **>PyMem_Malloc(sizeof(unsigned char *) * (n_slots + 1))
    if heads == NULL:
        raise MemoryError()
    try:
        for j in range(n_slots):
            heads[j] = <unsigned char *>PyBytes_AS_STRING(<bytes>blocks[j])
        for i in range(n):
            message = items[i][0]
            tag = message.tag
            if first or tag != last_tag:  # a batch is mostly one tag (or none): hash it once per run
                known = tag_hashes.get(tag)
                th = tag_hash(tag) if known is None else known
                last_tag = tag
                first = False
            offset = offsets[i]
            size = sizes[i]
            plan = plans[i]
            for triple in plan[0]:
                j = triple[0]
                p = heads[j]
                _put64(_put32(_put64(p, offset), size), th)
                heads[j] = p + ENTRY_SIZE
            if message.keys:
                keyed.append(i)
            for j in range(16):
                id_chars[15 - j] = _HEX[(offset >> (4 * j)) & 0xF]
            msg_id = PyUnicode_DecodeASCII(id_chars, 16 + suffix_len, NULL)
            message.msg_id = msg_id
            message.store_ts = store_ts
            results.append(_tuple_new(result_type, (msg_id, offsets[i], sizes[i], store_ts, plan[1])))
    finally:
        PyMem_Free(heads)
    return blocks, results, keyed


# --- the publish path's results (core/produce.py's _send_results)
def send_results(items, list results, dict ends, dict cached, cached_order, Py_ssize_t largest_cached,
                 Py_ssize_t entry_overhead, result_type) -> tuple:
    """produce._send_results: after a batch is appended, each destination's new end in `ends`, the messages the
    cache may hold put in `cached` (their `(offset, charge)` handed to `cached_order`), a `result_type`
    (SendResult) per message; returns the results, the cache charge and the bodies' total size."""
    cdef list out = []
    cdef Py_ssize_t i, k, n_dests, charge, size, cached_bytes = 0, body_bytes = 0
    cdef Py_ssize_t n = len(results)
    for i in range(n):
        item = items[i]
        message = item[0]
        dests = item[1]
        result = results[i]
        commit_offset = result[1]
        size = result[2]
        offsets = result[4]
        n_dests = len(dests)
        for k in range(n_dests):
            ends[dests[k]] = offsets[k] + 1
        charge = size + entry_overhead
        if charge <= largest_cached:
            cached[commit_offset] = message
            cached_order((commit_offset, charge))
            cached_bytes += charge
        body_bytes += len(message.body)
        out.append(_tuple_new(result_type, (result[0], message.topic, dests[0].queue_id, offsets[0], commit_offset,
                                            commit_offset + size, n_dests - 1)))
    return out, cached_bytes, body_bytes


# --- message ids (record.make_msg_id): the read-back path makes one per message read from the log
def make_msg_id(commit_offset, store_ts) -> str:
    """record.make_msg_id: 24 uppercase hex chars, commit offset (16) + store seconds, low 32 bits (8)."""
    cdef uint64_t offset = commit_offset  # OverflowError below 0 or from 2**64, as int.to_bytes(12) raises
    cdef uint64_t seconds = (store_ts // 1000) & 0xFFFFFFFF
    cdef char chars[24]
    cdef int j
    for j in range(16):
        chars[15 - j] = _HEX[(offset >> (4 * j)) & 0xF]
    for j in range(8):
        chars[23 - j] = _HEX[(seconds >> (4 * j)) & 0xF]
    return PyUnicode_DecodeASCII(chars, 24, NULL)
