"""Per-topic JSON Schema and content-type rules (core/schema.py), checked in the core's publish path."""

from __future__ import annotations

import pytest
from twisted.internet.testing import MemoryReactorClock

from tidegate.core.errors import BadRequest, SchemaViolation
from tidegate.core.model import Message
from tidegate.core.schema import SCHEMA_NAMESPACE, SchemaRegistry, media_type
from tidegate.core.storage.memory import MemoryMetadataStore
from tidegate.core.testing import make_broker

READING = {"type": "object", "required": ["id", "temp"],
           "properties": {"id": {"type": "string"}, "temp": {"type": "number"}}}


@pytest.fixture
def broker():
    b = make_broker(MemoryReactorClock())
    b.create_topic("readings")
    yield b
    b.close()


def test_a_message_matching_the_schema_is_stored(broker):
    broker.schemas.set("readings", READING)
    [result] = broker.publish([Message("readings", b'{"id": "d1", "temp": 21.5}')])
    assert result.topic == "readings"


@pytest.mark.parametrize("body, words", [
    (b'{"id": "d1"}', "data must contain \\['temp'\\] properties"),
    (b'{"id": "d1", "temp": "warm"}', "temp must be number"),
    (b"not json", "is not valid JSON"),
    (b"\xff\xfe", "is not valid JSON"),
])
def test_a_message_failing_the_schema_is_refused_with_the_validators_reason(broker, body, words):
    broker.schemas.set("readings", READING)
    with pytest.raises(SchemaViolation, match=words):
        broker.publish([Message("readings", body)])
    assert broker.queue_offsets(broker_queue("readings")) == (0, 0)


def broker_queue(topic):
    from tidegate.core.model import QueueRef

    return QueueRef(topic, 0)


def test_one_bad_message_refuses_the_whole_batch_before_anything_is_stored(broker):
    broker.schemas.set("readings", READING)
    good = Message("readings", b'{"id": "d1", "temp": 1}', )
    with pytest.raises(SchemaViolation):
        broker.publish([good, Message("readings", b"{}"), good], queue_id=0)
    assert broker.queue_offsets(broker_queue("readings")) == (0, 0)


def test_content_type_rule_compares_media_types_and_lets_untyped_messages_through(broker):
    broker.schemas.set("readings", content_type="application/json")
    broker.publish([Message("readings", b"{}", properties={"content-type": "Application/JSON; charset=utf-8"})])
    broker.publish([Message("readings", b"anything")])  # MQTT 3.1.1 cannot say: accepted
    with pytest.raises(SchemaViolation, match="takes content type application/json, not text/plain"):
        broker.publish([Message("readings", b"{}", properties={"content-type": "text/plain"})])


def test_other_topics_and_subjects_of_the_topic(broker):
    broker.schemas.set("readings", READING)
    broker.publish([Message("other", b"free text")])
    with pytest.raises(SchemaViolation):
        broker.publish([Message("readings", b"[]", subject="site/1")])  # the rule is the topic's, every subject


def test_bad_schemas_are_refused_when_set(broker):
    with pytest.raises(BadRequest, match="invalid JSON Schema"):
        broker.schemas.set("readings", {"type": "no-such-type"})
    with pytest.raises(BadRequest, match="only local \\$ref"):
        broker.schemas.set("readings", {"$ref": "http://169.254.169.254/latest/meta-data"})
    with pytest.raises(BadRequest, match="only local \\$ref"):
        broker.schemas.set("readings", {"properties": {"a": {"$ref": "file:///etc/passwd"}}})
    with pytest.raises(BadRequest, match="a schema, a content type or both"):
        broker.schemas.set("readings")
    with pytest.raises(BadRequest, match="not a media type"):
        broker.schemas.set("readings", content_type="json")
    assert broker.schemas.get("readings") is None
    broker.publish([Message("readings", b"still unchecked")])


def test_local_references_work(broker):
    broker.schemas.set("readings", {"$defs": {"t": {"type": "number"}}, "type": "object",
                                    "properties": {"temp": {"$ref": "#/$defs/t"}}})
    broker.publish([Message("readings", b'{"temp": 3}')])
    with pytest.raises(SchemaViolation):
        broker.publish([Message("readings", b'{"temp": "3"}')])


def test_rules_persist_get_versions_and_clear(broker):
    meta = MemoryMetadataStore()
    registry = SchemaRegistry(meta)
    first = registry.set("readings", READING, "application/json")
    assert first["version"] == 1
    assert registry.set("readings", {"type": "array"})["version"] == 2
    reloaded = SchemaRegistry(meta)
    assert reloaded.get("readings") == {"topic": "readings", "schema": {"type": "array"}, "content_type": "",
                                        "version": 2}
    with pytest.raises(SchemaViolation):
        reloaded.validators["readings"](Message("readings", b"{}"))
    assert reloaded.clear("readings")
    assert not reloaded.clear("readings")
    assert meta.kv_items(SCHEMA_NAMESPACE) == []


def test_deleting_a_topic_clears_its_rule(broker):
    broker.schemas.set("readings", READING)
    broker.delete_topic("readings")
    assert broker.schemas.get("readings") is None
    broker.publish([Message("readings", b"auto-created again, no rule")])


def test_media_type():
    assert media_type(" Text/Plain ; charset=us-ascii") == "text/plain"
