"""Every path the store uses under its data directory, in one place.

```
<data_dir>/commitlog/<20-digit base offset>.log        commit-log segments
<data_dir>/index/<topic>/<queue_id>/<20-digit base entry>.idx   per-queue index files
<data_dir>/index/<topic>/<queue_id>/low_water         first queue offset a topic's retention_ms still keeps
<data_dir>/keys/<20-digit segment base offset>.keys    key index, one file per commit-log segment
<data_dir>/checkpoint                                  commit offset up to which indexes are persisted
<data_dir>/clean_shutdown                              present only between close() and the next open
<data_dir>/tombstones                                  append-only list of deleted queues whose records the log holds
<data_dir>/meta.db                                     SQLite metadata (MetadataStore)
```

Topic names may be `.` or `..` (both match the topic-name rule), so topic directories are escaped reversibly.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote

from tidegate.core.errors import InvalidName
from tidegate.core.model import QueueRef
from tidegate.core.storage.fileio import OS_IO, FileIO, write_all

DIGITS = 20
# Message bodies, sessions and users live here: only the broker's own user may read them, whatever the umask.
DATA_DIR_MODE = 0o700
DATA_FILE_MODE = 0o600
SEGMENT_SUFFIX = ".log"
INDEX_SUFFIX = ".idx"
KEYS_SUFFIX = ".keys"
LOW_WATER_NAME = "low_water"


def _escape_topic(topic: str) -> str:
    if not topic or "/" in topic or "\x00" in topic or "\\" in topic:
        raise InvalidName(f"topic {topic!r} cannot name an index directory")
    escaped = topic.replace("%", "%25")
    if escaped.startswith("."):
        escaped = "%2E" + escaped[1:]
    return escaped


def _unescape_topic(name: str) -> str:
    return unquote(name)


def _numbered(directory: Path, suffix: str) -> list[int]:
    """Sorted numbers of the files `<20 digits><suffix>` in `directory`; other files are ignored."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        if name.endswith(suffix) and len(name) == DIGITS + len(suffix) and name[:DIGITS].isdigit():
            out.append(int(name[:DIGITS]))
    out.sort()
    return out


def make_private_dirs(path: Path) -> None:
    """`mkdir -p` where every directory created is 0700 (Path.mkdir gives the parents it creates the umask's mode)."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(DATA_DIR_MODE)
        except FileExistsError:
            if not directory.is_dir():
                raise


def secure_data_dir(root: str | os.PathLike[str]) -> None:
    """Create `root` 0700 (or tighten an existing one) and take group/other bits off everything already inside:
    files 0600, directories 0700, so a data directory an older version wrote under umask 022 is closed too."""
    path = Path(root)
    make_private_dirs(path)
    os.chmod(path, DATA_DIR_MODE)
    for directory, dirnames, filenames in os.walk(path):
        for name in dirnames:
            _tighten(os.path.join(directory, name), DATA_DIR_MODE)
        for name in filenames:
            _tighten(os.path.join(directory, name), DATA_FILE_MODE)


def _tighten(path: str, mode: int) -> None:
    try:
        st = os.lstat(path)
        if st.st_mode & 0o077 and not os.path.islink(path):
            os.chmod(path, mode)
    except FileNotFoundError:
        pass  # removed meanwhile


class StoreLayout:
    """Maps store objects to paths; creates the directories it owns."""

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.root = Path(data_dir)
        self.commitlog_dir = self.root / "commitlog"
        self.index_dir = self.root / "index"
        self.keys_dir = self.root / "keys"
        self.checkpoint_path = self.root / "checkpoint"
        self.clean_shutdown_path = self.root / "clean_shutdown"
        self.tombstones_path = self.root / "tombstones"
        self.meta_db_path = self.root / "meta.db"

    def create_dirs(self) -> None:
        for directory in (self.root, self.commitlog_dir, self.index_dir, self.keys_dir):
            make_private_dirs(directory)

    # --- commit log
    def segment_path(self, base_offset: int) -> Path:
        return self.commitlog_dir / f"{base_offset:0{DIGITS}d}{SEGMENT_SUFFIX}"

    def segment_bases(self) -> list[int]:
        return _numbered(self.commitlog_dir, SEGMENT_SUFFIX)

    # --- queue indexes
    def queue_dir(self, queue: QueueRef) -> Path:
        return self.index_dir / _escape_topic(queue.topic) / str(queue.queue_id)

    def index_path(self, queue: QueueRef, base_entry: int) -> Path:
        return self.queue_dir(queue) / f"{base_entry:0{DIGITS}d}{INDEX_SUFFIX}"

    def index_bases(self, queue: QueueRef) -> list[int]:
        return _numbered(self.queue_dir(queue), INDEX_SUFFIX)

    def low_water_path(self, queue: QueueRef) -> Path:
        """The queue's first offset kept by per-topic retention (absent until that retention first trims it)."""
        return self.queue_dir(queue) / LOW_WATER_NAME

    def indexed_queues(self) -> list[QueueRef]:
        """Every queue that has an index directory on disk."""
        out = []
        try:
            topic_dirs = os.listdir(self.index_dir)
        except FileNotFoundError:
            return []
        for topic_dir in topic_dirs:
            topic = _unescape_topic(topic_dir)
            try:
                queue_dirs = os.listdir(self.index_dir / topic_dir)
            except NotADirectoryError:
                continue
            for queue_dir in queue_dirs:
                if queue_dir.isdigit():
                    out.append(QueueRef(topic, int(queue_dir)))
        return out

    # --- key index
    def key_index_path(self, segment_base: int) -> Path:
        return self.keys_dir / f"{segment_base:0{DIGITS}d}{KEYS_SUFFIX}"

    def key_index_bases(self) -> list[int]:
        return _numbered(self.keys_dir, KEYS_SUFFIX)


def fsync_dir(path: Path, io: FileIO = OS_IO) -> None:
    """Make a created/renamed/deleted directory entry durable."""
    fd = io.open(path, os.O_RDONLY)
    try:
        io.fsync(fd)
    finally:
        io.close(fd)


def fsync_file(path: Path, io: FileIO = OS_IO) -> None:
    """fsync a file that is not open here; a file that is gone (deleted by retention) needs nothing."""
    try:
        fd = io.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        io.fsync(fd)
    finally:
        io.close(fd)


def write_atomically(path: Path, data: bytes, durable: bool = True, io: FileIO = OS_IO) -> None:
    """Replace `path` with `data` so a crash leaves either the old or the new content, never a mix.

    The one way the process replaces a small file. `durable=True`: write a temporary file, fsync it, rename it
    over `path`, fsync the directory, so the new content survives power loss once this returns. `durable=False`
    skips both fsyncs: still atomic against a process crash (the page cache survives kill -9), for files rewritten
    every second on the reactor thread whose loss on power failure recovery repairs (the checkpoint, queue low-water
    marks); their owners write them durably at close.

    On any error (disk full, EIO) `path` keeps its old content, the temporary file is removed so it does not hold
    on to the space, and the OSError propagates.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = io.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, DATA_FILE_MODE)
        try:
            write_all(io, fd, data)
            if durable:
                io.fsync(fd)
        finally:
            io.close(fd)
        io.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durable:
        fsync_dir(path.parent, io)
