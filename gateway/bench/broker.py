"""`--spawn-broker`: a temporary `tidegate serve` for one bench run, on ephemeral ports in a temporary data dir.

`SpawnedBroker` is the process itself (also used by interop/bench_mqtt_compare.py); `MqttTarget` is how the MQTT
commands pick their broker: the spawned one with its MQTT listener, or the one named by --server.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from tidegate.gateway.testing import BrokerProcess

from .arguments import DEFAULT_SERVER, SERVER_ENV, add_spawn_broker_options
from .driver import BenchError

MQTT_PORT = 1883


class SpawnedBroker(BrokerProcess):
    """A temporary `tidegate serve` for one bench run, in a temporary data dir removed afterwards.

    With `profile_path`, the broker runs under cProfile and writes its profile there when it stops.
    """

    def __init__(self, flush: str, *, listeners: tuple[str, ...] = ("native",), profile_path: str = "",
                 extra_settings: tuple[str, ...] = ()) -> None:
        args = ["--flush", flush, "--log-level", "warning"]
        for setting in extra_settings:
            args += ["--set", setting]
        root = Path(tempfile.mkdtemp(prefix="tidegate-bench-"))
        super().__init__(root / "data", *args, listeners=(*listeners, "admin"), profile_path=profile_path)

    def __enter__(self) -> SpawnedBroker:
        try:
            self.start()
        except AssertionError as exc:  # the broker died or never listened: say why, in one line
            self.__exit__()
            raise BenchError(f"the spawned broker did not start: {str(exc).splitlines()[0]}") from None
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            super().__exit__(*exc_info)
        finally:
            shutil.rmtree(self.data_dir.parent, ignore_errors=True)


def default_mqtt_server() -> str:
    """$TIDEGATE_SERVER's host (or 127.0.0.1) with the MQTT port."""
    native = os.environ.get(SERVER_ENV) or DEFAULT_SERVER
    return f"{native.rpartition(':')[0]}:{MQTT_PORT}"


def add_mqtt_target_options(parser: argparse.ArgumentParser) -> None:
    """--server (an MQTT address) and the --spawn-broker options, read by `MqttTarget`."""
    parser.add_argument("--server", metavar="HOST:PORT", default=None,
                        help=f"MQTT address of the broker (default: ${SERVER_ENV}'s host with port {MQTT_PORT}, or "
                             f"127.0.0.1:{MQTT_PORT}); ignored with --spawn-broker")
    add_spawn_broker_options(parser)


class MqttTarget:
    """The broker of an MQTT bench command: entering gives (MQTT address, broker pid or 0). With --spawn-broker a
    SpawnedBroker with the MQTT listener (no WebSocket) runs until exit; otherwise --server (or the default) is
    used as is, with --broker-pid if the command has it."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.broker: SpawnedBroker | None = None

    def __enter__(self) -> tuple[str, int]:
        args = self.args
        if not args.spawn_broker:
            if args.flush != "sync" or args.profile_broker:
                raise BenchError("--flush and --profile-broker apply to a broker started with --spawn-broker")
            return args.server or default_mqtt_server(), getattr(args, "broker_pid", 0)
        profile = os.path.abspath(args.profile_broker) if args.profile_broker else ""
        self.broker = SpawnedBroker(args.flush, listeners=("mqtt",), profile_path=profile,
                                    extra_settings=("listeners.mqtt.ws_enabled=false",))
        self.broker.__enter__()
        assert self.broker.process is not None
        return self.broker.addresses["mqtt"], self.broker.process.pid

    def __exit__(self, *exc: object) -> None:
        if self.broker is not None:
            self.broker.__exit__(*exc)
