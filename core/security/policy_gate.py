"""PolicyGate: the `Gate` of a broker with users, roles and policies (core/security/users.py, policy.py).

Authentication:
- a user name and password: the scrypt check runs through `run_in_thread` (off the reactor in the broker;
  tests pass an inline runner), then the user must exist, be enabled and match;
- no user name: the user `anonymous`, if `allow_anonymous` lets this source in (`"loopback"`, the default, means
  127.0.0.0/8 and ::1 only; `True` everywhere; `False` never) and that user exists and is enabled;
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

import ipaddress
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.logger import Logger

from tidegate.core.errors import NotAuthenticated
from tidegate.core.security.gate import Action, Credentials, Decision, Principal, Resource
from tidegate.core.security.policy import PolicyDecision, decide
from tidegate.core.security.users import ANONYMOUS_USER, SecurityDirectory, User

log = Logger(namespace="tidegate.security")

AnonymousPolicy = Literal["loopback"] | bool
RunInThread = Callable[..., Deferred[Any]]
GUEST = "guest"


def is_loopback(source: str) -> bool:
    try:
        address = ipaddress.ip_address(source.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def run_inline(function: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """A `run_in_thread` that runs on the calling thread (tests, tools)."""
    return maybeDeferred(function, *args)


@dataclass
class _Failures:
    count: int
    last: float


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
                 run_in_thread: RunInThread = run_inline, throttle: LoginThrottle | None = None) -> None:
        if allow_anonymous not in ("loopback", True, False):
            raise ValueError(f"allow_anonymous must be 'loopback', true or false, not {allow_anonymous!r}")
        self.directory = directory
        self.clock = clock
        self.allow_anonymous = allow_anonymous
        self.run_in_thread = run_in_thread
        self.throttle = throttle if throttle is not None else LoginThrottle(clock)
        self.admin_hosts: frozenset[str] = frozenset()  # Host names the admin API serves (gateway/admin.py)

    @property
    def version(self) -> int:
        return self.directory.version

    # ------------------------------------------------------------------ authentication
    def anonymous_allowed_from(self, source: str) -> bool:
        if self.allow_anonymous == "loopback":
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

    def _authenticate(self, credentials: Credentials) -> Deferred[Principal]:
        source = credentials.source
        if credentials.mechanism == "certificate":
            return self._settle(credentials, self._certificate_principal(credentials),
                                "no enabled user for this client certificate")
        if credentials.mechanism == "anonymous" or (not credentials.username and not credentials.password):
            return self._settle(credentials, self._anonymous(credentials), "anonymous clients are not allowed here")
        if credentials.mechanism != "password":
            return self._settle(credentials, None, f"authentication mechanism {credentials.mechanism!r} is not enabled")
        name, password = credentials.username, credentials.password
        if name == GUEST and password == b"guest" and self.directory.user(GUEST) is None:
            if is_loopback(source) and self.allow_anonymous is not False:
                return self._settle(credentials, self._anonymous(credentials), "")
            return self._settle(credentials, None, "the guest user may only connect from loopback")
        checked: Deferred[User | None] = self.run_in_thread(self.directory.authenticate, name, password)
        return checked.addCallback(
            lambda user: self._settle(credentials, None if user is None else self._principal(user, credentials),
                                      "bad user name or password"))

    def _anonymous(self, credentials: Credentials) -> Principal | None:
        if not self.anonymous_allowed_from(credentials.source):
            return None
        user = self.directory.user(ANONYMOUS_USER)
        if user is None or not user.enabled:
            return None
        return Principal(ANONYMOUS_USER, roles=frozenset(user.roles), anonymous=True,
                         client_id=credentials.client_id)

    def _certificate_principal(self, credentials: Credentials) -> Principal | None:
        name = credentials.certificate_identity
        user = self.directory.user(name) if name and name != ANONYMOUS_USER else None
        if user is None or not user.enabled:
            return None
        return self._principal(user, credentials)

    @staticmethod
    def _principal(user: User, credentials: Credentials) -> Principal:
        return Principal(user.name, roles=frozenset(user.roles), client_id=credentials.client_id)

    def _settle(self, credentials: Credentials, principal: Principal | None, refusal: str) -> Deferred[Principal]:
        if principal is None:
            self.throttle.failed(credentials.source)
            log.info("login refused: {user!r} from {source} on {listener}: {why}", user=credentials.username,
                     source=credentials.source, listener=credentials.listener, why=refusal)
            return fail(NotAuthenticated(refusal))
        self.throttle.succeeded(credentials.source)
        return succeed(principal)

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
                     admin_password: str | None = None, run_in_thread: RunInThread = run_inline) -> PolicyGate:
    """The broker's gate over its metadata store: load users/roles/policies, create the first-start defaults
    (and `admin` when `admin_password` is given), and warn when anonymous clients are accepted from anywhere."""
    directory = SecurityDirectory(store)
    for created in directory.bootstrap(admin_password):
        log.info("security: first start created {what}", what=created)
    policy: AnonymousPolicy = {"loopback": "loopback", "true": True, "false": False}[allow_anonymous]
    if policy is True:
        log.warn("security: allow_anonymous = true: clients from any address may connect without a password")
    throttle = LoginThrottle(clock, base_delay_s=login_delay_ms / 1000, max_delay_s=login_delay_max_ms / 1000,
                             max_sources=login_delay_sources)
    gate = PolicyGate(directory, clock, allow_anonymous=policy, run_in_thread=run_in_thread, throttle=throttle)
    gate.admin_hosts = frozenset(h.strip().lower() for h in admin_hosts.split(",") if h.strip())
    return gate
