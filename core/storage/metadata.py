"""SqliteMetadataStore: topics, groups, committed offsets, namespaced key/values and the gate's users, roles and
policy entries in SQLite (WAL mode).

One connection, used from the thread that opened it (the reactor). The schema is versioned: `MIGRATIONS[i]`
brings a database from version i to i + 1, and `schema_version` records where a database stands.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Callable, Iterable
from typing import Any

import sqlite_utils

from tidegate.core.errors import BadRequest, StoreError
from tidegate.core.model import QueueRef

TOPIC_DEFAULTS: dict[str, Any] = {"queues": 4, "perm": "rw", "retention_ms": 0, "internal": False, "created_ts": 0}
GROUP_DEFAULTS: dict[str, Any] = {"mode": "clustering", "ack": "offset", "created_ts": 0, "extra": None}
USER_DEFAULTS: dict[str, Any] = {"password_hash": "", "enabled": True, "roles": [], "created_ts": 0}
ROLE_DEFAULTS: dict[str, Any] = {"created_ts": 0}
POLICY_FIELDS = ("owner", "resource", "actions", "decision", "sources")


class InvalidMetadata(BadRequest):
    """A metadata row or value that cannot be stored (missing or mistyped field, value not JSON)."""


def _require(row: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = row[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidMetadata(f"{what} field {key!r} has the wrong type: {value!r}")
    return value


def _normalize(row: dict[str, Any], defaults: dict[str, Any], what: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise InvalidMetadata(f"a {what} row must be a dict, not {type(row).__name__}")
    unknown = set(row) - set(defaults) - {"name"}
    if unknown:
        raise InvalidMetadata(f"unknown {what} fields: {sorted(unknown)}")
    name = row.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidMetadata(f"a {what} row needs a non-empty string 'name'")
    out = {"name": name}
    for key, default in defaults.items():
        out[key] = row.get(key, default)
    return out


def normalize_topic_row(row: dict[str, Any]) -> dict[str, Any]:
    out = _normalize(row, TOPIC_DEFAULTS, "topic")
    _require(out, "queues", int, "topic")
    _require(out, "perm", str, "topic")
    _require(out, "retention_ms", int, "topic")
    _require(out, "internal", (bool, int), "topic")
    _require(out, "created_ts", int, "topic")
    out["internal"] = bool(out["internal"])
    return out


def normalize_group_row(row: dict[str, Any]) -> dict[str, Any]:
    out = _normalize(row, GROUP_DEFAULTS, "group")
    for key in ("mode", "ack"):
        value = out[key]
        out[key] = value.value if hasattr(value, "value") else value  # accept the core enums
        _require(out, key, str, "group")
    _require(out, "created_ts", int, "group")
    extra = out["extra"]
    if extra is None:
        extra = {}
    if not isinstance(extra, dict):
        raise InvalidMetadata("group field 'extra' must be a dict")
    to_json(extra)
    out["extra"] = extra
    return out


def normalize_offset_row(row: tuple[str, str, int, int]) -> tuple[str, str, int, int]:
    try:
        group, topic, queue_id, offset = row
    except (TypeError, ValueError):
        raise InvalidMetadata(f"an offset row is (group, topic, queue_id, offset), not {row!r}") from None
    if not isinstance(group, str) or not isinstance(topic, str):
        raise InvalidMetadata(f"offset row {row!r}: group and topic must be strings")
    for value in (queue_id, offset):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InvalidMetadata(f"offset row {row!r}: queue_id and offset must be non-negative integers")
    return group, topic, queue_id, offset


def normalize_user_row(row: dict[str, Any]) -> dict[str, Any]:
    """A user: `password_hash` is an encoded salted hash (never the password), '' for no password login."""
    out = _normalize(row, USER_DEFAULTS, "user")
    _require(out, "password_hash", str, "user")
    _require(out, "enabled", (bool, int), "user")
    _require(out, "created_ts", int, "user")
    roles = out["roles"]
    if not isinstance(roles, (list, tuple)) or not all(isinstance(r, str) and r for r in roles):
        raise InvalidMetadata("user field 'roles' must be a list of role names")
    out["enabled"] = bool(out["enabled"])
    out["roles"] = sorted(set(roles))
    return out


def normalize_role_row(row: dict[str, Any]) -> dict[str, Any]:
    out = _normalize(row, ROLE_DEFAULTS, "role")
    _require(out, "created_ts", int, "role")
    return out


def normalize_policy_row(row: dict[str, Any]) -> dict[str, Any]:
    """A policy entry of `owner` (`user:<name>` or `role:<name>`); its meaning is checked by core/security."""
    if not isinstance(row, dict):
        raise InvalidMetadata(f"a policy row must be a dict, not {type(row).__name__}")
    unknown = set(row) - set(POLICY_FIELDS) - {"id"}
    missing = set(POLICY_FIELDS) - set(row) - {"sources"}
    if unknown or missing:
        raise InvalidMetadata(f"policy row: unknown fields {sorted(unknown)}, missing fields {sorted(missing)}")
    out = {key: row.get(key, []) for key in POLICY_FIELDS}
    for key in ("owner", "resource", "decision"):
        if not isinstance(out[key], str) or not out[key]:
            raise InvalidMetadata(f"policy field {key!r} must be a non-empty string")
    if not out["owner"].startswith(("user:", "role:")):
        raise InvalidMetadata("policy field 'owner' must be user:<name> or role:<name>")
    for key in ("actions", "sources"):
        if not isinstance(out[key], (list, tuple)) or not all(isinstance(v, str) for v in out[key]):
            raise InvalidMetadata(f"policy field {key!r} must be a list of strings")
        out[key] = list(out[key])
    return out


# One encoder for every row: `json.dumps` with non-default options builds a new encoder per call, which costs as
# much as encoding a small row (a reconnect storm writes thousands of session rows per flush).
_ENCODE_JSON = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


class StoredRow(dict):  # type: ignore[type-arg]
    """A dict row as `kv_items` read it, with the text it was stored as (`stored_text`), so that a reader that
    writes its rows back can reuse parts of it instead of encoding them again (MQTT session rows after a restart).
    A plain dict to everyone else; changing it does not change `stored_text`, and `to_json` encodes it as any
    dict."""

    __slots__ = ("stored_text",)

    def __init__(self, row: dict[str, Any], stored_text: str) -> None:
        super().__init__(row)
        self.stored_text = stored_text


def _stored_value(text: str) -> Any:
    value = json.loads(text)
    return StoredRow(value, text) if type(value) is dict else value


def to_json(value: Any) -> str:
    """`value` as compact JSON. A dict that carries its own text (`json_text`, a str: MQTT session rows, whose
    writer encodes them faster than the generic encoder and guarantees the text is the dict's JSON) is stored as
    that text."""
    if isinstance(value, dict):
        text = getattr(value, "json_text", None)
        if type(text) is str:
            return text
    try:
        return _ENCODE_JSON(value)
    except (TypeError, ValueError) as exc:
        raise InvalidMetadata(f"value is not JSON-serialisable: {exc}") from None


def _v1(db: sqlite_utils.Database) -> None:
    # if_not_exists: a migration interrupted before its version row was written simply runs again
    db["topics"].create(
        {"name": str, "queues": int, "perm": str, "retention_ms": int, "internal": int, "created_ts": int},
        pk="name", not_null={"queues", "perm", "retention_ms", "internal", "created_ts"}, if_not_exists=True,
    )
    db["groups"].create({"name": str, "mode": str, "ack": str, "created_ts": int, "extra": str}, pk="name",
                        not_null={"mode", "ack", "created_ts", "extra"}, if_not_exists=True)
    db["offsets"].create({"group": str, "topic": str, "queue_id": int, "offset": int},
                         pk=("group", "topic", "queue_id"), not_null={"offset"}, if_not_exists=True)
    db["kv"].create({"namespace": str, "key": str, "value": str}, pk=("namespace", "key"), not_null={"value"},
                    if_not_exists=True)


def _v2(db: sqlite_utils.Database) -> None:
    """The gate: users (salted password hashes, roles, enabled), roles, and policy entries owned by either."""
    db["users"].create({"name": str, "password_hash": str, "enabled": int, "roles": str, "created_ts": int},
                       pk="name", not_null={"password_hash", "enabled", "roles", "created_ts"}, if_not_exists=True)
    db["roles"].create({"name": str, "created_ts": int}, pk="name", not_null={"created_ts"}, if_not_exists=True)
    db.execute("CREATE TABLE IF NOT EXISTS policies (id INTEGER PRIMARY KEY AUTOINCREMENT, owner TEXT NOT NULL, "
               "resource TEXT NOT NULL, actions TEXT NOT NULL, decision TEXT NOT NULL, sources TEXT NOT NULL)")
    db.execute("CREATE INDEX IF NOT EXISTS policies_owner ON policies (owner)")


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [_v1, _v2]
SCHEMA_VERSION = len(MIGRATIONS)


def _create_private(path: str) -> None:
    """Create the database file 0600 before SQLite opens it: SQLite gives its -wal and -shm files the database
    file's permissions, so all three stay owner-only whatever the umask."""
    if path == ":memory:" or not path:
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return  # SQLite reports the real problem with its own message
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


class SqliteMetadataStore:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        try:
            _create_private(os.fspath(path))
            self._conn = sqlite3.connect(os.fspath(path), isolation_level=None)
            self.db = sqlite_utils.Database(self._conn)
            self.db.enable_wal()
            self._conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a crash never corrupts, commits stay cheap
            self.schema_version = self._migrate()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open metadata database {os.fspath(path)!r}: {exc}") from None

    def _migrate(self) -> int:
        conn = self._conn
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = conn.execute("SELECT version FROM schema_version").fetchone()
        version = row[0] if row else 0
        if version > SCHEMA_VERSION:
            raise StoreError(f"metadata schema version {version} is newer than this Tidegate ({SCHEMA_VERSION})")
        for step in range(version, SCHEMA_VERSION):
            MIGRATIONS[step](self.db)
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("DELETE FROM schema_version")
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (step + 1,))
        return SCHEMA_VERSION

    def _run(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Cursor:
        try:
            return self._conn.execute(sql, tuple(params))
        except sqlite3.Error as exc:
            raise StoreError(f"metadata query failed: {exc}") from None

    # --- topics
    def get_topics(self) -> list[dict[str, Any]]:
        rows = self._run("SELECT name, queues, perm, retention_ms, internal, created_ts FROM topics ORDER BY name")
        return [
            {"name": n, "queues": q, "perm": p, "retention_ms": r, "internal": bool(i), "created_ts": c}
            for n, q, p, r, i, c in rows
        ]

    def put_topic(self, row: dict[str, Any]) -> None:
        r = normalize_topic_row(row)
        self._run(
            "INSERT INTO topics (name, queues, perm, retention_ms, internal, created_ts) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(name) DO UPDATE SET queues=excluded.queues, perm=excluded.perm, "
            "retention_ms=excluded.retention_ms, internal=excluded.internal, created_ts=excluded.created_ts",
            (r["name"], r["queues"], r["perm"], r["retention_ms"], int(r["internal"]), r["created_ts"]),
        )

    def delete_topic(self, name: str) -> None:
        self._run("DELETE FROM topics WHERE name = ?", (name,))

    # --- groups
    def get_groups(self) -> list[dict[str, Any]]:
        rows = self._run("SELECT name, mode, ack, created_ts, extra FROM groups ORDER BY name")
        return [
            {"name": n, "mode": m, "ack": a, "created_ts": c, "extra": json.loads(e) if e else {}}
            for n, m, a, c, e in rows
        ]

    def put_group(self, row: dict[str, Any]) -> None:
        r = normalize_group_row(row)
        self._run(
            "INSERT INTO groups (name, mode, ack, created_ts, extra) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(name) DO UPDATE SET mode=excluded.mode, ack=excluded.ack, "
            "created_ts=excluded.created_ts, extra=excluded.extra",
            (r["name"], r["mode"], r["ack"], r["created_ts"], to_json(r["extra"])),
        )

    def delete_group(self, name: str) -> None:
        self._run("DELETE FROM groups WHERE name = ?", (name,))

    # --- offsets
    def get_offsets(self, group: str) -> dict[tuple[str, int], int]:
        rows = self._run('SELECT topic, queue_id, "offset" FROM offsets WHERE "group" = ?', (group,))
        return {(t, q): o for t, q, o in rows}

    def all_offsets(self) -> dict[str, dict[QueueRef, int]]:
        """Every committed offset, by group: one query instead of one per group (bulk load after a restart). The
        queues are `QueueRef`s (tuples of topic and queue id), so the OffsetBook takes each group's dict as it is."""
        out: dict[str, dict[QueueRef, int]] = {}
        for group, topic, queue_id, offset in self._run('SELECT "group", topic, queue_id, "offset" FROM offsets'):
            offsets = out.get(group)
            if offsets is None:
                offsets = out[group] = {}
            offsets[QueueRef(topic, queue_id)] = offset
        return out

    def put_offsets(self, rows: Iterable[tuple[str, str, int, int]]) -> None:
        checked = [normalize_offset_row(row) for row in rows]
        if not checked:
            return
        conn = self._conn
        try:
            conn.execute("BEGIN")
            conn.executemany(
                'INSERT INTO offsets ("group", topic, queue_id, "offset") VALUES (?, ?, ?, ?) '
                'ON CONFLICT("group", topic, queue_id) DO UPDATE SET "offset"=excluded."offset"',
                checked,
            )
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise StoreError(f"storing offsets failed: {exc}") from None

    def delete_offsets(self, group: str, topic: str | None = None) -> None:
        if topic is None:
            self._run('DELETE FROM offsets WHERE "group" = ?', (group,))
        else:
            self._run('DELETE FROM offsets WHERE "group" = ? AND topic = ?', (group, topic))

    # --- namespaced key/values
    def kv_get(self, namespace: str, key: str) -> Any | None:
        row = self._run("SELECT value FROM kv WHERE namespace = ? AND key = ?", (namespace, key)).fetchone()
        return None if row is None else json.loads(row[0])

    def kv_put(self, namespace: str, key: str, value: Any) -> None:
        self._run(
            "INSERT INTO kv (namespace, key, value) VALUES (?, ?, ?) "
            "ON CONFLICT(namespace, key) DO UPDATE SET value=excluded.value",
            (namespace, key, to_json(value)),
        )

    def kv_delete(self, namespace: str, key: str) -> None:
        self._run("DELETE FROM kv WHERE namespace = ? AND key = ?", (namespace, key))

    def kv_apply(self, namespace: str, changes: dict[str, Any]) -> None:
        """Put (value) and delete (None) many keys of one namespace in one transaction: all or nothing, so a
        batch of session rows costs one commit instead of one per row."""
        puts = [(namespace, key, to_json(value)) for key, value in changes.items() if value is not None]
        deletes = [(namespace, key) for key, value in changes.items() if value is None]
        if not puts and not deletes:
            return
        conn = self._conn
        try:
            conn.execute("BEGIN")
            if puts:
                conn.executemany("INSERT INTO kv (namespace, key, value) VALUES (?, ?, ?) "
                                 "ON CONFLICT(namespace, key) DO UPDATE SET value=excluded.value", puts)
            if deletes:
                conn.executemany("DELETE FROM kv WHERE namespace = ? AND key = ?", deletes)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise StoreError(f"storing {namespace} rows failed: {exc}") from None

    def kv_items(self, namespace: str) -> list[tuple[str, Any]]:
        """The namespace's rows; dict values are `StoredRow`s carrying the text they were stored as."""
        rows = self._run("SELECT key, value FROM kv WHERE namespace = ? ORDER BY key", (namespace,))
        return [(k, _stored_value(v)) for k, v in rows]

    # --- users, roles and policy entries (the gate's; core/security/users.py gives them meaning)
    def get_users(self) -> list[dict[str, Any]]:
        rows = self._run("SELECT name, password_hash, enabled, roles, created_ts FROM users ORDER BY name")
        return [{"name": n, "password_hash": h, "enabled": bool(e), "roles": json.loads(r), "created_ts": c}
                for n, h, e, r, c in rows]

    def put_user(self, row: dict[str, Any]) -> None:
        r = normalize_user_row(row)
        self._run(
            "INSERT INTO users (name, password_hash, enabled, roles, created_ts) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(name) DO UPDATE SET password_hash=excluded.password_hash, enabled=excluded.enabled, "
            "roles=excluded.roles, created_ts=excluded.created_ts",
            (r["name"], r["password_hash"], int(r["enabled"]), to_json(r["roles"]), r["created_ts"]),
        )

    def delete_user(self, name: str) -> None:
        self._run("DELETE FROM users WHERE name = ?", (name,))

    def get_roles(self) -> list[dict[str, Any]]:
        return [{"name": n, "created_ts": c} for n, c in self._run("SELECT name, created_ts FROM roles ORDER BY name")]

    def put_role(self, row: dict[str, Any]) -> None:
        r = normalize_role_row(row)
        self._run("INSERT INTO roles (name, created_ts) VALUES (?, ?) "
                  "ON CONFLICT(name) DO UPDATE SET created_ts=excluded.created_ts", (r["name"], r["created_ts"]))

    def delete_role(self, name: str) -> None:
        self._run("DELETE FROM roles WHERE name = ?", (name,))

    def get_policies(self) -> list[dict[str, Any]]:
        rows = self._run("SELECT id, owner, resource, actions, decision, sources FROM policies ORDER BY id")
        return [{"id": i, "owner": o, "resource": r, "actions": json.loads(a), "decision": d,
                 "sources": json.loads(s)} for i, o, r, a, d, s in rows]

    def add_policy(self, row: dict[str, Any]) -> int:
        """Store one policy entry; returns its id."""
        r = normalize_policy_row(row)
        cursor = self._run("INSERT INTO policies (owner, resource, actions, decision, sources) VALUES (?, ?, ?, ?, ?)",
                           (r["owner"], r["resource"], to_json(r["actions"]), r["decision"], to_json(r["sources"])))
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def delete_policy(self, policy_id: int) -> bool:
        return self._run("DELETE FROM policies WHERE id = ?", (policy_id,)).rowcount > 0

    def delete_policies_of(self, owner: str) -> None:
        self._run("DELETE FROM policies WHERE owner = ?", (owner,))

    def close(self) -> None:
        self._conn.close()
