"""The compiled MQTT hot path (adapters/mqtt/_mqtt_speedups.pyx): loaded and installed once, by server.py.

Cython twins of the read decoder (`MqttCodec._decode_fast`), the plain-PUBLISH stager (`Inbound.stage_plain`), the
one-pass 3.1.1 writer (`Outbound._deliver_v311`) and the PUBACK settler (`Outbound.on_pubacks`): the same packets,
bytes, state changes and exceptions, with less interpreter work per message (docs/performance.md, "MQTT adapter
pass 3"). They replace the pure-Python methods, kept here as `py_*`, unless the extension was not built (no C
compiler at install time) or TIDEGATE_NO_EXTENSIONS is set to anything but "" or "0" when this module is imported:
the switch of tidegate.core.storage.accelerator, whose loader adapters may not import (tests/test_layering.py).
The codec stays free of the core: a codec used outside a broker connection decodes in pure Python.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

from tidegate.core.errors import TidegateError
from tidegate.core.model import Message

from . import codec, inbound, outbound
from .mapping import PROP_PUBLISHER, PROP_RETAIN
from .packets import Publish
from .state import Inflight

log = logging.getLogger("tidegate.mqtt")

EXTENSION = "tidegate.adapters.mqtt._mqtt_speedups"
ENV_VAR = "TIDEGATE_NO_EXTENSIONS"
REQUIRED = ("bind_codec", "bind_outbound", "bind_inbound", "decode_fast", "stage_plain", "deliver_v311", "on_pubacks")

py_decode_fast = codec.MqttCodec._decode_fast
py_stage_plain = inbound.Inbound.stage_plain
py_deliver_v311 = outbound.Outbound._deliver_v311
py_on_pubacks = outbound.Outbound.on_pubacks


def extensions_disabled() -> bool:
    """True when TIDEGATE_NO_EXTENSIONS asks for the pure-Python code."""
    return os.environ.get(ENV_VAR, "") not in ("", "0")


def _load() -> ModuleType | None:
    if extensions_disabled():
        return None
    try:
        module = importlib.import_module(EXTENSION)
    except ImportError as exc:
        log.debug("compiled MQTT accelerator not available: %s", exc)
        return None
    missing = [name for name in REQUIRED if not hasattr(module, name)]
    if missing:  # built from older sources (an editable install not rebuilt after a pull): not used at all
        log.warning("compiled MQTT accelerator is stale (no %s): running pure Python; reinstall to rebuild it",
                    ", ".join(missing))
        return None
    return module


compiled = _load()
if compiled is not None:
    compiled.bind_codec(codec._remaining_length, codec._packet_too_large, codec._PLAIN_TOPICS, codec._plain_topic)
    compiled.bind_outbound(outbound._QOS_OF_FLAGS, outbound._message_qos, Inflight, PROP_RETAIN)
    compiled.bind_inbound(inbound._ADDRESSES, PROP_PUBLISHER, Message, inbound._TRANSIENT, inbound._PERSISTENT,
                          Publish, inbound._window_exceeded, TidegateError)
    codec.MqttCodec._decode_fast = compiled.decode_fast  # type: ignore[method-assign]
    inbound.Inbound.stage_plain = compiled.stage_plain  # type: ignore[method-assign]
    outbound.Outbound._deliver_v311 = compiled.deliver_v311  # type: ignore[method-assign]
    outbound.Outbound.on_pubacks = compiled.on_pubacks  # type: ignore[method-assign]
