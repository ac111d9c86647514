"""MetadataStore contract: SQLite and the in-memory twin behave the same."""

from __future__ import annotations

import pytest

from tidegate.core.errors import TidegateError
from tidegate.core.storage.metadata import SCHEMA_VERSION, SqliteMetadataStore


def test_topics_are_stored_with_defaults_updated_and_deleted(meta_factory):
    meta = meta_factory()
    meta.put_topic({"name": "orders", "queues": 8, "created_ts": 5})
    meta.put_topic({"name": "%DLQ%g", "internal": True})
    assert meta.get_topics() == [
        {"name": "%DLQ%g", "queues": 4, "perm": "rw", "retention_ms": 0, "internal": True, "created_ts": 0},
        {"name": "orders", "queues": 8, "perm": "rw", "retention_ms": 0, "internal": False, "created_ts": 5},
    ]
    meta.put_topic({"name": "orders", "queues": 16, "perm": "r", "retention_ms": 1000, "created_ts": 5})
    assert meta.get_topics()[1]["queues"] == 16 and meta.get_topics()[1]["perm"] == "r"
    meta.delete_topic("orders")
    meta.delete_topic("missing")
    assert [t["name"] for t in meta.get_topics()] == ["%DLQ%g"]


def test_groups_keep_their_extra_dict(meta_factory):
    meta = meta_factory()
    meta.put_group({"name": "g1", "mode": "broadcasting", "ack": "message", "created_ts": 3,
                    "extra": {"filter": "a || b", "max_attempts": 4}})
    meta.put_group({"name": "g0"})
    groups = meta.get_groups()
    assert groups == [
        {"name": "g0", "mode": "clustering", "ack": "offset", "created_ts": 0, "extra": {}},
        {"name": "g1", "mode": "broadcasting", "ack": "message", "created_ts": 3,
         "extra": {"filter": "a || b", "max_attempts": 4}},
    ]
    groups[1]["extra"]["filter"] = "changed"  # callers get copies
    assert meta.get_groups()[1]["extra"]["filter"] == "a || b"
    meta.delete_group("g1")
    assert [g["name"] for g in meta.get_groups()] == ["g0"]


def test_offsets_are_batch_upserted_per_group_and_deletable_by_topic(meta_factory):
    meta = meta_factory()
    meta.put_offsets([("g", "a", 0, 5), ("g", "a", 1, 7), ("g", "b", 0, 1), ("h", "a", 0, 9)])
    meta.put_offsets([("g", "a", 0, 6)])
    meta.put_offsets([])
    assert meta.get_offsets("g") == {("a", 0): 6, ("a", 1): 7, ("b", 0): 1}
    meta.delete_offsets("g", "a")
    assert meta.get_offsets("g") == {("b", 0): 1}
    meta.delete_offsets("g")
    assert meta.get_offsets("g") == {}
    assert meta.get_offsets("h") == {("a", 0): 9}


def test_a_bad_offset_row_stores_nothing_from_its_batch(meta_factory):
    meta = meta_factory()
    with pytest.raises(TidegateError):
        meta.put_offsets([("g", "a", 0, 5), ("g", "a", -1, 2)])
    assert meta.get_offsets("g") == {}


def test_kv_values_round_trip_as_json_per_namespace(meta_factory):
    meta = meta_factory()
    meta.kv_put("mqtt.retained", "a/b", {"body": "x", "qos": 1})
    meta.kv_put("mqtt.retained", "a/c", [1, 2])
    meta.kv_put("amqp.bindings", "a/b", "other")
    meta.kv_put("mqtt.retained", "a/c", [3])
    assert meta.kv_get("mqtt.retained", "a/b") == {"body": "x", "qos": 1}
    assert meta.kv_items("mqtt.retained") == [("a/b", {"body": "x", "qos": 1}), ("a/c", [3])]
    meta.kv_delete("mqtt.retained", "a/b")
    assert meta.kv_get("mqtt.retained", "a/b") is None
    assert meta.kv_items("amqp.bindings") == [("a/b", "other")]


@pytest.mark.parametrize("row", [{"queues": 1}, {"name": ""}, {"name": "t", "queues": "4"}, {"name": "t", "x": 1}])
def test_bad_topic_rows_raise_a_typed_error(meta_factory, row):
    with pytest.raises(TidegateError):
        meta_factory().put_topic(row)


def test_values_that_are_not_json_raise_a_typed_error(meta_factory):
    meta = meta_factory()
    with pytest.raises(TidegateError):
        meta.kv_put("ns", "k", object())
    with pytest.raises(TidegateError):
        meta.put_group({"name": "g", "extra": {"bad": {1, 2}}})


def test_reopening_keeps_everything_and_records_the_schema_version(meta_factory):
    meta = meta_factory()
    meta.put_topic({"name": "orders"})
    meta.put_group({"name": "g"})
    meta.put_offsets([("g", "orders", 0, 42)])
    meta.kv_put("ns", "k", 1)
    meta.close()
    meta = meta_factory()
    assert [t["name"] for t in meta.get_topics()] == ["orders"]
    assert [g["name"] for g in meta.get_groups()] == ["g"]
    assert meta.get_offsets("g") == {("orders", 0): 42}
    assert meta.kv_get("ns", "k") == 1
    assert meta.schema_version == SCHEMA_VERSION
    meta.close()


def test_sqlite_store_uses_wal_and_writes_the_schema_version_table(tmp_path):
    meta = SqliteMetadataStore(tmp_path / "meta.db")
    assert meta.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert meta.db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    meta.close()


def test_a_database_from_a_newer_tidegate_is_refused(tmp_path):
    meta = SqliteMetadataStore(tmp_path / "meta.db")
    meta.db.execute("UPDATE schema_version SET version = 999")
    meta.close()
    with pytest.raises(TidegateError):
        SqliteMetadataStore(tmp_path / "meta.db")


def test_users_are_stored_with_defaults_sorted_roles_and_deleted(meta_factory):
    meta = meta_factory()
    meta.put_user({"name": "alice", "password_hash": "scrypt$x", "roles": ["b", "a", "a"], "created_ts": 7})
    meta.put_user({"name": "anonymous"})
    assert meta.get_users() == [
        {"name": "alice", "password_hash": "scrypt$x", "enabled": True, "roles": ["a", "b"], "created_ts": 7},
        {"name": "anonymous", "password_hash": "", "enabled": True, "roles": [], "created_ts": 0},
    ]
    meta.put_user({"name": "alice", "password_hash": "scrypt$y", "enabled": False, "roles": []})
    assert meta.get_users()[0]["enabled"] is False and meta.get_users()[0]["password_hash"] == "scrypt$y"
    users = meta.get_users()
    users[1]["roles"].append("changed")  # callers get copies
    assert meta.get_users()[1]["roles"] == []
    meta.delete_user("alice")
    meta.delete_user("missing")
    assert [u["name"] for u in meta.get_users()] == ["anonymous"]


def test_roles_are_stored_and_deleted(meta_factory):
    meta = meta_factory()
    meta.put_role({"name": "devices", "created_ts": 3})
    meta.put_role({"name": "admins"})
    assert meta.get_roles() == [{"name": "admins", "created_ts": 0}, {"name": "devices", "created_ts": 3}]
    meta.delete_role("admins")
    assert [r["name"] for r in meta.get_roles()] == ["devices"]


def test_policies_get_increasing_ids_and_are_deleted_by_id_or_owner(meta_factory):
    meta = meta_factory()
    first = meta.add_policy({"owner": "user:alice", "resource": "Topic:a/#", "actions": ["Pub"],
                             "decision": "Allow", "sources": ["10.0.0.0/8"]})
    second = meta.add_policy({"owner": "role:devices", "resource": "Topic:b", "actions": ["Sub", "Pub"],
                              "decision": "Deny"})
    third = meta.add_policy({"owner": "user:alice", "resource": "Group:g", "actions": ["All"], "decision": "Allow"})
    assert first < second < third
    assert meta.get_policies() == [
        {"id": first, "owner": "user:alice", "resource": "Topic:a/#", "actions": ["Pub"], "decision": "Allow",
         "sources": ["10.0.0.0/8"]},
        {"id": second, "owner": "role:devices", "resource": "Topic:b", "actions": ["Sub", "Pub"],
         "decision": "Deny", "sources": []},
        {"id": third, "owner": "user:alice", "resource": "Group:g", "actions": ["All"], "decision": "Allow",
         "sources": []},
    ]
    assert meta.delete_policy(second) is True
    assert meta.delete_policy(second) is False
    meta.delete_policies_of("user:alice")
    assert meta.get_policies() == []


@pytest.mark.parametrize("row", [
    {"owner": "alice", "resource": "Topic:a", "actions": ["Pub"], "decision": "Allow"},
    {"owner": "user:a", "resource": "", "actions": ["Pub"], "decision": "Allow"},
    {"owner": "user:a", "resource": "Topic:a", "actions": "Pub", "decision": "Allow"},
    {"owner": "user:a", "resource": "Topic:a", "actions": ["Pub"]},
    {"owner": "user:a", "resource": "Topic:a", "actions": ["Pub"], "decision": "Allow", "extra": 1},
])
def test_bad_policy_rows_raise_a_typed_error(meta_factory, row):
    with pytest.raises(TidegateError):
        meta_factory().add_policy(row)


@pytest.mark.parametrize("row", [{"name": ""}, {"name": "u", "roles": "admin"}, {"name": "u", "enabled": "yes"},
                                 {"name": "u", "password": "plain"}])
def test_bad_user_rows_raise_a_typed_error(meta_factory, row):
    with pytest.raises(TidegateError):
        meta_factory().put_user(row)


def test_security_tables_survive_reopening(meta_factory):
    meta = meta_factory()
    meta.put_user({"name": "alice", "password_hash": "h", "roles": ["r"]})
    meta.put_role({"name": "r"})
    policy_id = meta.add_policy({"owner": "role:r", "resource": "Topic:a", "actions": ["Pub"], "decision": "Allow"})
    meta.close()
    meta = meta_factory()
    assert [u["name"] for u in meta.get_users()] == ["alice"]
    assert [r["name"] for r in meta.get_roles()] == ["r"]
    assert [p["id"] for p in meta.get_policies()] == [policy_id]
    meta.close()


def test_a_version_1_database_is_migrated_and_keeps_its_rows(tmp_path):
    """A meta.db written before the gate existed gains the users/roles/policies tables at the next start."""
    import sqlite3

    import sqlite_utils

    from tidegate.core.storage.metadata import MIGRATIONS

    path = tmp_path / "meta.db"
    conn = sqlite3.connect(path, isolation_level=None)
    MIGRATIONS[0](sqlite_utils.Database(conn))
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    conn.execute("INSERT INTO schema_version (version) VALUES (1)")
    conn.execute("INSERT INTO topics (name, queues, perm, retention_ms, internal, created_ts) "
                 "VALUES ('orders', 4, 'rw', 0, 0, 0)")
    conn.close()
    meta = SqliteMetadataStore(path)
    assert meta.schema_version == SCHEMA_VERSION == 2
    assert [t["name"] for t in meta.get_topics()] == ["orders"]
    assert meta.get_users() == [] and meta.get_roles() == [] and meta.get_policies() == []
    meta.close()
