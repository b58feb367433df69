-- lookalike catalog schema, version 1 (PostgreSQL). Same tables as the SQLite store.
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);

-- The change sequence: every write transaction takes the next value by updating this row,
-- so writers are serialised on it and sequence order is commit order.
CREATE TABLE counters (name TEXT PRIMARY KEY, value BIGINT NOT NULL);
INSERT INTO counters VALUES ('seq', 0);

CREATE TABLE features (
    listing_id  TEXT NOT NULL,
    image_id    TEXT NOT NULL,
    vector      BYTEA NOT NULL,           -- float32 little-endian, L2-normalized
    model       TEXT NOT NULL,
    source      TEXT,
    sha256      TEXT NOT NULL,
    width       INTEGER,
    height      INTEGER,
    ingested_at DOUBLE PRECISION NOT NULL,
    labels      JSONB,
    seq         BIGINT NOT NULL,
    PRIMARY KEY (listing_id, image_id)
);
CREATE INDEX features_seq ON features (seq);
CREATE INDEX features_image_id ON features (image_id);

CREATE TABLE deletions (seq BIGINT NOT NULL, listing_id TEXT NOT NULL, image_id TEXT NOT NULL);
CREATE INDEX deletions_seq ON deletions (seq);

CREATE TABLE listings (
    listing_id  TEXT PRIMARY KEY,
    stock_level BIGINT,
    etag        TEXT,
    attrs       JSONB,
    updated_at  DOUBLE PRECISION,
    seq         BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX listings_seq ON listings (seq);

CREATE TABLE image_analysis (
    listing_id       TEXT NOT NULL,
    image_id         TEXT NOT NULL,
    cluster          INTEGER,
    cluster_distance DOUBLE PRECISION,
    outlier_score    DOUBLE PRECISION,
    x                DOUBLE PRECISION,
    y                DOUBLE PRECISION,
    updated_at       DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (listing_id, image_id)
);

CREATE TABLE query_results (
    query_id   TEXT NOT NULL,
    rank       INTEGER NOT NULL,
    listing_id TEXT NOT NULL,
    image_id   TEXT NOT NULL,
    score      DOUBLE PRECISION NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (query_id, rank)
);
