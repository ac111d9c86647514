"""`tidegate version` says which compiled accelerators run: both twins, or pure Python when switched off."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tidegate.adapters.mqtt import speedups
from tidegate.core.storage import accelerator

SCRIPT = "from tidegate.gateway.accelerators import describe_accelerators; print(describe_accelerators())"


def _describe(**env: str) -> str:
    environment = {**os.environ, **env}
    environment.pop("TIDEGATE_NO_EXTENSIONS", None) if not env else None
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=environment, capture_output=True, text=True,
                         timeout=60, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(speedups.compiled is None or accelerator.extensions_disabled(),
                    reason="compiled accelerators not built or switched off")
def test_version_names_both_compiled_accelerators() -> None:
    assert _describe() == "compiled accelerator (Cython) in use; MQTT hot path compiled"


def test_switched_off_accelerators_read_pure_python() -> None:
    assert _describe(TIDEGATE_NO_EXTENSIONS="1") == "pure Python (TIDEGATE_NO_EXTENSIONS is set)"
