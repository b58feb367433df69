// lookalike web page: search by upload or by a result, results grouped by listing, and a map.
"use strict";

const $ = (id) => document.getElementById(id);
let lastQuery = null; // {kind: "file", file} or {kind: "id", image_id, listing_id}
let searchSeq = 0; // the latest search; an answer to an older one arriving later is dropped

// The choices come from GET /options (the vocabularies of lookalike.types), never from a copy
// here; LABELS only gives some values a friendlier caption (a value without one shows as is).
const LABELS = { "sum-top-n": "sum of top 3" };
let vocab = { aggregations: [], group_by: [] };

function fillSelect(select, values) {
  const keep = select.value;
  select.replaceChildren(...values.map((v) => new Option(LABELS[v] ?? v, v)));
  if (values.includes(keep)) select.value = keep;
}

// ------------------------------------------------------------------ access token
// A server started with --read-token answers reads only to "Authorization: Bearer <token>".
// The token typed in the header is kept for this tab (sessionStorage) and sent with every
// request; images are then fetched with it too (an <img> cannot send a header).
const TOKEN_KEY = "lookalike-token";
let token = sessionStorage.getItem(TOKEN_KEY) || "";
$("token").value = token;

function withToken(init = {}) {
  if (!token) return init;
  return { ...init, headers: { ...(init.headers || {}), Authorization: "Bearer " + token } };
}

function needToken(refused) {
  $("token").classList.add("need");
  return new Error(refused ? "the access token was refused; check it (top right)"
    : "this server needs an access token: enter it at the top right");
}

async function showImage(img, url) {
  if (!token) { img.src = url; return; }
  const res = await fetch(url, withToken());
  if (!res.ok) return;
  const blob = URL.createObjectURL(await res.blob());
  img.addEventListener("load", () => URL.revokeObjectURL(blob), { once: true });
  img.src = blob;
}

$("token").addEventListener("change", () => {
  token = $("token").value.trim();
  if (token) sessionStorage.setItem(TOKEN_KEY, token); else sessionStorage.removeItem(TOKEN_KEY);
  $("token").classList.remove("need");
  ready = loadOptions();
  loadStats();
  map.loaded = false;
  if (lastQuery) runSearch(lastQuery); else $("status").textContent = "";
  if (!$("view-live").hidden) loadWatchlists().then(startLive);
});

function loadOptions() {
  return api("/options").then((o) => {
    vocab = o;
    fillSelect($("opt-agg"), o.aggregations);
    $("opt-group").disabled = o.group_by.length === 0;
  }).catch((err) => { $("status").textContent = "error: " + err.message; });
}

let ready = loadOptions();

function options() {
  const o = { k: Number($("opt-k").value) || 12 };
  if ($("opt-group").checked && vocab.group_by.length) {
    o.group_by = vocab.group_by[0];
    if ($("opt-agg").value) o.agg = $("opt-agg").value;
  }
  const t = $("opt-threshold").value;
  if (t !== "") o.threshold = Number(t);
  if ($("opt-stock").checked) o.where = "stock_level > 0";
  return o;
}

async function api(path, init) {
  const res = await fetch(path, withToken(init));
  const body = await res.json().catch(() => ({}));
  if (res.status === 401) throw needToken(Boolean(token));
  if (!res.ok) throw new Error(body.error ? body.error.message : res.statusText);
  return body;
}

async function runSearch(query) {
  lastQuery = query;
  const seq = ++searchSeq;
  await ready; // the choices are loaded (a no-op after the first time)
  const opts = options();
  $("status").textContent = "searching...";
  const t0 = performance.now();
  try {
    let body;
    if (query.kind === "file") {
      const form = new FormData();
      form.append("image", query.file);
      for (const [k, v] of Object.entries(opts)) form.append(k, String(v));
      body = await api("/search", { method: "POST", body: form });
    } else {
      body = await api("/search", { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ image_id: query.image_id, listing_id: query.listing_id, ...opts }) });
    }
    if (seq !== searchSeq) return; // superseded while in flight (e.g. a click during a re-search)
    const ms = Math.round(performance.now() - t0);
    $("status").textContent = `${body.hits.length} hits in ${ms} ms` +
      (query.kind === "id" ? ` for ${query.image_id}` : "");
    render(body.hits);
  } catch (err) {
    if (seq !== searchSeq) return;
    $("status").textContent = "error: " + err.message;
    render([]);
  }
}

function render(hits) {
  const grid = $("results");
  grid.replaceChildren();
  for (const h of hits) {
    const card = document.createElement("div");
    card.className = "hit";
    card.dataset.listing = h.listing_id;
    card.title = `search by ${h.image_id}`;
    const img = document.createElement("img");
    img.loading = "lazy"; img.alt = h.image_id; showImage(img, h.thumbnail_url);
    const meta = document.createElement("div");
    meta.className = "meta";
    const score = document.createElement("span");
    score.className = "score"; score.textContent = h.score.toFixed(3);
    if (h.band) { score.textContent += ` · ${h.band}`; score.title = "score band (lookalike calibrate)"; }
    const listing = document.createElement("div");
    listing.className = "listing"; listing.textContent = h.listing_id;
    const sub = document.createElement("div");
    sub.className = "muted";
    sub.textContent = h.n_images ? `${h.n_images} images` : h.image_id;
    meta.append(score, listing, sub);
    card.append(img, meta);
    card.addEventListener("click", () => {
      showImage($("query-preview"), h.thumbnail_url); $("query-preview").hidden = false;
      runSearch({ kind: "id", image_id: h.image_id, listing_id: h.listing_id });
    });
    grid.append(card);
  }
}

function useFile(file) {
  if (!file) return;
  const url = URL.createObjectURL(file);
  $("query-preview").src = url; $("query-preview").hidden = false;
  runSearch({ kind: "file", file });
}

// ------------------------------------------------------------------ search view wiring
$("file-input").addEventListener("change", (e) => useFile(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault(); drop.classList.remove("over"); useFile(e.dataTransfer.files[0]);
});
for (const id of ["opt-k", "opt-group", "opt-agg", "opt-threshold", "opt-stock"]) {
  $(id).addEventListener("change", () => { if (lastQuery) runSearch(lastQuery); });
}

// ------------------------------------------------------------------ tabs
for (const tab of document.querySelectorAll(".tab")) {
  tab.addEventListener("click", () => {
    for (const t of document.querySelectorAll(".tab")) t.classList.toggle("active", t === tab);
    for (const v of document.querySelectorAll(".view")) v.hidden = v.id !== "view-" + tab.dataset.view;
    if (tab.dataset.view === "explore") loadMap();
    if (tab.dataset.view !== "live") stopLive(); // the Live tab reads the stream while shown
  });
}

// ------------------------------------------------------------------ explore view
const map = { points: [], scale: 1, dx: 0, dy: 0, loaded: false, hover: null };

const hues = new Map(); // group -> hue, spread by the golden angle in order of appearance
function colour(p) {
  const key = p.cluster !== null && p.cluster !== undefined ? "c" + p.cluster : p.listing_id;
  if (!hues.has(key)) {
    const i = hues.size;
    hues.set(key, `hsl(${(i * 137.508) % 360}, 70%, ${i % 2 ? 44 : 54}%)`);
  }
  return hues.get(key);
}

async function loadMap() {
  if (map.loaded) return draw();
  $("map-status").textContent = "loading map...";
  try {
    const body = await api("/map");
    $("map-method").textContent = body.method;
    const xs = body.points.map((p) => p.x), ys = body.points.map((p) => p.y);
    const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
    const c = $("map-canvas"), pad = 30;
    map.points = body.points.map((p) => ({ ...p,
      px: pad + (p.x - x0) / ((x1 - x0) || 1) * (c.width - 2 * pad),
      py: pad + (p.y - y0) / ((y1 - y0) || 1) * (c.height - 2 * pad) }));
    map.loaded = true;
    $("map-status").textContent = `${body.points.length} of ${body.total} images`;
    draw();
  } catch (err) {
    $("map-status").textContent = "error: " + err.message;
  }
}

function screen(p) { return [p.px * map.scale + map.dx, p.py * map.scale + map.dy]; }

function draw() {
  const c = $("map-canvas"), g = c.getContext("2d");
  g.clearRect(0, 0, c.width, c.height);
  for (const p of map.points) {
    const [x, y] = screen(p);
    g.beginPath(); g.arc(x, y, 4, 0, 2 * Math.PI);
    g.fillStyle = colour(p); g.fill();
    if (p.outlier !== null && p.outlier !== undefined && p.outlier >= 0.97) { // top 3%
      g.lineWidth = 2; g.strokeStyle = "#dc2626"; g.stroke();
    }
  }
}

function nearest(ev) {
  const c = $("map-canvas"), r = c.getBoundingClientRect();
  const mx = (ev.clientX - r.left) * c.width / r.width, my = (ev.clientY - r.top) * c.height / r.height;
  let best = null, bd = 100;
  for (const p of map.points) {
    const [x, y] = screen(p), d = (x - mx) ** 2 + (y - my) ** 2;
    if (d < bd) { bd = d; best = p; }
  }
  return best;
}

const canvas = $("map-canvas");
let drag = null;
canvas.addEventListener("wheel", (ev) => {
  ev.preventDefault();
  const f = ev.deltaY < 0 ? 1.2 : 1 / 1.2, r = canvas.getBoundingClientRect();
  const mx = (ev.clientX - r.left) * canvas.width / r.width, my = (ev.clientY - r.top) * canvas.height / r.height;
  map.dx = mx - (mx - map.dx) * f; map.dy = my - (my - map.dy) * f; map.scale *= f;
  draw();
}, { passive: false });
canvas.addEventListener("mousedown", (ev) => { drag = { x: ev.clientX, y: ev.clientY, moved: false }; });
window.addEventListener("mouseup", () => { drag = null; });
canvas.addEventListener("mousemove", (ev) => {
  if (drag) {
    map.dx += ev.clientX - drag.x; map.dy += ev.clientY - drag.y;
    drag.moved = drag.moved || Math.abs(ev.clientX - drag.x) + Math.abs(ev.clientY - drag.y) > 2;
    drag.x = ev.clientX; drag.y = ev.clientY; draw(); return;
  }
  const p = nearest(ev), tip = $("map-tip");
  if (!p) { tip.hidden = true; return; }
  tip.hidden = false;
  if (tip.dataset.key !== p.thumbnail_url) { // fetch each point's thumbnail once per hover
    tip.dataset.key = p.thumbnail_url; showImage(tip.querySelector("img"), p.thumbnail_url);
  }
  tip.querySelector("span").textContent = `${p.listing_id} · ${p.image_id}`;
  tip.style.left = (ev.offsetX + 12) + "px"; tip.style.top = (ev.offsetY + 12) + "px";
});
canvas.addEventListener("click", (ev) => {
  const p = nearest(ev);
  if (!p) return;
  $("tab-search").click();
  showImage($("query-preview"), p.thumbnail_url); $("query-preview").hidden = false;
  runSearch({ kind: "id", image_id: p.image_id, listing_id: p.listing_id });
});

// ------------------------------------------------------------------ stats
function loadStats() {
  api("/stats").then((s) => {
    $("stats").textContent = `${s.images} images · ${s.listings ?? 0} listings` +
      (s.model ? ` · ${s.model.name} d=${s.model.dim}` : "");
  }).catch(() => {});
}
loadStats();

// ------------------------------------------------------------------ live view
// Server-sent events of GET /live: "image" (written by this server) and "match" (a row of the
// matches table: a watchlist hit or a catalog near-duplicate, from any process). One card per
// arriving image, its matches inside; the newest card first, at most LIVE_MAX cards.
//
// The stream is read with fetch() and a stream reader, not EventSource: EventSource cannot send
// the Authorization header a server with --read-token needs, and a token in the URL would be
// written to logs. The server's format (event:, data:, id:, retry:, comments) is parsed here
// as the SSE specification says; the stream is resumed with Last-Event-ID after it ends (the
// server ends it every 25 s) and after an error, with a growing delay.
const LIVE_MAX = 100;
const LIVE_BACKOFF_MAX = 30000; // ms between tries after errors, at most
const live = { ctrl: null, cards: new Map() };

function liveKey(listingId, imageId) { return listingId + "\u001f" + imageId; }

function liveCard(listingId, imageId, thumb, note) {
  const key = liveKey(listingId, imageId);
  let card = live.cards.get(key);
  if (!card) {
    card = document.createElement("div");
    card.className = "arrival";
    card.dataset.listing = listingId; card.dataset.image = imageId;
    const img = document.createElement("img");
    img.alt = imageId; showImage(img, thumb);
    const body = document.createElement("div");
    const who = document.createElement("div");
    who.className = "who"; who.textContent = `${listingId} · ${imageId}`;
    const when = document.createElement("div");
    when.className = "muted when";
    const matches = document.createElement("div");
    matches.className = "matches";
    body.append(who, when, matches);
    card.append(img, body);
    live.cards.set(key, card);
    $("live-feed").prepend(card);
    while (live.cards.size > LIVE_MAX) {
      const [oldest, el] = live.cards.entries().next().value;
      live.cards.delete(oldest); el.remove();
    }
  }
  if (note) card.querySelector(".when").textContent = note;
  return card;
}

function liveMatch(m) {
  const card = liveCard(m.listing_id, m.image_id, m.thumbnail_url, null);
  if (card.querySelector(`.match[data-id="${m.id}"]`)) return;
  const el = document.createElement("div");
  el.className = "match"; el.dataset.id = m.id; el.dataset.watchlist = m.watchlist ?? "";
  if (m.hit_thumbnail_url) {
    const img = document.createElement("img");
    img.alt = m.hit_image_id; showImage(img, m.hit_thumbnail_url);
    el.append(img);
  }
  const tag = document.createElement("span");
  tag.className = "tag"; tag.textContent = m.watchlist ? `watchlist ${m.watchlist}` : "near-duplicate";
  const what = document.createElement("span");
  what.textContent = `${m.entry_id ?? m.hit_image_id} ${m.score.toFixed(3)}`;
  el.append(tag, what);
  card.querySelector(".matches").append(el);
  const when = card.querySelector(".when");
  if (!when.textContent) when.textContent = new Date(m.matched_at * 1000).toLocaleTimeString();
}

function liveStatus(text) { $("live-status").textContent = text; }

function stopLive() {
  if (live.ctrl) live.ctrl.abort();
  live.ctrl = null;
}

function startLive() {
  stopLive();
  // a late caller (a watchlist list that loaded after the user left the tab) starts nothing:
  // the Live tab reads the stream only while it is shown
  if ($("view-live").hidden) return;
  const watchlist = $("live-watchlist").value;
  const url = "/live" + (watchlist ? `?watchlist=${encodeURIComponent(watchlist)}` : "");
  $("live-feed").replaceChildren(); live.cards.clear();
  const ctrl = new AbortController();
  live.ctrl = ctrl;
  followLive(ctrl, url, watchlist).catch((err) => {
    if (!ctrl.signal.aborted) liveStatus("error: " + err.message);
  });
}

function liveEvent(kind, data) {
  try {
    if (kind === "image") {
      const im = JSON.parse(data);
      liveCard(im.listing_id, im.image_id, im.thumbnail_url,
        `${im.status} ${new Date(im.at * 1000).toLocaleTimeString()}`);
    } else if (kind === "match") {
      liveMatch(JSON.parse(data));
    }
  } catch (err) { console.warn("live: an event was skipped", err); } // one bad event only
}

// Read GET /live again and again until ctrl is aborted (tab switch, another filter, token).
async function followLive(ctrl, url, watchlist) {
  const state = { lastId: null, retry: 500 };
  let backoff = 1000;
  while (!ctrl.signal.aborted) {
    let failed = false;
    try {
      const headers = { Accept: "text/event-stream" };
      if (state.lastId !== null) headers["Last-Event-ID"] = state.lastId;
      const res = await fetch(url, withToken({ headers, signal: ctrl.signal, cache: "no-store" }));
      if (res.status === 401) { // no use trying again: a new token restarts the view
        liveStatus("error: " + needToken(Boolean(token)).message);
        return;
      }
      if (!res.ok || !res.body) throw new Error(`HTTP ${res.status}`);
      liveStatus("connected" + (watchlist ? ` · ${watchlist}` : ""));
      backoff = 1000;
      await readEvents(res.body, state, liveEvent);
    } catch (err) {
      if (ctrl.signal.aborted) return;
      failed = true;
    }
    if (ctrl.signal.aborted) return;
    let wait = state.retry; // the server ended the stream (it does every 25 s): resume
    if (failed) {
      liveStatus(`reconnecting in ${Math.round(backoff / 1000)} s...`);
      wait = backoff;
      backoff = Math.min(backoff * 2, LIVE_BACKOFF_MAX);
    }
    await new Promise((ok) => setTimeout(ok, wait));
  }
}

// Parse a text/event-stream body (the SSE specification's rules: lines end in LF, CRLF or CR;
// ":" starts a comment; "field: value" with one leading space dropped; a blank line dispatches
// the event if it has data). Calls onEvent(type, data) per event; keeps the last event id and
// the server's retry delay (ms) in state.
async function readEvents(body, state, onEvent) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "", type = "", data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value;
    for (;;) {
      const end = buf.search(/[\r\n]/);
      if (end < 0 || (buf[end] === "\r" && end === buf.length - 1)) break; // wait for the rest
      const line = buf.slice(0, end);
      buf = buf.slice(buf.startsWith("\r\n", end) ? end + 2 : end + 1);
      if (line === "") {
        if (data.length) onEvent(type || "message", data.join("\n"));
        type = ""; data = [];
        continue;
      }
      if (line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let val = colon < 0 ? "" : line.slice(colon + 1);
      if (val.startsWith(" ")) val = val.slice(1);
      if (field === "event") type = val;
      else if (field === "data") data.push(val);
      else if (field === "id" && !val.includes("\0")) state.lastId = val;
      else if (field === "retry" && /^[0-9]+$/.test(val)) state.retry = Number(val);
    }
  }
}

async function loadWatchlists() {
  try {
    const body = await api("/watchlists");
    const select = $("live-watchlist"), keep = select.value;
    select.replaceChildren(new Option("everything", ""),
      ...body.watchlists.map((w) => new Option(`watchlist ${w.name} (${w.entries.length})`, w.name)));
    select.value = [...select.options].some((o) => o.value === keep) ? keep : "";
  } catch (err) { $("live-status").textContent = "error: " + err.message; }
}

$("tab-live").addEventListener("click", async () => {
  await loadWatchlists();
  if (!live.ctrl && !$("view-live").hidden) startLive();
});
$("live-watchlist").addEventListener("change", startLive);
