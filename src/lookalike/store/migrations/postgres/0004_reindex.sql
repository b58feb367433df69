-- What `lookalike reindex` keeps besides its new rows (lookalike/store/reindex.py; the new
-- rows go to features_next, made LIKE features when a reindex begins): the live rows that
-- could not be re-extracted, and the bytes of images written from bytes while a reindex runs.
-- Same tables as the SQLite store.
CREATE TABLE reindex_failed (
    listing_id TEXT NOT NULL,
    image_id   TEXT NOT NULL,
    src_seq    BIGINT NOT NULL,          -- features.seq of the write that failed
    reason     TEXT NOT NULL,
    PRIMARY KEY (listing_id, image_id)
);

CREATE TABLE reindex_bytes (
    listing_id TEXT NOT NULL,
    image_id   TEXT NOT NULL,
    sha256     TEXT NOT NULL,
    data       BYTEA NOT NULL,
    PRIMARY KEY (listing_id, image_id)
);
