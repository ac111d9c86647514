"""Per-topic message schemas: a JSON Schema and/or a content-type rule, checked at publish before anything is stored.

A topic's rule is kept in the metadata store (key/value namespace `topic.schemas`: topic -> {"schema", "content_type",
"version"}) and compiled once per (topic, version) with fastjsonschema, which turns the schema into a Python
function: about 3 µs per small message against about 80 µs for jsonschema's validator (both measured with timeit on
the same 3-field object; compiling costs a few milliseconds, once per `set`). The publish path (core/produce.py)
pays one dict lookup per message for topics without a rule and nothing else.

- content type: when set, a message that carries a `content-type` property must name the same media type
  (parameters such as `; charset=utf-8` and case are ignored); a message without one is accepted (MQTT 3.1.1 and
  many AMQP clients cannot say), and the schema, if any, still decides.
- schema: the body must be UTF-8 JSON that the schema accepts. Only local references (`#/...`) are allowed: the
  validator would otherwise fetch remote `$ref`s over the network or from files at compile time.

A refusal raises `SchemaViolation` naming the topic and the validator's message (clipped).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from tidegate.core.errors import BadRequest, SchemaViolation
from tidegate.core.model import Message
from tidegate.core.storage.api import MetadataStore

SCHEMA_NAMESPACE = "topic.schemas"
MAX_SCHEMA_BYTES = 64 * 1024
MAX_SCHEMA_DEPTH = 32
MAX_REASON_CHARS = 200
CONTENT_TYPE = "content-type"

Validator = Callable[[Message], None]


def media_type(value: str) -> str:
    """`application/json; charset=utf-8` -> `application/json`."""
    return value.split(";", 1)[0].strip().lower()


def _check_schema_shape(node: Any, depth: int = 0) -> None:
    if depth > MAX_SCHEMA_DEPTH:
        raise BadRequest(f"the schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
    if isinstance(node, dict):
        ref = node.get("$ref")
        if ref is not None and (not isinstance(ref, str) or not ref.startswith("#")):
            raise BadRequest(f"only local $ref ('#/...') are allowed in a topic schema, not {ref!r}")
        for value in node.values():
            _check_schema_shape(value, depth + 1)
    elif isinstance(node, list):
        for value in node:
            _check_schema_shape(value, depth + 1)


def _refuse_remote(uri: str) -> Any:
    raise BadRequest(f"remote schema references are not fetched ({uri!r})")


def compile_schema(schema: Any) -> Callable[[Any], Any]:
    """The schema compiled to a validating function, or `BadRequest` saying why it is not a usable schema."""
    import fastjsonschema

    if not isinstance(schema, dict | bool):
        raise BadRequest("a JSON Schema is an object (or true/false)")
    if len(json.dumps(schema)) > MAX_SCHEMA_BYTES:
        raise BadRequest(f"the schema is larger than {MAX_SCHEMA_BYTES} bytes")
    _check_schema_shape(schema)
    handlers = {scheme: _refuse_remote for scheme in ("http", "https", "file", "ftp", "data", "urn", "")}
    try:
        return fastjsonschema.compile(schema, handlers=handlers)
    except BadRequest:
        raise
    except fastjsonschema.JsonSchemaDefinitionException as exc:
        raise BadRequest(f"invalid JSON Schema: {exc}") from None
    except Exception as exc:  # the compiler's own errors on odd input (bad regex, wrong types)
        raise BadRequest(f"invalid JSON Schema: {type(exc).__name__}: {exc}") from None


def _clip(text: str) -> str:
    return text if len(text) <= MAX_REASON_CHARS else text[:MAX_REASON_CHARS] + "..."


def make_validator(topic: str, schema: Any, content_type: str) -> Validator:
    """The check one topic's messages go through (raises `SchemaViolation`)."""
    import fastjsonschema

    check = compile_schema(schema) if schema is not None else None
    wanted = media_type(content_type) if content_type else ""

    def validate(message: Message) -> None:
        if wanted:
            given = message.properties.get(CONTENT_TYPE) if message.properties else None
            if given is not None and media_type(given) != wanted:
                raise SchemaViolation(f"topic {topic!r} takes content type {wanted}, not {_clip(given)}")
        if check is None:
            return
        try:
            document = json.loads(message.body)
        except (UnicodeDecodeError, ValueError) as exc:
            raise SchemaViolation(f"topic {topic!r} takes JSON; the body is not valid JSON: {_clip(str(exc))}"
                                  ) from None
        try:
            check(document)
        except fastjsonschema.JsonSchemaValueException as exc:
            raise SchemaViolation(f"message does not match the schema of topic {topic!r}: {_clip(exc.message)}"
                                  ) from None
        except RecursionError:
            raise SchemaViolation(f"message for topic {topic!r} nests too deeply to validate") from None

    return validate


class SchemaRegistry:
    """Topic rules, loaded from metadata at start, written through on change. `validators` (topic -> check) is the
    dict the publish path reads."""

    def __init__(self, metadata: MetadataStore) -> None:
        self._meta = metadata
        self.validators: dict[str, Validator] = {}
        self._rules: dict[str, dict[str, Any]] = {}
        for topic, rule in metadata.kv_items(SCHEMA_NAMESPACE):
            if not isinstance(rule, dict):
                continue
            self._rules[topic] = rule
            try:
                self.validators[topic] = make_validator(topic, rule.get("schema"), str(rule.get("content_type") or ""))
            except BadRequest:
                # accepted when it was set, so only a validator upgrade can break it: refuse its messages loudly
                # rather than let unchecked data through
                self.validators[topic] = _broken(topic)

    def get(self, topic: str) -> dict[str, Any] | None:
        rule = self._rules.get(topic)
        return None if rule is None else {"topic": topic, **rule}

    def list(self) -> list[dict[str, Any]]:
        return [{"topic": topic, **rule} for topic, rule in sorted(self._rules.items())]

    def set(self, topic: str, schema: Any = None, content_type: str = "") -> dict[str, Any]:
        """Give `topic` a schema and/or a content-type rule (compiled now: a bad schema is refused here)."""
        if schema is None and not content_type:
            raise BadRequest("give a schema, a content type or both")
        if content_type and ("/" not in content_type or len(content_type) > 255):
            raise BadRequest(f"{content_type!r} is not a media type like application/json")
        previous = self._rules.get(topic)
        rule = {"schema": schema, "content_type": media_type(content_type) if content_type else "",
                "version": (int(previous["version"]) + 1) if previous else 1}
        validator = make_validator(topic, schema, rule["content_type"])  # raises before anything changes
        self._meta.kv_put(SCHEMA_NAMESPACE, topic, rule)
        self._rules[topic] = rule
        self.validators[topic] = validator
        return {"topic": topic, **rule}

    def clear(self, topic: str) -> bool:
        """Remove the topic's rule; False if it had none."""
        if topic not in self._rules:
            return False
        del self._rules[topic]
        self.validators.pop(topic, None)
        self._meta.kv_delete(SCHEMA_NAMESPACE, topic)
        return True


def _broken(topic: str) -> Validator:
    def refuse(message: Message) -> None:
        raise SchemaViolation(f"the schema of topic {topic!r} cannot be compiled; set it again")

    return refuse
