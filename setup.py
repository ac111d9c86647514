"""Optional compiled accelerator (core/storage/_record_speedups.pyx), built when Cython and a C compiler are there.

Everything else is declared in pyproject.toml. The build never fails because of the accelerator: without Cython,
a C compiler or Python's headers (or with TIDEGATE_NO_EXTENSIONS=1 set at install time) Tidegate installs as pure
Python and prints one notice; the pure-Python code is the same behaviour, only slower (docs/performance.md).
"""

from __future__ import annotations

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

NOTICE = ("tidegate: the optional compiled accelerator was not built ({reason}); installing pure Python "
          "(same behaviour, slower record encoding). Install a C compiler and the Python headers "
          "(Debian: apt-get install gcc python3-dev) and reinstall to build it.")
SOURCES = {"tidegate.core.storage._record_speedups": "core/storage/_record_speedups.pyx",
           "tidegate.adapters.mqtt._mqtt_speedups": "adapters/mqtt/_mqtt_speedups.pyx"}


_noticed: list[str] = []


def _notice(reason: str) -> None:
    """Say once per build why there is no accelerator (not while pip only asks for metadata: it runs setup.py for
    that too, and the build would repeat the notice)."""
    if _noticed or {"egg_info", "dist_info"} & set(sys.argv):
        return
    _noticed.append(reason)
    print(NOTICE.format(reason=reason), file=sys.stderr)


class OptionalBuildExt(build_ext):
    """build_ext that turns a failed compile into a notice instead of a failed install."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any compiler/platform failure means: no accelerator
            _notice(f"{type(exc).__name__}: {exc}")

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            _notice(f"{type(exc).__name__}: {exc}")


def extensions() -> list[Extension]:
    if os.environ.get("TIDEGATE_NO_EXTENSIONS", "") not in ("", "0"):
        _notice("TIDEGATE_NO_EXTENSIONS is set")
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        _notice("Cython is not installed")
        return []
    modules = [Extension(name, [source], include_dirs=["core/storage"], depends=["core/storage/_crc32c.h"])
               for name, source in SOURCES.items()]
    return cythonize(modules, language_level=3, quiet=True)


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
