"""The admin API's Host check against DNS rebinding."""

from __future__ import annotations

import pytest

from tidegate.gateway.admin import host_allowed


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.1:8080", "localhost:8080", "LOCALHOST", "[::1]:8080", "::1",
                                  "10.1.2.3:80", "broker.internal:8080"])
def test_ip_literals_localhost_and_listed_names_are_served(host):
    assert host_allowed(host, frozenset({"broker.internal"}))


@pytest.mark.parametrize("host", ["", "evil.example", "evil.example:8080", "127.0.0.1.evil.example", "[::1",
                                  "localhost.evil.example", "broker.internal.evil.example"])
def test_other_names_are_refused(host):
    assert not host_allowed(host, frozenset({"broker.internal"}))
