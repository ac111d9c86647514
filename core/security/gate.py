"""The gate's vocabulary and call shape: principals, actions, resources, decisions.

Authorization is one pure decision `gate.check(principal, action, resource, source) -> Decision` (RocketMQ ACL 2.0
style: resource types Topic/Group/Cluster, actions Pub/Sub/Create/Update/Delete/Get/List). Authentication is
`gate.authenticate(credentials) -> Deferred[Principal]`, asynchronous so that a password hash or a token check can
run off the reactor thread; adapters hold a connection's later frames until it fires (adapters/base.py). A gate
may also offer `login_now(credentials) -> Principal | None`: the principal of a login it admits on the spot (no
thread, no delay), recorded like a success of `authenticate`, or None to take the asynchronous path; adapters use it
to skip the Deferred chain per login (a reconnect storm of anonymous or certificate clients).

`AllowAllGate` is the policy of a broker without users: every authenticated connection may do everything except
reach adapter-private topics, which the session refuses before the gate is asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple, Protocol

from twisted.internet.defer import Deferred, succeed


class Action(StrEnum):
    PUB = "Pub"
    SUB = "Sub"
    CREATE = "Create"
    UPDATE = "Update"
    DELETE = "Delete"
    GET = "Get"
    LIST = "List"


class ResourceType(StrEnum):
    TOPIC = "Topic"  # name = the full name as MQTT writes it: `topic` or `topic/sub/ject`
    GROUP = "Group"
    CLUSTER = "Cluster"


@dataclass(frozen=True, slots=True)
class Resource:
    type: ResourceType
    name: str
    pattern: bool = False  # the name is a subscription filter (`+`/`#`): granted only where every match is

    def __str__(self) -> str:
        return f"{self.type.value}:{self.name}"

    @classmethod
    def topic(cls, full_name: str) -> Resource:
        return cls(ResourceType.TOPIC, full_name)

    @classmethod
    def topic_filter(cls, pattern: str) -> Resource:
        return cls(ResourceType.TOPIC, pattern, pattern=True)

    @classmethod
    def group(cls, name: str) -> Resource:
        return cls(ResourceType.GROUP, name)


CLUSTER = Resource(ResourceType.CLUSTER, "*")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a connection acts as. `system` principals are the broker itself (adapter housekeeping, wills)."""

    name: str
    roles: frozenset[str] = frozenset()
    system: bool = False
    anonymous: bool = False
    client_id: str = ""  # the connection's client id, for `${client_id}` in policy entries

    def __str__(self) -> str:
        return self.name


SYSTEM = Principal("%system%", system=True)
ANONYMOUS = Principal("anonymous", anonymous=True)


class Credentials(NamedTuple):
    """What a client presented at CONNECT/HELLO/connection.start-ok.

    A NamedTuple, not a frozen dataclass: one is made per login (every CONNECT of a reconnect storm), and a frozen
    dataclass sets each of its 7 fields through `object.__setattr__`, several times the cost of building a tuple.
    Immutable all the same; callers pass the mechanism first and the rest by keyword."""

    mechanism: str  # "anonymous", "password", "certificate", "token"
    username: str = ""
    password: bytes = b""
    client_id: str = ""
    certificate_identity: str = ""
    source: str = ""
    listener: str = ""


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.allowed


ALLOW = Decision(True)


class Gate(Protocol):
    """Authentication and authorization for every protocol. `version` changes whenever policies, users or roles
    change, so sessions may cache decisions until it moves."""

    version: int

    def authenticate(self, credentials: Credentials) -> Deferred[Principal]:
        """Fires with the principal, or fails with `NotAuthenticated`."""

    def check(self, principal: Principal, action: Action, resource: Resource, source: str) -> Decision:
        """Allow or deny one action; pure, cheap, called on the reactor thread."""


class AllowAllGate:
    """No users, no policies: anyone who connects is `anonymous` (or the name they gave) and may do anything."""

    version = 0

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "authenticate" in cls.__dict__ and "login_now" not in cls.__dict__:
            cls.login_now = None  # type: ignore[assignment]  # its own authenticate is the only way in

    def authenticate(self, credentials: Credentials) -> Deferred[Principal]:
        return succeed(AllowAllGate.login_now(self, credentials))

    def login_now(self, credentials: Credentials) -> Principal:
        """Every login is admitted on the spot."""
        return Principal(credentials.username) if credentials.username else ANONYMOUS

    def check(self, principal: Principal, action: Action, resource: Resource, source: str) -> Decision:
        return ALLOW
