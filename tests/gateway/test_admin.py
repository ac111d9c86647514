"""The admin HTTP site: /metrics, /healthz, /readyz and JSON errors, driven through the real twisted.web Site.

Requests go through `Site.buildProtocol` over a `StringTransport`, so HTTP parsing, routing and headers are the real
ones while no socket or reactor is involved.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web.resource import Resource

from tidegate.core.metrics import CoreMetrics
from tidegate.gateway.admin import Readiness, build_admin_site, write_json
from tidegate.gateway.metrics import TidegateCollector, build_registry


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


def request(site, path: str, method: str = "GET", headers: str = "") -> Response:
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n{headers}Connection: close\r\n\r\n"
                         .encode())
    raw = transport.value()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    channel.connectionLost(None)
    return Response(int(status_line.split()[1]), headers, body)


def make_site(readiness: Readiness | None = None, metrics: CoreMetrics | None = None, metrics_token: bytes = b""):
    registry = build_registry(TidegateCollector(metrics or CoreMetrics(), uptime=lambda: 3.0))
    return build_admin_site(registry, readiness or Readiness(), MemoryReactorClock(), metrics_token=metrics_token)


def test_healthz_answers_200_while_the_process_is_up_even_before_it_is_ready() -> None:
    site, _ = make_site()
    response = request(site, "/healthz")
    assert response.status == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"status": "ok"}


def test_readyz_is_503_until_store_and_listeners_are_done_then_200() -> None:
    readiness = Readiness()
    site, _ = make_site(readiness)
    first = request(site, "/readyz")
    assert first.status == 503
    assert set(first.json()["pending"]) == {"store", "listeners"}
    readiness.done(Readiness.STORE)
    assert request(site, "/readyz").json()["pending"].keys() == {"listeners"}
    readiness.done(Readiness.LISTENERS)
    ready = request(site, "/readyz")
    assert ready.status == 200
    assert ready.json() == {"status": "ready"}


def test_readyz_turns_503_again_when_shutdown_begins() -> None:
    readiness = Readiness()
    readiness.done(Readiness.STORE)
    readiness.done(Readiness.LISTENERS)
    site, _ = make_site(readiness)
    readiness.not_ready(Readiness.LISTENERS, "shutting down")
    response = request(site, "/readyz")
    assert response.status == 503
    assert response.json()["pending"] == {"listeners": "shutting down"}


def test_metrics_serves_prometheus_text_with_core_counters() -> None:
    metrics = CoreMetrics()
    metrics.messages_in["orders"] += 9
    site, _ = make_site(metrics=metrics)
    response = request(site, "/metrics")
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    assert b'tidegate_messages_in_total{topic="orders"} 9.0' in response.body
    assert b"tidegate_uptime_seconds 3.0" in response.body


def test_metrics_behind_a_token_answers_401_without_it_and_the_scrape_with_it() -> None:
    site, _ = make_site(metrics_token=b"scrape-token-0123456789")
    for headers in ("", "Authorization: Bearer wrong-token-0123456789\r\n",
                    "Authorization: Basic c2NyYXBlOnRva2Vu\r\n"):
        refused = request(site, "/metrics", headers=headers)
        assert refused.status == 401, headers
        assert refused.headers["www-authenticate"].startswith("Bearer")
        assert b"tidegate_" not in refused.body and b"metrics_token_file" in refused.body
    allowed = request(site, "/metrics", headers="Authorization: Bearer scrape-token-0123456789\r\n")
    assert allowed.status == 200 and b"tidegate_uptime_seconds" in allowed.body
    assert request(site, "/healthz").status == 200 and request(site, "/readyz").status in (200, 503)  # stay open


def test_unknown_paths_get_a_json_404() -> None:
    site, _ = make_site()
    for path in ("/", "/nope", "/metrics/extra", "/healthz/deeper"):
        response = request(site, path)
        assert response.status == 404, path
        assert response.headers["content-type"] == "application/json"
        assert response.json()["error"] == "not found"


def test_other_methods_get_a_json_405_with_allow_header() -> None:
    site, _ = make_site()
    response = request(site, "/healthz", method="POST")
    assert response.status == 405
    assert response.headers["allow"] == "GET, HEAD"
    assert response.json()["error"] == "method not allowed"


def test_resources_mounted_later_are_served_and_duplicates_are_refused() -> None:
    class Api(Resource):
        isLeaf = True

        def render_GET(self, request):
            return write_json(request, 200, {"topics": []})

    site, root = make_site()
    root.mount("api", Api())
    assert request(site, "/api/topics").json() == {"topics": []}
    try:
        root.mount("metrics", Api())
    except ValueError as exc:
        assert "/metrics is already served" in str(exc)
    else:
        raise AssertionError("mounting over /metrics must fail")
