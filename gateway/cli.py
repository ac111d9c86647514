"""The `tidegate` command line: `serve`, `config show`, `version`, plus commands other modules register.

Adding a command (topic, send, consume, group, message, bench, ...) needs no edit here. Put a module in the
`tidegate.gateway` package whose name starts with `cli_` (gateway/cli_admin.py, gateway/cli_bench.py) and give it

    def register(commands: argparse._SubParsersAction) -> None:
        parser = commands.add_parser("topic", help="create, list and delete topics")
        add_config_arguments(parser)             # optional: --config/--set/... like `serve`
        parser.set_defaults(handler=run_topic)   # run_topic(args: argparse.Namespace) -> int (the exit code)

`main` imports every `cli_*` module in name order and calls its `register`. A handler returns the exit code;
raising `UsageError` (or `ConfigError`) prints one line `tidegate <command>: error: ...` and exits 2, which is
also what argparse mistakes do. `load_config_from_args(args)` gives a handler the merged config, and
`tidegate.gateway.app.read_listeners_file(data_dir)` the addresses a running broker bound.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import signal
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any, NoReturn

from tidegate.gateway.config import (
    CliOverride,
    ConfigError,
    LoadedConfig,
    load_config,
    parse_set_option,
    render_json,
    render_toml,
)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
COMMAND_MODULE_PREFIX = "cli_"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# (option, config key) pairs: each shortcut is a `--set key=value` with a shorter spelling.
CONFIG_SHORTCUTS = (
    ("--data-dir", "broker.data_dir"),
    ("--flush", "storage.flush"),
    ("--native-port", "listeners.native.port"),
    ("--admin-port", "listeners.admin.port"),
    ("--log-level", "log.level"),
)


class UsageError(Exception):
    """A bad argument a handler found after parsing; reported in one line with exit code 2."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse prints the whole usage block before an error; we print one line pointing at --help instead."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def package_version() -> str:
    try:
        return version("tidegate")
    except PackageNotFoundError:
        return "unknown (not installed)"


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("configuration (defaults < file < TIDEGATE_* environment < these options)")
    group.add_argument("--config", metavar="FILE", help="TOML config file (default: $TIDEGATE_CONFIG if set)")
    group.add_argument("--set", dest="set_options", action="append", default=[], metavar="KEY=VALUE",
                       help="override one key, e.g. --set storage.flush=async (repeatable)")
    for option, key in CONFIG_SHORTCUTS:
        group.add_argument(option, dest=_shortcut_dest(key), metavar="VALUE", help=f"same as --set {key}=VALUE")


def _shortcut_dest(key: str) -> str:
    return "shortcut_" + key.replace(".", "__")


def cli_overrides(args: argparse.Namespace) -> list[CliOverride]:
    """--set options in the order given, then shortcuts (which win over a --set of the same key)."""
    overrides = [parse_set_option(text) for text in args.set_options]
    for option, key in CONFIG_SHORTCUTS:
        value = getattr(args, _shortcut_dest(key), None)
        if value is not None:
            overrides.append(CliOverride(key, value, option))
    return overrides


def load_config_from_args(args: argparse.Namespace, environ: dict[str, str] | None = None) -> LoadedConfig:
    return load_config(args.config, dict(os.environ) if environ is None else environ, cli_overrides(args))


def configure_logging(level: str) -> None:
    """One line per record on stderr; Twisted's own log events go through the same handler."""
    from twisted.logger import STDLibLogObserver, globalLogBeginner

    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
    root.setLevel(level.upper())
    globalLogBeginner.beginLoggingTo([STDLibLogObserver(name="twisted")], redirectStandardIO=False)


# --- serve
def run_serve(args: argparse.Namespace) -> int:
    loaded = load_config_from_args(args)
    configure_logging(loaded.config.log.level)
    return serve(loaded)


def serve(loaded: LoadedConfig) -> int:
    """Run the broker until SIGINT/SIGTERM; 0 after a clean stop, 1 if start-up or shutdown failed."""
    from twisted.internet import reactor

    from tidegate.gateway.app import TidegateProcess, freeze_startup_objects, tune_garbage_collector
    from tidegate.gateway.memory_tuning import tune_malloc

    log = logging.getLogger("tidegate.serve")
    if loaded.config_file is not None:
        log.info("config file %s", loaded.config_file)
    thresholds = tune_garbage_collector(loaded.config.process)
    tune_malloc(loaded.config.process)  # before the first large buffer: glibc settings (gateway/memory_tuning.py)
    process = TidegateProcess(loaded.config, reactor)
    start_failure: list[str] = []

    def start() -> None:
        process.startService()
        assert process.started is not None
        process.started.addCallbacks(started, failed)

    def started(_: Any) -> None:
        frozen = freeze_startup_objects(loaded.config.process)
        log.info("garbage collector: thresholds %s, %d start-up objects frozen", thresholds, frozen)

    def failed(failure: Any) -> None:
        start_failure.append(failure.getErrorMessage() or failure.type.__name__)
        log.error("start-up failed: %s: %s", failure.type.__name__, failure.getErrorMessage())
        log.debug("start-up failure detail", exc_info=(failure.type, failure.value, failure.getTracebackObject()))
        if reactor.running:
            reactor.stop()

    def stop() -> Any:
        return process.stopService().addErrback(stop_failed)

    def stop_failed(failure: Any) -> None:
        # Data may not have reached disk cleanly (the next start recovers it); the exit code must say so.
        stop_failure.append(failure.getErrorMessage())
        log.error("shutdown failed: %s: %s", failure.type.__name__, failure.getErrorMessage())

    stop_failure: list[str] = []
    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", stop)
    reactor.run()
    # Twisted records the signal that stopped it so that twistd can re-raise it; a SIGTERM/SIGINT stop is the normal
    # way to end a broker, so it is a success here.
    if start_failure or stop_failure:
        return EXIT_FAILURE
    return EXIT_OK


# --- config show
def run_config_show(args: argparse.Namespace) -> int:
    loaded = load_config_from_args(args)
    if args.json:
        sys.stdout.write(render_json(loaded, with_sources=args.sources))
    else:
        sys.stdout.write(render_toml(loaded, with_sources=not args.no_sources))
    return EXIT_OK


# --- version
def run_version(args: argparse.Namespace) -> int:
    import platform

    import twisted

    from tidegate.gateway.accelerators import describe_accelerators

    print(f"tidegate {package_version()} (Python {platform.python_version()}, Twisted {twisted.__version__}; "
          f"{describe_accelerators()})")
    return EXIT_OK


def _register_builtin(commands: argparse._SubParsersAction) -> None:
    serve_parser = commands.add_parser("serve", help="run the broker")
    add_config_arguments(serve_parser)
    serve_parser.set_defaults(handler=run_serve)

    config_parser = commands.add_parser("config", help="inspect the configuration")
    config_commands = config_parser.add_subparsers(dest="config_command", metavar="{show}", required=True,
                                                   parser_class=OneLineArgumentParser)
    show = config_commands.add_parser("show", help="print the effective merged config and where each value came from")
    add_config_arguments(show)
    show.add_argument("--json", action="store_true", help="print JSON instead of TOML")
    show.add_argument("--sources", action="store_true", help="with --json: include where each value came from")
    show.add_argument("--no-sources", action="store_true", help="TOML without the source comments")
    show.set_defaults(handler=run_config_show)

    version_parser = commands.add_parser("version", help="print the version")
    version_parser.set_defaults(handler=run_version)


def command_modules() -> list[str]:
    """Names of the `tidegate.gateway.cli_*` modules, sorted, found next to this one."""
    import tidegate.gateway as package

    return sorted(
        f"{package.__name__}.{info.name}"
        for info in pkgutil.iter_modules(package.__path__)
        if info.name.startswith(COMMAND_MODULE_PREFIX)
    )


def build_parser(extra_modules: Sequence[str] | None = None) -> OneLineArgumentParser:
    parser = OneLineArgumentParser(prog="tidegate", description="Tidegate: a RocketMQ-style broker that also "
                                   "speaks MQTT and AMQP 0-9-1.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                     parser_class=OneLineArgumentParser)
    _register_builtin(commands)
    for module_name in command_modules() if extra_modules is None else extra_modules:
        register: Callable[[argparse._SubParsersAction], None] = importlib.import_module(module_name).register
        register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        # --help, --version-style exits and usage errors: hand the code back so main() stays callable in-process.
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    prog = f"tidegate {args.command}"
    try:
        return int(args.handler(args))
    except (ConfigError, UsageError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
