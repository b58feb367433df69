"""The HTTP API on the real demo catalog (real model, real images), its OpenAPI contract
(schemathesis: no 5xx on generated input), and its security rules."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from lookalike.server import create_app

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def client(cnn_catalog_copy):
    app = create_app(cnn_catalog_copy, token=TOKEN, max_upload=2 * 2**20)
    with TestClient(app) as c:
        yield c
    app.state.catalog.close()


def upload_search(client, path, **options):
    with open(path, "rb") as fh:
        data = {k: str(v) for k, v in options.items()}
        return client.post("/search", files={"image": ("q.jpg", fh, "image/jpeg")}, data=data)


def test_upload_search_finds_the_right_listing_first(client, demo_dir):
    for listing in ("chelsea", "rocket", "motorcycle"):
        r = upload_search(
            client, demo_dir / "queries" / listing / "q-01.jpg", k=3, group_by="listing"
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"query_id", "hits"}
        assert body["hits"][0]["listing_id"] == listing
        assert list(body["hits"][0])[:3] == ["listing_id", "image_id", "score"]
        thumb = client.get(body["hits"][0]["thumbnail_url"])
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(thumb.content)).size[0] <= 192


def test_json_search_by_id_and_by_vector(client):
    r = client.post("/search", json={"image_id": "flower/flower-02.jpg", "k": 3})
    assert r.status_code == 200 and r.json()["hits"][0]["image_id"] == "flower/flower-02.jpg"
    rng = np.random.default_rng(0)
    r = client.post(
        "/search",
        json={
            "vector": rng.standard_normal(1280).tolist(),
            "k": 2,
            "group_by": "listing",
            "where": "stock_level > 0",
        },
    )
    assert r.status_code == 200 and len(r.json()["hits"]) == 2
    r = client.post("/search", json={"vector": [0.1] * 7})
    assert r.status_code == 400 and "d=7" in r.json()["error"]["message"]


def test_add_delete_and_update_are_reflected_in_the_next_search(client, demo_dir):
    q = demo_dir / "queries" / "hubble" / "q-02.jpg"
    with open(q, "rb") as fh:
        r = client.post(
            "/images",
            files={"image": ("new.jpg", fh, "image/jpeg")},
            data={"listing_id": "new-hubble", "image_id": "new-hubble/1.jpg"},
            headers=AUTH,
        )
    assert r.status_code == 200 and r.json()["status"] == "added"
    hits = upload_search(client, q, k=1).json()["hits"]
    assert hits[0]["image_id"] == "new-hubble/1.jpg" and hits[0]["score"] > 0.999
    assert client.get("/images/new-hubble/1.jpg/thumbnail").status_code == 200  # from the upload

    r = client.delete("/images/new-hubble/1.jpg", headers=AUTH)
    assert r.status_code == 200
    assert upload_search(client, q, k=1).json()["hits"][0]["listing_id"] == "hubble"

    r = client.put("/listings/hubble", json={"stock_level": 5}, headers=AUTH)
    assert r.status_code == 200 and r.json()["attrs"]["stock_level"] == 5
    hits = upload_search(client, q, k=3, group_by="listing", where="stock_level > 4")
    assert hits.json()["hits"][0]["listing_id"] == "hubble"
    assert client.get("/listings/hubble").json()["attrs"]["stock_level"] == 5


def test_facts_endpoints(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    stats = client.get("/stats").json()
    assert stats["images"] == 84 and stats["model"]["dim"] == 1280
    info = client.get("/images/coins/coins-01.jpg").json()
    assert info["listing_id"] == "coins" and len(info["sha256"]) == 64
    m = client.get("/map").json()
    assert m["method"] == "pca" and m["total"] == 84 and len(m["points"]) == 84
    xs = [p["x"] for p in m["points"]]
    assert max(xs) - min(xs) > 0.1  # a real spread, not a constant
    client.post("/search", json={"image_id": "coins/coins-01.jpg"})
    assert client.get("/images/no/such.jpg").status_code == 404
    assert client.get("/no/such/route").status_code == 404
    metrics = client.get("/metrics").text
    assert 'lookalike_http_requests_total{method="POST",route="/search",status="200"}' in metrics
    assert (
        'lookalike_http_requests_total{method="GET",route="/images/{image_id:path}",status="404"}'
        in metrics
    )
    assert 'lookalike_http_requests_total{method="GET",route="unmatched",status="404"}' in metrics
    assert "lookalike_catalog_images 84.0" in metrics
    assert "lookalike_http_request_seconds_bucket" in metrics
    page = client.get("/")
    assert page.status_code == 200 and "<title>lookalike</title>" in page.text


@pytest.mark.parametrize(
    "path",
    [
        "/images/../../etc/passwd/thumbnail",
        "/images/..%2F..%2Fetc%2Fpasswd/thumbnail",
        "/images/%2Fetc%2Fpasswd",
        "/images/coins/../../../catalog.db/thumbnail",
        "/static/../catalog.py",
        "/static/%2e%2e/app.py",
    ],
)
def test_path_traversal_reads_nothing_outside(client, path):
    r = client.get(path)
    assert r.status_code == 404
    assert b"import" not in r.content and b"root:" not in r.content


def test_write_endpoints_need_the_token(client, demo_dir):
    assert client.put("/listings/coins", json={"stock_level": 0}).status_code == 401
    assert (
        client.put(
            "/listings/coins", json={"stock_level": 0}, headers={"Authorization": "Bearer wrong"}
        ).status_code
        == 401
    )
    assert client.delete("/images/coins/coins-01.jpg").status_code == 401
    with open(demo_dir / "queries" / "coins" / "q-01.jpg", "rb") as fh:
        r = client.post(
            "/images",
            files={"image": ("x.jpg", fh, "image/jpeg")},
            data={"listing_id": "x", "image_id": "x/1.jpg"},
        )
    assert r.status_code == 401 and "bearer token" in r.json()["error"]["message"]
    assert client.get("/stats").json()["images"] == 84  # nothing was written


def test_oversized_and_non_image_uploads_are_refused(client):
    big = b"\xff\xd8" + b"0" * (2 * 2**20 + 10)
    r = client.post("/search", files={"image": ("big.jpg", big, "image/jpeg")})
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    r = client.post("/search", files={"image": ("a.txt", b"hello world", "text/plain")})
    assert r.status_code == 415 and "not an image" in r.json()["error"]["message"]
    r = client.post(
        "/images",
        files={"image": ("a.txt", b"hello", "text/plain")},
        data={"listing_id": "x", "image_id": "x/1"},
        headers=AUTH,
    )
    assert r.status_code == 415
    r = client.post("/search", content=b"k=3", headers={"content-type": "text/plain"})
    assert r.status_code == 415
    r = client.post(
        "/search", content=json.dumps({"k": 0}), headers={"content-type": "application/json"}
    )
    assert r.status_code == 422


def test_errors_are_json_with_the_right_code(client):
    assert client.get("/images/nope.jpg").json()["error"]["status"] == 404
    r = client.post("/search", json={"image_id": "coins/coins-01.jpg", "where": "stock >"})
    assert r.status_code == 400 and "where:" in r.json()["error"]["message"]
    assert client.get("/listings/no-such").status_code == 404


def test_a_backend_error_answers_its_mapped_status_as_one_json_line(client, monkeypatch):
    """A backend exception goes through lookalike.errors.translate, then the one table."""
    import sqlite3

    def locked(*args, **kwargs):
        raise sqlite3.OperationalError("database is locked")

    cat = client.app.state.catalog
    monkeypatch.setattr(cat, "stats", locked)
    monkeypatch.setattr(cat, "search", locked)
    for r in (client.get("/stats"), client.post("/search", json={"image_id": "x"})):
        assert r.status_code == 503, r.text
        assert r.headers["content-type"] == "application/json"
        assert r.headers["retry-after"] == "1"
        error = r.json()["error"]
        assert error["status"] == 503 and "database is locked" in error["message"]
        assert "\n" not in error["message"] and "Traceback" not in r.text
    monkeypatch.setattr(cat, "get_listing", _raise(sqlite3.DatabaseError("file is not a database")))
    r = client.get("/listings/coins")
    assert r.status_code == 503 and "damaged" in r.json()["error"]["message"]


def _raise(exc):
    def raiser(*args, **kwargs):
        raise exc

    return raiser


def test_the_error_table_takes_the_most_specific_class():
    from lookalike import errors
    from lookalike.server.errors import STATUS, status_of

    class OddQuery(errors.QueryError):
        pass

    assert status_of(errors.NotFoundError("x")) == 404
    assert status_of(errors.StoreBusyError("x")) == 503
    assert status_of(errors.StoreError("x")) == 503
    assert status_of(errors.BrokerError("x")) == 502
    assert status_of(OddQuery("x")) == 400
    assert status_of(errors.ModelMismatchError("x")) == 409
    assert status_of(errors.LookalikeError("x")) == 400
    assert all(issubclass(cls, errors.LookalikeError) for cls in STATUS)


def test_options_are_the_vocabularies_of_the_types(client):
    from lookalike.types import Aggregation, CodeKind, EngineKind, GroupBy, IndexKind, choices

    body = client.get("/options").json()
    assert body == {
        "aggregations": list(choices(Aggregation)),
        "group_by": list(choices(GroupBy)),
        "index_kinds": list(choices(IndexKind)),
        "code_kinds": list(choices(CodeKind)),
        "engine_kinds": list(choices(EngineKind)),
        "max_upload": 2 * 2**20,
    }


def test_openapi_declares_both_search_bodies_and_hits_are_types_hit(client):
    import dataclasses

    from lookalike.types import Hit

    schema = client.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    body = schema["paths"]["/search"]["post"]["requestBody"]
    assert set(body["content"]) == {"multipart/form-data", "application/json"}
    upload = components[body["content"]["multipart/form-data"]["schema"]["$ref"].split("/")[-1]]
    assert upload["required"] == ["image"]
    assert {"image", "k", "group_by", "agg", "top_n", "threshold", "where"} <= set(
        upload["properties"]
    )
    assert body["content"]["application/json"]["schema"]["$ref"].endswith("/SearchRequest")
    images = schema["paths"]["/images"]["post"]["requestBody"]["content"]
    assert set(images) == {"multipart/form-data"}
    hit = components["HitOut"]
    assert list(hit["properties"]) == [f.name for f in dataclasses.fields(Hit)] + [
        "thumbnail_url",
        "band",
    ]
    assert "Hit" not in components  # no second hit model


def test_bodies_past_the_limit_are_refused_while_streaming(client):
    huge = b"0" * (3 * 2**20 + 2**10)  # past max_upload + 1 MiB of slack
    r = client.post("/search", files={"image": ("big.jpg", huge, "image/jpeg")})
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: cut off once the streamed bytes pass the limit
        for _ in range(64):
            yield b"0" * 2**16

    r = client.post("/search", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]


def test_multipart_takes_one_file(client, demo_dir):
    q = (demo_dir / "queries" / "coins" / "q-01.jpg").read_bytes()
    files = [("image", ("a.jpg", q, "image/jpeg")), ("other", ("b.jpg", q, "image/jpeg"))]
    r = client.post("/search", files=files)
    assert r.status_code == 400 and "files" in r.json()["error"]["message"]


# ------------------------------------------------------ what the OpenAPI document declares


def test_undeclared_methods_are_405_naming_every_method_of_the_path(client):
    """Starlette named only the first route's methods; ``/images/{id}`` has GET and DELETE."""
    r = client.patch("/images/flower/flower-02.jpg")
    assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET"
    assert r.json()["error"]["status"] == 405
    r = client.get("/search")
    assert r.status_code == 405 and r.headers["allow"] == "POST"


def test_what_the_catalog_cannot_answer_now_is_a_409(client, demo_dir):
    """An ANN index that was not built, and an image id two listings hold: the request is
    valid, the catalog's state refuses it."""
    r = client.post("/search", json={"image_id": "flower/flower-02.jpg", "index": "hnsw"})
    assert r.status_code == 409 and "hnsw" in r.json()["error"]["message"]
    photo = (demo_dir / "queries" / "flower" / "q-01.jpg").read_bytes()
    form = {"listing_id": "flower-copy", "image_id": "flower/flower-02.jpg"}
    r = client.post(
        "/images", files={"image": ("q.jpg", photo, "image/jpeg")}, data=form, headers=AUTH
    )
    assert r.status_code == 200, r.text
    for r in (
        client.get("/images/flower/flower-02.jpg"),
        client.delete("/images/flower/flower-02.jpg", headers=AUTH),
    ):
        assert r.status_code == 409 and "listing" in r.json()["error"]["message"]
    r = client.get("/images/flower/flower-02.jpg", params={"listing_id": "flower-copy"})
    assert r.status_code == 200


@pytest.mark.parametrize(
    "extra",
    [
        {"k": "5"},  # a number as text
        {"save": 0},  # a bool as a number
        {"treshold": 0.5},  # a misspelt option
        {"vector": [1.0] * 1280},  # two queries
        {"image_id": None},
    ],
)
def test_a_json_search_takes_json_types_and_known_fields_only(client, extra):
    r = client.post("/search", json={"image_id": "flower/flower-02.jpg", **extra})
    assert r.status_code == 422, r.text


def test_a_blank_where_is_no_filter_and_a_near_zero_vector_is_refused(client):
    r = client.post("/search", json={"image_id": "flower/flower-02.jpg", "where": "  ", "k": 2})
    assert r.status_code == 200 and len(r.json()["hits"]) == 2
    r = client.post("/search", json={"vector": [1e-6] * 1280})
    assert r.status_code == 422 and "magnitude" in r.json()["error"]["message"]
    r = client.post("/search", json={"vector": [1e-5] + [0.0] * 1279})
    assert r.status_code == 200


def test_search_hits_carry_the_score_band(client, demo_dir):
    from lookalike.analytics import BANDS

    r = client.post("/search", json={"image_id": "chelsea/chelsea-01.jpg", "k": 5})
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    assert hits[0]["band"] == "same image" and all(h["band"] in BANDS for h in hits)
    up = upload_search(client, demo_dir / "queries" / "rocket" / "q-01.jpg", k=10)
    bands = [h["band"] for h in up.json()["hits"]]
    assert bands[0] in ("same image", "near copy", "similar") and "unrelated" in bands


def test_every_connection_of_lookalike_serve_has_nagle_off():
    """`lookalike serve` binds its own socket; asyncio turns Nagle's algorithm off only on
    connections of a socket that says TCP, and with it on each JSON answer waited 40 ms for the
    client's delayed ACK (a 20 ms search took 68 ms at one client)."""
    import asyncio
    import socket

    from lookalike.cli.serve import _bind

    sock = _bind("127.0.0.1", 0)

    async def nodelay_of_accepted() -> int:
        got: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            conn = writer.get_extra_info("socket")
            got.set_result(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_connection, sock=sock)
        _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        try:
            return await asyncio.wait_for(got, 10)
        finally:
            writer.close()
            server.close()
            await server.wait_closed()

    assert asyncio.run(nodelay_of_accepted()) != 0
