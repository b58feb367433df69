"""The ``where`` grammar: parsing, evaluation over listing attributes, and clear errors."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lookalike.engine import ListingTable, parse_where
from lookalike.engine.filters import MAX_WHERE_DEPTH, MAX_WHERE_LENGTH
from lookalike.errors import QueryError
from lookalike.types import ListingRecord


@pytest.fixture
def table() -> ListingTable:
    t = ListingTable()
    t.update(
        [
            ListingRecord("truck-1", {"stock_level": 3, "color": "red", "price": 12000.5}),
            ListingRecord("truck-2", {"stock_level": 0, "color": "blue", "new": True}),
            ListingRecord("truck-3", {"color": "red", "price": "9000"}),
            ListingRecord("car-1", {"stock_level": -1, "new": False}),
        ]
    )
    return t


def selected(table: ListingTable, text: str) -> list[str]:
    mask = parse_where(text).mask(table)
    return [lid for lid, keep in zip(table.ids, mask, strict=True) if keep]


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("stock_level > 0", ["truck-1"]),
        ("stock_level >= 0", ["truck-1", "truck-2"]),
        ("stock_level != 0", ["truck-1", "car-1"]),
        ("stock_level <> 0", ["truck-1", "car-1"]),
        ("stock_level = -1", ["car-1"]),
        ("color = 'red'", ["truck-1", "truck-3"]),
        ('color == "blue"', ["truck-2"]),
        ("color = 'red' and price < 10000", ["truck-3"]),
        ("color = 'blue' or stock_level > 2", ["truck-1", "truck-2"]),
        ("NOT (color = 'red')", ["truck-2", "car-1"]),
        ("listing_id in ('truck-2', 'car-1')", ["truck-2", "car-1"]),
        ("listing_id not in ('truck-2', 'car-1')", ["truck-1", "truck-3"]),
        ("stock_level is null", ["truck-3"]),
        ("stock_level is not null and new = false", ["car-1"]),
        ("new = true", ["truck-2"]),
        ("price > 1e4", ["truck-1"]),
        ("color > 'blue'", ["truck-1", "truck-3"]),
        ("(stock_level > 0 or new = true) and color = 'blue'", ["truck-2"]),
        ("missing_attr_on_some = 1 or stock_level > 2", ["truck-1"]),
    ],
)
def test_where_selects(table, text, want):
    assert selected(table, text) == want


def test_missing_attribute_compares_false_both_ways(table):
    assert "truck-3" not in selected(table, "stock_level > 0")
    assert "truck-3" not in selected(table, "stock_level <= 0")


def test_and_binds_tighter_than_or(table):
    assert selected(table, "color = 'blue' or color = 'red' and stock_level > 0") == [
        "truck-1",
        "truck-2",
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("stock_level >", "expected a value at the end"),
        ("stock_level > 0 and", "expected an attribute name"),
        ("stock_level ~ 3", "unexpected character '~' at column 13"),
        ("(stock_level > 0", "expected '\\)'"),
        ("stock_level > 0 0", "unexpected token at column 17"),
        ("__import__('os').system('x')", "unexpected character '.' at column 17"),
        ("__import__ ('os')", "comparison operator"),
        ("stock_level is 3", "expected 'null'"),
        ("color not = 'red'", "expected 'in'"),
    ],
)
def test_syntax_errors_are_clear(text, message):
    with pytest.raises(QueryError, match=message):
        parse_where(text)


def test_names_lists_the_attributes_read():
    assert parse_where("a > 1 and (b = 'x' or not c is null)").names() == {"a", "b", "c"}


# ---------------------------------------------------------------------- hostile input (issue 17)


def test_deep_nesting_is_a_query_error_not_a_recursion_error():
    # 330 levels (675 characters) used to blow the stack with RecursionError
    for text in ("(" * 330 + "a = 1" + ")" * 330, "not " * 1000 + "a = 1", "(" * 4000):
        with pytest.raises(QueryError) as info:
            parse_where(text)
        message = str(info.value)
        assert "\n" not in message
        assert f"nested deeper than {MAX_WHERE_DEPTH} levels" in message


def test_nesting_up_to_the_limit_is_accepted(table):
    deepest = "(" * MAX_WHERE_DEPTH + "stock_level > 0" + ")" * MAX_WHERE_DEPTH
    assert selected(table, deepest) == ["truck-1"]
    assert selected(table, "not " * MAX_WHERE_DEPTH + "stock_level > 0") == ["truck-1"]
    mixed = "not (" * (MAX_WHERE_DEPTH // 2) + "stock_level > 0" + ")" * (MAX_WHERE_DEPTH // 2)
    assert selected(table, mixed) == ["truck-1"]
    with pytest.raises(QueryError, match=f"nested deeper than {MAX_WHERE_DEPTH} levels"):
        parse_where("(" * (MAX_WHERE_DEPTH + 1) + "stock_level > 0" + ")" * (MAX_WHERE_DEPTH + 1))
    with pytest.raises(QueryError, match=f"nested deeper than {MAX_WHERE_DEPTH} levels"):
        parse_where("not " * (MAX_WHERE_DEPTH + 1) + "stock_level > 0")


def test_long_expressions_are_refused_with_the_limit_named():
    near = " or ".join(["a = 1"] * 400)
    assert len(near) <= MAX_WHERE_LENGTH
    parse_where(near)  # long and flat is fine
    too_long = near + " or a = 1" * 100
    with pytest.raises(QueryError, match=f"the limit is {MAX_WHERE_LENGTH}"):
        parse_where(too_long)


@pytest.mark.parametrize("value", [None, 3, b"a = 1", ["a = 1"]])
def test_non_strings_are_a_query_error(value):
    with pytest.raises(QueryError, match="expected a string"):
        parse_where(value)


_PIECES = st.sampled_from(
    [
        "(",
        ")",
        "not ",
        " and ",
        " or ",
        "a",
        " = ",
        "1",
        "'x'",
        '"y',
        ",",
        " in ",
        " is ",
        "null",
        "1e999",
        "-",
        ".",
        "\\",
        "'",
        "\n",
        "\x00",
        "\u202e",
        "\ud800",
        " ",
    ]
)


def _only_query_errors(text: str) -> None:
    try:
        expr = parse_where(text)
    except QueryError as exc:
        assert "\n" not in str(exc)
    else:
        assert isinstance(expr.names(), set)


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=300))
def test_random_text_raises_only_query_errors(text):
    _only_query_errors(text)


@settings(max_examples=400, deadline=None)
@given(st.lists(_PIECES, max_size=200).map("".join))
def test_random_token_soup_raises_only_query_errors(text):
    _only_query_errors(text)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 3000), st.integers(0, 3000), st.sampled_from(["(", "not ", "not ("]))
def test_random_deep_nesting_raises_only_query_errors(opens, closes, opener):
    _only_query_errors(opener * opens + "a = 1" + ")" * closes)
