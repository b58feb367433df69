"""The ``where`` grammar: parsing, evaluation over listing attributes, and clear errors."""

from __future__ import annotations

import pytest

from lookalike.engine import ListingTable, parse_where
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
