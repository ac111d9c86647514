"""Fixtures shared by the core's tests: a deterministic clock at a fixed epoch and an in-memory broker on it.
A module that needs another broker (other config) defines its own `broker` fixture, which takes precedence."""

import pytest
from twisted.internet.testing import MemoryReactorClock

from tidegate.core.testing import make_broker

T0 = 1_700_000_000.0


@pytest.fixture
def clock() -> MemoryReactorClock:
    c = MemoryReactorClock()
    c.advance(T0)
    return c


@pytest.fixture
def broker(clock):
    b = make_broker(clock)
    yield b
    b.close()
