"""The OS calls the file store makes to change files, behind one small object so tests can make them fail.

Production code uses `OS_IO`, whose attributes *are* the `os` functions: a call costs one attribute lookup more
than calling `os.write` directly, and the commit log caches the bound function (`CommitLog._write`), so the
per-record path is exactly as fast as before. Tests build a `FaultyFileIO` and pass it to the store: it forwards
to the same `os` functions, but raises `OSError(EIO/ENOSPC/...)` or writes fewer bytes than asked at the calls a
test chooses (by operation, by a substring of the file's path, after N matching calls, N times).

Reads (`pread`, `read`, `mmap`) are not routed: the faults that matter for durability are on the write side.
"""

from __future__ import annotations

import errno
import os
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# every routed operation; `open` and `replace`/`unlink`/`truncate` take paths, the others take an fd
OPERATIONS = ("open", "close", "write", "pwrite", "fsync", "fdatasync", "replace", "ftruncate", "truncate", "unlink")


class FileIO:
    """The production file layer: plain `os` functions stored as instance attributes (one dict lookup each)."""

    def __init__(self) -> None:
        self.open: Callable[..., int] = os.open
        self.close: Callable[[int], None] = os.close
        self.write: Callable[[int, Any], int] = os.write
        self.pwrite: Callable[[int, Any, int], int] = os.pwrite
        self.fsync: Callable[[int], None] = os.fsync
        self.fdatasync: Callable[[int], None] = os.fdatasync
        self.replace: Callable[..., None] = os.replace  # the atomic rename
        self.ftruncate: Callable[[int, int], None] = os.ftruncate
        self.truncate: Callable[..., None] = os.truncate
        self.unlink: Callable[..., None] = os.unlink


OS_IO = FileIO()


def write_all(io: FileIO, fd: int, data: bytes | bytearray | memoryview) -> None:
    """`write` until every byte is written: os.write may write less than asked (signals, a nearly full disk).

    A call that makes no progress raises OSError(EIO) instead of spinning. On an error some prefix of `data`
    may be in the file: callers that append to a shared file cut it back.
    """
    view = memoryview(data)
    while view:
        written = io.write(fd, view)
        if written <= 0:
            raise OSError(errno.EIO, "write made no progress")
        view = view[written:]


def pwrite_all(io: FileIO, fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """`pwrite` until every byte is written at `offset` on (a retry rewrites the same bytes: idempotent)."""
    view = memoryview(data)
    while view:
        written = io.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(errno.EIO, "pwrite made no progress")
        view = view[written:]
        offset += written


@dataclass(slots=True)
class Fault:
    """One injected fault: what to match, when to fire, what to do."""

    operation: str
    path: str | None  # substring of the file's path; None matches every file
    error: int | None  # errno to raise
    short: int | None  # write/pwrite at most this many bytes (then return the count, as the kernel would)
    after: int  # let this many matching calls through first
    times: int | None  # fire this many times (None: until removed)
    seen: int = 0
    fired: int = 0


class FaultyFileIO(FileIO):
    """A FileIO for tests: forwards to `os`, fails or shortens the calls a test picks.

    ```
    io = FaultyFileIO()
    io.inject("write", errno.ENOSPC, path="commitlog")           # every commit-log write: disk full
    io.inject("pwrite", short=8, path=".idx", times=1)           # one index write stops after 8 bytes
    io.inject("fsync", errno.EIO, after=2, times=1)              # the third fsync fails
    io.clear()                                                   # space is back
    ```

    Each fault counts every call it matches (`after` skips that many); the first fault due fires. `calls`
    counts every call per operation, faulted or not, and `history` lists them in order as (operation, path).
    Paths of fds are remembered from `open`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.faults: list[Fault] = []
        self.calls: Counter[str] = Counter()
        self.history: list[tuple[str, str]] = []  # (operation, path) of every call, in order
        self._paths: dict[int, str] = {}
        self._lock = threading.Lock()  # the group-commit flusher fsyncs from another thread
        self.open = self._open
        self.close = self._close
        self.write = self._write
        self.pwrite = self._pwrite
        self.fsync = self._fd_call("fsync", os.fsync)
        self.fdatasync = self._fd_call("fdatasync", os.fdatasync)
        self.ftruncate = self._ftruncate
        self.replace = self._replace
        self.truncate = self._truncate
        self.unlink = self._unlink

    # --- configuring
    def inject(self, operation: str, error: int | None = None, *, short: int | None = None, path: str | None = None,
               after: int = 0, times: int | None = None) -> Fault:
        """Add a fault: raise OSError(`error`), or for write/pwrite write only `short` bytes."""
        if operation not in OPERATIONS:
            raise ValueError(f"unknown operation {operation!r}; one of {OPERATIONS}")
        if (error is None) == (short is None):
            raise ValueError("give exactly one of error= or short=")
        if short is not None and operation not in ("write", "pwrite"):
            raise ValueError("short= applies to write and pwrite only")
        fault = Fault(operation, path, error, short, after, times)
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        """Remove every fault (the disk works again)."""
        with self._lock:
            self.faults.clear()

    # --- matching
    def _due(self, operation: str, path: str) -> Fault | None:
        with self._lock:
            self.calls[operation] += 1
            self.history.append((operation, path))
            due = None
            for fault in self.faults:
                if fault.operation != operation or (fault.path is not None and fault.path not in path):
                    continue
                fault.seen += 1
                if due is None and fault.seen > fault.after and (fault.times is None or fault.fired < fault.times):
                    fault.fired += 1
                    due = fault
            return due

    @staticmethod
    def _raise(fault: Fault, path: str) -> None:
        assert fault.error is not None
        raise OSError(fault.error, f"{os.strerror(fault.error)} (injected)", path)

    def _fd_path(self, fd: int) -> str:
        return self._paths.get(fd, f"<fd {fd}>")

    # --- the routed calls
    def _open(self, path: Any, flags: int, mode: int = 0o777, **kwargs: Any) -> int:
        name = os.fspath(path)
        fault = self._due("open", name)
        if fault is not None:
            self._raise(fault, name)
        fd = os.open(path, flags, mode, **kwargs)
        self._paths[fd] = name
        return fd

    def _close(self, fd: int) -> None:
        self._paths.pop(fd, None)
        os.close(fd)

    def _write(self, fd: int, data: Any) -> int:
        path = self._fd_path(fd)
        fault = self._due("write", path)
        if fault is not None:
            if fault.short is None:
                self._raise(fault, path)
            return os.write(fd, memoryview(data)[:fault.short]) if fault.short else 0
        return os.write(fd, data)

    def _pwrite(self, fd: int, data: Any, offset: int) -> int:
        path = self._fd_path(fd)
        fault = self._due("pwrite", path)
        if fault is not None:
            if fault.short is None:
                self._raise(fault, path)
            return os.pwrite(fd, memoryview(data)[:fault.short], offset) if fault.short else 0
        return os.pwrite(fd, data, offset)

    def _fd_call(self, operation: str, func: Callable[[int], None]) -> Callable[[int], None]:
        def call(fd: int) -> None:
            path = self._fd_path(fd)
            fault = self._due(operation, path)
            if fault is not None:
                self._raise(fault, path)
            func(fd)

        return call

    def _ftruncate(self, fd: int, length: int) -> None:
        path = self._fd_path(fd)
        fault = self._due("ftruncate", path)
        if fault is not None:
            self._raise(fault, path)
        os.ftruncate(fd, length)

    def _replace(self, src: Any, dst: Any) -> None:
        name = os.fspath(dst)
        fault = self._due("replace", name)
        if fault is not None:
            self._raise(fault, name)
        os.replace(src, dst)

    def _truncate(self, path: Any, length: int) -> None:
        name = os.fspath(path)
        fault = self._due("truncate", name)
        if fault is not None:
            self._raise(fault, name)
        os.truncate(path, length)

    def _unlink(self, path: Any) -> None:
        name = os.fspath(path)
        fault = self._due("unlink", name)
        if fault is not None:
            self._raise(fault, name)
        os.unlink(path)
