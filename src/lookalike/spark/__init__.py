"""lookalike on Apache Spark: the same jobs with the same answers, when one machine is not enough.

Install with ``pip install lookalike[spark]`` (pyspark, pandas < 3; Java 17 on every node).
The data lives in the data-lake layout of :mod:`lookalike.lake` (``lookalike export``), or is
made by :func:`extract`.

* :func:`session`: a ``SparkSession`` with ``PYSPARK_PYTHON`` set to this interpreter (so
  executors import the same packages), ``SPARK_LOCAL_IP=127.0.0.1`` for local masters, and any
  ``--master`` (``local[*]``, ``spark://...``; YARN / Kubernetes through ``spark-submit``).
* :func:`extract`: images listed in a manifest -> feature vectors (``mapInPandas``; the model
  is loaded once per executor process: ONNX Runtime on CPU, torch on a GPU executor); a bad
  image gets its reason in an ``error`` column and never fails the job.
* :func:`search`: queries broadcast to every task, each task scores its rows with the local
  engine (:class:`~lookalike.engine.NumpyEngine`: the same semantics, tie order
  included) and keeps its own top-k (or every hit above the threshold). Features are stored one
  file per ``part`` (a hash of ``listing_id``) and Spark never splits such a file across tasks
  (``spark.sql.files.maxPartitionBytes`` is raised above the largest file), so every listing is
  whole in one task: per-listing aggregation needs no shuffle of rows. Listing filters join the
  ``listings`` table first. The driver merges the tasks' candidates in the global order.
* :func:`kmeans`, :func:`train_classifier`: Spark MLlib ``KMeans`` and
  ``LogisticRegression`` / ``MultilayerPerceptronClassifier`` with ``TrainValidationSplit``
  over a ``ParamGridBuilder`` grid.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..catalog import DEFAULT_K
from ..engine import NumpyEngine, VectorCache, check_queries, check_spec, parse_where
from ..errors import ImageError, LookalikeError, QueryError
from ..extract import NETWORK_EXTRACTORS, l2_normalize
from ..lake import read_model
from ..types import Changes, Hit, ListingRecord, SearchResult, SearchSpec

#: Largest Parquet file Spark reads in one task (bytes); raised so that a ``part`` file is
#: never split.
MAX_PARTITION_BYTES = 16 * 2**30


def session(
    master: str = "local[*]",
    app: str = "lookalike",
    ui: bool = False,
    conf: dict[str, str] | None = None,
) -> Any:
    """Build (or get) the SparkSession lookalike's jobs run on.

    Raises:
        LookalikeError: pyspark is not installed (``pip install lookalike[spark]``).
    """
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise LookalikeError("Spark jobs need pyspark: pip install 'lookalike[spark]'") from None
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    if master.startswith("local"):
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    builder = (
        SparkSession.builder.master(master)
        .appName(app)
        .config("spark.ui.enabled", "true" if ui else "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.sql.files.maxPartitionBytes", str(MAX_PARTITION_BYTES))
        .config("spark.sql.files.openCostInBytes", str(MAX_PARTITION_BYTES))
        .config("spark.sql.shuffle.partitions", "8")
        .config("spark.driver.memory", os.environ.get("LOOKALIKE_SPARK_DRIVER_MEMORY", "4g"))
    )
    for key, value in (conf or {}).items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark


# ------------------------------------------------------------------------------------ extract

_EXTRACTORS: dict[str, Any] = {}


def _extract_batches(batches: Iterator[Any], extractor_name: str) -> Iterator[Any]:
    """mapInPandas body: manifest rows -> feature rows (the model loads once per process)."""
    import pandas as pd

    from ..catalog.ingest import Prepared, prepare_bytes
    from ..extract import get_extractor
    from ..images import ImageSource, read_bytes

    ext = _EXTRACTORS.get(extractor_name)
    if ext is None:
        from pyspark import TaskContext

        # ONNX Runtime would start one thread per core in every Python worker; a task owns
        # spark.task.cpus cores (1 by default), so use that many
        ctx = TaskContext.get()
        options = {"threads": ctx.cpus()} if extractor_name in NETWORK_EXTRACTORS and ctx else {}
        ext = _EXTRACTORS[extractor_name] = get_extractor(extractor_name, **options)
    for frame in batches:
        prepared = []
        for lid, iid, path in zip(
            frame["listing_id"], frame["image_id"], frame["path"], strict=True
        ):
            src = ImageSource(str(lid), str(iid), str(path))
            try:
                prepared.append(prepare_bytes(read_bytes(src.location), src, ext))
            except ImageError as exc:
                prepared.append(Prepared(src, "failed", reason=str(exc)))
        ok = [(p, p.array) for p in prepared if p.status == "ok" and p.array is not None]
        vecs = ext.embed(np.stack([a for _, a in ok])) if ok else np.zeros((0, ext.dim))
        by_id = {id(p): v for (p, _), v in zip(ok, vecs, strict=True)}
        out = []
        for p, part in zip(prepared, frame["part"], strict=True):
            v = by_id.get(id(p))
            out.append(
                {
                    "listing_id": p.source.listing_id,
                    "image_id": p.source.image_id,
                    "vector": v.astype(np.float32).tolist() if v is not None else None,
                    "model": ext.info.tag,
                    "source": p.source.location,
                    "sha256": p.sha256 or None,
                    "width": p.width or None,
                    "height": p.height or None,
                    "ingested_at": time.time(),
                    "labels": None,
                    "error": p.reason or None,
                    "part": int(part),
                }
            )
        yield pd.DataFrame(out)


def extract(
    spark: Any,
    manifest: str,
    out: str,
    extractor: str = "cnn",
    parts: int = 16,
    batch_rows: int = 64,
) -> dict[str, int]:
    """Extract feature vectors of the images in a manifest (Parquet or CSV with
    ``listing_id,image_id,path``) into the lake layout under ``out`` (``features/part=N``, one
    file per part, written by Spark); a failed image keeps its row with ``vector`` null and
    the reason in ``error``. The model is recorded in ``out/_lookalike.json``.

    Returns:
        ``{"images", "failed"}`` counts.

    Raises:
        LookalikeError: the manifest lacks a column.
    """
    from pyspark.sql import functions as F  # noqa: N812
    from pyspark.sql import types as T  # noqa: N812

    from ..extract import get_extractor
    from ..lake import write_model_sidecar

    info = get_extractor(extractor).info
    if manifest.endswith(".csv"):
        df = spark.read.option("header", "true").csv(manifest)
    else:
        df = spark.read.parquet(manifest)
    missing = {"listing_id", "image_id", "path"} - set(df.columns)
    if missing:
        raise LookalikeError(f"{manifest}: manifest lacks column(s) {', '.join(sorted(missing))}")
    schema = T.StructType(
        [
            T.StructField("listing_id", T.StringType()),
            T.StructField("image_id", T.StringType()),
            T.StructField("vector", T.ArrayType(T.FloatType())),
            T.StructField("model", T.StringType()),
            T.StructField("source", T.StringType()),
            T.StructField("sha256", T.StringType()),
            T.StructField("width", T.IntegerType()),
            T.StructField("height", T.IntegerType()),
            T.StructField("ingested_at", T.DoubleType()),
            T.StructField("labels", T.StringType()),
            T.StructField("error", T.StringType()),
            T.StructField("part", T.IntegerType()),
        ]
    )
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(batch_rows))
    rows = (
        df.select("listing_id", "image_id", "path")
        # the lake's partition: crc32(listing_id) mod parts, as lake.part_of computes it;
        # shuffling the (small) manifest rows by it before extraction spreads the model work
        # over the tasks and leaves each part whole in one task (one file per part)
        .withColumn(
            "part", F.pmod(F.crc32(F.col("listing_id").cast("binary")), F.lit(parts)).cast("int")
        )
        .repartition(parts, "part")
        .mapInPandas(lambda it: _extract_batches(it, extractor), schema)
    )
    target = str(Path(out) / "features")
    rows.write.mode("overwrite").partitionBy("part").parquet(target)
    write_model_sidecar(out, info)
    written = spark.read.parquet(target)
    counts = written.agg(F.count("*").alias("n"), F.count("error").alias("failed")).first()
    return {"images": int(counts["n"]), "failed": int(counts["failed"])}


# ------------------------------------------------------------------------------------ search


def _search_partition(
    batches: Iterator[Any],
    queries: np.ndarray,
    spec_args: dict[str, Any],
    where: str | None,
    dim: int,
) -> Iterator[Any]:
    """mapInPandas body: one task's rows -> its candidate hits for every query."""
    import pandas as pd

    frames = list(batches)
    if not frames:
        return
    frame = pd.concat(frames, ignore_index=True)
    if "error" in frame.columns:
        frame = frame[frame["error"].isna()]
    if len(frame) == 0:
        return
    keys = list(zip(frame["listing_id"].astype(str), frame["image_id"].astype(str), strict=True))
    vectors = np.stack([np.asarray(v, dtype=np.float32) for v in frame["vector"]])
    order = sorted(range(len(keys)), key=lambda i: keys[i])  # the local cache's row order
    cache = VectorCache(dim)
    cache.apply(
        Changes(seq=1, upserted=[keys[i] for i in order], vectors=vectors[order], deleted=[])
    )
    mask = None
    if where:
        attrs_col = frame["attrs"] if "attrs" in frame.columns else None
        records = {}
        for i, (lid, _) in enumerate(keys):
            if lid not in records:
                raw = attrs_col.iloc[i] if attrs_col is not None else None
                records[lid] = ListingRecord(lid, json.loads(raw) if isinstance(raw, str) else {})
        cache.update_listings(1, list(records.values()))
        mask = parse_where(where).mask(cache.listings)
    spec = SearchSpec(listing_mask=mask, **spec_args)
    out = []
    for qi, raw in enumerate(NumpyEngine(cache).search(queries, spec)):
        for row, score, count in zip(raw.rows, raw.scores, raw.counts, strict=True):
            lid, iid = cache.keys[row]
            out.append((qi, lid, iid, float(score), int(count)))
    yield pd.DataFrame(out, columns=["query", "listing_id", "image_id", "score", "n_images"])


def search(
    spark: Any,
    features: str,
    queries: np.ndarray,
    *,
    k: int | None = None,
    group_by: str | None = None,
    agg: str = "max",
    top_n: int = 3,
    threshold: float | None = None,
    where: str | None = None,
    listings: str | None = None,
    normalize: bool = True,
    save: str | None = None,
    query_ids: Sequence[str] | None = None,
) -> list[SearchResult]:
    """Distributed exact search: same options, same answers as ``Catalog.search``.

    Args:
        features: the lake folder (with ``features/``), or the ``features`` folder itself.
        queries: ``(d,)`` or ``(nq, d)`` query vectors.
        listings: the ``listings`` table folder, needed by ``where`` (default: beside
            ``features``).
        save: write the hits as a ``query_results`` Parquet table under this folder.
        query_ids: one id per query (a query table's ids); default: new UUIDs.

    Returns:
        One :class:`~lookalike.catalog.SearchResult` per query.

    Raises:
        QueryError: bad options or queries.
    """
    from pyspark.sql import types as T  # noqa: N812

    root = Path(features)
    lake = root.parent if root.name == "features" else root
    model = read_model(lake)
    q = check_queries(queries, model.dim)
    if query_ids is not None and len(query_ids) != len(q):
        raise QueryError(f"{len(query_ids)} query ids for {len(q)} queries")
    if normalize:
        q = l2_normalize(q)
    kk = k if k is not None else (None if threshold is not None else DEFAULT_K)
    # the options as given (strings); check_spec names a bad one, as Catalog.search does
    spec_args: dict[str, Any] = dict(
        k=kk, threshold=threshold, group_by=group_by, agg=agg, top_n=top_n
    )
    check_spec(SearchSpec(**spec_args))  # validate on the driver, with a clear error
    df = spark.read.parquet(str(lake / "features"))
    if where:
        listings_dir = listings or str(lake / "listings")
        if not Path(listings_dir).exists():
            raise QueryError(f"where needs the listings table: {listings_dir} does not exist")
        ldf = spark.read.parquet(listings_dir).select("listing_id", "attrs")
        df = df.join(ldf.hint("broadcast"), on="listing_id", how="left")
    columns = ["listing_id", "image_id", "vector"] + (["error"] if "error" in df.columns else [])
    columns += ["attrs"] if where else []
    bq = spark.sparkContext.broadcast(q)
    out_schema = T.StructType(
        [
            T.StructField("query", T.IntegerType()),
            T.StructField("listing_id", T.StringType()),
            T.StructField("image_id", T.StringType()),
            T.StructField("score", T.DoubleType()),
            T.StructField("n_images", T.IntegerType()),
        ]
    )
    dim = model.dim
    cands = (
        df.select(*columns)
        .mapInPandas(lambda it: _search_partition(it, bq.value, spec_args, where, dim), out_schema)
        .toPandas()
    )
    results = []
    for qi in range(len(q)):
        sub = cands[cands["query"] == qi]
        ordered = sorted(
            zip(sub["score"], sub["listing_id"], sub["image_id"], sub["n_images"], strict=True),
            key=lambda t: (-np.float32(t[0]), t[1], t[2]),
        )
        if kk is not None:
            ordered = ordered[:kk]
        hits = [
            Hit(
                lid, iid, float(np.float32(sc)), rank + 1, int(n) if group_by == "listing" else None
            )
            for rank, (sc, lid, iid, n) in enumerate(ordered)
        ]
        qid = str(query_ids[qi]) if query_ids is not None else uuid.uuid4().hex
        results.append(SearchResult(qid, hits))
    if save:
        _save_results(results, save)
    return results


def read_query_table(path: str, extractor: Any) -> tuple[list[str], np.ndarray]:
    """A batch of queries from a Parquet or CSV table: a ``query_id`` column (optional; default
    the row number) and either ``vector`` (list of float, Parquet) or ``path`` (an image file or
    URL, embedded here with ``extractor``).

    Returns:
        ``(query ids, (n, d) float32)``.

    Raises:
        QueryError: no ``vector`` / ``path`` column, an empty table, or an image that does not
            load (named with its row).
    """
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    from ..images import load_image

    table = pcsv.read_csv(path) if path.endswith(".csv") else pq.read_table(path)
    if table.num_rows == 0:
        raise QueryError(f"{path}: the query table is empty")
    ids = (
        [str(v) for v in table.column("query_id").to_pylist()]
        if "query_id" in table.column_names
        else [str(i) for i in range(table.num_rows)]
    )
    if "vector" in table.column_names:
        rows = table.column("vector").to_pylist()
        for i, v in enumerate(rows):
            if v is None:
                raise QueryError(f"{path}: row {i} (query_id {ids[i]}): vector is null")
        return ids, np.asarray(rows, dtype=np.float32)
    if "path" not in table.column_names:
        raise QueryError(f"{path}: a query table needs a 'vector' or a 'path' column")
    vectors = []
    paths = table.column("path").to_pylist()
    for a in range(0, len(paths), 64):
        images = []
        for i in range(a, min(a + 64, len(paths))):
            try:
                images.append(load_image(str(paths[i]), draft_size=extractor.draft_size).image)
            except ImageError as exc:
                raise QueryError(f"{path}: row {i} (query_id {ids[i]}): {exc}") from None
        vectors.append(extractor.embed_images(images))
    return ids, np.concatenate(vectors)


def _save_results(results: Sequence[SearchResult], folder: str) -> None:
    """Append ``results`` to the ``query_results`` table under ``folder`` (one new file)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    now = time.time()
    rows = [
        (r.query_id, h.rank, h.listing_id, h.image_id, h.score, now)
        for r in results
        for h in r.hits
    ]
    table = pa.table(
        {
            name: [row[i] for row in rows]
            for i, name in enumerate(
                ["query_id", "rank", "listing_id", "image_id", "score", "created_at"]
            )
        }
    )
    Path(folder).mkdir(parents=True, exist_ok=True)
    pq.write_table(table, Path(folder) / f"results-{uuid.uuid4().hex[:8]}.parquet")
    for r in results:
        r.saved = True


# ------------------------------------------------------------------------------------ MLlib


def _vectors_frame(spark: Any, lake: str, label: str | None = None) -> Any:
    """The lake's good rows with an MLlib ``features`` vector column (and ``label_text``)."""
    from pyspark.ml.functions import array_to_vector
    from pyspark.sql import functions as F  # noqa: N812

    df = spark.read.parquet(str(Path(lake) / "features"))
    if "error" in df.columns:
        df = df.where(F.col("error").isNull())
    df = df.withColumn("features", array_to_vector(F.col("vector")))
    if label == "listing":
        df = df.withColumn("label_text", F.col("listing_id"))
    return df


def kmeans(spark: Any, lake: str, k: int, seed: int = 0, max_iter: int = 20) -> dict[str, Any]:
    """Spark MLlib k-means (cosine distance) over the lake's vectors (failed rows skipped).

    Args:
        lake: the lake folder (with ``features/``).
        k: clusters.
        seed: MLlib's seed.
        max_iter: iterations.

    Returns:
        ``{"k", "sizes": {cluster: size}, "assignments": pandas DataFrame with listing_id,
        image_id, cluster}``.
    """
    import pandas as pd
    from pyspark.ml.clustering import KMeans

    df = _vectors_frame(spark, lake)
    model = KMeans(
        k=k,
        seed=seed,
        maxIter=max_iter,
        distanceMeasure="cosine",
        featuresCol="features",
        predictionCol="cluster",
    ).fit(df)
    # pyspark types toPandas() as a protocol without indexing; it is a pandas DataFrame
    assigned: pd.DataFrame = (
        model.transform(df).select("listing_id", "image_id", "cluster").toPandas()
    )
    return {"k": k, "sizes": assigned["cluster"].value_counts().to_dict(), "assignments": assigned}


def train_classifier(
    spark: Any, lake: str, model: str = "logreg", seed: int = 0, train_ratio: float = 0.75
) -> dict[str, Any]:
    """Train an MLlib classifier (labels: listing ids) with ``TrainValidationSplit`` over a
    ``ParamGridBuilder`` grid, and report accuracy and macro F1 on a held-out split.

    Args:
        lake: the lake folder (with ``features/``).
        model: ``logreg`` (regularization grid) or ``mlp`` (one hidden layer of 128, step
            size grid).
        seed: seed of the splits and the MLP.
        train_ratio: fraction of the rows trained on; the rest is the held-out split.

    Returns:
        ``{"model", "accuracy", "f1", "n_test"}`` (accuracy and F1 in [0, 1]).

    Raises:
        LookalikeError: unknown model. SourceError: no model recorded with the lake.
    """
    from pyspark.ml import Pipeline
    from pyspark.ml.classification import LogisticRegression, MultilayerPerceptronClassifier
    from pyspark.ml.evaluation import MulticlassClassificationEvaluator
    from pyspark.ml.feature import StringIndexer
    from pyspark.ml.tuning import ParamGridBuilder, TrainValidationSplit

    df = _vectors_frame(spark, lake, label="listing")
    indexer = StringIndexer(inputCol="label_text", outputCol="label")
    n_classes = df.select("label_text").distinct().count()
    dim = read_model(lake).dim
    if model == "logreg":
        clf: Any = LogisticRegression(maxIter=100)
        grid = ParamGridBuilder().addGrid(clf.regParam, [0.0, 0.01]).build()
    elif model == "mlp":
        clf = MultilayerPerceptronClassifier(seed=seed, maxIter=200, layers=[dim, 128, n_classes])
        grid = ParamGridBuilder().addGrid(clf.stepSize, [0.03, 0.1]).build()
    else:
        raise LookalikeError("model must be logreg or mlp")
    evaluator = MulticlassClassificationEvaluator(metricName="f1")
    tvs = TrainValidationSplit(
        estimator=clf, estimatorParamMaps=grid, evaluator=evaluator, trainRatio=0.8, seed=seed
    )
    train, test = df.randomSplit([train_ratio, 1 - train_ratio], seed=seed)
    fitted = Pipeline(stages=[indexer, tvs]).fit(train)
    pred = fitted.transform(test)
    acc = MulticlassClassificationEvaluator(metricName="accuracy").evaluate(pred)
    f1 = evaluator.evaluate(pred)
    return {"model": model, "accuracy": float(acc), "f1": float(f1), "n_test": pred.count()}
