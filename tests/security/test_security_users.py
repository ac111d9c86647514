"""Password hashes, the user/role/policy directory and its write-through to the metadata store."""

from __future__ import annotations

import pytest

from tidegate.core.errors import BadRequest, ClientError
from tidegate.core.security.gate import Action, Resource
from tidegate.core.security.policy import PolicyEntry, decide
from tidegate.core.security.users import (
    ALLOW_ALL_ROLE,
    SUPERUSER_ROLE,
    DuplicateName,
    SecurityDirectory,
    UnknownName,
    hash_password,
    verify_password,
)
from tidegate.core.storage.memory import MemoryMetadataStore
from tidegate.core.storage.metadata import SqliteMetadataStore


def test_password_hashes_are_salted_scrypt_and_verify():
    first, second = hash_password(b"s3cret"), hash_password(b"s3cret")
    assert first.startswith("scrypt$14$8$1$") and first != second
    assert "s3cret" not in first
    assert verify_password(b"s3cret", first) and verify_password(b"s3cret", second)
    assert not verify_password(b"s3cret!", first)


@pytest.mark.parametrize("encoded", ["", "plain", "md5$x", "scrypt$14$8$1$!!$!!", "scrypt$a$b$c$d$e"])
def test_garbage_hashes_never_verify(encoded):
    assert verify_password(b"anything", encoded) is False


def test_empty_and_huge_passwords_are_refused():
    with pytest.raises(BadRequest):
        hash_password(b"")
    with pytest.raises(BadRequest):
        hash_password(b"x" * 2000)


def test_bootstrap_creates_roles_anonymous_and_admin_once():
    store = MemoryMetadataStore()
    directory = SecurityDirectory(store)
    created = directory.bootstrap("adminpw")
    assert created == [f"role:{SUPERUSER_ROLE}", f"role:{ALLOW_ALL_ROLE}", "user:anonymous", "user:admin"]
    assert directory.is_superuser("admin") and not directory.is_superuser("anonymous")
    assert directory.authenticate("admin", b"adminpw") is not None
    assert directory.bootstrap("other") == []  # second start: nothing new, the admin password is not reset
    assert directory.authenticate("admin", b"adminpw") is not None
    grants = directory.grants_for("anonymous")
    assert decide(grants, Action.DELETE, Resource.topic("x/y"), "", username="anonymous").allowed


def test_bootstrap_without_admin_password_creates_no_admin():
    directory = SecurityDirectory(MemoryMetadataStore())
    directory.bootstrap(None)
    assert directory.user("admin") is None and directory.user("anonymous") is not None


def test_users_authenticate_only_enabled_and_with_the_right_password():
    directory = SecurityDirectory(MemoryMetadataStore())
    directory.add_user("alice", b"s3cret")
    assert directory.authenticate("alice", b"s3cret").name == "alice"
    assert directory.authenticate("alice", b"wrong") is None
    assert directory.authenticate("nobody", b"s3cret") is None
    directory.set_enabled("alice", False)
    assert directory.authenticate("alice", b"s3cret") is None
    directory.set_enabled("alice", True)
    directory.set_password("alice", b"n3w")
    assert directory.authenticate("alice", b"s3cret") is None and directory.authenticate("alice", b"n3w")


def test_user_without_password_cannot_log_in_with_one():
    directory = SecurityDirectory(MemoryMetadataStore())
    directory.add_user("anonymous", None)
    assert directory.authenticate("anonymous", b"") is None and directory.authenticate("anonymous", b"x") is None


@pytest.mark.parametrize("name", ["", "a/b", "a+b", "#", "x*", "with space", "a" * 129])
def test_names_that_could_widen_patterns_are_refused(name):
    directory = SecurityDirectory(MemoryMetadataStore())
    with pytest.raises(BadRequest):
        directory.add_user(name, b"pw")
    with pytest.raises(BadRequest):
        directory.add_role(name)


def test_duplicates_and_unknown_names_raise_client_errors():
    directory = SecurityDirectory(MemoryMetadataStore())
    directory.add_user("alice", b"pw")
    with pytest.raises(DuplicateName):
        directory.add_user("alice", b"pw")
    with pytest.raises(UnknownName):
        directory.set_enabled("bob", False)
    with pytest.raises(UnknownName):
        directory.assign_role("alice", "nope")
    with pytest.raises(UnknownName):
        directory.grant("user:bob", PolicyEntry.create("Topic:a", "Pub", "Allow"))
    with pytest.raises(ClientError):
        directory.grant("group:x", PolicyEntry.create("Topic:a", "Pub", "Allow"))


def test_every_change_bumps_the_version():
    directory = SecurityDirectory(MemoryMetadataStore())
    versions = [directory.version]
    entry = PolicyEntry.create("Topic:a", "Pub", "Allow")
    steps = [
        lambda: directory.add_role("devices"),
        lambda: directory.add_user("alice", b"pw"),
        lambda: directory.assign_role("alice", "devices"),
        lambda: directory.grant("role:devices", entry),
        lambda: directory.set_enabled("alice", False),
        lambda: directory.set_password("alice", b"pw2"),
        lambda: directory.revoke("role:devices", entry),
        lambda: directory.delete_role("devices"),
        lambda: directory.delete_user("alice"),
    ]
    for step in steps:
        step()
        versions.append(directory.version)
    assert versions == sorted(set(versions))


def test_roles_bundle_policies_and_deleting_a_role_removes_them_at_once():
    directory = SecurityDirectory(MemoryMetadataStore())
    directory.add_role("devices")
    directory.add_user("alice", b"pw", roles=["devices"])
    directory.grant("role:devices", PolicyEntry.create("Topic:telemetry/${username}/#", "Pub", "Allow"))
    directory.grant("user:alice", PolicyEntry.create("Topic:telemetry/alice/secret", "Pub", "Deny"))
    grants = directory.grants_for("alice")
    assert decide(grants, Action.PUB, Resource.topic("telemetry/alice/t"), "", username="alice").allowed
    assert not decide(grants, Action.PUB, Resource.topic("telemetry/alice/secret"), "", username="alice").allowed
    directory.delete_role("devices")
    assert directory.user("alice").roles == ()
    assert not decide(directory.grants_for("alice"), Action.PUB, Resource.topic("telemetry/alice/t"), "",
                      username="alice").allowed
    assert [p.grant.owner for p in directory.policies()] == ["user:alice"]


def test_grant_is_idempotent_and_revoke_by_entry_or_id():
    directory = SecurityDirectory(MemoryMetadataStore())
    directory.add_user("alice", b"pw")
    entry = PolicyEntry.create("Topic:a", "Pub", "Allow")
    first = directory.grant("user:alice", entry)
    assert directory.grant("user:alice", entry).id == first.id
    other = directory.grant("user:alice", PolicyEntry.create("Topic:b", "Sub", "Deny"))
    assert directory.revoke("user:alice", policy_id=other.id) == [other.id]
    assert directory.revoke("user:alice", entry) == [first.id]
    with pytest.raises(UnknownName):
        directory.revoke("user:alice", entry)


def test_the_directory_survives_a_restart_on_sqlite_without_plain_text(tmp_path):
    store = SqliteMetadataStore(tmp_path / "meta.db")
    directory = SecurityDirectory(store)
    directory.bootstrap("adminpw")
    directory.add_role("devices")
    directory.add_user("alice", b"s3cret-pw", roles=["devices"])
    directory.grant("role:devices", PolicyEntry.create("Topic:t/#", "Pub,Sub", "Allow", ["10.0.0.0/8"]))
    directory.set_enabled("alice", False)
    store.close()
    raw = (tmp_path / "meta.db").read_bytes() + b"".join(p.read_bytes() for p in tmp_path.glob("meta.db-*"))
    assert b"s3cret-pw" not in raw and b"adminpw" not in raw
    store = SqliteMetadataStore(tmp_path / "meta.db")
    again = SecurityDirectory(store)
    assert again.user("alice").enabled is False and again.user("alice").roles == ("devices",)
    assert [p.to_dict()["resource"] for p in again.policies("role:devices")] == ["Topic:t/#"]
    again.set_enabled("alice", True)
    assert again.authenticate("alice", b"s3cret-pw") is not None
    assert again.user("alice").to_dict().keys() == {"name", "enabled", "roles", "has_password", "created_ts"}
    store.close()
