"""The ``lookalike`` command: a thin face over :class:`lookalike.catalog.Catalog`.

This package owns the command line. This module builds the typer :data:`app` from the command
modules, one per command group, and is the console-script entry point (:func:`main`):

* :mod:`.search`: ``index``, ``search``, ``results``, ``stats``, ``delete``, ``config``,
  ``extractors``, ``demo``;
* :mod:`.reindex`: ``reindex`` (re-extract with the installed or another extractor);
* :mod:`.listing`: ``listing set | show | import``;
* :mod:`.ann`: ``ann build``, ``bench``;
* :mod:`.stream`: ``stream``, ``publish``;
* :mod:`.watch`: ``watch add | list | remove | hits | relay``;
* :mod:`.serve`: ``serve``;
* :mod:`.lake`: ``export``, ``import``, ``spark extract | search | cluster | train``;
* :mod:`.analyze`: ``train``, ``predict``, ``analyze clusters | outliers | map``, ``dedup``,
  ``eval``;
* :mod:`.common`: shared options, output helpers, the ``key=value`` type and the one error
  handler.

Exit codes: 0 success; 1 error (one line on stderr); 2 usage error; 3 ``index`` finished but
some images failed (listed on stderr and, with ``--failed-csv``, in a file).
"""

from __future__ import annotations

import logging
import os
from typing import Annotated

import typer

from . import analyze, ann, lake, listing, reindex, search, serve, stream, watch
from .common import escape_help

app = typer.Typer(
    name="lookalike",
    help=(
        "Semantic image search: index images into a catalog of feature vectors, then find "
        "lookalikes by image, stored id or vector.\n\n"
        "Start with:  lookalike demo ./demo  (writes a demo collection of real photos and "
        "prints the next commands)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.ERROR,
        format="%(levelname)s %(name)s: %(message)s",
    )


# Order of `lookalike --help`: the everyday commands first.
app.add_typer(search.commands)
app.add_typer(reindex.commands)
app.add_typer(ann.ann_app, name="ann")
app.add_typer(ann.commands)
app.add_typer(listing.listing_app, name="listing")
app.add_typer(stream.commands)
app.add_typer(watch.watch_app, name="watch")
app.add_typer(serve.commands)
app.add_typer(lake.commands)
app.add_typer(lake.spark_app, name="spark")
app.add_typer(analyze.commands)
app.add_typer(analyze.analyze_app, name="analyze")
escape_help(app)

#: Every typer app that holds commands (for tests and documentation tools).
GROUPS: tuple[typer.Typer, ...] = (
    search.commands,
    reindex.commands,
    ann.ann_app,
    ann.commands,
    listing.listing_app,
    stream.commands,
    watch.watch_app,
    serve.commands,
    lake.commands,
    lake.spark_app,
    analyze.commands,
    analyze.analyze_app,
)


def main() -> None:
    """Console-script entry point (``lookalike``)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


__all__ = ["GROUPS", "app", "main"]
