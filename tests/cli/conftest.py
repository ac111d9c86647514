"""A real broker for the CLI tests: one `tidegate serve` subprocess per session on ephemeral ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tidegate.gateway import cli
from tidegate.gateway.app import LISTENERS_FILE, read_listeners_file

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0


def serve_command(data_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tidegate.gateway", "serve", "--data-dir", str(data_dir),
            "--set", "listeners.native.port=0", "--set", "listeners.admin.port=0",
            "--set", "listeners.mqtt.enabled=false", "--set", "listeners.amqp.enabled=false",
            "--log-level", "warning", *extra]


def wait_for_listeners(process: subprocess.Popen[bytes], data_dir: Path, log_path: Path) -> dict[str, str]:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not (data_dir / LISTENERS_FILE).exists():
        if process.poll() is not None:
            raise RuntimeError(f"tidegate serve exited with {process.returncode}: {log_path.read_text()}")
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"tidegate serve wrote no {LISTENERS_FILE} in {START_TIMEOUT_S}s: "
                               f"{log_path.read_text()}")
        time.sleep(0.02)  # another process writes the file; polling is the only way to see it
    return read_listeners_file(data_dir)


def stop(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise


@pytest.fixture(scope="session")
def broker_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The native address of a `tidegate serve` running for the whole session (sync flush, the default)."""
    root = tmp_path_factory.mktemp("broker")
    data_dir, log_path = root / "data", root / "serve.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(serve_command(data_dir), stdout=log, stderr=subprocess.STDOUT)
    try:
        yield wait_for_listeners(process, data_dir, log_path)["native"]
    finally:
        assert stop(process) == 0, log_path.read_text()


@pytest.fixture
def server(broker_address: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The session broker, also set as $TIDEGATE_SERVER so commands find it without --server."""
    for name in list(os.environ):
        if name.startswith("TIDEGATE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("TIDEGATE_SERVER", broker_address)
    return broker_address


@pytest.fixture
def topic_name() -> str:
    """A topic no other test uses (the broker is shared by the session)."""
    return f"cli-{uuid.uuid4().hex[:10]}"


class Cli:
    """Runs `tidegate ...` in-process and returns (exit code, stdout, stderr)."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = cli.main(list(argv))
        captured = self.capsys.readouterr()
        return code, captured.out, captured.err


@pytest.fixture
def tidegate(capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(capsys)
