"""Run a real `tidegate serve` process on ephemeral 127.0.0.1 ports: for end-to-end tests, interop scripts and
`tidegate bench --spawn-broker`.

The process binds port 0 everywhere and writes `<data_dir>/listeners.json` once it listens; `BrokerProcess.start()`
waits for that file (bounded), so callers never guess ports or sleep.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
POLL_S = 0.02


def wait_until(condition: Callable[[], bool], timeout: float, what: str,
               process: subprocess.Popen | None = None, log_path: Path | None = None) -> None:
    """Poll `condition` until it holds; fail with `what` after `timeout` or if `process` dies meanwhile."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            log = log_path.read_text(errors="replace") if log_path and log_path.exists() else ""
            raise AssertionError(f"broker exited with {process.returncode} while waiting for {what}:\n{log[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(POLL_S)  # polling interval of a bounded wait


class BrokerProcess:
    """One broker process; `start()` again after `kill()`/`stop()` restarts it on the same data directory."""

    def __init__(self, data_dir: Path | str, *extra_args: str, listeners: Sequence[str] = ("native", "admin"),
                 env: dict[str, str] | None = None, log_path: Path | None = None,
                 profile_path: str = "") -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.extra_args = list(extra_args)
        self.wanted = set(listeners)
        self.env = env
        self.profile_path = profile_path  # run under cProfile, written there when the broker stops
        self.process: subprocess.Popen | None = None
        self.addresses: dict[str, str] = {}
        self.log_path = log_path or self.data_dir.parent / f"{self.data_dir.name}.log"
        self._log = None

    def command(self) -> list[str]:
        profiler = ["-m", "cProfile", "-o", self.profile_path] if self.profile_path else []
        args = [sys.executable, *profiler, "-m", "tidegate.gateway", "serve", "--data-dir", str(self.data_dir),
                "--set", "listeners.native.port=0", "--set", "listeners.admin.port=0"]
        mqtt = "mqtt" in self.wanted or "mqtt_ws" in self.wanted
        args += ["--set", f"listeners.mqtt.enabled={str(mqtt).lower()}"]
        if mqtt:
            args += ["--set", "listeners.mqtt.port=0", "--set", "listeners.mqtt.ws_port=0",
                     "--set", f"listeners.mqtt.ws_enabled={str('mqtt_ws' in self.wanted).lower()}"]
        amqp = "amqp" in self.wanted
        args += ["--set", f"listeners.amqp.enabled={str(amqp).lower()}"]
        if amqp:
            args += ["--set", "listeners.amqp.port=0"]
        return args + self.extra_args

    def spawn(self) -> BrokerProcess:
        """Start the process without waiting for it to listen (see wait_for_listeners)."""
        listeners_file = self.data_dir / "listeners.json"
        if listeners_file.exists():
            listeners_file.unlink()  # left behind by a killed process: never read stale ports
        env = {k: v for k, v in os.environ.items() if not k.startswith("TIDEGATE_")}
        env.update(self.env or {})
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=self._log,
                                        stderr=subprocess.STDOUT, env=env)
        return self

    def wait_for_listeners(self) -> dict[str, str]:
        listeners_file = self.data_dir / "listeners.json"
        wait_until(listeners_file.exists, START_TIMEOUT_S, "listeners.json", self.process, self.log_path)
        self.addresses = json.loads(listeners_file.read_text())
        return self.addresses

    def start(self) -> BrokerProcess:
        self.spawn().wait_for_listeners()
        return self

    def address(self, name: str) -> str:
        return self.addresses[name]

    def host_port(self, name: str) -> tuple[str, int]:
        host, port = self.addresses[name].rsplit(":", 1)
        return host, int(port)

    @property
    def native(self) -> str:
        return self.addresses["native"]

    def stop(self, signum: int = signal.SIGTERM) -> int:
        """Ask the broker to shut down cleanly; returns its exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            return self.process.wait(timeout=STOP_TIMEOUT_S)
        finally:
            self._close_log()

    def kill(self) -> None:
        """kill -9: no flush, no clean-shutdown marker."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT_S)
        self._close_log()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> BrokerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                self.stop()
            except subprocess.TimeoutExpired:
                self.kill()
        self._close_log()
