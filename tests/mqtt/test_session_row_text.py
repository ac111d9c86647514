"""Session rows carry their own JSON text (`EncodedRow`): the text is exactly what the generic encoder makes of the
row's dict, the subscriptions' part is encoded once until they change, and both metadata stores store the text and
give the same row back."""

from __future__ import annotations

import enum

import pytest

from tidegate.adapters.mqtt import sessions as sessions_module
from tidegate.adapters.mqtt.sessions import EncodedRow, Session, SubscriptionEntry
from tidegate.adapters.mqtt.state import PacketIds
from tidegate.core.storage import metadata
from tidegate.core.storage.memory import MemoryMetadataStore
from tidegate.core.storage.metadata import SqliteMetadataStore, to_json


def generic_json(row: dict) -> str:
    return metadata._ENCODE_JSON(dict(row))


def sessions() -> list[Session]:
    plain = Session("c1", "%MQTT%c1", 4, 3600)
    plain.put_subscription(SubscriptionEntry("a/+", 1))
    odd = Session('cl\u00e9nt "7"\\\u2603\n', '%MQTT%cl\u00e9nt "7"\\\u2603\n', 5, 0xFFFFFFFF, owner="\u00fcser")
    odd.put_subscription(SubscriptionEntry("s/\u00e9/#", 2, no_local=True, retain_as_published=True,
                                           retain_handling=2, identifier=268435455))
    odd.put_subscription(SubscriptionEntry("$share/g/b", 0, share=("g", "b")))
    odd.packets = PacketIds({7, 3, 65535}, {9: "k9", 2: "k\u00e92"})
    odd.disconnected_at = 1_764_000_000_123
    empty = Session("e", "%MQTT%e", 3, 1)
    return [plain, odd, empty]


@pytest.mark.parametrize("session", sessions(), ids=["plain", "odd", "empty"])
def test_the_row_text_is_what_the_generic_encoder_makes_of_the_row(session: Session) -> None:
    row = session.to_row()
    assert isinstance(row, EncodedRow) and isinstance(row, dict)
    assert row.json_text == generic_json(row)
    assert to_json(row) == row.json_text
    assert Session.from_row(dict(row)).to_row() == row  # read back: the same row


def test_an_int_enum_level_is_written_as_its_number() -> None:
    class Level(enum.IntEnum):
        V5 = 5

    session = Session("c", "%MQTT%c", Level.V5, 60)
    row = session.to_row()
    assert row["level"] == 5 and type(row["level"]) is int and row.json_text == generic_json(row)


def test_the_subscriptions_text_is_encoded_once_until_they_change(monkeypatch: pytest.MonkeyPatch) -> None:
    session = Session("c1", "%MQTT%c1", 4, 3600)
    session.put_subscription(SubscriptionEntry("a", 1))
    encoded = []
    real = metadata._ENCODE_JSON
    monkeypatch.setattr(sessions_module, "to_json", lambda value: encoded.append(value) or real(value))
    first = session.to_row()
    session.disconnected_at = 5
    second = session.to_row()
    assert len(encoded) == 1 and second.json_text == real(dict(second))  # only the subscriptions, once
    for change in (lambda: session.put_subscription(SubscriptionEntry("b", 0)),
                   lambda: session.pop_subscription("a"),
                   session.clear_subscriptions):
        change()
        row = session.to_row()
        assert row.json_text == real(dict(row)) and row["subs"] == [s.to_row() for s in session.subscriptions.values()]
    assert len(encoded) == 4 and first["subs"] != session.to_row()["subs"]


def test_a_restored_session_encodes_its_stored_subscriptions_once() -> None:
    stored = sessions()[1].to_row()
    restored = Session.from_row(dict(stored))
    assert restored.subs_text is None
    assert restored.to_row().json_text == stored.json_text
    assert restored.subs_text is not None and restored.to_row().json_text == stored.json_text


@pytest.mark.parametrize("store_kind", ["sqlite", "memory"])
def test_both_metadata_stores_store_the_carried_text_and_give_the_row_back(tmp_path, store_kind: str) -> None:
    store = SqliteMetadataStore(tmp_path / "meta.db") if store_kind == "sqlite" else MemoryMetadataStore()
    rows = {s.client_id: s.to_row() for s in sessions()}
    if store_kind == "sqlite":
        store.kv_apply("mqtt.sessions", dict(rows))
    else:
        for key, row in rows.items():
            store.kv_put("mqtt.sessions", key, row)
    assert dict(store.kv_items("mqtt.sessions")) == {key: dict(row) for key, row in rows.items()}
    if store_kind == "sqlite":
        raw = dict(store._run("SELECT key, value FROM kv WHERE namespace = 'mqtt.sessions'").fetchall())
        assert raw == {key: row.json_text for key, row in rows.items()}
        store.close()


def test_a_session_read_from_the_store_reuses_its_stored_subscriptions_text(tmp_path, monkeypatch) -> None:
    store = SqliteMetadataStore(tmp_path / "meta.db")
    written = {s.client_id: s.to_row() for s in sessions()}
    store.kv_apply("mqtt.sessions", dict(written))
    loaded = dict(store.kv_items("mqtt.sessions"))
    encoded = []
    real = metadata._ENCODE_JSON
    monkeypatch.setattr(sessions_module, "to_json", lambda value: encoded.append(value) or real(value))
    for client_id, row in loaded.items():
        session = Session.from_row(row)
        assert session.subs_text is not None
        session.disconnected_at = 0  # what a resume changes
        before = len(encoded)
        again = session.to_row()
        assert again.json_text == real(dict(again)) and again["subs"] == written[client_id]["subs"]
        assert not any(value is session.subs_row for value in encoded[before:])  # subscriptions not re-encoded
    store.close()


@pytest.mark.parametrize("stored_text", [
    '{"client_id": "c", "topic": "%MQTT%c", "level": 4, "expiry": 60, "subs": [["a", 1, false, false, 0, null, null]]}',
    '{"topic":"%MQTT%c","client_id":"c","level":4,"expiry":60,"subs":[["a",1,false,false,0,null,null]],'
    '"inbound_qos2":[],"released":[],"disconnected_at":0,"owner":""}',
    '{"client_id":"c","topic":"%MQTT%c","level":4.0,"expiry":60,"subs":[["a",1,false,false,0,null,null]],'
    '"inbound_qos2":[],"released":[],"disconnected_at":0,"owner":""}',
    '{"client_id":"c","topic":"%MQTT%c","level":4,"expiry":60,"subs":[["a",1,0,0,0,null,null]],'
    '"inbound_qos2":[],"released":[],"disconnected_at":null,"owner":null}',
], ids=["spaced", "other-key-order", "float-level", "nulls"])
def test_a_row_written_differently_is_encoded_again_at_its_first_write(tmp_path, stored_text: str) -> None:
    store = SqliteMetadataStore(tmp_path / "meta.db")
    store._run("INSERT INTO kv (namespace, key, value) VALUES ('mqtt.sessions', 'c', ?)", (stored_text,))
    (_, row), = store.kv_items("mqtt.sessions")
    session = Session.from_row(row)
    assert session.subs_text is None
    written = session.to_row()
    assert written.json_text == generic_json(written)
    assert Session.from_row(dict(written)).subscriptions == session.subscriptions
    store.close()


def test_a_stored_row_changed_by_its_reader_is_encoded_from_its_values() -> None:
    row = metadata.StoredRow({"group": "g", "members": ["a"]}, '{"group":"g","members":["a"]}')
    row["members"].append("b")
    assert to_json(row) == '{"group":"g","members":["a","b"]}'
