"""Hostile requests through a real uvicorn on loopback (issue 17, HTTP parts): the decode
budget, auth and limits before the body is read, no 500s, anonymous writes, leaks and odd
ids, and the operations of ``lookalike serve``.

Every server here listens on 127.0.0.1 on a free port and is stopped by its fixture; every
loop is bounded by a deadline."""

from __future__ import annotations

import http.client
import io
import json
import logging
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image

from lookalike.server import create_app

TOKEN = "w-token"
READ_TOKEN = "r-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MiB = 2**20
SRC = Path(__file__).resolve().parents[1] / "src"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def live(catalog: Any, **options: Any) -> Iterator[tuple[str, Any]]:
    """``create_app(catalog, **options)`` served by uvicorn in a thread: (base URL, app)."""
    import uvicorn

    port = free_port()
    app = create_app(catalog, **options)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        app.state.catalog.close()


@pytest.fixture
def server(cnn_catalog_copy):
    with live(cnn_catalog_copy, token=TOKEN, max_upload=2 * MiB) as (url, app):
        yield url, app


def jpeg(size=(64, 48), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG")
    return buf.getvalue()


def grey16_png(side: int) -> bytes:
    """A 16-bit greyscale PNG of ``side`` x ``side`` that compresses to almost nothing
    (9400: ~172 KB for 88 M pixels)."""
    arr = np.zeros((side, side), np.uint16)
    arr[::97] = 40000
    img = Image.fromarray(arr)
    assert img.mode == "I;16"
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def multipart_head(path: str, length: int | None, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines.append("Content-Type: multipart/form-data; boundary=xyz")
    if length is None:
        lines.append("Transfer-Encoding: chunked")
    else:
        lines.append(f"Content-Length: {length}")
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def push(url: str, head: bytes, total: int, chunked: bool, timeout: float = 20.0):
    """Send ``head`` then up to ``total`` body bytes as fast as the server takes them, until
    it answers. Returns (status, bytes of body the client could send before the answer)."""
    port = int(url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    sock.sendall(head)
    sock.setblocking(False)
    first = (
        b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
        b"Content-Type: image/jpeg\r\n\r\n"
    )
    filler = b"\0" * (64 * 1024)
    sent, answer = 0, b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            want_write = [sock] if sent < total else []
            readable, writable, _ = select.select([sock], want_write, [], 0.5)
            if readable:
                try:
                    data = sock.recv(65536)
                except (ConnectionResetError, BlockingIOError):
                    data = b""
                answer += data
                if not data or b"\r\n\r\n" in answer:
                    break
            elif writable:
                chunk = (first + filler if sent == 0 else filler)[: total - sent]
                wire = b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk
                try:
                    n = sock.send(wire)
                except (BrokenPipeError, ConnectionResetError):
                    break
                sent += n if not chunked else max(0, n - 8)
                if chunked and n < len(wire):  # keep the chunk framing whole
                    sock.setblocking(True)
                    try:
                        sock.sendall(wire[n:])
                    except (BrokenPipeError, ConnectionResetError):
                        break  # the server answered and closed mid-chunk: read the answer
                    finally:
                        sock.setblocking(False)
        # the answer may still be on its way after a reset
        sock.setblocking(True)
        sock.settimeout(2)
        while b"\r\n\r\n" not in answer:
            try:
                data = sock.recv(65536)
            except OSError:
                break
            if not data:
                break
            answer += data
    finally:
        sock.close()
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1") else None
    return status, sent, answer


# ----------------------------------------------------------------- 1. decode budget


@contextmanager
def serve_process(catalog: Path, *args: str) -> Iterator[tuple[str, subprocess.Popen]]:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "lookalike.cli", "serve", "--catalog", str(catalog)]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if requests.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.1)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def search_upload(url: str, data: bytes, name: str = "q.png", **headers: str):
    return requests.post(
        url + "/search", files={"image": (name, data, "image/png")}, headers=headers, timeout=60
    )


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_a_9400_square_16_bit_png_costs_the_server_no_memory(cnn_catalog_copy, demo_dir):
    """Before: one POST /search of this 172 KB PNG peaked the server at 2.49 GiB (6.6 s).
    Now: refused from its header (over the 40 Mpx upload limit) in milliseconds; and with the
    limit raised to Pillow's, decoded at reduced size: the peak grows by ~180 MB (its 2-byte
    pixels, loaded once), not by gigabytes."""
    big = grey16_png(9400)
    assert len(big) < 400_000
    query = (demo_dir / "queries" / "rocket" / "q-01.jpg").read_bytes()
    with serve_process(cnn_catalog_copy) as (url, proc):
        assert search_upload(url, query, "q.jpg").status_code == 200  # model loaded
        before = peak_rss_kib(proc.pid)
        t0 = time.monotonic()
        r = search_upload(url, big)
        assert r.status_code == 415, r.text
        assert "9400x9400" in r.json()["error"]["message"]
        assert "40000000-pixel" in r.json()["error"]["message"]
        assert time.monotonic() - t0 < 2
        assert peak_rss_kib(proc.pid) - before < 20_000
    with serve_process(cnn_catalog_copy, "--max-pixels", "89478485") as (url, proc):
        assert search_upload(url, query, "q.jpg").status_code == 200
        before = peak_rss_kib(proc.pid)
        r = search_upload(url, big)
        assert r.status_code == 200, r.text
        grown = peak_rss_kib(proc.pid) - before
        assert grown < 400_000, f"peak RSS grew by {grown} KiB"


def test_concurrent_decodes_are_bounded(cnn_catalog_copy, monkeypatch):
    with live(cnn_catalog_copy, max_decodes=2) as (url, app):
        cat = app.state.catalog
        lock = threading.Lock()
        now = peak = 0
        real = cat.search

        def slow_search(*args: Any, **kwargs: Any) -> Any:
            nonlocal now, peak
            with lock:
                now += 1
                peak = max(peak, now)
            time.sleep(0.2)
            with lock:
                now -= 1
            return real(*args, **kwargs)

        monkeypatch.setattr(cat, "search", slow_search)
        codes: list[int] = []
        threads = [
            threading.Thread(target=lambda: codes.append(search_upload(url, jpeg()).status_code))
            for _ in range(6)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert codes == [200] * 6
        assert peak == 2


# ------------------------------------------------------- 2. auth and limits before the body


def test_upload_without_token_is_refused_before_its_body(server):
    """An upload without a token: 401 after its headers alone (before: the body was read and
    spooled first, up to the body limit)."""
    url, _ = server
    status, _, answer = push(url, multipart_head("/images", int(1.5 * MiB), {}), 0, False, 5)
    assert status == 401, answer[:200]
    status, sent, answer = push(url, multipart_head("/images", 200 * MiB, {}), 0, False, 5)
    assert status == 401, answer[:200]
    assert b"connection: close" in answer.lower()
    status, sent, _ = push(url, multipart_head("/images", 200 * MiB, {}), 200 * MiB, False)
    assert status == 401
    print(f"\n401 after {sent} bytes of a 200 MiB body")
    assert sent < 16 * MiB  # what loopback socket buffers hold, not what the server read


def test_content_length_over_the_limit_is_refused_at_once(server):
    url, _ = server
    head = multipart_head("/images", 300 * MiB, AUTH)
    status, _, answer = push(url, head, 0, False, 5)
    assert status == 413, answer[:200]
    head = multipart_head("/search", 300 * MiB, {})
    assert push(url, head, 0, False, 5)[0] == 413


def test_chunked_upload_is_counted_while_it_streams(server):
    url, _ = server
    status, sent, answer = push(url, multipart_head("/images", None, AUTH), 300 * MiB, True)
    # The server answers 413 and closes; a client still sending then gets a reset, and TCP may
    # discard the answer with it (RFC 9112, 9.6), so no answer at all is allowed too: what is
    # tested is that the server stopped reading at the limit.
    assert status in (413, None), answer[:200]
    print(f"\n{status} after {sent} bytes of a chunked 300 MiB body (limit 3 MiB)")
    assert sent < 24 * MiB


def test_json_bodies_have_their_own_limit(server):
    url, _ = server
    vector = [0.1] * 1280
    assert requests.post(url + "/search", json={"vector": vector, "k": 1}).status_code == 200
    head = (
        "POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {200 * MiB}\r\n\r\n"
    ).encode()
    assert push(url, head, 0, False, 5)[0] == 413
    big = json.dumps({"vector": [0.1] * 1280, "where": "x" * (3 * MiB)})
    r = requests.post(url + "/search", data=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "2097152-byte" in r.json()["error"]["message"]

    def chunks() -> Iterator[bytes]:
        yield b'{"vector": ['
        for _ in range(40_000):
            yield b"0.1," * 32
        yield b"0.1]}"

    r = requests.post(url + "/search", data=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413


# ------------------------------------------------------------------------- 3. no 500s


def test_an_unexpected_error_is_a_json_500_and_the_connection_stays(server, monkeypatch, caplog):
    url, app = server

    def boom() -> None:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(app.state.catalog, "stats", boom)
    conn = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=10)
    with caplog.at_level(logging.ERROR):
        conn.request("GET", "/stats")
        r = conn.getresponse()
        body = json.loads(r.read())
    assert r.status == 500
    assert body == {"error": {"status": 500, "message": "internal error (RecursionError)"}}
    assert r.getheader("connection") != "close"
    conn.request("GET", "/healthz")  # same keep-alive connection
    r2 = conn.getresponse()
    assert r2.status == 200 and json.loads(r2.read()) == {"status": "ok"}
    conn.close()
    lines = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert len(lines) == 1 and lines[0].exc_info is not None
    assert "RecursionError" in lines[0].getMessage()


def test_deeply_nested_json_is_a_4xx(server):
    url, _ = server
    body = "[" * 100_000 + "]" * 100_000
    r = requests.post(url + "/search", data=body, headers={"Content-Type": "application/json"})
    assert 400 <= r.status_code < 500 and "error" in r.json()


def test_deeply_nested_where_is_a_json_4xx(server):
    url, _ = server
    where = "(" * 400 + "stock_level > 0" + ")" * 400
    r = requests.post(url + "/search", json={"vector": [0.1] * 1280, "where": where[:2000]})
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"]["status"] == r.status_code


def test_stock_level_beyond_int64_is_a_json_4xx(server):
    url, _ = server
    r = requests.put(url + "/listings/chelsea", json={"stock_level": 2**70}, headers=AUTH)
    assert r.status_code == 422 and "int64" in r.json()["error"]["message"]


# ------------------------------------------------------ 4. anonymous writes, heavy work


def test_save_needs_the_write_token_and_results_read_back(server):
    url, _ = server
    q = {"image_id": "flower/flower-02.jpg", "k": 3, "save": True}
    r = requests.post(url + "/search", json=q)
    assert r.status_code == 401
    r = requests.post(url + "/search", files={"image": ("q.jpg", jpeg())}, data={"save": "true"})
    assert r.status_code == 401
    assert requests.post(url + "/search", json={**q, "save": False}).status_code == 200
    r = requests.post(url + "/search", json=q, headers=AUTH)
    assert r.status_code == 200
    saved = requests.get(url + f"/results/{r.json()['query_id']}")
    assert saved.status_code == 200
    assert [h["image_id"] for h in saved.json()["hits"]] == [
        h["image_id"] for h in r.json()["hits"]
    ]
    assert requests.get(url + "/results/nope").status_code == 404


def test_map_is_built_once_and_sampled_per_limit(server):
    url, app = server
    cache = app.state.server.map_cache
    full = requests.get(url + "/map").json()
    assert len(full["points"]) == 84
    for limit in (5, 10, 20, 7, 5):
        body = requests.get(url + f"/map?limit={limit}").json()
        assert len(body["points"]) == limit and body["total"] == 84
        keys = {(p["listing_id"], p["image_id"]) for p in full["points"]}
        assert {(p["listing_id"], p["image_id"]) for p in body["points"]} <= keys
    assert cache.builds == 1
    assert requests.get(url + "/map?limit=5").json() == requests.get(url + "/map?limit=5").json()


def test_read_token_protects_reads(cnn_catalog_copy):
    with live(cnn_catalog_copy, token=TOKEN, read_token=READ_TOKEN) as (url, _):
        read = {"Authorization": f"Bearer {READ_TOKEN}"}
        for path in ("/stats", "/map?limit=3", "/options", "/metrics", "/listings/chelsea"):
            assert requests.get(url + path).status_code == 401, path
            assert requests.get(url + path, headers=read).status_code == 200, path
            assert requests.get(url + path, headers=AUTH).status_code == 200, path
        for path in ("/healthz", "/docs", "/openapi.json", "/static/index.html"):
            assert requests.get(url + path).status_code == 200, path
        q = {"image_id": "flower/flower-02.jpg", "k": 1}
        assert requests.post(url + "/search", json=q).status_code == 401
        assert requests.post(url + "/search", json=q, headers=read).status_code == 200
        r = requests.put(url + "/listings/chelsea", json={"stock_level": 1}, headers=read)
        assert r.status_code == 401  # the read token grants no writes
        # refused before the upload is read
        head = multipart_head("/search", 100 * MiB, {})
        assert push(url, head, 0, False, 5)[0] == 401


# ---------------------------------------------------------------- 5. leaks and odd ids


def test_reads_do_not_reveal_server_paths(server, cnn_catalog_copy):
    url, _ = server
    secret = str(cnn_catalog_copy.parent)
    stats = requests.get(url + "/stats")
    assert stats.json()["catalog"] == "cat" and secret not in stats.text
    assert str(cnn_catalog_copy) in requests.get(url + "/stats", headers=AUTH).text
    info = requests.get(url + "/images/flower/flower-02.jpg").json()
    assert info["source"] == "flower-02.jpg"
    full = requests.get(url + "/images/flower/flower-02.jpg", headers=AUTH).json()
    assert full["source"].startswith("/") and full["source"].endswith("flower-02.jpg")
    for path in ("/images/nope.jpg", "/thumbnails/nope.jpg", "/listings/nope", "/results/x"):
        r = requests.get(url + path)
        assert r.status_code == 404 and secret not in r.text and "/tmp" not in r.text, r.text


def test_an_id_ending_in_thumbnail_is_not_shadowed(server):
    url, _ = server
    files = {"image": ("t.jpg", jpeg(), "image/jpeg")}
    data = {"listing_id": "odd", "image_id": "odd/thumbnail"}
    assert requests.post(url + "/images", files=files, data=data, headers=AUTH).status_code == 200
    meta = requests.get(url + "/images/odd/thumbnail")
    assert meta.status_code == 200 and meta.json()["image_id"] == "odd/thumbnail"
    thumb = requests.get(url + meta.json()["thumbnail_url"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert meta.json()["thumbnail_url"].startswith("/thumbnails/odd/thumbnail?")
    # the older route still answers thumbnails of ordinary ids
    old = requests.get(url + "/images/flower/flower-02.jpg/thumbnail")
    assert old.status_code == 200 and old.headers["content-type"] == "image/jpeg"


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_put_listing_refuses_non_finite_numbers(server, literal):
    url, _ = server
    body = '{"price": ' + literal + "}"
    headers = {**AUTH, "Content-Type": "application/json"}
    r = requests.put(url + "/listings/chelsea", data=body, headers=headers)
    assert r.status_code == 422 and "finite" in r.json()["error"]["message"]
    assert "price" not in requests.get(url + "/listings/chelsea").json()["attrs"]


def test_put_listing_keeps_json_types_or_refuses(server):
    url, _ = server
    r = requests.put(url + "/listings/chelsea", json={"etag": 5}, headers=AUTH)
    assert r.status_code == 422 and "etag" in r.json()["error"]["message"]
    r = requests.put(url + "/listings/chelsea", json={"etag": "5", "size": 5}, headers=AUTH)
    assert r.status_code == 200
    got = requests.get(url + "/listings/chelsea").json()
    assert got["attrs"]["etag"] == "5" and got["attrs"]["size"] == 5


# --------------------------------------------------------------------- 6. operations


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "lookalike.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_serve_refuses_a_missing_catalog(tmp_path):
    r = run_cli("serve", "--catalog", str(tmp_path / "typo"), "--port", str(free_port()))
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "--create" in r.stderr
    assert not (tmp_path / "typo").exists()


def test_serve_on_a_port_in_use_is_one_line_and_exit_1(cnn_catalog_copy):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        r = run_cli("serve", "--catalog", str(cnn_catalog_copy), "--port", str(port))
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "in use" in r.stderr


def test_serve_logs_each_request_and_docs_need_no_cdn(cnn_catalog_copy):
    with serve_process(cnn_catalog_copy) as (url, proc):
        docs = requests.get(url + "/docs")
        assert docs.status_code == 200 and "cdn" not in docs.text.lower()
        assert "/docs-assets/swagger-ui-bundle.js" in docs.text
        for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
            assert requests.get(url + f"/docs-assets/{asset}").status_code == 200
        requests.get(url + "/healthz")
        proc.terminate()
        out, err = proc.communicate(timeout=15)
    assert '"GET /healthz HTTP/1.1" 200' in out + err
    assert "warning: writes are open" not in err  # loopback: no warning


def test_open_writes_off_loopback_are_warned_about():
    from lookalike.cli.serve import _loopback

    assert _loopback("127.0.0.1") and _loopback("::1") and _loopback("localhost")
    assert not _loopback("0.0.0.0") and not _loopback("192.168.1.5")


@pytest.mark.parametrize("image_id", ["a\u202eb.jpg", "a\x7fb.jpg", "   "])
def test_an_odd_id_is_a_bad_request_not_a_bad_image(server, image_id):
    url, _ = server
    files = {"image": ("t.jpg", jpeg(), "image/jpeg")}
    data = {"listing_id": "odd", "image_id": image_id}
    r = requests.post(url + "/images", files=files, data=data, headers=AUTH)
    assert r.status_code in (400, 422), r.text
    assert "id" in r.json()["error"]["message"]
