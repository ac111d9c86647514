"""The admin HTTP endpoint (twisted.web): /metrics, /healthz, /readyz, and JSON errors for everything else.

The JSON admin API mounts under its own path without touching this module's resources:

    root = AdminRoot(registry, readiness)
    root.mount("api", SecurityApi(gate))     # serves /api/security/... (authenticated, admins only)

Every response this module writes itself is JSON, including 404 and 405, so scripts never have to parse HTML.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from tidegate.core.errors import TidegateError, TopicNotFound
from tidegate.core.security.gate import Action, Credentials, Principal, ResourceType
from tidegate.core.security.gate import Resource as GateResource
from tidegate.core.security.policy import ALL_ACTIONS, PolicyEntry, PolicyError, parse_actions, parse_resource
from tidegate.core.security.users import DuplicateName, UnknownName, hash_password

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
    """Prometheus exposition; with a token (`[security] metrics_token_file`) only for `Authorization: Bearer
    <token>`, so topic names and traffic are not open to whoever reaches the admin port."""

    def __init__(self, registry: CollectorRegistry, token: bytes = b"") -> None:
        super().__init__()
        self.registry = registry
        self.token = token

    def render_GET(self, request: Request) -> bytes:
        if self.token:
            scheme, _, given = (request.getHeader(b"authorization") or b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.token):
                request.setHeader(b"www-authenticate", b'Bearer realm="tidegate metrics"')
                return write_json(request, 401, {"error": "/metrics needs the bearer token "
                                                          "(security.metrics_token_file)"})
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
    def __init__(self, registry: CollectorRegistry, readiness: Readiness, metrics_token: bytes = b"") -> None:
        super().__init__()
        self.putChild(b"metrics", MetricsResource(registry, metrics_token))
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


def build_admin_site(registry: CollectorRegistry, readiness: Readiness, reactor: Any, *,
                     metrics_token: bytes = b"") -> tuple[AdminSite, AdminRoot]:
    """The site to listen with and its root (to `mount` more resources on). `reactor` drives HTTP timeouts."""
    root = AdminRoot(registry, readiness, metrics_token)
    return AdminSite(root, reactor=reactor), root


# ----------------------------------------------------------------------------------------------- /api/security
def _audit_target(request: Request, body: dict[str, Any]) -> tuple[str, str] | None:
    """What a mutating /api/security request changes, as (kind, name) with kind user, role or owner; None for reads
    and `check`."""
    if request.method not in (b"POST", b"DELETE"):
        return None
    path = [p.decode("utf-8", "replace") for p in request.postpath if p]
    if path == ["tls", "reload"]:
        return ("tls", "certificates")
    if path[:1] != ["security"]:
        return None
    route = path[1:]
    if route[:1] == ["users"]:
        return ("user", route[1] if len(route) > 1 else str(body.get("name", "")))
    if route[:1] == ["roles"]:
        if len(route) == 3:
            return ("user", str(body.get("user", "")))
        return ("role", route[1] if len(route) > 1 else str(body.get("name", "")))
    if route[:1] == ["policies"]:
        return ("owner", str(body.get("owner", "")))
    return None


def _audit_state(directory: Any, target: tuple[str, str]) -> Any:
    """The target's state for the audit log: users without their hash, a role's entries, an owner's entries."""
    kind, name = target
    if kind == "tls":
        return None  # the reload's answer (new not-after dates) is in the HTTP reply; the audit line says who and when
    if kind == "user":
        user = directory.user(name)
        return None if user is None else user.to_dict()
    if kind == "role":
        if name not in directory.roles():
            return None
        return {"role": name, "policies": [p.to_dict() for p in directory.policies(f"role:{name}")]}
    return [p.to_dict() for p in directory.policies(name)]


def host_allowed(host_header: str, extra_hosts: frozenset[str] = frozenset()) -> bool:
    """Against DNS rebinding: a browser sends the attacker's name as Host, so only IP literals, `localhost` and
    names the operator listed are served."""
    host = host_header.strip().lower()
    if host.startswith("["):
        host = host[1:host.find("]")] if "]" in host else ""
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    if not host:
        return False
    if host == "localhost" or host in extra_hosts:
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class SecurityApi(Resource):
    """The user/role/policy API under /api/security (what `tidegate user|role|acl` calls).

    Every request needs the right Host (see `host_allowed`) and HTTP Basic credentials of an enabled super-user,
    checked by the gate (its password check runs off the reactor and failed attempts are slowed per source).
    Bodies are JSON; answers are JSON: 400 bad request, 401 no or wrong credentials, 403 not an admin or a foreign
    Host, 404 unknown name, 409 duplicate.

        GET    users                       POST users {name, password?, roles?, enabled?}
        DELETE users/<name>                POST users/<name>/password {password}
        POST   users/<name>/enable         POST users/<name>/disable
        GET    roles                       POST roles {name}            DELETE roles/<name>
        POST   roles/<role>/assign {user}  POST roles/<role>/unassign {user}
        GET    policies[?owner=user:x]     POST policies {owner, resource, actions, decision, sources?}
        POST   policies/revoke {owner, resource, actions, decision, sources?} or {owner, id}
        POST   check {user, action, resource, source?, client_id?}  -> {"decision", "entry", "reason"}
        GET    limits                      -> {"defaults": {...}, "users": {name: {...}}}
        GET    users/<name>/limits         POST users/<name>/limits {field: int | null}   DELETE users/<name>/limits
        POST   /api/tls/reload             re-read the TLS certificate files (as SIGHUP does)
                                           -> {"reloaded": true, "not_after": {listener: ISO time}}; 500 keeps the old

    and, under /api/topics (same authentication), the topics' message rules (core/schema.py):

        GET    topics/schemas              GET topics/<name>/schema
        POST   topics/<name>/schema {schema?, content_type?}                        DELETE topics/<name>/schema
    """

    isLeaf = True
    MAX_BODY = 64 * 1024

    def __init__(self, gate: Any, *, extra_hosts: frozenset[str] = frozenset(),
                 tls_reload: Callable[[], Any] | None = None, limiter: Any = None, broker: Any = None) -> None:
        super().__init__()
        self.gate = gate
        self.extra_hosts = extra_hosts
        self.tls_reload = tls_reload  # the process's certificate reload (gateway/app.py), None without TLS wiring
        self.limiter = limiter  # core/security/limits.Limiter (per-user limits), or None
        self.broker = broker  # for topic schemas (broker.schemas), or None

    def render(self, request: Request) -> Any:
        from twisted.web.server import NOT_DONE_YET

        host = (request.getHeader(b"host") or b"").decode("latin-1")
        if not host_allowed(host, self.extra_hosts):
            return write_json(request, 403, {"error": f"Host {host!r} is not served here"})
        username, password = request.getUser(), request.getPassword()
        if not username:
            request.setHeader(b"www-authenticate", b'Basic realm="tidegate"')
            return write_json(request, 401, {"error": "authentication required"})
        credentials = Credentials("password", username=username.decode("utf-8", "replace"), password=password,
                                  source=request.getClientAddress().host if request.getClientAddress() else "",
                                  listener="admin")
        decision = self.gate.authenticate(credentials)
        decision.addCallbacks(lambda principal: self._authorized(request, principal),
                              lambda failure: self._refused(request, failure))
        decision.addErrback(lambda failure: self._finish(request, 500, {"error": "internal error"}))
        return NOT_DONE_YET

    def _finish(self, request: Request, status: int, payload: Any) -> None:
        if request.finished or getattr(request, "_disconnected", False):
            return
        request.write(write_json(request, status, payload))
        request.finish()

    def _refused(self, request: Request, failure: Any) -> None:
        request.setHeader(b"www-authenticate", b'Basic realm="tidegate"')
        self._finish(request, 401, {"error": "bad user name or password"})

    def _authorized(self, request: Request, principal: Any) -> None:
        directory = self.gate.directory
        if not directory.is_superuser(principal.name):
            self._finish(request, 403, {"error": f"{principal.name} is not an administrator"})
            return
        try:
            body = self._body(request) if request.method == b"POST" else {}
            password = body.get("password")
            if password is not None and not isinstance(password, str):
                raise ValueError("the password must be a string")
        except ValueError as exc:
            self._finish(request, 400, {"error": str(exc)})
            return
        if not password:
            self._answer(request, directory, body, None, principal)
            return
        # scrypt takes tens of milliseconds: hash in a thread, like logins, never on the reactor
        hashed = self.gate.run_in_thread(hash_password, password.encode())
        hashed.addCallbacks(lambda encoded: self._answer(request, directory, body, encoded, principal),
                            lambda failure: self._answer(request, directory, body, failure.value, principal))
        hashed.addErrback(lambda failure: self._finish(request, 500, {"error": "internal error"}))

    def _answer(self, request: Request, directory: Any, body: dict[str, Any], password_hash: Any,
                principal: Any = None) -> None:
        """`password_hash` is the body's password hashed, None without one, or the error hashing raised. Every
        change (POST/DELETE but `check`) is audited with its state before and after, whatever its outcome."""
        target = _audit_target(request, body)
        before = _audit_state(directory, target) if target is not None else None
        status, payload = self._apply(request, directory, body, password_hash)
        audit = getattr(self.gate, "audit", None)
        if target is not None and audit is not None:
            client = request.getClientAddress()
            audit.admin_change(who=getattr(principal, "name", ""), source=getattr(client, "host", ""),
                               operation=f"{request.method.decode('ascii', 'replace')} {_request_path(request)}",
                               target=f"{target[0]}:{target[1]}", before=before,
                               after=_audit_state(directory, target), status=status)
        self._finish(request, status, payload)

    def _apply(self, request: Request, directory: Any, body: dict[str, Any], password_hash: Any) -> tuple[int, Any]:
        try:
            if isinstance(password_hash, Exception):
                raise password_hash
            status, payload = self._dispatch(request, directory, body, password_hash)
        except DuplicateName as exc:
            status, payload = 409, {"error": exc.message}
        except (UnknownName, TopicNotFound) as exc:
            status, payload = 404, {"error": exc.message}
        except TidegateError as exc:
            status, payload = 400, {"error": exc.message}
        except (PolicyError, ValueError, KeyError, TypeError) as exc:
            status, payload = 400, {"error": str(exc) if not isinstance(exc, KeyError) else f"missing field {exc}"}
        return status, payload

    def _body(self, request: Request) -> dict[str, Any]:
        raw = request.content.read(self.MAX_BODY + 1) if request.content is not None else b""
        if len(raw) > self.MAX_BODY:
            raise ValueError("request body too large")
        body = json.loads(raw or b"{}")
        if not isinstance(body, dict):
            raise ValueError("the request body must be a JSON object")
        return body

    def _dispatch(self, request: Request, directory: Any, body: dict[str, Any],
                  password_hash: str | None) -> tuple[int, Any]:
        method = request.method.decode("ascii", "replace")
        path = [p.decode("utf-8", "replace") for p in request.postpath if p]
        if path == ["tls", "reload"] and method == "POST" and self.tls_reload is not None:
            try:
                return 200, self.tls_reload()
            except Exception as exc:  # a file that does not load: the old certificates stay; say why
                return 500, {"error": f"TLS reload failed, the previous certificates stay in use: {exc}"}
        if path[:1] == ["topics"]:
            return self._topics(method, path[1:], body, request)
        if path[:1] != ["security"]:
            return 404, {"error": "not found", "path": _request_path(request)}
        route = path[1:]
        if route == ["limits"] or (len(route) == 3 and route[0] == "users" and route[2] == "limits"):
            return self._limits(method, route, body, directory)
        if method == "GET":
            if route == ["users"]:
                return 200, [u.to_dict() for u in directory.users()]
            if route == ["roles"]:
                return 200, directory.roles()
            if route == ["policies"]:
                owner = request.args.get(b"owner", [b""])[0].decode("utf-8", "replace") or None
                return 200, [p.to_dict() for p in directory.policies(owner)]
            return 404, {"error": "not found", "path": _request_path(request)}
        if method == "DELETE" and len(route) == 2 and route[0] in ("users", "roles"):
            (directory.delete_user if route[0] == "users" else directory.delete_role)(route[1])
            if route[0] == "users" and self.limiter is not None:
                self.limiter.clear_user_limits(route[1])  # a user of the same name later starts from defaults
            return 200, {"deleted": route[1]}
        if method != "POST":
            return 405, {"error": "method not allowed", "method": method}
        return self._post(route, body, directory, password_hash)

    def _post(self, route: list[str], body: dict[str, Any], directory: Any,
              password_hash: str | None) -> tuple[int, Any]:
        if route == ["users"]:
            user = directory.add_user(body["name"], None, password_hash=password_hash or "",
                                      roles=body.get("roles", ()), enabled=bool(body.get("enabled", True)))
            return 201, user.to_dict()
        if len(route) == 3 and route[0] == "users":
            name, verb = route[1], route[2]
            if verb == "password":
                if password_hash is None:
                    raise ValueError("missing field 'password'")
                directory.set_password_hash(name, password_hash)
            elif verb in ("enable", "disable"):
                directory.set_enabled(name, verb == "enable")
            else:
                return 404, {"error": f"unknown user operation {verb!r}"}
            return 200, directory.user(name).to_dict()
        if route == ["roles"]:
            directory.add_role(body["name"])
            return 201, {"name": body["name"]}
        if len(route) == 3 and route[0] == "roles" and route[2] in ("assign", "unassign"):
            directory.assign_role(body["user"], route[1], assigned=route[2] == "assign")
            return 200, directory.user(body["user"]).to_dict()
        if route == ["policies"]:
            entry = PolicyEntry.create(body["resource"], body["actions"], body["decision"], body.get("sources", ()))
            return 201, directory.grant(body["owner"], entry).to_dict()
        if route == ["policies", "revoke"]:
            if "id" in body:
                removed = directory.revoke(body["owner"], policy_id=int(body["id"]))
            else:
                entry = PolicyEntry.create(body["resource"], body["actions"], body["decision"],
                                           body.get("sources", ()))
                removed = directory.revoke(body["owner"], entry)
            return 200, {"revoked": removed}
        if route == ["check"]:
            return 200, self._check(body, directory)
        return 404, {"error": "not found", "path": "/api/security/" + "/".join(route)}

    def _limits(self, method: str, route: list[str], body: dict[str, Any], directory: Any) -> tuple[int, Any]:
        limiter = self.limiter
        if limiter is None:
            return 404, {"error": "limits are not available on this endpoint"}
        if route == ["limits"]:
            if method != "GET":
                return 405, {"error": "method not allowed", "method": method}
            return 200, {"defaults": asdict(limiter.settings), "users": limiter.all_user_limits()}
        name = route[1]
        if directory.user(name) is None:
            raise UnknownName(f"no user {name!r}")
        if method == "POST":
            limiter.set_user_limits(name, body)
        elif method == "DELETE":
            limiter.clear_user_limits(name)
        elif method != "GET":
            return 405, {"error": "method not allowed", "method": method}
        return 200, {"user": name, "limits": limiter.user_limits(name),
                     "effective": asdict(limiter.settings.merged(limiter.user_limits(name)))}

    def _topics(self, method: str, route: list[str], body: dict[str, Any], request: Request) -> tuple[int, Any]:
        broker = self.broker
        if broker is None:
            return 404, {"error": "topic rules are not available on this endpoint"}
        schemas = broker.schemas
        if route == ["schemas"] and method == "GET":
            return 200, schemas.list()
        if len(route) != 2 or route[1] != "schema":
            return 404, {"error": "not found", "path": _request_path(request)}
        topic = route[0]
        if method == "GET":
            rule = schemas.get(topic)
            return (200, rule) if rule is not None else (404, {"error": f"topic {topic!r} has no schema"})
        if method == "DELETE":
            if not schemas.clear(topic):
                return 404, {"error": f"topic {topic!r} has no schema"}
            return 200, {"cleared": topic}
        if method != "POST":
            return 405, {"error": "method not allowed", "method": method}
        broker.get_topic(topic)  # TopicNotFound (404): a rule belongs to an existing topic
        content_type = body.get("content_type") or ""
        if not isinstance(content_type, str):
            raise ValueError("content_type must be a string")
        return 200, schemas.set(topic, body.get("schema"), content_type)

    def _check(self, body: dict[str, Any], directory: Any) -> dict[str, Any]:
        name = body["user"]
        user = directory.user(name)
        if user is None:
            raise UnknownName(f"no user {name!r}")
        resource_type, pattern = parse_resource(body["resource"])
        actions = parse_actions([body["action"]])
        if len(actions) != 1 or ALL_ACTIONS in actions:
            raise ValueError("check one action: Pub, Sub, Create, Update, Delete, Get or List")
        principal = Principal(name, roles=frozenset(user.roles), anonymous=name == "anonymous",
                              client_id=str(body.get("client_id", "")))
        is_filter = resource_type is ResourceType.TOPIC and ("+" in pattern or "#" in pattern)
        resource = GateResource(resource_type, pattern, pattern=is_filter)
        decision = self.gate.decide(principal, Action(next(iter(actions))), resource, str(body.get("source", "")))
        return decision.to_dict()
