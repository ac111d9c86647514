"""The compiled CRC32C (core/storage/_crc32c.h through _record_speedups.crc32c) against reference CRC32Cs.

With SSE4.2 the compiled CRC runs three interleaved crc32 chains over spans of at least 3 x 256 bytes (3 x 8192 in
the long loop) and joins them with zero-shift tables; these tests pin that the result stays bit-identical to a plain
CRC32C: the standard check value, every length 0..4096, lengths around the block boundaries, 64 KiB and 1 MiB,
unaligned starts and continuing from a previous CRC. The references are a pure-Python CRC32C written here (its
table built bit by bit) and the crc32c package (what record.py uses when the accelerator is off).

This file tests the compiled path only, so it is not in the Makefile's PURE_PYTHON_TESTS. Without the extension it
skips, except under CI=true on a machine with a C compiler, where it fails (as tests/storage/test_record_speedups.py).
"""

from __future__ import annotations

import importlib
import os
import platform
import random
import shutil
from types import ModuleType

import pytest
from crc32c import crc32c as package_crc32c
from hypothesis import given, settings
from hypothesis import strategies as st

EXTENSION = "tidegate.core.storage._record_speedups"
CHECK_INPUT = b"123456789"
CHECK_VALUE = 0xE3069283  # the catalogued check value of CRC-32C (Castagnoli)
SHORT_BLOCK = 256  # _crc32c.h's TG_CRC_SHORT
LONG_BLOCK = 8192  # _crc32c.h's TG_CRC_LONG


def _load() -> ModuleType | None:
    try:
        return importlib.import_module(EXTENSION)
    except ImportError:
        return None


_speedups = _load()


@pytest.fixture(scope="module")
def speedups() -> ModuleType:
    """The compiled module; a missing build skips, or fails under CI=true with a C compiler on PATH."""
    if _speedups is None:
        if os.environ.get("CI") == "true" and (shutil.which("cc") or shutil.which("gcc")):
            pytest.fail("CI has a C compiler but the accelerator was not built: see the pip install output")
        pytest.skip("compiled accelerator not built (no C compiler?)")
    return _speedups


def _bitwise_step(crc: int) -> int:
    """Feed one byte's worth of zero bits to a reflected CRC32C register (polynomial 0x82F63B78), bit by bit."""
    for _ in range(8):
        crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc


_REFERENCE_TABLE = [_bitwise_step(byte) for byte in range(256)]


def _reference_crc32c(data: bytes, value: int = 0) -> int:
    """Byte-at-a-time pure-Python CRC32C from a table built bit by bit above (independent of the C code)."""
    crc = value ^ 0xFFFFFFFF
    table = _REFERENCE_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _cpu_has_sse42() -> bool:
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return " sse4_2" in cpuinfo.read()
    except OSError:
        return False


def test_reference_gives_the_check_value() -> None:
    """The test's own reference is CRC32C: it gives the catalogued check value, as the crc32c package does."""
    assert _reference_crc32c(CHECK_INPUT) == CHECK_VALUE
    assert package_crc32c(CHECK_INPUT) == CHECK_VALUE


def test_hardware_path_is_used_where_the_cpu_has_it(speedups: ModuleType) -> None:
    """On an SSE4.2 CPU the compiled CRC takes the crc32-instruction path, so these tests exercise the three chains."""
    if not _cpu_has_sse42():
        pytest.skip("no SSE4.2 on this CPU: the table path runs (tested against the same references)")
    assert speedups.crc_backend() == "sse4.2"


def test_check_value(speedups: ModuleType) -> None:
    """"123456789" -> 0xE3069283 on the compiled paths."""
    assert speedups.crc32c(CHECK_INPUT) == CHECK_VALUE
    assert speedups.crc32c_software(CHECK_INPUT) == CHECK_VALUE


def test_every_length_up_to_4096_matches(speedups: ModuleType) -> None:
    """Every length 0..4096 of random data (single chain below 768 bytes, three chains above) equals the package."""
    data = _random_bytes(4096, seed=1)
    for length in range(4097):
        prefix = data[:length]
        assert speedups.crc32c(prefix) == package_crc32c(prefix), length


def test_lengths_around_block_boundaries_match_the_pure_python_reference(speedups: ModuleType) -> None:
    """Around each multiple of the 3-block spans (and 3 x 8192 + 3 x 256 + 8) the result equals the pure-Python CRC."""
    data = _random_bytes(3 * LONG_BLOCK * 2 + 3 * SHORT_BLOCK * 2 + 64, seed=2)
    edges = [3 * SHORT_BLOCK, 6 * SHORT_BLOCK, 3 * LONG_BLOCK, 3 * LONG_BLOCK + 3 * SHORT_BLOCK,
             3 * LONG_BLOCK + 3 * SHORT_BLOCK + 8, 6 * LONG_BLOCK]
    for edge in edges:
        for length in (edge - 9, edge - 8, edge - 1, edge, edge + 1, edge + 7, edge + 8, edge + 15):
            for offset in (0, 1, 7):
                span = memoryview(data)[offset:offset + length]
                assert speedups.crc32c(span) == _reference_crc32c(bytes(span)), (length, offset)


@pytest.mark.parametrize("size", [64 * 1024, 64 * 1024 + 5, 1024 * 1024])
def test_large_buffers_match(speedups: ModuleType, size: int) -> None:
    """64 KiB (a large message body) and 1 MiB equal the crc32c package; 64 KiB also the pure-Python reference."""
    data = _random_bytes(size, seed=size)
    assert speedups.crc32c(data) == package_crc32c(data)
    if size <= 64 * 1024:
        assert speedups.crc32c(data) == _reference_crc32c(data)


@pytest.mark.parametrize("offset", range(1, 16))
def test_unaligned_starts_match(speedups: ModuleType, offset: int) -> None:
    """memoryview slices starting 1..15 bytes into a buffer (the byte-wise head before the 8-byte loads) match."""
    data = _random_bytes(64 * 1024 + 32, seed=offset)
    view = memoryview(data)
    for length in (0, 5, 767, 768, 3 * LONG_BLOCK + 100, 64 * 1024):
        span = view[offset:offset + length]
        assert speedups.crc32c(span) == package_crc32c(bytes(span)), (offset, length)


def test_continuing_from_a_previous_crc_equals_the_crc_of_the_concatenation(speedups: ModuleType) -> None:
    """crc32c(b, crc32c(a)) == crc32c(a + b) at split points on and around the block sizes."""
    data = _random_bytes(70_000, seed=3)
    for split in (0, 1, 7, 767, 768, 769, 3 * LONG_BLOCK, 3 * LONG_BLOCK + 1, 40_000, 70_000):
        head, tail = data[:split], data[split:]
        assert speedups.crc32c(tail, speedups.crc32c(head)) == package_crc32c(data), split


@settings(max_examples=150, deadline=None)
@given(data=st.one_of(st.binary(max_size=2000), st.integers(0, 70_000).flatmap(
           lambda size: st.integers(0, 2**32 - 1).map(lambda seed: _random_bytes(size, seed)))),
       value=st.integers(0, 2**32 - 1), offset=st.integers(0, 15), split=st.floats(0, 1))
def test_any_buffer_start_value_offset_and_split_match(speedups: ModuleType, data: bytes, value: int, offset: int,
                                                        split: float) -> None:
    """For any data, starting value and start offset the compiled CRC equals the package, also when continued."""
    span = memoryview(data)[min(offset, len(data)):]
    expected = package_crc32c(bytes(span), value)
    assert speedups.crc32c(span, value) == expected
    cut = int(len(span) * split)
    assert speedups.crc32c(span[cut:], speedups.crc32c(span[:cut], value)) == expected
