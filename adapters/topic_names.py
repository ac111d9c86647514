"""How one protocol name level becomes a core topic name, the same for every adapter so that protocols meet.

A core topic name allows `[A-Za-z0-9_.%-]`; any other byte of the UTF-8 level is written `%XX` (upper-case hex), and
an empty level is `%00`. The encoding is canonical: `decode_level` accepts exactly the strings `encode_level`
produces, so `%41` typed by a native client is not confused with `A` published over MQTT or AMQP.
"""

from __future__ import annotations

EMPTY_LEVEL = "%00"
_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")
_HEX_UPPER = "0123456789ABCDEF"


def encode_level(level: str) -> str:
    """The core-topic spelling of one level (the first level of an MQTT name, an AMQP exchange or queue name)."""
    if not level:
        return EMPTY_LEVEL
    raw = level.encode("utf-8", "surrogatepass")
    if all(b in _SAFE for b in raw):
        return level
    out: list[str] = []
    for b in raw:
        if b in _SAFE:
            out.append(chr(b))
        else:
            out.append("%" + _HEX_UPPER[b >> 4] + _HEX_UPPER[b & 0xF])
    return "".join(out)


def decode_level(encoded: str) -> str | None:
    """The level a core topic name spells, or None when it is not a canonical encoding."""
    if "%" not in encoded:
        return encoded
    if encoded == EMPTY_LEVEL:
        return ""
    raw = bytearray()
    i, n = 0, len(encoded)
    while i < n:
        ch = encoded[i]
        if ch == "%":
            pair = encoded[i + 1:i + 3]
            if len(pair) != 2 or any(c not in _HEX_UPPER for c in pair):
                return None
            raw.append(int(pair, 16))
            i += 3
        else:
            raw.append(ord(ch))
            i += 1
    try:
        level = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return level if encode_level(level) == encoded else None
