"""Hostile mixed load against ``lookalike serve --token SECRET`` on loopback (issue 17).

N client threads (``--clients``, default 8) send requests for T seconds (``--seconds``,
default 30) to a server started by this script as a separate process, on a free 127.0.0.1
port, with a catalog of the 84 demo photos (cnn extractor) and the demo listing attributes.
The mix, picked at random per request (seeded):

* normal searches: ``POST /search`` with an uploaded demo query photo (``search_upload``)
  and ``POST /search`` JSON by stored image id (``search_id``);
* authorized writes: ``POST /images`` with the token, each a distinct small generated JPEG
  under a unique id (``write``; counted as acknowledged when answered 200);
* hostile requests: bodies over the limits announced by ``Content-Length`` with and without
  the token (``big_body_*``; only the headers are sent), a chunked body that streams past the
  upload limit, a 3 MiB JSON body, the 9400x9400 16-bit PNG (~172 KB, 88 M pixels) as a
  search and as a write, a deeply nested ``where``, 100,000-deep JSON, ``stock_level`` =
  2**70, NaN / Infinity prices, control characters in ids, missing and wrong tokens, a save
  without a token, malformed JSON, unknown routes and methods, and a path-traversal id.

    PYTHONPATH=src python benchmarks/hostile.py
    PYTHONPATH=src python benchmarks/hostile.py --clients 8 --seconds 30 --json

What the figures mean:

* ``sent`` / ``by status``: requests per kind and their answers (``reset`` or ``timeout``:
  no HTTP answer reached the client; a reset while a client is still sending an oversized
  body may discard the 413 with it, which is allowed);
* ``unexpected``: answers outside the statuses each kind should get (reported);
* ``p50`` / ``p99``: latency of the normal searches while the hostile requests run;
* ``5xx``: server errors other than 503 -- must be 0; ``503`` (a busy store, with
  Retry-After) is allowed and reported separately;
* ``peak RSS``: the server process's VmHWM from ``/proc/<pid>/status`` at the end (MiB);
* ``rows``: after the load, ``GET /stats`` images must equal the demo images plus every
  acknowledged write (zero lost, zero duplicated), and every acknowledged id must read back.

Exit status 1 if any 5xx other than 503, a hostile request answered 2xx, or a lost or
duplicated row. Not a test: the counts and latencies depend on the machine (2 cores: the
model, the server and the clients share them).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import requests
from PIL import Image

import lookalike
from lookalike.demo import write_demo

TOKEN = "SECRET"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BAD = {"Authorization": "Bearer not-the-token"}
MiB = 2**20
TIMEOUT = 60.0
JSON = {"Content-Type": "application/json"}
NORMAL = ("search_upload", "search_id")

#: kind -> (weight, statuses it should get). ``reset`` / ``timeout``: no HTTP answer.
KINDS: dict[str, tuple[int, set[Any]]] = {
    "search_upload": (12, {200}),
    "search_id": (12, {200}),
    "write": (10, {200, 503}),
    "big_body_no_token": (2, {401, "reset"}),
    "big_body_token": (2, {413, "reset"}),
    "big_body_search": (2, {413, "reset"}),
    "chunked_over_limit": (1, {413, "reset"}),
    "json_3mib": (2, {413, "reset"}),
    "png_9400_search": (2, {415}),
    "png_9400_write": (2, {415}),
    "deep_where": (2, {400, 422}),
    "deep_json": (2, {400, 422}),
    "stock_2_70": (2, {400, 422}),
    "nan_price": (2, {400, 422}),
    # 422: the schema's id pattern; 415: the catalog's own id check (U+007F, bidi overrides)
    "ctrl_char_id": (2, {400, 404, 415, 422}),
    "no_token_write": (2, {401}),
    "bad_token_write": (2, {401}),
    "save_no_token": (2, {401}),
    "malformed_json": (2, {400, 422}),
    "unknown_route": (2, {404, 405}),
    "path_traversal": (2, {400, 404}),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def grey16_png(side: int) -> bytes:
    """A 16-bit greyscale PNG, ``side`` x ``side``, that compresses to almost nothing."""
    arr = np.zeros((side, side), np.uint16)
    arr[::97] = 40000
    img = Image.fromarray(arr)
    assert img.mode == "I;16"
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def small_jpeg(seed: int) -> bytes:
    """A distinct 48x40 JPEG per seed."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def raw_head(port: int, head: bytes, body_bytes: int = 0, timeout: float = 10.0) -> Any:
    """Send ``head`` (and at most ``body_bytes`` of zeros) on a fresh socket and return the
    answer's status, or "reset" / "timeout" when none arrived."""
    answer = b""
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(head)
            sent = 0
            sock.setblocking(False)
            while time.monotonic() < deadline and b"\r\n\r\n" not in answer:
                want = [sock] if sent < body_bytes else []
                readable, writable, _ = select.select([sock], want, [], 0.5)
                if readable:
                    data = sock.recv(65536)
                    if not data:
                        break
                    answer += data
                elif writable:
                    sent += sock.send(b"\0" * min(65536, body_bytes - sent))
        except (ConnectionResetError, BrokenPipeError, BlockingIOError):
            pass
    if answer.startswith(b"HTTP/1.1 "):
        return int(answer.split(b" ", 2)[1])
    return "timeout" if time.monotonic() >= deadline else "reset"


def multipart_head(path: str, length: int, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += ["Content-Type: multipart/form-data; boundary=xyz", f"Content-Length: {length}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class Load:
    """Shared state of the client threads (counters under one lock)."""

    def __init__(self, url: str, port: int, queries: list[bytes], ids: list[str], png: bytes):
        self.url, self.port, self.queries, self.ids, self.png = url, port, queries, ids, png
        self.lock = threading.Lock()
        self.by_kind: dict[str, Counter[Any]] = defaultdict(Counter)
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.acked: list[str] = []
        self.uncertain: list[str] = []  # writes with no answer: may or may not be stored
        self.hostile_2xx: list[str] = []
        self.counter = 0

    def next_n(self) -> int:
        with self.lock:
            self.counter += 1
            return self.counter

    def one(self, s: requests.Session, kind: str, rng: random.Random, box: dict[str, str]) -> Any:
        """Send one request of ``kind`` and return its status; a write puts its id in
        ``box`` before it is sent."""
        u = self.url
        if kind == "search_upload":
            q = rng.choice(self.queries)
            files = {"image": ("q.jpg", q, "image/jpeg")}
            return s.post(u + "/search", files=files, data={"k": "10"}).status_code
        if kind == "search_id":
            body = {"image_id": rng.choice(self.ids), "k": 10, "where": "stock_level >= 0"}
            return s.post(u + "/search", json=body).status_code
        if kind == "write":
            n = self.next_n()
            box["id"] = image_id = f"bench/w-{n:06d}.jpg"
            files = {"image": (f"w{n}.jpg", small_jpeg(n), "image/jpeg")}
            data = {"listing_id": f"bench-{n % 7}", "image_id": image_id}
            return s.post(u + "/images", files=files, data=data, headers=AUTH).status_code
        if kind == "big_body_no_token":
            return raw_head(self.port, multipart_head("/images", 200 * MiB, {}), MiB)
        if kind == "big_body_token":
            return raw_head(self.port, multipart_head("/images", 300 * MiB, AUTH), MiB)
        if kind == "big_body_search":
            return raw_head(self.port, multipart_head("/search", 300 * MiB, {}), MiB)
        if kind == "chunked_over_limit":

            def chunks() -> Any:
                yield (
                    b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"'
                    b"\r\nContent-Type: image/jpeg\r\n\r\n"
                )
                for _ in range(40):  # 40 MiB at most, over the 16 MiB + 1 MiB limit
                    yield b"\0" * MiB

            headers = {**AUTH, "Content-Type": "multipart/form-data; boundary=xyz"}
            return s.post(u + "/images", data=chunks(), headers=headers).status_code
        if kind == "json_3mib":
            body = json.dumps({"image_id": self.ids[0], "where": "x" * (3 * MiB)})
            return s.post(u + "/search", data=body, headers=JSON).status_code
        if kind == "png_9400_search":
            files = {"image": ("big.png", self.png, "image/png")}
            return s.post(u + "/search", files=files).status_code
        if kind == "png_9400_write":
            files = {"image": ("big.png", self.png, "image/png")}
            data = {"listing_id": "bench-big", "image_id": f"big-{self.next_n()}.png"}
            return s.post(u + "/images", files=files, data=data, headers=AUTH).status_code
        if kind == "deep_where":
            where = ("(" * 400 + "stock_level > 0" + ")" * 400)[:2000]
            body = {"image_id": rng.choice(self.ids), "where": where}
            return s.post(u + "/search", json=body).status_code
        if kind == "deep_json":
            body = "[" * 100_000 + "]" * 100_000
            return s.post(u + "/search", data=body, headers=JSON).status_code
        if kind == "stock_2_70":
            r = s.put(u + "/listings/chelsea", json={"stock_level": 2**70}, headers=AUTH)
            return r.status_code
        if kind == "nan_price":
            body = '{"price": ' + rng.choice(["NaN", "Infinity", "-Infinity"]) + "}"
            r = s.put(u + "/listings/coffee", data=body, headers={**AUTH, **JSON})
            return r.status_code
        if kind == "ctrl_char_id":
            bad = rng.choice(
                ["a\x00b", "line\nbreak", "tab\there", "\x1b[31mred", "x\x7f", "\u202eevil"]
            )
            if rng.random() < 0.5:
                files = {"image": ("c.jpg", small_jpeg(0), "image/jpeg")}
                data = {"listing_id": "bench-ctrl", "image_id": bad}
                return s.post(u + "/images", files=files, data=data, headers=AUTH).status_code
            return s.post(u + "/search", json={"image_id": bad, "k": 3}).status_code
        if kind in ("no_token_write", "bad_token_write"):
            files = {"image": ("t.jpg", small_jpeg(1), "image/jpeg")}
            data = {"listing_id": "bench-anon", "image_id": f"anon-{self.next_n()}.jpg"}
            headers = BAD if kind == "bad_token_write" else {}
            if rng.random() < 0.5:
                return s.post(u + "/images", files=files, data=data, headers=headers).status_code
            r = s.put(u + "/listings/chelsea", json={"stock_level": 1}, headers=headers)
            return r.status_code
        if kind == "save_no_token":
            body = {"image_id": rng.choice(self.ids), "k": 3, "save": True}
            return s.post(u + "/search", json=body).status_code
        if kind == "malformed_json":
            body = rng.choice(['{"k": ', '{"image_id": [}', "not json", '{"k": 1}}'])
            return s.post(u + "/search", data=body, headers=JSON).status_code
        if kind == "unknown_route":
            if rng.random() < 0.5:
                return s.get(u + f"/nope/{rng.randrange(1000)}").status_code
            return s.delete(u + "/stats").status_code
        if kind == "path_traversal":
            path = rng.choice(["/thumbnails/../../etc/passwd", "/images/%2e%2e/%2e%2e/etc/passwd"])
            return s.get(u + path).status_code
        raise ValueError(kind)

    def worker(self, i: int, stop_at: float, max_requests: int) -> None:
        rng = random.Random(i)
        kinds = list(KINDS)
        weights = [KINDS[k][0] for k in kinds]
        with requests.Session() as s:
            s.request = _with_timeout(s.request)  # type: ignore[method-assign]
            for _ in range(max_requests):
                if time.monotonic() >= stop_at:
                    break
                kind = rng.choices(kinds, weights)[0]
                t0 = time.perf_counter()
                box: dict[str, str] = {}
                try:
                    status = self.one(s, kind, rng, box)
                except requests.Timeout:
                    status = "timeout"
                except (requests.ConnectionError, OSError):
                    status = "reset"
                dt = time.perf_counter() - t0
                with self.lock:
                    self.by_kind[kind][status] += 1
                    if kind in NORMAL and status == 200:
                        self.latency[kind].append(dt)
                    if kind == "write":
                        if status == 200:
                            self.acked.append(box["id"])
                        elif not isinstance(status, int) and "id" in box:
                            self.uncertain.append(box["id"])
                    elif kind not in NORMAL and isinstance(status, int) and status < 300:
                        self.hostile_2xx.append(kind)


def _with_timeout(request: Any) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", TIMEOUT)
        return request(*args, **kwargs)

    return call


def build_catalog(tmp: Path) -> tuple[Path, list[bytes], list[str]]:
    write_demo(tmp / "demo")
    with lookalike.open_catalog(tmp / "cat", extractor="cnn") as cat:
        cat.index([tmp / "demo" / "photos"])
        with open(tmp / "demo" / "listings.csv", newline="") as fh:
            for row in csv.DictReader(fh):
                cat.update_listing(
                    row["listing_id"], stock_level=int(row["stock_level"]), category=row["category"]
                )
    queries = [p.read_bytes() for p in sorted((tmp / "demo" / "queries").rglob("*.jpg"))]
    photos = tmp / "demo" / "photos"
    ids = [p.relative_to(photos).as_posix() for p in sorted(photos.rglob("*.jpg"))]
    return tmp / "cat", queries, ids


def start_server(catalog: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    src = str(Path(lookalike.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "lookalike.cli", "serve", "--catalog", str(catalog)]
    cmd += ["--port", str(port), "--token", TOKEN, "--no-access-log"]
    with open(log, "wb") as fh:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=fh)


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {log.read_text()[-2000:]}")
        try:
            if requests.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            time.sleep(0.2)
    raise SystemExit("server did not answer /healthz within 60 s")


def percentile(xs: list[float], q: float) -> float | None:
    return round(float(np.percentile(np.array(xs) * 1e3, q)), 1) if xs else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8, help="client threads")
    ap.add_argument("--seconds", type=float, default=30.0, help="duration of the load")
    ap.add_argument("--max-requests", type=int, default=100_000, help="cap per client")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="lookalike-hostile-"))
    proc = None
    try:
        t0 = time.perf_counter()
        catalog, queries, ids = build_catalog(tmp)
        png = grey16_png(9400)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = tmp / "server.log"
        proc = start_server(catalog, port, log)
        wait_ready(url, proc, log)
        base = requests.get(url + "/stats", timeout=TIMEOUT).json()["images"]
        for q in queries[:2]:  # warm up: the model
            files = {"image": ("q.jpg", q, "image/jpeg")}
            requests.post(url + "/search", files=files, timeout=TIMEOUT).raise_for_status()
        print(
            f"setup {time.perf_counter() - t0:.1f} s: {base} images, PNG {len(png)} bytes; "
            f"{args.clients} clients x {args.seconds:g} s",
            file=sys.stderr,
        )

        load = Load(url, port, queries, ids, png)
        stop_at = time.monotonic() + args.seconds
        threads = [
            threading.Thread(target=load.worker, args=(i, stop_at, args.max_requests))
            for i in range(args.clients)
        ]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=args.seconds + TIMEOUT + 30)
        wall = time.perf_counter() - t0

        # the row-count check, then the memory figure, then stop
        stats = requests.get(url + "/stats", timeout=TIMEOUT).json()
        expected = base + len(load.acked)
        missing = 0
        check_until = time.monotonic() + 60
        with requests.Session() as s:
            for image_id in load.acked:
                if time.monotonic() > check_until:
                    break
                if s.get(url + f"/images/{image_id}", timeout=TIMEOUT).status_code != 200:
                    missing += 1
        rss = peak_rss_mib(proc.pid)
        alive = proc.poll() is None
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        server_log = (tmp / "server.log").read_text(errors="replace") if tmp.exists() else ""
        shutil.rmtree(tmp, ignore_errors=True)

    statuses: Counter[Any] = Counter()
    for c in load.by_kind.values():
        statuses.update(c)
    n5xx = sum(v for k, v in statuses.items() if isinstance(k, int) and k >= 500 and k != 503)
    n503 = statuses.get(503, 0)
    unexpected = {
        k: sum(v for st, v in c.items() if st not in KINDS[k][1]) for k, c in load.by_kind.items()
    }
    lat = [x for k in NORMAL for x in load.latency[k]]
    images = stats["images"]
    lost = max(0, expected - images)
    extra = images - expected
    duplicated = max(0, extra - len(load.uncertain))
    rows_ok = lost == 0 and duplicated == 0 and missing == 0
    ok = n5xx == 0 and rows_ok and not load.hostile_2xx and alive
    out = {
        "clients": args.clients,
        "seconds": args.seconds,
        "wall_s": round(wall, 1),
        "sent": {k: sum(load.by_kind[k].values()) for k in KINDS if k in load.by_kind},
        "by_kind": {
            k: {str(s): n for s, n in sorted(c.items(), key=str)} for k, c in load.by_kind.items()
        },
        "by_status": {str(s): n for s, n in sorted(statuses.items(), key=str)},
        "unexpected": {k: v for k, v in unexpected.items() if v},
        "search_p50_ms": percentile(lat, 50),
        "search_p99_ms": percentile(lat, 99),
        "search_ok": len(lat),
        "per_search_kind_ms": {
            k: {
                "n": len(load.latency[k]),
                "p50": percentile(load.latency[k], 50),
                "p99": percentile(load.latency[k], 99),
            }
            for k in NORMAL
        },
        "5xx": n5xx,
        "503": n503,
        "hostile_2xx": len(load.hostile_2xx),
        "server_peak_rss_mib": round(rss, 1),
        "server_alive_at_end": alive,
        "rows": {
            "demo": base,
            "acked_writes": len(load.acked),
            "uncertain_writes": len(load.uncertain),
            "expected": expected,
            "stats_images": images,
            "lost": lost,
            "duplicated": duplicated,
            "acked_not_readable": missing,
        },
        "ok": ok,
    }
    if n5xx and server_log:
        print(server_log[-4000:], file=sys.stderr)
    if args.json:
        print(json.dumps(out))
    else:
        print_table(out, load)
    return 0 if ok else 1


def print_table(out: dict[str, Any], load: Load) -> None:
    print(
        f"hostile mixed load: {out['clients']} clients x {out['seconds']:g} s "
        f"(wall {out['wall_s']} s), lookalike serve --token on 127.0.0.1, "
        f"{out['rows']['demo']} demo images"
    )
    print(f"{'kind':<20} {'sent':>6}  {'responses by status':<40} {'unexpected':>10}")
    for kind in KINDS:
        c = load.by_kind.get(kind)
        if not c:
            continue
        shown = " ".join(f"{s}:{n}" for s, n in sorted(c.items(), key=str))
        print(f"{kind:<20} {sum(c.values()):>6}  {shown:<40} {out['unexpected'].get(kind, 0):>10}")
    total = sum(out["sent"].values())
    shown = " ".join(f"{s}:{n}" for s, n in out["by_status"].items())
    print(f"{'all':<20} {total:>6}  {shown}")
    print(
        f"normal searches under load: {out['search_ok']} ok, "
        f"p50 {out['search_p50_ms']} ms, p99 {out['search_p99_ms']} ms"
    )
    for k, v in out["per_search_kind_ms"].items():
        print(f"  {k:<18} n={v['n']:<6} p50 {v['p50']} ms, p99 {v['p99']} ms")
    print(
        f"5xx (not 503): {out['5xx']}   503 (store busy): {out['503']}   "
        f"hostile answered 2xx: {out['hostile_2xx']}"
    )
    print(
        f"server peak RSS (VmHWM): {out['server_peak_rss_mib']} MiB; "
        f"alive at end: {out['server_alive_at_end']}"
    )
    r = out["rows"]
    print(
        f"rows: GET /stats images {r['stats_images']} = {r['demo']} demo + "
        f"{r['acked_writes']} acknowledged writes (expected {r['expected']}): "
        f"lost {r['lost']}, duplicated {r['duplicated']}, uncertain {r['uncertain_writes']}, "
        f"acknowledged but not readable {r['acked_not_readable']}"
    )
    print("OK" if out["ok"] else "FAIL")


if __name__ == "__main__":
    sys.exit(main())
