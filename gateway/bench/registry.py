"""The `tidegate bench` command and its registry of drivers: one entry per driver module, in help order.

Adding a driver (say `amqp`) is a module with a `COMMAND` (an `arguments.BenchCommand`) and its name below. The
registry imports the driver modules; they import the engine and the shared pieces, never this module, so there is
no import cycle. The engine itself needs no registry: `run_bench` is handed the driver class.
"""

from __future__ import annotations

import argparse

from . import amqp, mqtt, mqtt_conns, mqtt_storm, native
from .arguments import BenchCommand

COMMANDS: dict[str, BenchCommand] = {
    c.name: c for c in (native.COMMAND, mqtt.COMMAND, mqtt_conns.COMMAND, mqtt_storm.COMMAND, amqp.COMMAND)}


def register(commands: argparse._SubParsersAction) -> None:
    """Add `bench` and one subcommand per registered driver to the `tidegate` parser."""
    from tidegate.gateway.cli import OneLineArgumentParser

    bench = commands.add_parser("bench", help="measure throughput, latency, loss and duplication end to end")
    drivers = bench.add_subparsers(dest="bench_protocol", metavar="{" + ",".join(COMMANDS) + "}", required=True,
                                   parser_class=OneLineArgumentParser)
    for command in COMMANDS.values():
        parser = drivers.add_parser(command.name, help=command.help)
        command.add_arguments(parser)
        parser.set_defaults(handler=command.run)
