"""The layering of docs/architecture.md as checked rules: dependencies point gateway -> adapters -> core -> storage.

import-linter (the test extra) checks each rule on the import graph of the installed `tidegate` package, direct and
indirect imports alike (a codec importing a helper that imports twisted breaks the codec rule too), including imports
inside functions. The contracts are written here, not in a config file, because one rule covers modules that may
not exist yet (adapters/amqp/codec*.py) and import-linter refuses a contract naming a module it cannot find.

Exceptions are listed one import at a time with the reason; import-linter fails a listed exception that no longer
occurs, so the list cannot outlive the code it excuses. On failure the assertion message is import-linter's report:
every rule broken and the import chain (module, line) that breaks it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROOT_PACKAGES = ("tidegate.core", "tidegate.adapters", "tidegate.gateway", "tidegate.client")

# Sans-IO codecs: bytes in, frames out; no reactor, no core (docs/architecture.md, DESIGN.md section 6).
MQTT_CODECS = (
    "tidegate.adapters.mqtt.codec",
    "tidegate.adapters.mqtt.packets",
    "tidegate.adapters.mqtt.properties",
    "tidegate.adapters.mqtt.reason_codes",
)
MQTT_CODEC_EXCEPTIONS = (
    # One wildcard matcher for the whole broker: MQTT filter validation and matching reuse the core trie's level
    # rules, a pure module (standard library and core.errors only), so MQTT and core routing agree by construction.
    "tidegate.adapters.mqtt.packets -> tidegate.core.routing",
    "tidegate.core.routing -> tidegate.core.errors",
)
NATIVE_CODECS = (
    "tidegate.adapters.native.codec",
    "tidegate.adapters.native.frames",
    "tidegate.adapters.native.fastpath",
    "tidegate.adapters.native.errors",
)
NATIVE_CODEC_EXCEPTIONS = (
    # The native protocol's frames carry core messages and core error codes on the wire as they are: the frame
    # types are built from tidegate.core.model (Message, QueueRef) and decode errors are tidegate.core.errors
    # classes, whose wire codes the protocol shares. Both are plain data modules without I/O or broker state.
    "tidegate.adapters.native.codec -> tidegate.core.errors",
    "tidegate.adapters.native.codec -> tidegate.core.model",
    "tidegate.adapters.native.frames -> tidegate.core.errors",
    "tidegate.adapters.native.frames -> tidegate.core.model",
    "tidegate.adapters.native.fastpath -> tidegate.core.model",
    "tidegate.adapters.native.errors -> tidegate.core.errors",
)
STORAGE_MAY_IMPORT = (
    # The only core modules the store knows: the data it stores and the errors it raises.
    "tidegate.core.storage.** -> tidegate.core.model",
    "tidegate.core.storage.** -> tidegate.core.errors",
)


def amqp_codecs() -> tuple[str, ...]:
    """adapters/amqp/codec*.py, once the AMQP adapter exists."""
    found = sorted((REPO / "adapters" / "amqp").glob("codec*.py"))
    return tuple(f"tidegate.adapters.amqp.{path.stem}" for path in found)


def _lines(values: tuple[str, ...] | list[str]) -> str:
    return "".join(f"\n    {value}" for value in values)


def contracts() -> dict[str, dict[str, tuple[str, ...] | str]]:
    out: dict[str, dict[str, tuple[str, ...] | str]] = {
        "core-below-adapters": {
            "name": "core imports no adapter or gateway module",
            "source_modules": ("tidegate.core",),
            "forbidden_modules": ("tidegate.adapters", "tidegate.client", "tidegate.gateway"),
        },
        "storage-at-the-bottom": {
            "name": "core.storage imports only tidegate.core.model, tidegate.core.errors and itself",
            "source_modules": ("tidegate.core.storage",),
            # tidegate.core.* includes core.storage itself, which import-linter skips as overlapping the source.
            "forbidden_modules": ("tidegate.core.*", "tidegate.adapters", "tidegate.client", "tidegate.gateway"),
            "ignore_imports": STORAGE_MAY_IMPORT,
        },
        "adapters-through-the-api": {
            "name": "adapters never import tidegate.core.broker or tidegate.core.storage",
            "source_modules": ("tidegate.adapters", "tidegate.client"),
            "forbidden_modules": ("tidegate.core.broker", "tidegate.core.storage"),
        },
        "mqtt-codecs-sans-io": {
            "name": "MQTT codecs import neither twisted nor tidegate.core beyond the routing trie",
            "source_modules": MQTT_CODECS,
            "forbidden_modules": ("twisted", "tidegate.core", "tidegate.gateway"),
            "ignore_imports": MQTT_CODEC_EXCEPTIONS,
        },
        "native-codecs-sans-io": {
            "name": "native codecs import neither twisted nor tidegate.core beyond core.model and core.errors",
            "source_modules": NATIVE_CODECS,
            "forbidden_modules": ("twisted", "tidegate.core", "tidegate.gateway"),
            "ignore_imports": NATIVE_CODEC_EXCEPTIONS,
        },
    }
    amqp = amqp_codecs()
    if amqp:
        out["amqp-codecs-sans-io"] = {
            "name": "AMQP codecs import neither twisted nor tidegate.core",
            "source_modules": amqp,
            "forbidden_modules": ("twisted", "tidegate.core", "tidegate.gateway"),
        }
    return out


def write_config(path: Path) -> Path:
    parts = [
        "[importlinter]",
        f"root_packages ={_lines(ROOT_PACKAGES)}",
        "include_external_packages = True",
    ]
    for key, contract in contracts().items():
        parts += ["", f"[importlinter:contract:{key}]", f"name = {contract['name']}", "type = forbidden"]
        for option in ("source_modules", "forbidden_modules", "ignore_imports"):
            if option in contract:
                parts.append(f"{option} ={_lines(contract[option])}")
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return path


def test_every_layering_contract_holds(tmp_path: Path) -> None:
    """core below adapters, storage at the bottom, adapters only through the core API, codecs sans-IO."""
    config = write_config(tmp_path / "layering.ini")
    # A process of its own: import-linter inspects its contract classes with dir()/getattr(), which breaks once
    # other tests have imported zope.interface declarations into this process (AttributeError: __provides__).
    run = subprocess.run(
        [sys.executable, "-c", LINT, str(config)],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
        env={**os.environ, "COLUMNS": "200"},  # one line per contract in the report
    )
    report = run.stdout + run.stderr
    assert run.returncode == 0, f"an import breaks the layering:\n{report}"
    assert f"Contracts: {len(contracts())} kept, 0 broken." in report, report


LINT = """
import sys
from importlinter.cli import lint_imports
sys.exit(lint_imports(config_filename=sys.argv[1], no_cache=True, no_logo=True))
"""
