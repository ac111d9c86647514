"""The pure authorization decision, RocketMQ ACL 2.0 style.

A policy entry says: `Allow`/`Deny` these actions (`Pub`, `Sub`, `Create`, `Update`, `Delete`, `Get`, `List`, `All`)
on resources matching `Topic:<pattern>`, `Group:<pattern>` or `Cluster:*`, optionally only from some source CIDRs.
Users and roles carry entries; `decide` picks, among the entries that match a request, the **most specific** one
(a literal name beats any pattern; among patterns, more literal characters beat fewer); **Deny wins ties** and no
match means deny.

Patterns: a literal name; a prefix ending in `*` (`orders*`, or `*` for anything); MQTT wildcards `+` (one whole
level) and `#` (the last level: the parent and everything under it). `${username}` and `${client_id}` are
substituted first. A substituted value containing `/`, `+`, `#` or `*` (or an empty one) would widen the entry into
other clients' names (client id `a/b` under `telemetry/${client_id}/#` writes into client `a`'s space), so an Allow
entry with such a value does not match at all, and a Deny entry is widened instead (cut at the placeholder and
turned into a prefix): both fail closed.

A subscription filter (`Resource.pattern=True`) is granted only where every topic it can match is allowed: some
Allow entry must cover the whole filter, and no Deny entry as specific or more that shares a topic with it. Patterns
are regular languages over a tiny alphabet, so covering and overlapping are decided exactly on small automata.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import lru_cache
from typing import Any

from tidegate.core.security.gate import Action, Resource, ResourceType

ALL_ACTIONS = "All"
ACTION_NAMES: dict[str, str] = {a.value.lower(): a.value for a in Action} | {"all": ALL_ACTIONS}
PLACEHOLDER = re.compile(r"\$\{(username|client_id)\}")
UNSAFE_IN_PLACEHOLDER = frozenset("/+#*")
MAX_FILTER_CHARS = 512  # longer subscription filters are granted only by match-everything entries


class PolicyError(ValueError):
    """A policy entry that cannot mean anything sound (bad resource, pattern, action, effect or CIDR)."""


class Effect(StrEnum):
    ALLOW = "Allow"
    DENY = "Deny"


# --------------------------------------------------------------------------------------------- patterns
class _Seg:
    """Any run of characters without `/` (MQTT `+`)."""

    def __repr__(self) -> str:
        return "SEG"


class _Any:
    """Any run of characters (trailing `*`, and what follows `/` in a trailing `#`)."""

    def __repr__(self) -> str:
        return "ANY"


SEG, ANY = _Seg(), _Any()
Item = str | _Seg | _Any
_OTHER = object()  # stands for every character that no pattern in a comparison names


@dataclass(frozen=True, slots=True)
class Pattern:
    """A compiled pattern: a union of item sequences (a trailing `#` is two: the parent, and everything under it)."""

    text: str
    sequences: tuple[tuple[Item, ...], ...]
    literal: bool
    literal_chars: int

    @property
    def specificity(self) -> tuple[int, int]:
        return (1 if self.literal else 0, self.literal_chars)

    def matches(self, name: str) -> bool:
        return _regex(self.sequences).fullmatch(name) is not None


@lru_cache(maxsize=4096)
def _regex(sequences: tuple[tuple[Item, ...], ...]) -> re.Pattern[str]:
    """The regular expression of a pattern, made when a name is first matched against it: a subscription filter is
    only compared with policy patterns (`covers`/`overlaps` walk the sequences), so it never pays for one, and a
    storm of clients with their own filters does not compile one each (about 0.2 ms per regex)."""
    return re.compile("|".join("".join(_regex_item(item) for item in seq) for seq in sequences), re.DOTALL)


def _level_items(level: str, allow_star: bool, last: bool) -> list[Item]:
    if level == "+":
        return [SEG]
    if "+" in level or "#" in level:
        raise PolicyError(f"'+' and '#' must be a whole level, not part of {level!r}")
    if "*" in level:
        if not allow_star or not last or level.index("*") != len(level) - 1:
            raise PolicyError("'*' may only end a pattern (a prefix)")
        return [*level[:-1], ANY]
    return list(level)


@lru_cache(maxsize=4096)
def compile_pattern(text: str, *, mqtt_filter: bool = False) -> Pattern:
    """Compile an ACL pattern (or, with `mqtt_filter`, a subscription filter, where `*` is an ordinary character)."""
    levels = text.split("/")
    head: list[Item] = []
    tail_hash = False
    for index, level in enumerate(levels):
        last = index == len(levels) - 1
        if level == "#":
            if not last:
                raise PolicyError("'#' may only be the last level")
            tail_hash = True
            break
        if index:
            head.append("/")
        if mqtt_filter and "*" in level and level != "+":
            if "+" in level or "#" in level:
                raise PolicyError(f"'+' and '#' must be a whole level, not part of {level!r}")
            head.extend(level)
        else:
            head.extend(_level_items(level, allow_star=not mqtt_filter, last=last))
    sequences: list[tuple[Item, ...]]
    if tail_hash:
        if head:  # `a/#` matches `a` and everything under `a/`
            sequences = [tuple(head), (*head, "/", ANY)]
        else:
            sequences = [(ANY,)]
    else:
        sequences = [tuple(head)]
    wild = sum(1 for seq in sequences[-1:] for item in seq if not isinstance(item, str))
    literal_chars = sum(1 for item in sequences[-1] if isinstance(item, str))
    return Pattern(text, tuple(sequences), literal=wild == 0 and not tail_hash, literal_chars=literal_chars)


def _regex_item(item: Item) -> str:
    if item is SEG:
        return "[^/]*"
    if item is ANY:
        return ".*"
    assert isinstance(item, str)
    return re.escape(item)


# --------------------------------------------------------------------------------------------- automata
State = frozenset[tuple[int, int]]


def _closure(pattern: Pattern, states: Iterable[tuple[int, int]]) -> State:
    out: set[tuple[int, int]] = set()
    todo = list(states)
    while todo:
        seq_index, pos = todo.pop()
        if (seq_index, pos) in out:
            continue
        out.add((seq_index, pos))
        seq = pattern.sequences[seq_index]
        if pos < len(seq) and not isinstance(seq[pos], str):
            todo.append((seq_index, pos + 1))
    return frozenset(out)


def _start(pattern: Pattern) -> State:
    return _closure(pattern, [(i, 0) for i in range(len(pattern.sequences))])


def _step(pattern: Pattern, states: State, symbol: object) -> State:
    nxt: list[tuple[int, int]] = []
    for seq_index, pos in states:
        seq = pattern.sequences[seq_index]
        if pos >= len(seq):
            continue
        item = seq[pos]
        if item is ANY or (item is SEG and symbol != "/"):
            nxt.append((seq_index, pos))
        elif isinstance(item, str) and item == symbol:
            nxt.append((seq_index, pos + 1))
    return _closure(pattern, nxt)


def _accepting(pattern: Pattern, states: State) -> bool:
    return any(pos == len(pattern.sequences[i]) for i, pos in states)


def _alphabet(*patterns: Pattern) -> list[object]:
    chars = {item for p in patterns for seq in p.sequences for item in seq if isinstance(item, str)}
    return [*sorted(chars | {"/"}), _OTHER]


def _explore(a: Pattern, b: Pattern) -> Iterable[tuple[State, State]]:
    """Every pair of (deterministic) states both patterns reach on some common input."""
    alphabet = _alphabet(a, b)
    start = (_start(a), _start(b))
    seen = {start}
    todo = [start]
    while todo:
        pair = todo.pop()
        yield pair
        for symbol in alphabet:
            nxt = (_step(a, pair[0], symbol), _step(b, pair[1], symbol))
            if nxt[0] and nxt not in seen:  # once `a` is dead nothing more of it can be matched
                seen.add(nxt)
                todo.append(nxt)


@lru_cache(maxsize=4096)
def covers(outer: Pattern, inner: Pattern) -> bool:
    """Whether every name `inner` matches is matched by `outer`."""
    if outer.sequences == ((ANY,),):
        return True
    return not any(_accepting(inner, i) and not _accepting(outer, o) for i, o in _explore(inner, outer))


@lru_cache(maxsize=4096)
def overlaps(a: Pattern, b: Pattern) -> bool:
    """Whether some name is matched by both."""
    if a.sequences == ((ANY,),) or b.sequences == ((ANY,),):
        return True  # every pattern matches at least one name
    return any(_accepting(a, x) and _accepting(b, y) for x, y in _explore(a, b))


# --------------------------------------------------------------------------------------------- entries
def parse_resource(text: str) -> tuple[ResourceType, str]:
    kind, sep, pattern = text.partition(":")
    types = {t.value.lower(): t for t in ResourceType}
    if not sep or kind.lower() not in types:
        raise PolicyError(f"resource {text!r} must be Topic:<pattern>, Group:<pattern> or Cluster:*")
    resource_type = types[kind.lower()]
    if not pattern:
        raise PolicyError(f"resource {text!r} has an empty pattern")
    if resource_type is ResourceType.CLUSTER and pattern != "*":
        raise PolicyError("the cluster resource is written Cluster:*")
    # the placeholders stand for one safe level: validate the pattern with a neutral value in their place
    compile_pattern(PLACEHOLDER.sub("x", pattern))
    return resource_type, pattern


def parse_actions(actions: Iterable[str] | str) -> frozenset[str]:
    names = [a.strip() for a in (actions.split(",") if isinstance(actions, str) else actions) if a.strip()]
    if not names:
        raise PolicyError("a policy entry needs at least one action")
    out = set()
    for name in names:
        canonical = ACTION_NAMES.get(name.lower())
        if canonical is None:
            raise PolicyError(f"unknown action {name!r} (Pub, Sub, Create, Update, Delete, Get, List, All)")
        out.add(canonical)
    return frozenset(out)


def parse_effect(effect: str) -> Effect:
    for candidate in Effect:
        if candidate.value.lower() == effect.lower():
            return candidate
    raise PolicyError(f"decision {effect!r} must be Allow or Deny")


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_sources(sources: Iterable[str]) -> tuple[Network, ...]:
    out = []
    for cidr in sources:
        try:
            out.append(ipaddress.ip_network(cidr.strip(), strict=False))
        except ValueError:
            raise PolicyError(f"source {cidr!r} is not an address or CIDR") from None
    return tuple(out)


@dataclass(frozen=True, slots=True)
class PolicyEntry:
    """One Allow/Deny line. Build with `PolicyEntry.create(...)`, which validates every field."""

    resource: str
    actions: frozenset[str]
    effect: Effect
    sources: tuple[str, ...] = ()
    resource_type: ResourceType = field(default=ResourceType.TOPIC, compare=False)
    pattern: str = field(default="", compare=False)
    networks: tuple[Network, ...] = field(default=(), compare=False)

    @classmethod
    def create(cls, resource: str, actions: Iterable[str] | str, effect: str | Effect,
               sources: Iterable[str] = ()) -> PolicyEntry:
        resource_type, pattern = parse_resource(resource)
        sources = tuple(s.strip() for s in sources if s.strip())
        return cls(resource=f"{resource_type.value}:{pattern}", actions=parse_actions(actions),
                   effect=parse_effect(effect) if isinstance(effect, str) else effect, sources=sources,
                   resource_type=resource_type, pattern=pattern, networks=parse_sources(sources))

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> PolicyEntry:
        return cls.create(row["resource"], row["actions"], row["decision"], row.get("sources") or ())

    def to_dict(self) -> dict[str, Any]:
        order = [a.value for a in Action] + [ALL_ACTIONS]
        return {"resource": self.resource, "actions": sorted(self.actions, key=order.index),
                "decision": self.effect.value, "sources": list(self.sources)}

    def applies_to(self, action: Action) -> bool:
        return ALL_ACTIONS in self.actions or action.value in self.actions

    def from_source(self, source: str) -> bool:
        """Whether the entry applies from `source`. An unknown source (no address) is outside every Allow CIDR
        but inside every Deny CIDR: fail closed."""
        if not self.networks:
            return True
        try:
            address = ipaddress.ip_address(source.split("%", 1)[0])
        except ValueError:
            return self.effect is Effect.DENY
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address.version == net.version and address in net for net in self.networks)

    def pattern_for(self, username: str, client_id: str) -> Pattern | None:
        """The entry's pattern for this principal, or None if it cannot apply to them (see the module doc)."""
        if "${" not in self.pattern:
            return compile_pattern(self.pattern)
        values = {"username": username, "client_id": client_id}
        unsafe = [m for m in PLACEHOLDER.finditer(self.pattern)
                  if not values[m.group(1)] or UNSAFE_IN_PLACEHOLDER & set(values[m.group(1)])]
        if unsafe:
            if self.effect is Effect.ALLOW:
                return None
            # a Deny that cannot be written exactly covers everything from the placeholder on
            cut = PLACEHOLDER.sub(lambda m: values[m.group(1)], self.pattern[:unsafe[0].start()])
            return _widened(cut)
        return compile_pattern(PLACEHOLDER.sub(lambda m: values[m.group(1)], self.pattern))


def _widened(prefix: str) -> Pattern:
    """A prefix pattern `prefix*` even if the prefix holds wildcard characters (they stay literal here, and `*`
    makes the pattern cover them anyway)."""
    literal = prefix.replace("+", "").replace("#", "").replace("*", "")
    seq = (*literal, ANY) if literal == prefix else (ANY,)
    return Pattern(prefix + "*", (seq,), literal=False, literal_chars=len(seq) - 1)


# --------------------------------------------------------------------------------------------- decision
@dataclass(frozen=True, slots=True)
class Grant:
    """A policy entry and whose it is (`user:alice`, `role:devices`)."""

    owner: str
    entry: PolicyEntry


@dataclass(frozen=True, slots=True)
class PolicyDecision:
    allowed: bool
    grant: Grant | None = None
    reason: str = ""

    def __bool__(self) -> bool:
        return self.allowed

    def to_dict(self) -> dict[str, Any]:
        entry = None if self.grant is None else {"owner": self.grant.owner, **self.grant.entry.to_dict()}
        return {"decision": "allow" if self.allowed else "deny", "entry": entry, "reason": self.reason}


def decide(grants: Sequence[Grant], action: Action, resource: Resource, source: str, *, username: str,
           client_id: str = "", superuser: bool = False) -> PolicyDecision:
    """The decision for one request. Pure: same inputs, same answer."""
    if superuser:
        return PolicyDecision(True, None, "super-user")
    candidates: list[tuple[Grant, Pattern]] = []
    for grant in grants:
        entry = grant.entry
        if entry.resource_type is not resource.type or not entry.applies_to(action) or not entry.from_source(source):
            continue
        pattern = entry.pattern_for(username, client_id)
        if pattern is not None:
            candidates.append((grant, pattern))
    if resource.type is ResourceType.TOPIC and resource.pattern:
        return _decide_filter(candidates, resource.name)
    matched = [(g, p) for g, p in candidates if p.matches(resource.name)]
    if not matched:
        return PolicyDecision(False, None, "no policy entry matches")
    best = max(p.specificity for _, p in matched)
    top = [g for g, p in matched if p.specificity == best]
    for grant in top:
        if grant.entry.effect is Effect.DENY:
            return PolicyDecision(False, grant, "denied by policy")
    return PolicyDecision(True, top[0], "allowed by policy")


def _matches_everything(pattern: Pattern) -> bool:
    return pattern.sequences == ((ANY,),)


def _decide_filter(candidates: list[tuple[Grant, Pattern]], filter_text: str) -> PolicyDecision:
    try:
        wanted = compile_pattern(filter_text, mqtt_filter=True)
    except PolicyError as exc:
        return PolicyDecision(False, None, f"malformed filter: {exc}")
    if len(filter_text) > MAX_FILTER_CHARS and not all(_matches_everything(p) for _, p in candidates):
        # the automata grow with the filter; a client must not stall the reactor with a 64 KiB filter
        return PolicyDecision(False, None, f"filter longer than {MAX_FILTER_CHARS} characters")
    denies = [(g, p) for g, p in candidates if g.entry.effect is Effect.DENY and overlaps(p, wanted)]
    best: tuple[Grant, Pattern] | None = None
    for grant, pattern in candidates:
        if grant.entry.effect is Effect.ALLOW and covers(pattern, wanted):
            if best is None or pattern.specificity > best[1].specificity:
                best = (grant, pattern)
    if best is None:
        if denies:
            return PolicyDecision(False, denies[0][0], "denied by policy")
        return PolicyDecision(False, None, "no policy entry allows every topic the filter matches")
    for grant, pattern in denies:
        if pattern.specificity >= best[1].specificity:
            return PolicyDecision(False, grant, "denied by policy for some topics the filter matches")
    return PolicyDecision(True, best[0], "allowed by policy")
