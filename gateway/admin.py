"""The admin HTTP endpoint (twisted.web): /metrics, /healthz, /readyz, and JSON errors for everything else.

The JSON admin API (a later issue) mounts under its own path without touching this module's resources:

    root = AdminRoot(registry, readiness)
    root.mount("api", ApiResource(broker))   # serves /api/...

Every response this module writes itself is JSON, including 404 and 405, so scripts never have to parse HTML.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

JSON_CONTENT_TYPE = b"application/json"


class Readiness:
    """Conditions the process waits for before it reports ready; each is pending until marked done.

    Shutdown marks a condition pending again, so load balancers stop sending traffic while listeners drain.
    """

    STORE = "store"
    LISTENERS = "listeners"

    def __init__(self) -> None:
        self._pending: dict[str, str] = {
            self.STORE: "the message store has not finished recovery",
            self.LISTENERS: "the protocol listeners are not bound yet",
        }
        # Live health checks asked at every /readyz: (ok, reason) — e.g. the store after a disk-full error
        # (recovers by itself once space is back) or durability after an fsync failure (needs a restart).
        self._checks: dict[str, Callable[[], tuple[bool, str]]] = {}

    def add_check(self, name: str, check: Callable[[], tuple[bool, str]]) -> None:
        self._checks[name] = check

    @property
    def ready(self) -> bool:
        return not self.pending

    @property
    def pending(self) -> dict[str, str]:
        pending = dict(self._pending)
        for name, check in self._checks.items():
            try:
                ok, reason = check()
            except Exception as exc:  # a broken check must not take /readyz down: it reports not ready
                ok, reason = False, f"health check failed: {exc}"
            if not ok:
                pending[name] = reason
        return pending

    def done(self, condition: str) -> None:
        self._pending.pop(condition, None)

    def not_ready(self, condition: str, reason: str) -> None:
        self._pending[condition] = reason


def write_json(request: Request, status: int, payload: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", JSON_CONTENT_TYPE)
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(payload).encode("utf-8") + b"\n"


def _request_path(request: Request) -> str:
    return request.path.decode("utf-8", "replace")


class JsonNotFound(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        return write_json(request, 404, {"error": "not found", "path": _request_path(request)})


class _Endpoint(Resource):
    """A leaf answering GET (and HEAD) at exactly its own path; other methods get a JSON 405."""

    isLeaf = True

    def render(self, request: Request) -> bytes:
        # A leaf receives every path below it (/healthz/x); only the exact path (or a trailing slash) is ours.
        if request.postpath not in ([], [b""]):
            return JsonNotFound().render(request)
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return write_json(request, 405, {"error": "method not allowed", "method":
                                             request.method.decode("ascii", "replace"), "allow": ["GET", "HEAD"]})
        return self.render_GET(request)

    def render_GET(self, request: Request) -> bytes:
        raise NotImplementedError


class MetricsResource(_Endpoint):
    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        body = generate_latest(self.registry)
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return body


class HealthResource(_Endpoint):
    """Liveness: if this answers, the reactor is turning."""

    def render_GET(self, request: Request) -> bytes:
        return write_json(request, 200, {"status": "ok"})


class ReadyResource(_Endpoint):
    def __init__(self, readiness: Readiness) -> None:
        super().__init__()
        self.readiness = readiness

    def render_GET(self, request: Request) -> bytes:
        if self.readiness.ready:
            return write_json(request, 200, {"status": "ready"})
        return write_json(request, 503, {"status": "not ready", "pending": self.readiness.pending})


class AdminRoot(Resource):
    def __init__(self, registry: CollectorRegistry, readiness: Readiness) -> None:
        super().__init__()
        self.putChild(b"metrics", MetricsResource(registry))
        self.putChild(b"healthz", HealthResource())
        self.putChild(b"readyz", ReadyResource(readiness))

    def mount(self, name: str, resource: Resource) -> None:
        """Serve `resource` at /<name>/ (the admin API and future endpoints plug in here)."""
        key = name.encode("ascii")
        if key in self.children:
            raise ValueError(f"/{name} is already served by the admin endpoint")
        self.putChild(key, resource)

    def getChild(self, path: bytes, request: Request) -> Resource:
        return JsonNotFound()

    def render(self, request: Request) -> bytes:
        return JsonNotFound().render(request)


class AdminSite(Site):
    """A Site without per-request access logging: a scraper hitting /metrics every few seconds is not news."""

    noisy = False

    def log(self, request: Request) -> None:
        return None


def build_admin_site(registry: CollectorRegistry, readiness: Readiness, reactor: Any) -> tuple[AdminSite, AdminRoot]:
    """The site to listen with and its root (to `mount` more resources on). `reactor` drives HTTP timeouts."""
    root = AdminRoot(registry, readiness)
    return AdminSite(root, reactor=reactor), root
