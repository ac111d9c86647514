"""PolicyGate: the `Gate` of a broker with users, roles and policies (core/security/users.py, policy.py).

Authentication:
- a user name and password: the scrypt check runs through `run_in_thread` (off the reactor in the broker;
  tests pass an inline runner), then the user must exist, be enabled and match;
- a password shaped like a JWT (`header.payload.signature`) when JWT is configured: the token is verified
  (core/security/tokens.py, also through `run_in_thread`) and its user name claim names the user, which must exist
  and be enabled; a given user name must equal the claim. A refused token is a failed login like a bad password;
- no user name: the user `anonymous`, if `allow_anonymous` lets this connection in (`"loopback"`, the default: the
  listener is bound to a loopback address *and* the client comes from 127.0.0.0/8 or ::1; `True` everywhere;
  `False` never) and that user exists and is enabled;
- a verified client certificate (mechanism "certificate", the TLS layer checked it against the CA bundle): its
  identity (`[tls] identity`: CN or a SAN) must name an existing, enabled user, exactly like a user name with the
  right password; there is no separate mapping table (create the user, without a password if it only ever uses
  its certificate). The reserved `anonymous` user cannot be claimed by a certificate;
- `guest`/`guest` (AMQP clients' default) from loopback, when no real `guest` user exists: treated like an
  anonymous client, as RabbitMQ allows it from localhost only.
Every failed attempt from a source address doubles the delay before that source's next answer (success or
failure), up to `max_delay_s`; the table of sources is bounded (least recently failed forgotten first).

Authorization (`check`): a system principal may do everything; otherwise the principal's user must still exist and
be enabled (checked on every decision, so a user disabled while connected is denied at its next action: the
session's cache drops when `version` moves), then the super-user role bypasses, then `policy.decide`.
"""

from __future__ import annotations

import functools
import ipaddress
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.logger import Logger

from tidegate.core.errors import NotAuthenticated
from tidegate.core.metrics import SecurityMetrics
from tidegate.core.security.audit import AuditLog
from tidegate.core.security.gate import Action, Credentials, Decision, Principal, Resource
from tidegate.core.security.policy import PolicyDecision, decide
from tidegate.core.security.tokens import TokenError, TokenVerifier, VerifiedToken, looks_like_jwt, open_token_verifier
from tidegate.core.security.users import ANONYMOUS_USER, SecurityDirectory, User

log = Logger(namespace="tidegate.security")

AnonymousPolicy = Literal["loopback"] | bool
RunInThread = Callable[..., Deferred[Any]]
GUEST = "guest"


# Source addresses whose loopback-ness is remembered: every anonymous login asks, and parsing an address costs
# more than the rest of the decision; a reconnect storm comes from few addresses. Bounded (least recently used go).
SOURCE_CACHE_SIZE = 4096


@functools.lru_cache(maxsize=SOURCE_CACHE_SIZE)
def is_loopback(source: str) -> bool:
    try:
        address = ipaddress.ip_address(source.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


@functools.lru_cache(maxsize=64)
def is_loopback_bind(host: str) -> bool:
    """Whether a listener bound to `host` is reachable from this machine only (`localhost` or a loopback literal;
    a wildcard or any other name is not)."""
    host = host.strip().strip("[]").lower()
    return host == "localhost" or is_loopback(host)


def run_inline(function: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """A `run_in_thread` that runs on the calling thread (tests, tools)."""
    return maybeDeferred(function, *args)


@dataclass
class _Failures:
    count: int
    last: float



@functools.lru_cache(maxsize=1024)
def role_set(roles: tuple[str, ...]) -> frozenset[str]:
    """One shared frozenset per distinct role list: every login of a user would otherwise build its own (~200 B per
    connection)."""
    return frozenset(roles)

class LoginThrottle:
    """Per-source exponential delay after failed logins: `base_delay_s * 2**(failures - 1)`, capped."""

    def __init__(self, clock: Any, *, base_delay_s: float = 0.2, max_delay_s: float = 10.0,
                 forget_after_s: float = 600.0, max_sources: int = 10_000) -> None:
        self.clock = clock
        self.base_delay_s = base_delay_s
        self.max_delay_s = max_delay_s
        self.forget_after_s = forget_after_s
        self.max_sources = max_sources
        self._failures: OrderedDict[str, _Failures] = OrderedDict()

    def delay(self, source: str) -> float:
        entry = self._failures.get(source)
        if entry is None or self.base_delay_s <= 0:
            return 0.0
        if self.clock.seconds() - entry.last > self.forget_after_s:
            del self._failures[source]
            return 0.0
        return min(self.max_delay_s, self.base_delay_s * 2 ** min(entry.count - 1, 32))

    def failed(self, source: str) -> None:
        entry = self._failures.pop(source, None) or _Failures(0, 0.0)
        entry.count += 1
        entry.last = self.clock.seconds()
        self._failures[source] = entry  # most recent last
        while len(self._failures) > self.max_sources:
            self._failures.popitem(last=False)

    def succeeded(self, source: str) -> None:
        self._failures.pop(source, None)

    def __len__(self) -> int:
        return len(self._failures)


class PolicyGate:
    """`Gate` over a `SecurityDirectory`."""

    def __init__(self, directory: SecurityDirectory, clock: Any, *, allow_anonymous: AnonymousPolicy = "loopback",
                 run_in_thread: RunInThread = run_inline, throttle: LoginThrottle | None = None,
                 tokens: TokenVerifier | None = None, listener_hosts: Mapping[str, str] | None = None,
                 audit: AuditLog | None = None, metrics: SecurityMetrics | None = None) -> None:
        if allow_anonymous not in ("loopback", True, False):
            raise ValueError(f"allow_anonymous must be 'loopback', true or false, not {allow_anonymous!r}")
        self.directory = directory
        self.clock = clock
        self.allow_anonymous = allow_anonymous
        self.run_in_thread = run_in_thread
        self.throttle = throttle if throttle is not None else LoginThrottle(clock)
        self.tokens = tokens
        # listener name (Credentials.listener) -> the host it is bound to, for anonymous-per-listener decisions
        self.listener_hosts: dict[str, str] = dict(listener_hosts or {})
        self.audit = audit if audit is not None else AuditLog(None)
        self.metrics = metrics if metrics is not None else SecurityMetrics()
        self.admin_hosts: frozenset[str] = frozenset()  # Host names the admin API serves (gateway/admin.py)

    @property
    def version(self) -> int:
        return self.directory.version

    # ------------------------------------------------------------------ authentication
    def anonymous_allowed_from(self, source: str, listener: str = "") -> bool:
        """`"loopback"`: the listener must be bound to loopback (when the gate knows its address) and the client
        must come from loopback too; the second check also covers listeners the gate was not told about."""
        if self.allow_anonymous == "loopback":
            host = self.listener_hosts.get(listener)
            if host is not None and not is_loopback_bind(host):
                return False
            return is_loopback(source)
        return bool(self.allow_anonymous)

    def authenticate(self, credentials: Credentials) -> Deferred[Principal]:
        source = credentials.source
        delay = self.throttle.delay(source)
        if delay > 0:
            later: Deferred[None] = Deferred()
            self.clock.callLater(delay, later.callback, None)
            return later.addCallback(lambda _: self._authenticate(credentials))
        return self._authenticate(credentials)

    def login_now(self, credentials: Credentials) -> Principal | None:
        """The principal of a login this gate admits on the spot (anonymous, certificate, loopback guest: no
        thread, no throttle delay), recorded exactly as `authenticate` records a success (throttle, audit); None
        when the answer needs `authenticate` (a password or token check, a throttled source, any refusal), which
        has then recorded nothing. Adapters skip the Deferred chain of a reconnect storm's logins with it."""
        if self.throttle.delay(credentials.source) > 0:
            return None
        decided = self._decide_now(credentials)
        if decided is None or decided[0] is None:
            return None
        principal, _refusal, mechanism, _user = decided
        self._record_success(credentials, principal, mechanism)
        return principal

    def _decide_now(self, credentials: Credentials) -> tuple[Principal | None, str, str, str] | None:
        """(principal or None, refusal, mechanism, audited user) of a login decided without a thread, or None when
        it needs one (a password, a token). Records nothing."""
        if credentials.mechanism == "certificate":
            return (self._certificate_principal(credentials), "no enabled user for this client certificate",
                    "certificate", credentials.certificate_identity)
        if (self.tokens is not None and credentials.mechanism in ("password", "anonymous", "token")
                and looks_like_jwt(credentials.password)):
            return None
        if credentials.mechanism == "token":
            return None, "bearer tokens are not enabled", "mechanism", ""
        if credentials.mechanism == "anonymous" or (not credentials.username and not credentials.password):
            return self._anonymous(credentials), "anonymous clients are not allowed here", "anonymous", ""
        if credentials.mechanism != "password":
            return None, f"authentication mechanism {credentials.mechanism!r} is not enabled", "mechanism", ""
        if credentials.username == GUEST and credentials.password == b"guest" and self.directory.user(GUEST) is None:
            if is_loopback(credentials.source) and self.allow_anonymous is not False:
                return self._anonymous(credentials), "", "guest", ""
            return None, "the guest user may only connect from loopback", "guest", ""
        return None

    def _authenticate(self, credentials: Credentials) -> Deferred[Principal]:
        decided = self._decide_now(credentials)
        if decided is not None:
            principal, refusal, mechanism, user = decided
            return self._settle(credentials, principal, refusal, mechanism, user=user)
        if self.tokens is not None and looks_like_jwt(credentials.password):
            return self._authenticate_token(credentials)
        name, password = credentials.username, credentials.password
        checked: Deferred[User | None] = self.run_in_thread(self.directory.authenticate, name, password)
        return checked.addCallback(
            lambda user: self._settle(credentials, None if user is None else self._principal(user, credentials),
                                      "bad user name or password", "password"))

    def _authenticate_token(self, credentials: Credentials) -> Deferred[Principal]:
        """Verify the bearer token off the reactor; its user must exist and be enabled (policies are the user's)."""
        assert self.tokens is not None
        checked: Deferred[VerifiedToken] = self.run_in_thread(self.tokens.verify, credentials.password,
                                                              credentials.username)

        def verified(token: VerifiedToken) -> Deferred[Principal]:
            user = self.directory.user(token.username)
            if user is None or not user.enabled:
                return self._settle(credentials, None, "the token's user is unknown or disabled", "token",
                                    cause="token_user", user=token.username)
            return self._settle(credentials, self._principal(user, credentials), "", "token", user=token.username)

        def refused(failure: Any) -> Deferred[Principal]:
            failure.trap(TokenError)
            error: TokenError = failure.value
            return self._settle(credentials, None, str(error), "token", cause=f"token_{error.cause}")

        return checked.addCallbacks(verified, refused)

    def _anonymous(self, credentials: Credentials) -> Principal | None:
        if not self.anonymous_allowed_from(credentials.source, credentials.listener):
            return None
        user = self.directory.user(ANONYMOUS_USER)
        if user is None or not user.enabled:
            return None
        return Principal(ANONYMOUS_USER, roles=role_set(user.roles), anonymous=True,
                         client_id=credentials.client_id)

    def _certificate_principal(self, credentials: Credentials) -> Principal | None:
        name = credentials.certificate_identity
        user = self.directory.user(name) if name and name != ANONYMOUS_USER else None
        if user is None or not user.enabled:
            return None
        return self._principal(user, credentials)

    @staticmethod
    def _principal(user: User, credentials: Credentials) -> Principal:
        return Principal(user.name, roles=role_set(user.roles), client_id=credentials.client_id)

    def _settle(self, credentials: Credentials, principal: Principal | None, refusal: str, mechanism: str, *,
                cause: str = "", user: str = "") -> Deferred[Principal]:
        """Record the outcome (throttle, audit, metrics) and answer. `cause` is a bounded word for metrics."""
        user = user or credentials.username
        if principal is None:
            cause = cause or {"password": "bad_password", "anonymous": "anonymous_refused"}.get(mechanism, mechanism)
            self.throttle.failed(credentials.source)
            self.metrics.login_failed(credentials.listener, cause)
            self.audit.login(ok=False, user=user, source=credentials.source, mechanism=mechanism,
                             listener=credentials.listener, client_id=credentials.client_id, reason=refusal)
            log.info("login refused: {user!r} from {source} on {listener}: {why}", user=user,
                     source=credentials.source, listener=credentials.listener, why=refusal)
            return fail(NotAuthenticated(refusal))
        self._record_success(credentials, principal, mechanism)
        return succeed(principal)

    def _record_success(self, credentials: Credentials, principal: Principal, mechanism: str) -> None:
        self.throttle.succeeded(credentials.source)
        self.audit.login(ok=True, user=principal.name, source=credentials.source, mechanism=mechanism,
                         listener=credentials.listener, client_id=credentials.client_id)

    def note_denial(self, principal: Principal, action: Action, resource: Resource, *, source: str = "",
                    listener: str = "", reason: str = "") -> None:
        """A session refused an action (core/session.py): count it and write a (rate-limited) audit line."""
        self.metrics.denied(listener, action.value)
        self.audit.denial(user=principal.name, action=action.value, resource=str(resource), source=source,
                          listener=listener, reason=reason)

    # ------------------------------------------------------------------ authorization
    def decide(self, principal: Principal, action: Action, resource: Resource, source: str) -> PolicyDecision:
        """The full decision, with the entry that made it (for `acl check` and audit)."""
        if principal.system:
            return PolicyDecision(True, None, "system")
        directory = self.directory
        user = directory.user(principal.name)
        if user is None or not user.enabled:
            return PolicyDecision(False, None, f"user {principal.name!r} is disabled or removed")
        if directory.is_superuser(user.name):
            return PolicyDecision(True, None, "super-user")
        return decide(directory.grants_for(user.name), action, resource, source, username=user.name,
                      client_id=principal.client_id)

    def check(self, principal: Principal, action: Action, resource: Resource, source: str) -> Decision:
        decision = self.decide(principal, action, resource, source)
        return Decision(decision.allowed, decision.reason)


def open_policy_gate(store: Any, clock: Any, *, allow_anonymous: str = "loopback", login_delay_ms: int = 200,
                     login_delay_max_ms: int = 10_000, login_delay_sources: int = 10_000, admin_hosts: str = "",
                     admin_password: str | None = None, run_in_thread: RunInThread = run_inline,
                     jwt_secret_file: str = "", jwt_jwks_file: str = "", jwt_audience: str = "",
                     jwt_issuer: str = "", jwt_username_claim: str = "sub", jwt_leeway_s: int = 30,
                     listener_hosts: Mapping[str, str] | None = None, audit: AuditLog | None = None,
                     metrics: SecurityMetrics | None = None) -> PolicyGate:
    """The broker's gate over its metadata store: load users/roles/policies, create the first-start defaults
    (and `admin` when `admin_password` is given), open the JWT verifier (a bad JWT setting raises
    `TokenConfigError` or `InsecureKeyFile`), and warn about anonymous clients on non-loopback listeners."""
    tokens = open_token_verifier(jwt_secret_file=jwt_secret_file, jwt_jwks_file=jwt_jwks_file,
                                 jwt_audience=jwt_audience, jwt_issuer=jwt_issuer,
                                 jwt_username_claim=jwt_username_claim, jwt_leeway_s=jwt_leeway_s)
    directory = SecurityDirectory(store)
    for created in directory.bootstrap(admin_password):
        log.info("security: first start created {what}", what=created)
    policy: AnonymousPolicy = {"loopback": "loopback", "true": True, "false": False}[allow_anonymous]
    hosts = dict(listener_hosts or {})
    exposed = sorted(name for name, host in hosts.items() if not is_loopback_bind(host))
    if policy is True:
        log.warn("security: allow_anonymous = true: clients from any address may connect without a password"
                 "{on}", on=f" (listeners on non-loopback addresses: {', '.join(exposed)})" if exposed else "")
    elif policy == "loopback" and exposed:
        log.info("security: anonymous clients are refused on {names} (bound to non-loopback addresses; "
                 "allow_anonymous = true would admit them)", names=", ".join(exposed))
    throttle = LoginThrottle(clock, base_delay_s=login_delay_ms / 1000, max_delay_s=login_delay_max_ms / 1000,
                             max_sources=login_delay_sources)
    gate = PolicyGate(directory, clock, allow_anonymous=policy, run_in_thread=run_in_thread, throttle=throttle,
                      tokens=tokens, listener_hosts=hosts, audit=audit, metrics=metrics)
    gate.admin_hosts = frozenset(h.strip().lower() for h in admin_hosts.split(",") if h.strip())
    return gate
