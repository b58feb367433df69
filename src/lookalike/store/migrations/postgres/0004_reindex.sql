-- The second model generation of `lookalike reindex` (lookalike/store/reindex.py): the new
-- vectors beside the live ones until the swap, and the bytes of images written from bytes
-- while a reindex runs. Same tables as the SQLite store.
CREATE TABLE features_next (
    listing_id TEXT NOT NULL,
    image_id   TEXT NOT NULL,
    src_seq    BIGINT NOT NULL,          -- features.seq of the row it was made from
    vector     BYTEA,                    -- float32 little-endian; NULL: not re-extracted
    reason     TEXT,                     -- why not
    PRIMARY KEY (listing_id, image_id)
);

CREATE TABLE reindex_bytes (
    listing_id TEXT NOT NULL,
    image_id   TEXT NOT NULL,
    sha256     TEXT NOT NULL,
    data       BYTEA NOT NULL,
    PRIMARY KEY (listing_id, image_id)
);
