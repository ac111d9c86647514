"""Tag filter expressions evaluated on the broker: `*` (everything) or `TagA || TagB`.

Index entries carry a 63-bit hash of the tag, so most non-matching messages are skipped without reading the log;
the tag itself is compared after reading because hashes may collide.
"""

from __future__ import annotations

from dataclasses import dataclass

from tidegate.core.errors import InvalidFilter
from tidegate.core.model import MAX_TAG_BYTES, tag_hash


@dataclass(slots=True, frozen=True)
class TagFilter:
    expression: str
    tags: frozenset[str] | None  # None matches every message
    hashes: frozenset[int] | None

    @property
    def matches_all(self) -> bool:
        return self.tags is None

    def may_match_hash(self, h: int) -> bool:
        return self.hashes is None or h in self.hashes

    def matches(self, tag: str) -> bool:
        return self.tags is None or tag in self.tags


MATCH_ALL = TagFilter("*", None, None)


def parse_tag_filter(expression: str | None) -> TagFilter:
    """Parse a RocketMQ tag expression. Raises InvalidFilter naming the offending part."""
    if expression is None:
        return MATCH_ALL
    text = expression.strip()
    if text in ("", "*"):
        return MATCH_ALL
    tags = []
    for part in text.split("||"):
        tag = part.strip()
        if not tag:
            raise InvalidFilter(f"invalid tag expression {expression!r}: empty tag between '||'")
        if tag == "*":
            return MATCH_ALL
        if len(tag.encode("utf-8", "surrogatepass")) > MAX_TAG_BYTES:
            raise InvalidFilter(f"invalid tag expression {expression!r}: tag longer than {MAX_TAG_BYTES} bytes")
        tags.append(tag)
    return TagFilter(text, frozenset(tags), frozenset(tag_hash(t) for t in tags))
