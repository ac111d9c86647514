"""Users, roles and their policy entries: the gate's directory, kept in the metadata store.

Passwords are stored as salted scrypt hashes (`hashlib.scrypt`, a memory-hard KDF in the standard library), encoded
`scrypt$<log2 n>$<r>$<p>$<salt>$<hash>` so the cost can rise later without breaking old hashes; never plain text.

`SecurityDirectory` loads everything once and answers from memory (the gate asks on the reactor thread, per
action); every change writes through to the store and bumps `version`, so sessions drop their cached decisions and
a user disabled or a role removed while connected is denied at the next action.

First start (no users at all): the roles `superuser` (bypasses every policy) and `allow-all` (Allow All on every
topic, group and the cluster) and the user `anonymous` with `allow-all` are created, so the README tour keeps
working for anonymous loopback clients; with `TIDEGATE_ADMIN_PASSWORD` set, `admin` is created as a super-user.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol

from tidegate.core.errors import BadRequest, ClientError
from tidegate.core.security.policy import Grant, PolicyEntry

SUPERUSER_ROLE = "superuser"
ALLOW_ALL_ROLE = "allow-all"
ANONYMOUS_USER = "anonymous"
ADMIN_USER = "admin"
ADMIN_PASSWORD_ENV = "TIDEGATE_ADMIN_PASSWORD"
NAME = re.compile(r"[A-Za-z0-9_.@-]{1,128}")  # no '/', '+', '#', '*': names go into ${username} patterns
MAX_PASSWORD_BYTES = 1024

SCRYPT_LOG2_N = 14  # n = 16384, r = 8: 16 MiB and some tens of milliseconds per hash
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32


class DuplicateName(ClientError):
    """A user or role of that name already exists."""


class UnknownName(ClientError):
    """No user, role or policy entry of that name (or id)."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _scrypt(password: bytes, salt: bytes, log2_n: int, r: int, p: int, length: int) -> bytes:
    return hashlib.scrypt(password, salt=salt, n=1 << log2_n, r=r, p=p, dklen=length,
                          maxmem=(128 * r * (1 << log2_n)) + (4 << 20))


def hash_password(password: bytes, *, log2_n: int = SCRYPT_LOG2_N) -> str:
    """A new salted scrypt hash of `password`, encoded with its parameters."""
    if not password:
        raise BadRequest("the password is empty")
    if len(password) > MAX_PASSWORD_BYTES:
        raise BadRequest(f"the password is longer than {MAX_PASSWORD_BYTES} bytes")
    salt = os.urandom(SALT_BYTES)
    digest = _scrypt(password, salt, log2_n, SCRYPT_R, SCRYPT_P, HASH_BYTES)
    return f"scrypt${log2_n}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: bytes, encoded: str) -> bool:
    """Whether `password` matches `encoded` (constant-time compare); False for '' (no password login)."""
    try:
        scheme, log2_n, r, p, salt, digest = encoded.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest, validate=True)
        actual = _scrypt(password, base64.b64decode(salt, validate=True), int(log2_n), int(r), int(p), len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


class SecurityStore(Protocol):
    """The metadata-store calls the directory needs (core/storage/metadata.py and its in-memory twin)."""

    def get_users(self) -> list[dict[str, Any]]: ...
    def put_user(self, row: dict[str, Any]) -> None: ...
    def delete_user(self, name: str) -> None: ...
    def get_roles(self) -> list[dict[str, Any]]: ...
    def put_role(self, row: dict[str, Any]) -> None: ...
    def delete_role(self, name: str) -> None: ...
    def get_policies(self) -> list[dict[str, Any]]: ...
    def add_policy(self, row: dict[str, Any]) -> int: ...
    def delete_policy(self, policy_id: int) -> bool: ...
    def delete_policies_of(self, owner: str) -> None: ...


@dataclass(frozen=True, slots=True)
class User:
    name: str
    password_hash: str
    enabled: bool
    roles: tuple[str, ...]
    created_ts: int

    def to_dict(self) -> dict[str, Any]:
        """What may be shown: never the hash."""
        return {"name": self.name, "enabled": self.enabled, "roles": list(self.roles),
                "has_password": bool(self.password_hash), "created_ts": self.created_ts}


@dataclass(frozen=True, slots=True)
class StoredPolicy:
    id: int
    grant: Grant

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "owner": self.grant.owner, **self.grant.entry.to_dict()}


def check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise BadRequest(f"{what} name {name!r} must be 1-128 of A-Z a-z 0-9 _ . @ -")
    return name


class SecurityDirectory:
    """Users, roles and policies in memory, written through to `store`; `version` moves on every change."""

    def __init__(self, store: SecurityStore, *, clock: Any = time.time) -> None:
        self.store = store
        self._now = clock
        self.version = 0
        self._users: dict[str, User] = {}
        self._roles: dict[str, int] = {}
        self._policies: dict[int, StoredPolicy] = {}
        self._grants_by_owner: dict[str, list[Grant]] = {}
        self._load()

    # ------------------------------------------------------------------ loading
    def _load(self) -> None:
        self._users = {row["name"]: User(row["name"], row["password_hash"], row["enabled"], tuple(row["roles"]),
                                         row["created_ts"]) for row in self.store.get_users()}
        self._roles = {row["name"]: row["created_ts"] for row in self.store.get_roles()}
        self._policies = {}
        for row in self.store.get_policies():
            self._policies[row["id"]] = StoredPolicy(row["id"], Grant(row["owner"], PolicyEntry.from_dict(row)))
        self._index()

    def _index(self) -> None:
        by_owner: dict[str, list[Grant]] = {}
        for stored in self._policies.values():
            by_owner.setdefault(stored.grant.owner, []).append(stored.grant)
        self._grants_by_owner = by_owner

    def _changed(self) -> None:
        self.version += 1

    def bootstrap(self, admin_password: str | None = None) -> list[str]:
        """First start: default roles, `anonymous`, and `admin` if a password is given. Returns what was created."""
        created: list[str] = []
        for role in (SUPERUSER_ROLE, ALLOW_ALL_ROLE):
            if role not in self._roles:
                self.add_role(role)
                created.append(f"role:{role}")
                if role == ALLOW_ALL_ROLE:
                    for resource in ("Topic:*", "Group:*", "Cluster:*"):
                        self.grant(f"role:{ALLOW_ALL_ROLE}", PolicyEntry.create(resource, "All", "Allow"))
        if not self._users:
            self.add_user(ANONYMOUS_USER, None, roles=[ALLOW_ALL_ROLE])
            created.append(f"user:{ANONYMOUS_USER}")
        if admin_password and ADMIN_USER not in self._users:
            self.add_user(ADMIN_USER, admin_password.encode(), roles=[SUPERUSER_ROLE])
            created.append(f"user:{ADMIN_USER}")
        return created

    # ------------------------------------------------------------------ reads (reactor thread, per action)
    def user(self, name: str) -> User | None:
        return self._users.get(name)

    def users(self) -> list[User]:
        return [self._users[n] for n in sorted(self._users)]

    def roles(self) -> list[str]:
        return sorted(self._roles)

    def policies(self, owner: str | None = None) -> list[StoredPolicy]:
        return [p for p in self._policies.values() if owner is None or p.grant.owner == owner]

    def effective_roles(self, name: str) -> tuple[str, ...]:
        """The user's roles that still exist (a deleted role stops counting at once)."""
        user = self._users.get(name)
        return () if user is None else tuple(r for r in user.roles if r in self._roles)

    def grants_for(self, name: str) -> list[Grant]:
        """The user's own entries and those of its roles."""
        out = list(self._grants_by_owner.get(f"user:{name}", ()))
        for role in self.effective_roles(name):
            out.extend(self._grants_by_owner.get(f"role:{role}", ()))
        return out

    def is_superuser(self, name: str) -> bool:
        return SUPERUSER_ROLE in self.effective_roles(name)

    # ------------------------------------------------------------------ users
    def _require_user(self, name: str) -> User:
        user = self._users.get(name)
        if user is None:
            raise UnknownName(f"no user {name!r}")
        return user

    def _put_user(self, user: User) -> None:
        self.store.put_user({"name": user.name, "password_hash": user.password_hash, "enabled": user.enabled,
                             "roles": list(user.roles), "created_ts": user.created_ts})
        self._users[user.name] = user
        self._changed()

    def add_user(self, name: str, password: bytes | None, *, roles: Iterable[str] = (), enabled: bool = True,
                 password_hash: str | None = None) -> User:
        """Create a user; `password` None means no password login (the anonymous user)."""
        check_name(name, "user")
        if name in self._users:
            raise DuplicateName(f"user {name!r} exists")
        roles = tuple(sorted(set(roles)))
        for role in roles:
            self._require_role(role)
        encoded = password_hash if password_hash is not None else (hash_password(password) if password else "")
        user = User(name, encoded, enabled, roles, int(self._now()))
        self._put_user(user)
        return user

    def set_password_hash(self, name: str, password_hash: str) -> None:
        user = self._require_user(name)
        self._put_user(User(user.name, password_hash, user.enabled, user.roles, user.created_ts))

    def set_password(self, name: str, password: bytes) -> None:
        self.set_password_hash(name, hash_password(password))

    def set_enabled(self, name: str, enabled: bool) -> None:
        user = self._require_user(name)
        self._put_user(User(user.name, user.password_hash, enabled, user.roles, user.created_ts))

    def delete_user(self, name: str) -> None:
        self._require_user(name)
        self.store.delete_policies_of(f"user:{name}")
        self.store.delete_user(name)
        del self._users[name]
        self._policies = {i: p for i, p in self._policies.items() if p.grant.owner != f"user:{name}"}
        self._index()
        self._changed()

    def assign_role(self, name: str, role: str, *, assigned: bool = True) -> None:
        user = self._require_user(name)
        self._require_role(role)
        roles = set(user.roles) | {role} if assigned else set(user.roles) - {role}
        self._put_user(User(user.name, user.password_hash, user.enabled, tuple(sorted(roles)), user.created_ts))

    def authenticate(self, name: str, password: bytes) -> User | None:
        """The enabled user whose password this is, or None (same cost whether or not the user exists)."""
        user = self._users.get(name)
        if user is None or not user.password_hash:
            verify_password(password, _dummy_hash())  # no timing oracle for which names exist
            return None
        if not verify_password(password, user.password_hash) or not user.enabled:
            return None
        return user

    # ------------------------------------------------------------------ roles
    def _require_role(self, role: str) -> None:
        if role not in self._roles:
            raise UnknownName(f"no role {role!r}")

    def add_role(self, role: str) -> None:
        check_name(role, "role")
        if role in self._roles:
            raise DuplicateName(f"role {role!r} exists")
        created = int(self._now())
        self.store.put_role({"name": role, "created_ts": created})
        self._roles[role] = created
        self._changed()

    def delete_role(self, role: str) -> None:
        """Remove the role, its entries, and every user's membership."""
        self._require_role(role)
        for user in list(self._users.values()):
            if role in user.roles:
                self.assign_role(user.name, role, assigned=False)
        self.store.delete_policies_of(f"role:{role}")
        self.store.delete_role(role)
        del self._roles[role]
        self._policies = {i: p for i, p in self._policies.items() if p.grant.owner != f"role:{role}"}
        self._index()
        self._changed()

    # ------------------------------------------------------------------ policies
    def _require_owner(self, owner: str) -> None:
        kind, _, name = owner.partition(":")
        if kind == "user":
            self._require_user(name)
        elif kind == "role":
            self._require_role(name)
        else:
            raise BadRequest(f"policy owner {owner!r} must be user:<name> or role:<name>")

    def grant(self, owner: str, entry: PolicyEntry) -> StoredPolicy:
        """Add `entry` to `owner` (an identical entry already there is returned, not duplicated)."""
        self._require_owner(owner)
        for stored in self.policies(owner):
            if stored.grant.entry == entry:
                return stored
        policy_id = self.store.add_policy({"owner": owner, **entry.to_dict()})
        stored = StoredPolicy(policy_id, Grant(owner, entry))
        self._policies[policy_id] = stored
        self._index()
        self._changed()
        return stored

    def revoke(self, owner: str, entry: PolicyEntry | None = None, *, policy_id: int | None = None) -> list[int]:
        """Remove the owner's entries equal to `entry` (or the one with `policy_id`); returns the removed ids."""
        self._require_owner(owner)
        removed = [p.id for p in self.policies(owner)
                   if (policy_id is not None and p.id == policy_id) or (entry is not None and p.grant.entry == entry)]
        if not removed:
            raise UnknownName(f"{owner} has no such policy entry")
        for pid in removed:
            self.store.delete_policy(pid)
            del self._policies[pid]
        self._index()
        self._changed()
        return removed


@lru_cache(maxsize=1)
def _dummy_hash() -> str:
    return hash_password(b"tidegate-no-such-user")
