"""End to end in a real browser: Debian's chromium driven by Playwright (never `playwright
install`) against `lookalike serve`'s app on a free loopback port. Screenshots are saved in
test-artifacts/ for people to look at."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from lookalike.server import create_app
from lookalike.types import Aggregation, choices

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"),
    reason="chromium not installed (apt-get install chromium; CI installs it)",
)
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


@pytest.fixture
def server_url(cnn_catalog_copy, request):
    """The page's server; ``create_app`` options may come as the fixture's (indirect) param."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(cnn_catalog_copy, **getattr(request, "param", {}))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
    app.state.catalog.close()


@pytest.fixture
def page(tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        yield context.new_page()
        browser.close()


def test_upload_search_explore_in_a_real_browser(server_url, page, demo_dir):
    ARTIFACTS.mkdir(exist_ok=True)
    page.goto(server_url + "/")
    page.wait_for_selector("#stats:has-text('84 images')")

    # the page's choices come from GET /options: the vocabularies of lookalike.types
    page.wait_for_function("document.querySelectorAll('#opt-agg option').length > 0")
    offered = page.eval_on_selector_all("#opt-agg option", "els => els.map(e => e.value)")
    assert tuple(offered) == choices(Aggregation)

    # search by uploading a held-out photo: the right listing comes first
    page.set_input_files("#file-input", str(demo_dir / "queries" / "motorcycle" / "q-01.jpg"))
    page.wait_for_selector("#results .hit")
    first = page.locator("#results .hit").first
    assert first.get_attribute("data-listing") == "motorcycle"
    assert "hits in" in page.inner_text("#status")
    page.wait_for_function(
        "[...document.querySelectorAll('#results .hit img')].every(i => i.complete && "
        "i.naturalWidth > 0)"
    )
    page.screenshot(path=str(ARTIFACTS / "search.png"), full_page=True)

    # the in-stock filter removes listings with stock_level 0 (the demo's coffee, hubble, moon)
    page.set_input_files("#file-input", str(demo_dir / "queries" / "coffee" / "q-01.jpg"))
    page.wait_for_function("document.querySelector('#results .hit')?.dataset.listing === 'coffee'")
    page.check("#opt-stock")
    page.wait_for_function("document.querySelector('#results .hit')?.dataset.listing !== 'coffee'")
    listings = page.eval_on_selector_all("#results .hit", "els => els.map(e => e.dataset.listing)")
    assert "coffee" not in listings and "moon" not in listings
    # clicking a result searches by that stored image, even while the re-search that
    # unchecking starts (an upload, through the model) is still in flight: the later answer
    # to the older search must not replace the click's
    page.evaluate(  # answers to uploads arrive 1 s late, so the race is certain
        "(() => { const f = window.fetch; window.fetch = async (p, init) => {"
        " const r = await f(p, init);"
        " if (init && init.body instanceof FormData) await new Promise(ok => setTimeout(ok, 1000));"
        " return r; }; })()"
    )
    page.uncheck("#opt-stock")
    card = page.locator("#results .hit").nth(1)
    clicked = card.get_attribute("title").removeprefix("search by ")
    card.click()
    page.wait_for_selector(f"#status:has-text(' for {clicked}')")
    page.wait_for_timeout(1500)  # the late upload answer has arrived by now
    assert page.inner_text("#status").endswith(f" for {clicked}")
    assert page.locator("#results .hit").first.get_attribute("title") == f"search by {clicked}"

    # the Explore view draws the map of the collection
    page.click("#tab-explore")
    page.wait_for_selector("#map-status:has-text('84 of 84 images')")
    drawn = page.evaluate(
        "(() => { const c = document.getElementById('map-canvas');"
        " const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        " let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n; })()"
    )
    assert drawn > 84 * 10  # 84 dots of a few dozen pixels each
    page.screenshot(path=str(ARTIFACTS / "explore.png"), full_page=True)


READ_TOKEN = "page-read-token"


@pytest.mark.parametrize("server_url", [{"read_token": READ_TOKEN}], indirect=True)
def test_the_page_asks_for_the_read_token_and_searches_with_it(server_url, page, demo_dir):
    """With ``--read-token`` the page says it needs a token, then searches, shows thumbnails
    and draws the map with the token typed once per tab (kept in sessionStorage)."""
    ARTIFACTS.mkdir(exist_ok=True)
    page.goto(server_url + "/")
    page.wait_for_selector("#status:has-text('needs an access token')")
    assert page.eval_on_selector("#token", "e => e.classList.contains('need')")

    page.fill("#token", "wrong")
    page.dispatch_event("#token", "change")
    page.wait_for_selector("#status:has-text('token was refused')")

    page.fill("#token", READ_TOKEN)
    page.dispatch_event("#token", "change")
    page.wait_for_selector("#stats:has-text('84 images')")
    page.wait_for_function("document.querySelectorAll('#opt-agg option').length > 0")
    page.set_input_files("#file-input", str(demo_dir / "queries" / "motorcycle" / "q-01.jpg"))
    page.wait_for_selector("#results .hit")
    assert page.locator("#results .hit").first.get_attribute("data-listing") == "motorcycle"
    page.wait_for_function(  # thumbnails come through fetch with the token
        "[...document.querySelectorAll('#results .hit img')].every(i => i.complete && "
        "i.naturalWidth > 0)"
    )
    assert not page.eval_on_selector("#token", "e => e.classList.contains('need')")
    page.screenshot(path=str(ARTIFACTS / "search-read-token.png"), full_page=True)

    page.reload()  # the same tab keeps the token
    page.wait_for_selector("#stats:has-text('84 images')")
    assert page.input_value("#token") == READ_TOKEN
    page.click("#tab-explore")
    page.wait_for_selector("#map-status:has-text('84 of 84 images')")


@pytest.mark.parametrize("server_url", [{"read_token": READ_TOKEN}], indirect=True)
def test_the_live_tab_follows_arrivals_with_the_read_token(server_url, page, demo_dir):
    """With ``--read-token`` the Live tab reads ``GET /live`` with the token in the
    Authorization header (never in a URL): it shows an uploaded image as it arrives, with its
    watchlist match and both thumbnails; after a failed connection it tries again."""
    import httpx

    photo = (demo_dir / "photos" / "camera" / "camera-01.jpg").read_bytes()
    res = httpx.post(  # writes are open on this server; reads need the token
        server_url + "/watchlists",
        json={"name": "cams", "threshold": 0.9, "entries": [{"image_id": "camera/camera-01.jpg"}]},
        timeout=30,
    )
    assert res.status_code == 200, res.text
    requests = []
    page.on("request", lambda r: requests.append((r.url, r.headers.get("authorization"))))
    refused = []

    def first_refused(route):  # the first connection fails: the page must try again
        if not refused:
            refused.append(route.request.url)
            route.abort()
        else:
            route.continue_()

    page.goto(server_url + "/")
    page.wait_for_selector("#status:has-text('needs an access token')")
    with page.expect_response(lambda r: "/live" in r.url) as without_token:
        page.click("#tab-live")
    assert without_token.value.status == 401
    page.wait_for_selector("#live-status:has-text('access token')")  # said in words

    page.route("**/live*", first_refused)
    page.fill("#token", READ_TOKEN)
    page.dispatch_event("#token", "change")
    page.wait_for_selector("#live-status:has-text('connected')", timeout=20_000)
    assert len(refused) == 1  # the first try with the token failed; the next one connected
    assert page.locator("#live-watchlist option").count() == 2  # everything, cams

    res = httpx.post(
        server_url + "/images",
        data={"listing_id": "arrived", "image_id": "arrived/1.jpg"},
        files={"image": ("1.jpg", photo, "image/jpeg")},
        timeout=60,
    )
    assert res.status_code == 200, res.text
    card = page.locator('.arrival[data-image="arrived/1.jpg"]')
    card.locator('.match[data-watchlist="cams"]').wait_for(timeout=20_000)  # the match event
    card.locator(".when:has-text('added')").wait_for()  # the image event
    page.wait_for_function(  # the thumbnails came through fetch with the token
        "[...document.querySelectorAll('.arrival img')].length >= 2 && "
        "[...document.querySelectorAll('.arrival img')].every(i => i.complete && "
        "i.naturalWidth > 0)"
    )
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "live-read-token.png"), full_page=True)

    streams = [auth for url, auth in requests if "/live" in url]
    assert f"Bearer {READ_TOKEN}" in streams  # the stream was asked for with the token
    assert not [url for url, _ in requests if READ_TOKEN in url]  # and never in a URL

    # leaving the tab ends the stream: no reader is left on the server
    page.click("#tab-search")
    page.wait_for_function("document.getElementById('view-live').hidden")
    assert page.evaluate("live.ctrl === null")
    page.wait_for_timeout(1500)  # nothing that was under way when the tab closed reopens it
    assert page.evaluate("live.ctrl === null")


def test_the_page_parses_server_sent_events_as_the_specification_says(server_url, page):
    """The page's reader of ``text/event-stream`` (``readEvents`` in app.js), fed in 3-byte
    pieces: LF, CRLF and CR line ends (a CRLF split between pieces too), comments, multi-line
    data, an event without a type, ``id`` and ``retry``, and UTF-8 split inside a character."""
    page.goto(server_url + "/")
    page.wait_for_selector("#stats:has-text('84 images')")
    text = (
        ": lookalike live\r\nretry: 750\r\n\r\n"
        'event: match\ndata: {"a":1}\ndata:x\nid: 7\n\n'
        "data: plain é€\r\revent: image\r\ndata: y\r\n\r\n"
        "event: dropped\nid: 9\n\n"  # no data: not dispatched, but the id counts
        "data: cut"  # no blank line before the end: not dispatched
    )
    out = page.evaluate(
        """async (text) => {
          const bytes = new TextEncoder().encode(text);
          const body = new ReadableStream({ start(c) {
            for (let i = 0; i < bytes.length; i += 3) c.enqueue(bytes.slice(i, i + 3));
            c.close();
          } });
          const state = { lastId: null, retry: 500 }, got = [];
          await readEvents(body, state, (type, data) => got.push([type, data]));
          return { got, state };
        }""",
        text,
    )
    assert out["got"] == [
        ["match", '{"a":1}\nx'],
        ["message", "plain é€"],
        ["image", "y"],
    ]
    assert out["state"] == {"lastId": "9", "retry": 750}
