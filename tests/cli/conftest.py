"""A real broker for the CLI tests: one `tidegate serve` subprocess per session on ephemeral ports."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from tidegate.gateway import cli
from tidegate.gateway.testing import BrokerProcess


@pytest.fixture(scope="session")
def broker_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The native address of a `tidegate serve` running for the whole session (sync flush, the default)."""
    root = tmp_path_factory.mktemp("broker")
    process = BrokerProcess(root / "data", "--log-level", "warning").start()
    try:
        yield process.native
    finally:
        assert process.stop() == 0, process.log()


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
