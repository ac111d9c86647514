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
_warned_stale: dict[str, bool] = {}


def extensions_disabled() -> bool:
    """True when TIDEGATE_NO_EXTENSIONS asks for the pure-Python code."""
    return os.environ.get(ENV_VAR, "") not in ("", "0")


RECORD_SPEEDUPS = "tidegate.core.storage._record_speedups"
# What every user of the record accelerator takes from it: a build older than the sources (an editable install not
# rebuilt after a pull) lacks some, and is then not used at all rather than failing at import or half used.
RECORD_SPEEDUPS_NAMES = ("bind", "encode_record", "encode_record_parts", "check_record", "decode_record",
                         "encode_batch", "index_batch", "make_msg_id", "entry_pack", "index_entries", "send_results")


def load_extension(name: str, required: tuple[str, ...] = ()) -> ModuleType | None:
    """The compiled module `name`, or None (disabled by the environment, not built for this interpreter, or built
    from older sources that lack one of the `required` names)."""
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
    missing = [attribute for attribute in required if not hasattr(module, attribute)]
    if missing:
        _loaded[name] = False
        _failures[name] = f"built from older sources (no {', '.join(missing)}): reinstall to rebuild it"
        if not _warned_stale.get(name):
            _warned_stale[name] = True
            logger.warning("compiled accelerator %s is stale (%s); running pure Python", name, _failures[name])
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
    if _warned_stale:
        return "pure Python (compiled accelerator built from older sources: reinstall to rebuild it)"
    return "pure Python (compiled accelerator not built)"
