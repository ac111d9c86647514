"""The optional compiled accelerator: which variant runs, and loading it.

Tidegate is pure Python; setup.py also builds Cython twins of a few hot functions (the record codec and queue-index
entries, core/storage/_record_speedups.pyx) when a C compiler is available at install time. A module with a
compiled twin imports it through `load_extension` and keeps its pure-Python functions as the fallback, used when
the extension was not built or TIDEGATE_NO_EXTENSIONS is set to anything but "" or "0" (read at import time).
Both variants give the same bytes and results (tests/storage/test_record_speedups.py).
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

logger = logging.getLogger("tidegate.accelerator")

ENV_VAR = "TIDEGATE_NO_EXTENSIONS"

_loaded: dict[str, bool] = {}  # extension module name -> in use
_failures: dict[str, str] = {}  # extension module name -> why it did not import


def extensions_disabled() -> bool:
    """True when TIDEGATE_NO_EXTENSIONS asks for the pure-Python code."""
    return os.environ.get(ENV_VAR, "") not in ("", "0")


def load_extension(name: str) -> ModuleType | None:
    """The compiled module `name`, or None (disabled by the environment, or not built for this interpreter)."""
    if extensions_disabled():
        _loaded[name] = False
        return None
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        _loaded[name] = False
        _failures[name] = str(exc)
        logger.debug("compiled accelerator %s not available: %s", name, exc)
        return None
    _loaded[name] = True
    return module


def accelerated() -> bool:
    """True when every compiled twin loaded so far is in use (and at least one was loaded)."""
    return bool(_loaded) and all(_loaded.values())


def describe() -> str:
    """One line for `tidegate version` and the startup log."""
    import tidegate.core.storage.record  # noqa: F401 - loads the record accelerator if there is one

    if accelerated():
        return "compiled accelerator (Cython) in use"
    if extensions_disabled():
        return f"pure Python ({ENV_VAR} is set)"
    return "pure Python (compiled accelerator not built)"
