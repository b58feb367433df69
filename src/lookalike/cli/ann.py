"""ANN commands: ``ann build`` (train, fill and save a faiss index) and ``bench`` (latency and
recall@k of every engine and built index on the catalog's own vectors).

``ann build`` is registered on :data:`ann_app` (mounted as ``ann``), ``bench`` on
:data:`commands` (merged into the top level).
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from ..types import IndexKind
from .common import CatalogOpt, FormatOpt, OutputFormat, command, opened, out, print_json, say

ann_app = typer.Typer(help="Approximate nearest-neighbour indexes (faiss).", no_args_is_help=True)
commands = typer.Typer()

ANN_KINDS = "|".join(IndexKind.ann())


def ann_kind(text: str | IndexKind) -> IndexKind:
    """An ANN kind of :class:`~lookalike.types.IndexKind` (``ivf``, ``ivfpq``, ``hnsw``).

    Raises:
        typer.BadParameter: ``exact``, ``auto`` or an unknown word (a usage error).
    """
    if text in IndexKind.ann():
        return IndexKind(text)
    raise typer.BadParameter(f"{text!r} is not one of {', '.join(IndexKind.ann())}")


@command(ann_app, "build")
def ann_build(
    catalog: CatalogOpt,
    kind: Annotated[
        IndexKind,
        typer.Option(parser=ann_kind, metavar=f"[{ANN_KINDS}]", help="Which index to build."),
    ] = IndexKind.HNSW,
    nlist: Annotated[int, typer.Option(help="IVF cells (0: min(4 sqrt(n), n/39)).")] = 0,
    nprobe: Annotated[int, typer.Option(help="IVF cells scanned per query (0: nlist/8).")] = 0,
    pq_m: Annotated[int, typer.Option(help="IVF-PQ sub-quantizers (0: min(64, d/4)).")] = 0,
    hnsw_m: Annotated[int, typer.Option(help="HNSW links per node.")] = 32,
    ef_search: Annotated[int, typer.Option(help="HNSW search breadth.")] = 256,
) -> None:
    """Train and fill an ANN index of the catalog and save it in CATALOG/ann.

    Searches use it with --index KIND (or automatically once the collection is large); it
    follows later inserts and deletes. `lookalike bench` reports its recall@10.
    """
    with opened(catalog) as cat:
        ann = cat.build_index(
            kind, nlist=nlist, nprobe=nprobe, pq_m=pq_m, hnsw_m=hnsw_m, ef_search=ef_search
        )
    say(
        f"built {kind} over {ann.ntotal} vectors in {ann.build_seconds:.1f} s "
        f"({ann.params.factory(ann.dim)}); saved in {catalog}/ann"
    )


@command(commands)
def bench(
    catalog: CatalogOpt,
    queries: Annotated[int, typer.Option(help="Stored vectors used as queries.")] = 100,
    k: Annotated[int, typer.Option("-k", "--k", help="Hits per query.")] = 10,
    fmt: FormatOpt = OutputFormat.TABLE,
) -> None:
    """Latency (p50/p99) and recall@k of every engine and built ANN index on this catalog."""
    from ..bench import bench_catalog

    with opened(catalog) as cat:
        rows = bench_catalog(cat, n_queries=queries, k=k)
    if fmt == OutputFormat.JSON:
        for row in rows:
            print_json(row)
        return
    table = Table(
        title=f"{rows[0]['n']} vectors, d={rows[0]['d']}, {rows[0]['queries']} queries",
        title_justify="left",
    )
    for col in ("engine", "p50 ms", "p99 ms", f"recall@{k}"):
        table.add_column(col, justify="left" if col == "engine" else "right")
    for r in rows:
        table.add_row(
            r["name"], f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}", f"{r['recall_at_k']:.4f}"
        )
    out.print(table)
