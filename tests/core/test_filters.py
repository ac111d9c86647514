"""Tag expressions: `*` or `A || B`, checked on the broker."""

import pytest

from tidegate.core.errors import InvalidFilter
from tidegate.core.filters import parse_tag_filter
from tidegate.core.model import tag_hash


@pytest.mark.parametrize("expr", [None, "", "*", "  *  ", "A || *"])
def test_star_and_empty_match_everything(expr):
    f = parse_tag_filter(expr)
    assert f.matches_all and f.matches("") and f.matches("X") and f.may_match_hash(123)


def test_or_expression_matches_listed_tags_only():
    f = parse_tag_filter("TagA || TagB")
    assert f.matches("TagA") and f.matches("TagB")
    assert not f.matches("TagC") and not f.matches("")
    assert f.may_match_hash(tag_hash("TagA"))
    assert not f.may_match_hash(tag_hash("TagC"))


@pytest.mark.parametrize("expr", ["A ||", "|| B", "A |||| B", "x" * 300])
def test_malformed_expressions_raise_invalid_filter(expr):
    with pytest.raises(InvalidFilter):
        parse_tag_filter(expr)
