"""One line saying which compiled accelerators run (`tidegate version`, the ready log line).

Two optional Cython twins exist: the record codec (core/storage/_record_speedups.pyx) and the MQTT hot path
(adapters/mqtt/_mqtt_speedups.pyx). Each falls back to pure Python when it was not built or TIDEGATE_NO_EXTENSIONS
is set; the layering keeps the core from knowing about the adapter, so the gateway puts the two together.
"""

from __future__ import annotations


def describe_accelerators() -> str:
    from tidegate.adapters.mqtt import speedups
    from tidegate.core.storage import accelerator

    storage = accelerator.describe()
    if accelerator.extensions_disabled():
        return storage
    mqtt = "MQTT hot path compiled" if speedups.compiled is not None else "MQTT hot path pure Python (not built)"
    return f"{storage}; {mqtt}"
