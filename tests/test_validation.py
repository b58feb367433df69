"""Hostile input at the catalog (issue 17, items 3 and 8): ids, listing attributes, zero query
vectors and messages are checked once, here, so every face (CLI, HTTP, stream) refuses them
with the project's own errors. Store-facing checks run on SQLite and PostgreSQL."""

from __future__ import annotations

import io
import math
import re

import numpy as np
import pytest
from PIL import Image

import lookalike
from lookalike.catalog.validate import (
    MAX_ATTR_NAME_LENGTH,
    MAX_ATTR_TEXT_LENGTH,
    catalog_name,
)
from lookalike.errors import LookalikeError, NotFoundError, QueryError
from lookalike.images import ImageSource
from lookalike.types import MAX_ID_LENGTH, ModelInfo, WriteStatus, id_problem

MODEL = ModelInfo("external", "1", 4)

#: Ids every write path must refuse, with a word the message must contain.
BAD_IDS = [
    ("", "empty"),
    ("   ", "only whitespace"),
    ("\t\n", "only whitespace"),
    ("a" * (MAX_ID_LENGTH + 1), f"the limit is {MAX_ID_LENGTH}"),
    ("evil\u202egpj.exe", "U+202E"),
    ("x\u2066y", "U+2066"),
    ("del\x7f", "U+007F"),
    ("nul\x00byte", "U+0000"),
    ("line\nbreak", "U+000A"),
    ("c1\x85", "U+0085"),
    ("lone\ud800surrogate", "U+D800"),
]
GOOD_IDS = ["truck-17", "a" * MAX_ID_LENGTH, "ünïcødé/фото 1.jpg", "שלום", "x\u200dy", " pad "]


def png(colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48, 40), colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def vec_cat(store_location):
    cat = lookalike.open_catalog(store_location)
    cat.add_vectors(["L1", "L2"], ["L1/a", "L2/a"], np.eye(2, 4), model=MODEL)
    yield cat
    cat.close()


# ---------------------------------------------------------------------- the id rule


@pytest.mark.parametrize(("value", "word"), BAD_IDS)
def test_id_rule_refuses_with_a_reason(value, word):
    problem = id_problem(value, "image id")
    assert problem is not None and word in problem and problem.startswith("image id")
    assert "\n" not in problem and problem.encode()  # one line, printable anywhere


@pytest.mark.parametrize("value", GOOD_IDS)
def test_id_rule_accepts_ordinary_ids(value):
    assert id_problem(value) is None


@pytest.mark.parametrize("value", [None, 17, b"bytes"])
def test_id_rule_refuses_non_strings(value):
    assert "must be a string" in (id_problem(value) or "")


# ---------------------------------------------------------------------- ids on every write path


@pytest.mark.parametrize(("value", "word"), BAD_IDS)
def test_add_vectors_refuses_bad_ids_and_writes_nothing(vec_cat, value, word):
    for lids, iids in (([value], ["ok"]), (["ok"], [value])):
        with pytest.raises(QueryError, match=re.escape(word)):
            vec_cat.add_vectors(lids, iids, np.ones((1, 4)), model=MODEL)
    assert vec_cat.count() == 2


@pytest.mark.parametrize("value", GOOD_IDS)
def test_add_vectors_keeps_accepting_ordinary_ids(vec_cat, value):
    vec_cat.add_vectors([value], [value], np.ones((1, 4)), model=MODEL)
    assert vec_cat.resolve_key(value, value) == (value, value)


def test_update_listing_refuses_bad_listing_ids(vec_cat):
    for value, word in BAD_IDS:
        with pytest.raises(QueryError, match=re.escape(word)):
            vec_cat.update_listing(value, stock_level=1)
    assert sorted(rec.listing_id for rec in vec_cat.listings()) == ["L1", "L2"]


def test_import_batch_refuses_bad_ids(vec_cat):
    from lookalike.types import FeatureBatch

    batch = FeatureBatch(["ok"], ["evil\u202e"], np.ones((1, 4), np.float32) / 2, ["0" * 64])
    with pytest.raises(QueryError, match="U\\+202E"):
        vec_cat.import_batch(MODEL, batch)
    assert vec_cat.count() == 2


def test_add_many_fails_only_the_item_with_a_bad_id(tmp_path):
    with lookalike.open_catalog(tmp_path / "cat", extractor="colorhist") as cat:
        items = [(png((i * 40, 0, 0)), "L", f"L/{i}.png", None) for i in range(3)]
        items[1] = (png(), "L", "   ", None)
        items.append((png((0, 0, 250)), "bad\x7f", "L/x.png", None))
        out = cat.add_many(items)
        assert [s for s, _ in out] == [
            WriteStatus.ADDED,
            WriteStatus.FAILED,
            WriteStatus.ADDED,
            WriteStatus.FAILED,
        ]
        assert "image id" in out[1][1] and "whitespace" in out[1][1]
        assert "listing id" in out[3][1] and "U+007F" in out[3][1]
        assert cat.count() == 2
        with pytest.raises(QueryError, match="U\\+202E"):
            cat.add(png(), "L", "L/\u202egnp.exe")
        with pytest.raises(QueryError, match="empty"):
            cat.add(png(), "", "L/y.png")
        assert cat.count() == 2


def test_index_reports_sources_with_bad_ids_as_failed(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("good.png", "bad\x7fname.png", "rtl\u202eeman.png"):
        (folder / name).write_bytes(png())
    with lookalike.open_catalog(tmp_path / "cat", extractor="colorhist") as cat:
        report = cat.index([folder], workers=0)
        assert report.added == 1 and len(report.failed) == 2
        reasons = " ".join(why for _, why in report.failed)
        assert "U+007F" in reasons and "U+202E" in reasons
        report = cat.index([ImageSource(" ", "x.png", str(folder / "good.png"))], workers=0)
        assert report.added == 0 and "listing id" in report.failed[0][1]
        assert cat.count() == 1


# ---------------------------------------------------------------------- lookups


@pytest.mark.parametrize("value", ["nul\x00byte", "lone\ud800"])
def test_lookups_of_unstorable_ids_are_query_errors(vec_cat, value):
    for call in (
        lambda: vec_cat.get_listing(value),
        lambda: vec_cat.get_image(value),
        lambda: vec_cat.get_image("L1/a", value),
        lambda: vec_cat.delete(value),
        lambda: vec_cat.search(image_id=value),
        lambda: vec_cat.saved_results(value),
    ):
        with pytest.raises(QueryError, match="no id can contain it"):
            call()


def test_lookups_of_odd_but_storable_ids_are_not_found(vec_cat):
    with pytest.raises(NotFoundError):
        vec_cat.get_listing("del\x7f")
    with pytest.raises(NotFoundError):
        vec_cat.get_image("\u202e")


# ---------------------------------------------------------------------- listing attributes

REFUSED_ATTRS = [
    ({"stock_level": 2**70}, "int64 range"),
    ({"stock_level": -(2**63) - 1}, "int64 range"),
    ({"price": 2**63}, "int64 range"),
    ({"price": math.nan}, "finite"),
    ({"price": math.inf}, "finite"),
    ({"price": -math.inf}, "finite"),
    ({"stock_level": math.nan}, "whole number"),
    ({"stock_level": 1.5}, "whole number"),
    ({"stock_level": True}, "whole number"),
    ({"stock_level": "many"}, "whole number"),
    ({"title": "x" * (MAX_ATTR_TEXT_LENGTH + 1)}, f"the limit is {MAX_ATTR_TEXT_LENGTH}"),
    ({"title": "a\x00b"}, "U\\+0000"),
    ({"title": "tab\there"}, "U\\+0009"),
    ({"title": "\ud800"}, "surrogate"),
    ({"etag": True}, "etag.*text"),
    ({"etag": 2.5}, "etag.*text"),
    ({"colour": [1, 2]}, "str, number, bool or null"),
    ({"colour": {"a": 1}}, "str, number, bool or null"),
    ({"": 1}, "empty"),
    ({"  ": 1}, "empty"),
    ({"n" * (MAX_ATTR_NAME_LENGTH + 1): 1}, f"the limit is {MAX_ATTR_NAME_LENGTH}"),
    ({"bad\nname": 1}, "U\\+000A"),
    ({"bad\x7f": 1}, "U\\+007F"),
    ({"listing_id": "other"}, "listing_id"),
]


@pytest.mark.parametrize(("attrs", "message"), REFUSED_ATTRS)
def test_update_listing_refuses_what_a_store_cannot_hold(vec_cat, attrs, message):
    vec_cat.update_listing("L1", stock_level=3, colour="red")
    with pytest.raises(QueryError, match=message) as info:
        vec_cat.update_listing("L1", keep="me", **attrs)
    assert "\n" not in str(info.value)
    # nothing of the refused call was written
    assert vec_cat.get_listing("L1").attrs == {"stock_level": 3, "colour": "red"}


def test_update_listing_keeps_accepting_ordinary_values(vec_cat):
    vec_cat.update_listing(
        "L1",
        stock_level=2**63 - 1,
        etag="W/abc",
        colour="ünïcødé",
        price=-(2**63),
        weight=12.5,
        new=True,
        title="t" * MAX_ATTR_TEXT_LENGTH,
        **{"n" * MAX_ATTR_NAME_LENGTH: 0, "with space": "ok"},
    )
    attrs = vec_cat.get_listing("L1").attrs
    assert attrs["stock_level"] == 2**63 - 1 and attrs["price"] == -(2**63)
    assert attrs["weight"] == 12.5 and attrs["new"] is True and attrs["colour"] == "ünïcødé"
    assert len(attrs["title"]) == MAX_ATTR_TEXT_LENGTH and attrs["with space"] == "ok"
    # what both stores always did, now done once here
    vec_cat.update_listing("L1", stock_level=4.0, etag=5)
    vec_cat.update_listing("L2", stock_level="7")
    assert vec_cat.get_listing("L1").attrs["stock_level"] == 4
    assert vec_cat.get_listing("L1").attrs["etag"] == "5"
    assert vec_cat.get_listing("L2").attrs == {"stock_level": 7}
    vec_cat.update_listing("L1", stock_level=None, title=None)  # None removes
    attrs = vec_cat.get_listing("L1").attrs
    assert "stock_level" not in attrs and "title" not in attrs
    res = vec_cat.search(vector=np.array([1.0, 0, 0, 0]), where="new = true and weight > 12")
    assert [h.listing_id for h in res.hits] == ["L1"]


def test_listing_id_passed_as_an_attribute_is_a_query_error_not_a_type_error(vec_cat):
    attrs = {"listing_id": "L2", "stock_level": 1}  # as a JSON body would hand it over
    with pytest.raises(QueryError, match="listing_id"):
        vec_cat.update_listing("L1", **attrs)


# ---------------------------------------------------------------------- messages


def test_messages_name_the_catalog_not_its_path(tmp_path):
    location = tmp_path / "deep" / "secret" / "shop-cat"
    with lookalike.open_catalog(location) as cat:
        with pytest.raises(QueryError) as empty:
            cat.search(vector=np.ones(4))
        cat.add_vectors(["L1"], ["L1/a"], np.ones((1, 4)), model=MODEL)
        errors: list[LookalikeError] = []
        for call in (
            lambda: cat.get_image("nope"),
            lambda: cat.get_listing("nope"),
            lambda: cat.search(image_id="nope"),
            lambda: cat.search(vector=np.ones(4), index="hnsw"),
            lambda: cat.predict([png()]),
        ):
            with pytest.raises(LookalikeError) as info:
                call()
            errors.append(info.value)
        for exc in [empty.value, *errors]:
            assert str(tmp_path) not in str(exc) and "secret" not in str(exc), exc
            assert "shop-cat" in str(exc), exc
        assert cat.stats()["catalog"] == str(location)  # the HTTP layer decides what to show


def test_messages_do_not_show_the_postgres_url(pg_server, monkeypatch, tmp_path):
    monkeypatch.setenv("LOOKALIKE_STATE_DIR", str(tmp_path / "state"))
    url = pg_server.create_database("msgnames")
    with lookalike.open_catalog(url) as cat:
        cat.add_vectors(["L1"], ["L1/a"], np.ones((1, 4)), model=MODEL)
        with pytest.raises(NotFoundError) as info:
            cat.get_image("nope")
    message = str(info.value)
    assert "msgnames" in message and "postgresql://" not in message and "127.0.0.1" not in message


@pytest.mark.parametrize(
    ("uri", "name"),
    [
        ("/srv/data/cats/shop", "shop"),
        ("/srv/data/cats/shop/", "shop"),
        ("postgresql://lookalike@db.internal:5432/shop?sslmode=require", "shop"),
        ("postgresql://db.internal", "postgresql"),
    ],
)
def test_catalog_name(uri, name):
    assert catalog_name(uri) == name
