"""The data-lake format: a catalog's tables as Parquet, for Spark and any other engine.

``export_catalog`` writes ``DIR/features``, ``DIR/listings`` and ``DIR/query_results``:

* ``features`` is partitioned by ``part = crc32(listing_id) mod P`` (Hive-style
  ``part=N/`` folders, **one file per part**), so every image of a listing is in one file and
  per-listing aggregation never needs rows from two files. Columns: ``listing_id``,
  ``image_id``, ``vector`` (``fixed_size_list<float32>[d]``), ``model``, ``source``,
  ``sha256``, ``width``, ``height``, ``ingested_at``, ``labels`` (JSON text). The schema
  metadata key ``lookalike.model`` holds ``{"name", "version", "dim"}``.
* ``listings``: ``listing_id``, ``stock_level``, ``etag``, ``attrs`` (JSON text, every attribute).
* ``query_results``: ``query_id``, ``rank``, ``listing_id``, ``image_id``, ``score``,
  ``created_at``.

``import_catalog`` reads them back into any catalog (vectors bit for bit, hashes kept).
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import numpy as np

from .catalog import Catalog
from .errors import MissingExtraError, ModelMismatchError, SourceError
from .files import atomic_path, atomic_write
from .types import FeatureBatch, ImageRecord, ModelInfo

try:
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError:  # the default install has no pyarrow: lookalike[parquet] brings it
    raise MissingExtraError("pyarrow", "parquet", "the Parquet lake (export, import)") from None

#: Rows read from the store per query while exporting.
EXPORT_BATCH = 4096
#: Default number of ``part`` partitions.
DEFAULT_PARTS = 16
MODEL_KEY = b"lookalike.model"


def part_of(listing_id: str, parts: int) -> int:
    """The partition of a listing: CRC-32 of its UTF-8 id modulo ``parts`` (stable across
    processes and languages, unlike Python's ``hash``)."""
    return zlib.crc32(listing_id.encode()) % parts


def features_schema(dim: int, model: ModelInfo | None = None) -> pa.Schema:
    """The Arrow schema of the ``features`` table for vectors of dimension ``dim``."""
    schema = pa.schema(
        [
            ("listing_id", pa.string()),
            ("image_id", pa.string()),
            ("vector", pa.list_(pa.float32(), dim)),
            ("model", pa.string()),
            ("source", pa.string()),
            ("sha256", pa.string()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("ingested_at", pa.float64()),
            ("labels", pa.string()),
        ]
    )
    if model is not None:
        meta = {"name": model.name, "version": model.version, "dim": model.dim}
        schema = schema.with_metadata({MODEL_KEY: json.dumps(meta).encode()})
    return schema


def vectors_column(vectors: np.ndarray) -> pa.FixedSizeListArray:
    """``(n, d) float32`` -> a fixed-size-list Arrow column (no copy of the values)."""
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), v.shape[1])


def column_vectors(column: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    """A fixed-size-list (or list) Arrow column -> ``(n, d) float32``."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    values = arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return values.reshape(-1, dim)


def export_catalog(
    cat: Catalog, folder: str | os.PathLike[str], parts: int = DEFAULT_PARTS
) -> dict[str, int]:
    """Write the catalog's tables under ``folder`` (layout in the module docstring).

    Args:
        folder: the lake folder (created; existing tables are replaced).
        parts: ``part`` partitions of the ``features`` table.

    Returns:
        Rows written per table: ``{"features", "listings", "query_results"}``.

    Raises:
        SourceError: the catalog is empty. OSError: the folder cannot be written.
    """
    model = cat.model
    if model is None:
        raise SourceError(f"{cat.uri} is empty: nothing to export")
    root = Path(folder)
    schema = features_schema(model.dim, model)
    writers: dict[int, pq.ParquetWriter] = {}
    n_features = 0
    try:  # stream the rows: one store query and one row group per part per batch
        for recs in cat.iter_records(EXPORT_BATCH):
            by_part: dict[int, list[ImageRecord]] = {}
            for r in recs:
                by_part.setdefault(part_of(r.listing_id, parts), []).append(r)
            for p, part_recs in sorted(by_part.items()):
                if p not in writers:
                    out = root / "features" / f"part={p}"
                    out.mkdir(parents=True, exist_ok=True)
                    writers[p] = pq.ParquetWriter(out / "data.parquet", schema)
                writers[p].write_table(_features_table(part_recs, schema))
            n_features += len(recs)
    finally:
        for w in writers.values():
            w.close()
    by_id = {rec.listing_id: rec for rec in cat.listings()}
    listings = [by_id[lid] for lid in sorted(by_id)]
    lt = pa.table(
        {
            "listing_id": [rec.listing_id for rec in listings],
            "stock_level": pa.array([rec.attrs.get("stock_level") for rec in listings], pa.int64()),
            "etag": [rec.attrs.get("etag") for rec in listings],
            "attrs": [json.dumps(rec.attrs) for rec in listings],
        }
    )
    with atomic_path(root / "listings" / "data.parquet") as tmp:
        pq.write_table(lt, tmp)
    results = cat.all_saved_results()
    qt = pa.table(
        {
            "query_id": [r.query_id for r in results],
            "rank": pa.array([r.rank for r in results], pa.int32()),
            "listing_id": [r.listing_id for r in results],
            "image_id": [r.image_id for r in results],
            "score": pa.array([r.score for r in results], pa.float64()),
            "created_at": [r.created_at for r in results],
        }
    )
    with atomic_path(root / "query_results" / "data.parquet") as tmp:
        pq.write_table(qt, tmp)
    write_model_sidecar(root, model)
    return {"features": n_features, "listings": lt.num_rows, "query_results": qt.num_rows}


def _features_table(recs: list[ImageRecord], schema: pa.Schema) -> pa.Table:
    """A ``features`` table of stored rows (layout in the module docstring)."""
    return pa.table(
        {
            "listing_id": [r.listing_id for r in recs],
            "image_id": [r.image_id for r in recs],
            "vector": vectors_column(np.stack([r.vector for r in recs])),
            "model": [r.model for r in recs],
            "source": [r.source for r in recs],
            "sha256": [r.sha256 for r in recs],
            "width": pa.array([r.width for r in recs], pa.int32()),
            "height": pa.array([r.height for r in recs], pa.int32()),
            "ingested_at": [r.ingested_at for r in recs],
            "labels": [json.dumps(r.labels) if r.labels is not None else None for r in recs],
        },
        schema=schema,
    )


SIDECAR = "_lookalike.json"


def write_model_sidecar(folder: str | os.PathLike[str], model: ModelInfo) -> None:
    """Record the model in ``folder/_lookalike.json`` (for tables written by Spark, which does
    not keep Arrow schema metadata); written atomically.

    Raises:
        OSError: the folder cannot be written.
    """
    meta = {"model": {"name": model.name, "version": model.version, "dim": model.dim}}
    atomic_write(Path(folder) / SIDECAR, json.dumps(meta))


def read_model(folder: str | os.PathLike[str]) -> ModelInfo:
    """The model recorded with an exported lake: ``_lookalike.json``, else the ``features``
    files' schema metadata.

    Raises:
        SourceError: no ``features`` table, or no model recorded.
    """
    root = Path(folder)
    if (root / SIDECAR).exists():
        d = json.loads((root / SIDECAR).read_text())["model"]
        return ModelInfo(d["name"], d["version"], int(d["dim"]))
    files = sorted((root / "features").rglob("*.parquet"))
    if not files:
        raise SourceError(f"{root}/features: no Parquet files")
    meta = pq.read_schema(files[0]).metadata or {}
    if MODEL_KEY not in meta:
        raise SourceError(f"{files[0]}: no {MODEL_KEY.decode()} metadata")
    d = json.loads(meta[MODEL_KEY])
    return ModelInfo(d["name"], d["version"], int(d["dim"]))


def import_catalog(folder: str | os.PathLike[str], cat: Catalog) -> dict[str, int]:
    """Read tables written by :func:`export_catalog` (or by ``lookalike spark extract``) into
    ``cat``: vectors bit for bit, hashes and metadata kept.

    Raises:
        SourceError: missing tables or metadata. ModelMismatchError: other model's vectors.
    """
    root = Path(folder)
    model = read_model(root)
    if cat.model is not None and cat.model != model:
        raise ModelMismatchError(f"{cat.uri} holds {cat.model.tag}; {root} has {model.tag}")
    n = 0
    for path in sorted((root / "features").rglob("*.parquet")):
        table = pq.read_table(path)
        if "error" in table.column_names:  # spark extract output: skip failed rows
            table = table.filter(pa.compute.is_null(table["error"]))
        if table.num_rows == 0:
            continue
        cols = table.to_pydict()
        cat.import_batch(
            model,
            FeatureBatch(
                listing_ids=cols["listing_id"],
                image_ids=cols["image_id"],
                vectors=column_vectors(table["vector"], model.dim),
                sha256s=cols["sha256"],
                sources=cols.get("source") or [],
                widths=cols.get("width") or [],
                heights=cols.get("height") or [],
                labels=[json.loads(x) if x else None for x in cols.get("labels") or []] or [],
            ),
        )
        n += table.num_rows
    n_listings = 0
    listings_file = root / "listings"
    if listings_file.exists():
        for path in sorted(listings_file.rglob("*.parquet")):
            for row in pq.read_table(path).to_pylist():
                cat.update_listing(row["listing_id"], **json.loads(row["attrs"] or "{}"))
                n_listings += 1
    n_results = 0
    results_dir = root / "query_results"
    if results_dir.exists():
        by_query: dict[str, list[tuple[int, str, str, float]]] = {}
        for path in sorted(results_dir.rglob("*.parquet")):
            for row in pq.read_table(path).to_pylist():
                by_query.setdefault(row["query_id"], []).append(
                    (row["rank"], row["listing_id"], row["image_id"], row["score"])
                )
        for qid, hits in by_query.items():
            if not cat.has_saved_results(qid):
                cat.save_results(qid, [(h[1], h[2], h[3]) for h in sorted(hits)])
                n_results += len(hits)
    return {"features": n, "listings": n_listings, "query_results": n_results}
