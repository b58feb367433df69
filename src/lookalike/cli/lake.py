"""Parquet lake and Spark commands: ``export``, ``import`` (catalog <-> lake tables) and
``spark extract``, ``spark search``, ``spark cluster``, ``spark train`` (the same jobs on
Apache Spark).

``export`` and ``import`` are registered on :data:`commands` (merged into the top level), the
Spark jobs on :data:`spark_app` (mounted as ``spark``). ``spark search`` embeds query images
with :func:`lookalike.spark.read_query_table`, the one code path for query images on Spark.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from ..errors import QueryError, optional_import
from ..types import Aggregation, GroupBy
from .common import (
    CatalogOpt,
    FormatOpt,
    OutputFormat,
    command,
    opened,
    print_hit_lines,
    print_json,
    say,
)

#: Partitions of an exported lake (``lookalike.lake.DEFAULT_PARTS``; the lake module needs
#: pyarrow, which the default install lacks, so the CLI does not import it to start).
DEFAULT_PARTS = 16

commands = typer.Typer()
spark_app = typer.Typer(
    help="The same jobs on Apache Spark (pip install 'lookalike[spark]'; Java 17).",
    no_args_is_help=True,
)

MasterOpt = Annotated[
    str, typer.Option(help="Spark master: local[*], spark://host:7077, yarn, k8s://...")
]


@command(commands, "export")
def export_(
    catalog: CatalogOpt,
    parquet: Annotated[Path, typer.Option(help="Folder to write the lake tables into.")],
    parts: Annotated[
        int, typer.Option(help="Partitions of features (hash of listing_id).")
    ] = DEFAULT_PARTS,
) -> None:
    """Write the catalog as Parquet tables (features partitioned by a hash of listing_id,
    listings, query_results): the input of the Spark jobs and any other engine."""
    from ..lake import export_catalog

    with opened(catalog) as cat:
        counts = export_catalog(cat, parquet, parts=parts)
    say(f"exported {counts} to {parquet}")


@command(commands, "import")
def import_(
    parquet: Annotated[Path, typer.Option(help="A lake folder (export or spark extract).")],
    catalog: CatalogOpt,
) -> None:
    """Read lake tables (from `lookalike export` or `lookalike spark extract`) into a catalog."""
    from ..lake import import_catalog

    with opened(catalog, create=True) as cat:
        counts = import_catalog(parquet, cat)
    say(f"imported {counts} into {catalog}")


@command(spark_app, "extract")
def spark_extract(
    input_: Annotated[
        str, typer.Option("--input", help="Manifest (.parquet/.csv) with listing_id,image_id,path.")
    ],
    out_dir: Annotated[str, typer.Option("--out", help="Lake folder to write.")],
    extractor: Annotated[str, typer.Option(help="cnn, cnn-int8, hog or colorhist.")] = "cnn",
    parts: Annotated[
        int, typer.Option(min=1, help="Partitions of features (hash of listing_id); also tasks.")
    ] = DEFAULT_PARTS,
    master: MasterOpt = "local[*]",
) -> None:
    """Extract feature vectors on Spark executors; failed images land in an error column."""
    from .. import spark as lsp

    counts = lsp.extract(lsp.session(master), input_, out_dir, extractor=extractor, parts=parts)
    say(
        f"extracted {counts['images'] - counts['failed']} images into {out_dir} "
        f"({counts['failed']} failed: see the error column)"
    )


def _lake_root(features: str) -> Path:
    """The lake folder of ``--features`` (the lake itself, or its ``features`` folder)."""
    root = Path(features)
    return root.parent if root.name == "features" else root


def _embed_query_image(lake: Path, image: str) -> np.ndarray:
    """``(1, d)``: one query image embedded with the lake's extractor, through the same
    :func:`lookalike.spark.read_query_table` path as a ``--queries`` table of paths."""
    pa = optional_import("pyarrow", "parquet", "a query image for a Spark search")
    pq = optional_import("pyarrow.parquet", "parquet", "a query image for a Spark search")

    from .. import spark as lsp
    from ..extract import get_extractor
    from ..lake import read_model

    extractor = get_extractor(read_model(lake).name)
    with tempfile.TemporaryDirectory(prefix="lookalike-query-") as tmp:
        table = Path(tmp) / "query.parquet"
        pq.write_table(pa.table({"path": [image]}), table)
        try:
            _, vectors = lsp.read_query_table(str(table), extractor)
        except QueryError as exc:  # name the image, not the temporary table's row
            raise QueryError(str(exc).replace(f"{table}: row 0 (query_id 0): ", "")) from None
    return vectors


@command(spark_app, "search")
def spark_search(
    features: Annotated[str, typer.Option(help="Lake folder (from export or spark extract).")],
    query: Annotated[
        str | None, typer.Argument(help="Query image (embedded on the driver).")
    ] = None,
    vector: Annotated[
        Path | None, typer.Option(help="Query vector(s): .npy (d,) or (n, d).")
    ] = None,
    queries: Annotated[
        str | None,
        typer.Option(
            help="Batch: a query table (.parquet/.csv) with query_id and a vector or path "
            "column; with --output, the results table keeps its query ids."
        ),
    ] = None,
    listings: Annotated[
        str | None, typer.Option(help="Listings table (default: in the lake).")
    ] = None,
    k: Annotated[int | None, typer.Option("-k", "--k", help="Hits (default 10).")] = None,
    group_by: Annotated[
        GroupBy | None, typer.Option(help="listing: one hit per listing, scored by --agg.")
    ] = None,
    agg: Annotated[
        Aggregation,
        typer.Option(help="Per-listing score: max, mean or sum-top-n (of the --top-n best)."),
    ] = Aggregation.MAX,
    top_n: Annotated[int, typer.Option(help="n of sum-top-n.")] = 3,
    threshold: Annotated[float | None, typer.Option(help="Only hits with score > T.")] = None,
    where: Annotated[str | None, typer.Option(help="Filter on listing attributes.")] = None,
    output: Annotated[
        str | None,
        typer.Option(
            "--output",
            "--save",
            help="Write the hits as a query_results Parquet table into this folder. --save is "
            "the older name of this option; unlike `lookalike search --save` (a flag that "
            "writes into the catalog), it takes a folder.",
        ),
    ] = None,
    master: MasterOpt = "local[*]",
    fmt: FormatOpt = OutputFormat.TABLE,
) -> None:
    """Exact search on Spark: same options and the same JSON as `lookalike search`."""
    from .. import spark as lsp

    if sum(x is not None for x in (query, vector, queries)) != 1:
        raise QueryError("give one of: a query image, --vector, --queries")
    lake = _lake_root(features)
    ids = None
    if vector is not None:
        q = np.load(vector)
    elif queries is not None:
        from ..extract import get_extractor
        from ..lake import read_model

        ids, q = lsp.read_query_table(queries, get_extractor(read_model(lake).name))
    else:
        assert query is not None
        q = _embed_query_image(lake, query)
    results = lsp.search(
        lsp.session(master),
        features,
        q,
        k=k,
        group_by=group_by,
        agg=agg,
        top_n=top_n,
        threshold=threshold,
        where=where,
        listings=listings,
        save=output,
        query_ids=ids,
    )
    for res in results:
        if fmt == OutputFormat.JSON:
            print_json(res.to_dict())
        else:
            print_hit_lines(res)


@command(spark_app, "cluster")
def spark_cluster(
    features: Annotated[str, typer.Option(help="Lake folder.")],
    k: Annotated[int, typer.Option("-k", "--k", help="Clusters.")],
    master: MasterOpt = "local[*]",
) -> None:
    """k-means with Spark MLlib (cosine distance); prints the cluster sizes as JSON."""
    from .. import spark as lsp

    result = lsp.kmeans(lsp.session(master), features, k=k)
    print_json(
        {"k": result["k"], "sizes": {str(c): int(n) for c, n in sorted(result["sizes"].items())}}
    )


@command(spark_app, "train")
def spark_train(
    features: Annotated[str, typer.Option(help="Lake folder (labels: listing ids).")],
    model: Annotated[str, typer.Option(help="logreg or mlp.")] = "logreg",
    master: MasterOpt = "local[*]",
) -> None:
    """Train an MLlib classifier with TrainValidationSplit + ParamGridBuilder; prints its
    held-out report as JSON."""
    from .. import spark as lsp

    print_json(lsp.train_classifier(lsp.session(master), features, model=model))
