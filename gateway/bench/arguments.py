"""Command-line pieces every `tidegate bench` driver shares: exit codes, the default server, option parsers and
the options that start a temporary broker."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

EXIT_OK = 0
EXIT_FAILURE = 1
SERVER_ENV = "TIDEGATE_SERVER"
DEFAULT_SERVER = "127.0.0.1:10911"


@dataclass(frozen=True, slots=True)
class BenchCommand:
    """`tidegate bench <name>` (one per driver module, listed in registry.py): `add_arguments` fills its parser,
    `run` is its handler and returns the exit code."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse `type` for integers of at least `minimum`."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected at least {minimum}, got {text}")
        return value

    return parse


def add_spawn_broker_options(parser: argparse.ArgumentParser) -> None:
    """--spawn-broker, --flush, --profile-broker (see broker.py)."""
    parser.add_argument("--spawn-broker", action="store_true",
                        help="start a temporary `tidegate serve` (ephemeral ports, temp data dir) and stop it after")
    parser.add_argument("--flush", choices=("sync", "async"), default="sync",
                        help="with --spawn-broker: the broker's storage.flush (default sync)")
    parser.add_argument("--profile-broker", metavar="FILE", default="",
                        help="with --spawn-broker: run the broker under cProfile, write the profile to FILE")


def progress(line: str) -> None:
    """Progress lines go to stderr, so that stdout holds only the report (or its JSON)."""
    print(line, file=sys.stderr, flush=True)
