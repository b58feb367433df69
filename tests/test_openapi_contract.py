"""The OpenAPI document matches the server: schemathesis, every check, every phase.

The app is the real demo catalog (cnn model, plus a watchlist with one hit) behind a write
token and a read token, driven in process (ASGI). Every route of the document is in the run,
the watchlists and the ``GET /live`` event stream included. Phases: examples, coverage
(boundary values, missing and wrong-typed fields, undeclared methods), fuzzing (positive and
negative), and stateful sequences that follow the document's links (an image added by ``POST
/images`` is read, thumbnailed and deleted; a saved search is read back; a watchlist added is
read and removed). Checks: all of them, including ``positive_data_acceptance`` (a request the
schema allows is not refused with a 400/422), ``negative_data_rejection`` (one it forbids is),
``unsupported_method`` / ``allow_header_conformance`` (405 with a truthful ``Allow``),
``ignored_auth`` (a declared token is enforced) and ``use_after_free``. The only exception,
written out in ``tests/contract.toml``: a 415 for an upload whose bytes are no image.
``tests/contract_hooks.py`` gives schemathesis valid images and ``where`` expressions, and
lets ``GET /live`` streams (asked for as ``text/event-stream``) end after 0.2 s through their
own ``max_seconds``.
"""

from __future__ import annotations

import re
import shutil
import sys
import tomllib
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import schemathesis
from pydantic import ValidationError
from pydantic_core import SchemaValidator, core_schema
from schemathesis.engine import from_schema
from schemathesis.engine.events import (
    FatalError,
    FuzzScenarioFinished,
    NonFatalError,
    ScenarioFinished,
)

import contract_hooks  # noqa: F401  (registers the image and where strategies)
import lookalike
from lookalike.catalog.validate import check_attr_name
from lookalike.errors import QueryError
from lookalike.server import create_app
from lookalike.server.schemas import ID_PATTERN, LOOKUP_PATTERN, NAME_PATTERN, TEXT_PATTERN
from lookalike.types import id_problem, text_problem

TOKEN = "contract-write"
READ_TOKEN = "contract-read"
CONFIG = Path(__file__).with_name("contract.toml")


@pytest.fixture(scope="module")
def contract_schema(tmp_path_factory, cnn_catalog_dir):
    path = tmp_path_factory.mktemp("contract") / "cat"
    shutil.copytree(cnn_catalog_dir, path)
    with lookalike.open_catalog(path) as cat:  # a watchlist with a hit: GET /live has events
        cat.watch_add_stored("seen", [("moon", "moon/moon-03.jpg")], 0.9)
        copy = cat.get_image_vector("moon/moon-03.jpg", "moon")
        cat.add_vectors(["repost"], ["repost/moon.jpg"], copy[None, :])
        assert [m.entry_id for m in cat.watch_hits("seen")] == ["moon/moon-03.jpg"]
    app = create_app(path, token=TOKEN, read_token=READ_TOKEN)
    yield load_schema(app)
    app.state.catalog.close()


def load_schema(app):
    """The app's document as schemathesis loads it, with ``tests/contract.toml`` and the write
    token (which grants reads too)."""
    data = tomllib.loads(CONFIG.read_text())
    data["auth"] = {"openapi": {"bearer": {"bearer": TOKEN}}}
    config = schemathesis.Config.from_dict(data)
    return schemathesis.openapi.from_asgi("/openapi.json", app, config=config)


def run_contract(schema) -> tuple[dict[str, list[str]], list[str], Counter[str]]:
    """Run every phase and check on ``schema`` as ``schemathesis run`` does (its engine):
    the failures by check (each a one-line summary: operation, status, message), the errors,
    and the cases by phase."""
    failures: dict[str, list[str]] = defaultdict(list)
    errors: list[str] = []
    cases: Counter[str] = Counter()
    for event in from_schema(schema).execute():
        if isinstance(event, ScenarioFinished | FuzzScenarioFinished):
            recorder = event.recorder
            phase = getattr(event, "phase", None)
            cases[getattr(phase, "value", "fuzz")] += len(recorder.cases)
            for case_id, nodes in recorder.checks.items():
                for node in nodes:
                    if node.failure_info is None:
                        continue
                    failure = node.failure_info.failure
                    answer = recorder.interactions.get(case_id)
                    status = answer.response.status_code if answer and answer.response else "-"
                    first = " ".join(failure.message.split())[:300]
                    failures[node.name].append(f"{failure.operation} -> {status}: {first}")
        elif isinstance(event, NonFatalError | FatalError):
            errors.append(str(getattr(event, "value", None) or getattr(event, "exception", "")))
    return dict(failures), errors, cases


def test_openapi_contract_every_check_every_phase(contract_schema):
    """Examples, coverage, fuzzing and stateful sequences over the document's links: no
    failure of any check, no error, and every phase ran cases."""
    failures, errors, cases = run_contract(contract_schema)
    assert errors == []
    assert {name: len(found) for name, found in failures.items()} == {}, failures
    assert cases["coverage"] > 0 and cases["fuzzing"] > 0 and cases["stateful"] > 0, cases


def _operations(doc: dict) -> dict[str, dict]:
    return {
        op["operationId"]: op
        for item in doc["paths"].values()
        for method, op in item.items()
        if method in {"get", "put", "post", "delete"}
    }


def test_the_document_declares_tokens_links_and_the_image_media_types(contract_schema):
    doc = contract_schema.app.openapi()  # schemathesis rewrites its own copy's links
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    ops = _operations(doc)
    assert ops["add_image"]["security"] == [{"bearer": []}]
    assert ops["stats"]["security"] == [{"bearer": []}]  # the read token is set
    assert "security" not in ops["healthz"]
    for op in ops.values():  # the token is the scheme, not a header parameter
        assert all(p["name"].lower() != "authorization" for p in op.get("parameters", []))
    links = ops["add_image"]["responses"]["200"]["links"]
    assert {link["operationId"] for link in links.values()} >= {
        "get_image",
        "get_thumbnail",
        "delete_image",
    }
    search_links = ops["search"]["responses"]["200"]["links"]
    assert {link["operationId"] for link in search_links.values()} == {
        "get_results",
        "delete_results",
    }
    body = ops["search"]["requestBody"]["content"]
    assert body["application/json"]["schema"]["$ref"] == "#/components/schemas/SearchRequest"
    assert "SearchRequest" in doc["components"]["schemas"]
    assert "image/png" in body["multipart/form-data"]["encoding"]["image"]["contentType"]
    vector = doc["components"]["schemas"]["SearchRequest"]["properties"]["vector"]
    assert vector["minItems"] == vector["maxItems"] == 1280  # the catalog's dimension


def test_the_watchlist_and_live_routes_declare_their_rules(contract_schema):
    """What the contract run holds these routes to: tokens, bounds, the catalog's dimension,
    the upload's media types, links, and the stream's own end."""
    doc = contract_schema.app.openapi()
    ops, schemas = _operations(doc), doc["components"]["schemas"]
    for op in ("add_to_watchlist", "remove_watchlist", "live", "list_matches"):
        assert ops[op]["security"] == [{"bearer": []}], op
    for op in ("add_to_watchlist", "live", "list_matches"):
        assert {"401", "422"} <= set(ops[op]["responses"]), op
    entries = schemas["WatchlistAdd"]["properties"]["entries"]
    assert (entries["minItems"], entries["maxItems"]) == (1, 64)
    assert schemas["WatchlistAdd"]["additionalProperties"] is False
    vector = schemas["WatchVectorEntry"]["properties"]["vector"]
    assert vector["minItems"] == vector["maxItems"] == 1280
    assert schemas["WatchVectorEntry"]["required"] == ["entry_id", "vector"]
    body = ops["add_to_watchlist"]["requestBody"]["content"]  # JSON or an upload, one operation
    assert body["application/json"]["schema"]["$ref"] == "#/components/schemas/WatchlistAdd"
    form = body["multipart/form-data"]
    assert "image/png" in form["encoding"]["image"]["contentType"]
    upload = schemas["WatchEntryUpload"]
    assert upload["properties"]["image"]["minLength"] == 1
    assert "anyOf" not in upload["properties"]["threshold"]  # a form field is never null
    links = ops["add_to_watchlist"]["responses"]["200"]["links"]
    assert {link["operationId"] for link in links.values()} == {"get_watchlist", "remove_watchlist"}
    params = {p["name"]: p for p in ops["live"]["parameters"]}
    assert set(params) == {"watchlist", "backlog", "max_events", "max_seconds", "last-event-id"}
    seconds = params["max_seconds"]["schema"]
    assert (seconds["exclusiveMinimum"], seconds["maximum"], seconds["default"]) == (0, 25, 25)
    assert params["max_events"]["schema"]["anyOf"][0]["maximum"] == 10_000
    assert params["last-event-id"]["schema"]["pattern"] == "^[0-9]{1,18}(-[0-9]{1,18})?$"
    assert "anyOf" not in params["last-event-id"]["schema"]  # a header is never null
    assert "text/event-stream" in ops["live"]["responses"]["200"]["content"]


def _code_points() -> list[str]:
    """The Basic Multilingual Plane (every control, space and bidi character lives there) but
    the surrogates, which no text can carry, and a sample of the planes above."""
    bmp = [c for c in range(0x10000) if not 0xD800 <= c <= 0xDFFF]
    return [chr(c) for c in [*bmp, *range(0x10000, sys.maxunicode + 1, 251)]]


def _matcher(pattern: str, engine: str):
    """Whether a string matches ``pattern`` as Python ``re`` (the fuzzers) or pydantic's Rust
    regex (the server's validation of path, query and form fields) reads it."""
    if engine == "python":
        compiled = re.compile(pattern.removesuffix("$") + r"\Z")
        return lambda s: compiled.match(s) is not None
    validator = SchemaValidator(core_schema.str_schema(pattern=pattern, regex_engine="rust-regex"))

    def ok(s: str) -> bool:
        try:
            validator.validate_python(s)
        except ValidationError:
            return False
        return True

    return ok


def _name_ok(name: str) -> bool:
    try:
        check_attr_name(name)
    except QueryError:
        return False
    return True


@pytest.mark.parametrize("engine", ["python", "rust"])
def test_the_id_and_text_patterns_are_the_catalogs_rules(engine):
    """The document's patterns refuse exactly what the catalog refuses, character by character
    (alone, after a letter, between spaces)."""
    ids, lookups, names, texts = (
        _matcher(p, engine) for p in (ID_PATTERN, LOOKUP_PATTERN, NAME_PATTERN, TEXT_PATTERN)
    )
    wrong = []
    for ch in _code_points():
        for s in (ch, f"a{ch}", f" {ch} "):
            if ids(s) != (id_problem(s) is None):
                wrong.append(("id", s))
            if names(s) != _name_ok(s):
                wrong.append(("name", s))
            if texts(s) != (text_problem(s) is None):
                wrong.append(("text", s))
            if lookups(s) != ("\x00" not in s):
                wrong.append(("lookup", s))
    assert wrong == []
