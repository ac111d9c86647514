"""`Credentials` is a NamedTuple (cheap to build once per CONNECT): the same fields and defaults as before, built
with the mechanism first and the rest by keyword, and immutable."""

from __future__ import annotations

import pytest

from tidegate.core.security import Credentials


def test_fields_and_defaults_are_unchanged() -> None:
    credentials = Credentials("anonymous")
    assert credentials._fields == ("mechanism", "username", "password", "client_id", "certificate_identity",
                                   "source", "listener")
    assert (credentials.username, credentials.password, credentials.client_id, credentials.certificate_identity,
            credentials.source, credentials.listener) == ("", b"", "", "", "", "")


def test_built_by_keyword_it_holds_what_it_was_given() -> None:
    credentials = Credentials(mechanism="password", username="alice", password=b"pw", client_id="c1",
                              source="127.0.0.1", listener="mqtt")
    assert credentials.mechanism == "password" and credentials.username == "alice" and credentials.password == b"pw"
    assert credentials == Credentials("password", username="alice", password=b"pw", client_id="c1",
                                      source="127.0.0.1", listener="mqtt")
    assert hash(credentials) == hash(Credentials("password", username="alice", password=b"pw", client_id="c1",
                                                 source="127.0.0.1", listener="mqtt"))


def test_it_cannot_be_changed() -> None:
    credentials = Credentials("password", username="alice")
    with pytest.raises(AttributeError):
        credentials.username = "mallory"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        credentials.extra = 1  # type: ignore[attr-defined]
