-- Watchlists (standing queries) and the matches they and match-on-arrival record; the
-- matches table is also the outbox of the match events (published_at NULL: not yet sent).
-- Same tables as the SQLite store (lookalike/store/watch.py). Numbered 0003 so that a
-- concurrent 0002 of another change keeps its number.
CREATE TABLE watchlists (
    name           TEXT NOT NULL,
    entry_id       TEXT NOT NULL,
    vector         BYTEA NOT NULL,        -- float32 little-endian, L2-normalized
    threshold      DOUBLE PRECISION NOT NULL,
    source         TEXT,
    ref_listing_id TEXT,
    ref_image_id   TEXT,
    created_at     DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (name, entry_id)
);

-- Bumped by every change of a watchlist: writers re-read the watchlists when it moves.
INSERT INTO counters VALUES ('watch_seq', 0) ON CONFLICT (name) DO NOTHING;

CREATE TABLE matches (
    id             BIGSERIAL PRIMARY KEY,
    event_id       TEXT NOT NULL,
    target         TEXT NOT NULL,
    listing_id     TEXT NOT NULL,
    image_id       TEXT NOT NULL,
    sha256         TEXT NOT NULL,
    watchlist      TEXT,
    entry_id       TEXT,
    hit_listing_id TEXT,
    hit_image_id   TEXT,
    score          DOUBLE PRECISION NOT NULL,
    matched_at     DOUBLE PRECISION NOT NULL,
    published_at   DOUBLE PRECISION,
    seq            BIGINT NOT NULL,       -- the change sequence of the write: commit order
    UNIQUE (event_id, target)
);
CREATE INDEX matches_seq ON matches (seq);
CREATE INDEX matches_watchlist ON matches (watchlist, seq);
CREATE INDEX matches_outbox ON matches (id) WHERE published_at IS NULL;
