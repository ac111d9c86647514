"""glibc malloc settings `tidegate serve` applies to its own process at start (`process.malloc_*` settings).

Why: a large message (64 KiB and up) lives in buffers CPython takes straight from malloc (a socket read of up to
1 MiB, the payload, the record pieces). With glibc's defaults a read of 1 MiB is first an `mmap` of its own, then
the dynamic threshold moves up and such buffers come from the heap, whose free top above `M_TRIM_THRESHOLD`
(2 × the current mmap threshold) is handed back to the kernel when the buffers are freed. The next message touches
the same addresses again and the kernel faults fresh zeroed pages in: a few page faults per message (on a VM,
where fresh pages also cost the hypervisor, more expensive still), plus `brk`/`munmap` calls. Keeping a bounded
amount of freed heap (`M_TRIM_THRESHOLD`), growing the heap in larger steps (`M_TOP_PAD`) and serving every buffer
up to the largest message from the heap (`M_MMAP_THRESHOLD`) lets the broker reuse memory it already has.

The cost is memory the process keeps after a burst: up to `malloc_trim_threshold_bytes` of free heap stays mapped
(the default 64 MiB; the message cache alone is 64 MiB by default). Setting any of these switches glibc's dynamic
threshold off, so each is only set when configured above 0.

Only on Linux with glibc (found through ctypes); anywhere else (musl, macOS, Windows, no libc) nothing is changed
and `tune_malloc` says so. It never raises: a broker starts with the allocator's defaults rather than not at all.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform
from collections.abc import Callable
from typing import Any

log = logging.getLogger("tidegate.process")

# glibc's mallopt parameter numbers (malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

# glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit): the largest value worth asking.
MAX_MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024


def find_mallopt() -> Callable[[int, int], int] | None:
    """glibc's `mallopt(param, value)` through ctypes, or None when this is not Linux with glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt


def tune_malloc(settings: Any,
                find: Callable[[], Callable[[int, int], int] | None] = find_mallopt) -> dict[str, int]:
    """Apply the `process.malloc_*` settings of `settings` (the config's `process` section); return what was set,
    by mallopt name (empty when nothing was). `find` gives the mallopt function (tests inject one)."""
    wanted = _wanted(settings)
    if not wanted:
        return {}
    function = find()
    if function is None:
        log.info("malloc tuning skipped: not Linux with glibc (process.malloc_* settings have no effect here)")
        return {}
    applied: dict[str, int] = {}
    for name, (param, value) in wanted.items():
        if function(param, value) == 1:  # mallopt returns 1 on success, 0 on error
            applied[name] = value
        else:
            log.warning("mallopt(%s, %d) was refused; glibc's default stays", name, value)
    if applied:
        log.info("malloc: %s", ", ".join(f"{name}={value}" for name, value in applied.items()))
    return applied


def _wanted(settings: Any) -> dict[str, tuple[int, int]]:
    """mallopt name -> (parameter, value) of every setting above 0."""
    trim, pad, mmap = (settings.malloc_trim_threshold_bytes, settings.malloc_top_pad_bytes,
                       settings.malloc_mmap_threshold_bytes)
    wanted: dict[str, tuple[int, int]] = {}
    if trim > 0:
        wanted["M_TRIM_THRESHOLD"] = (M_TRIM_THRESHOLD, trim)
    if pad > 0:
        wanted["M_TOP_PAD"] = (M_TOP_PAD, pad)
    if mmap > 0:
        wanted["M_MMAP_THRESHOLD"] = (M_MMAP_THRESHOLD, min(mmap, MAX_MMAP_THRESHOLD_BYTES))
    return wanted
