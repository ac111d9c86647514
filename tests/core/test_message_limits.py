"""Keys and properties are bounded in the core, for every protocol, with clear errors and nothing stored."""

import pytest
from twisted.internet.testing import MemoryReactorClock

from tidegate.core.errors import InvalidName, MessageTooLarge
from tidegate.core.model import MAX_KEYS, MAX_PROPERTIES, Message
from tidegate.core.testing import make_broker


@pytest.fixture
def broker():
    b = make_broker(MemoryReactorClock())
    yield b
    b.close()


@pytest.mark.parametrize("message, error, words", [
    (Message("t", b"x", keys=("",) * 3_000_000), InvalidName, "at most 64 keys"),
    (Message("t", b"x", keys=("",)), InvalidName, "non-empty"),
    (Message("t", b"x", keys=("k" * 256,)), InvalidName, "at most 255 bytes"),
    (Message("t", b"x", properties={f"p{i}": "" for i in range(MAX_PROPERTIES + 1)}), InvalidName,
     "at most 256 properties"),
    (Message("t", b"x", properties={"big": "v" * 70_000}), MessageTooLarge, "properties exceed"),
])
def test_oversized_keys_and_properties_are_refused_before_anything_is_stored(broker, message, error, words):
    with pytest.raises(error, match=words):
        broker.publish([message])
    assert broker.list_topics() == []


def test_the_limits_themselves_are_accepted(broker):
    broker.publish([Message("t", b"x", keys=tuple(f"k{i}" for i in range(MAX_KEYS)),
                            properties={f"p{i}": "v" for i in range(MAX_PROPERTIES)})])
    assert [t.name for t in broker.list_topics()] == ["t"]
