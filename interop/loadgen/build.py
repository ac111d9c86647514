"""Build the C MQTT load generator (mqtt_loadgen.c) into a build directory; never into the repository's tree of
sources and never committed.

    python3 interop/loadgen/build.py [BUILD_DIR]     # prints the binary's path

Used by interop/bench_mqtt_compare.py (`--loadgen c`) and the interop test (interop/test_mqtt_loadgen.py). Needs a C
compiler (`cc`, or $CC) and Linux headers only: the generator speaks MQTT over raw sockets, no libmosquitto.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).resolve().with_name("mqtt_loadgen.c")
DEFAULT_BUILD_DIR = Path(tempfile.gettempdir()) / "tidegate-loadgen"
CFLAGS = ("-O2", "-Wall", "-Wextra")


class LoadgenUnavailable(RuntimeError):
    """No C compiler, or the source did not compile (the message says which)."""


def compiler() -> str | None:
    """$CC if set, else `cc` or `gcc` on PATH."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def build_loadgen(build_dir: Path | str | None = None) -> Path:
    """Path of an up-to-date `mqtt_loadgen` binary in `build_dir` (default: <tmp>/tidegate-loadgen), compiled with
    `cc -O2` when missing or older than the source. Raises LoadgenUnavailable when it cannot be built."""
    directory = Path(build_dir) if build_dir else DEFAULT_BUILD_DIR
    binary = directory / "mqtt_loadgen"
    if binary.exists() and binary.stat().st_mtime >= SOURCE.stat().st_mtime:
        return binary
    cc = compiler()
    if cc is None:
        raise LoadgenUnavailable("no C compiler (apt-get install gcc libc6-dev)")
    directory.mkdir(parents=True, exist_ok=True)
    # Compile to a temporary name and rename: a concurrent run never executes a half-written binary.
    partial = directory / f".mqtt_loadgen.{os.getpid()}"
    done = subprocess.run([cc, *CFLAGS, "-o", str(partial), str(SOURCE)], capture_output=True, text=True)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise LoadgenUnavailable(f"{cc} failed on {SOURCE.name}: {done.stderr.strip()[-2000:]}")
    partial.replace(binary)
    return binary


if __name__ == "__main__":
    try:
        print(build_loadgen(sys.argv[1] if len(sys.argv) > 1 else None))
    except LoadgenUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
