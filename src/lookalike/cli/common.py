"""What every command module of the ``lookalike`` CLI shares.

This module owns: the output consoles and helpers (JSON lines, hit tables), the exit codes,
the shared options as ``Annotated`` aliases (catalog, format, progress, device, engine, the
neighbour index and ``--nprobe`` of the all-pairs analytics), the ``key=value`` parameter type,
the one error handler every command is wrapped in, and :func:`command`, which registers a
command with that handler and help text fit for the terminal.

Exit codes (the README's contract): 0 ok; 1 error, one line ``error: ...`` on stderr; 2 usage
error; 3 ``index`` finished but some files failed.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any, NamedTuple, NoReturn, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..errors import LookalikeError, translate
from ..types import EngineKind, IndexKind, SearchResult
from ..values import parse_value

if TYPE_CHECKING:
    from ..catalog import Catalog

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3

#: Set to ``1`` to get the traceback of an unexpected exception instead of one line.
DEBUG_ENV = "LOOKALIKE_DEBUG"


class OutputFormat(StrEnum):
    """How a command prints its result: ``table`` (for people) or ``json`` (for programs)."""

    TABLE = "table"
    JSON = "json"


# ---------------------------------------------------------------------------- shared options

CatalogOpt = Annotated[
    str,
    typer.Option(
        "--catalog",
        "-c",
        envvar="LOOKALIKE_CATALOG",
        help="Catalog folder (created on first index) or postgresql:// URL. "
        "Env: LOOKALIKE_CATALOG.",
    ),
]
FormatOpt = Annotated[
    OutputFormat, typer.Option("--format", "-f", help="table (for people) or json (for programs).")
]
ProgressOpt = Annotated[bool, typer.Option(help="Show a progress bar (stderr).")]
DeviceOpt = Annotated[
    str,
    typer.Option(help="cnn inference: auto (GPU if present, else ONNX Runtime CPU), cpu, cuda."),
]
EngineOpt = Annotated[
    EngineKind | None,
    typer.Option(
        help="Exact engine: auto (default), fast (compiled kernels), numpy (the reference), "
        "torch (GPU). Env: LOOKALIKE_ENGINE.",
    ),
]
NeighbourIndexOpt = Annotated[
    IndexKind,
    typer.Option(
        "--index",
        help="Which engine answers the neighbour queries (the choices of search --index): "
        "exact (every pair scored, O(n^2)); ivf or ivfpq (a built IVF index, `lookalike ann "
        "build --kind ivf`: a blocked join of each cell with its --nprobe nearest cells, far "
        "faster on millions of images; a pair can be missed, never invented); hnsw (a built "
        "HNSW graph, per-image search); auto (the catalog's `config --index` setting).",
    ),
]
NprobeOpt = Annotated[
    int | None,
    typer.Option(
        "--nprobe",
        help="With --index ivf/ivfpq: neighbouring cells each IVF cell is joined with (default "
        "16; more finds more pairs, slower).",
    ),
]
KOpt = Annotated[int, typer.Option("-k", "--k", help="How many.")]


# ---------------------------------------------------------------------------- key=value


class Assignment(NamedTuple):
    """One ``key=value`` from the command line; ``value`` is parsed by
    :func:`lookalike.values.parse_value` (numbers, true/false, null -> None)."""

    key: str
    value: Any


def key_value(text: str | Assignment) -> Assignment:
    """The ``key=value`` parameter type (typer ``parser=``): ``"stock_level=0"`` ->
    ``Assignment("stock_level", 0)``.

    Raises:
        typer.BadParameter: no ``=`` or an empty key (a usage error, exit 2).
    """
    if isinstance(text, Assignment):
        return text
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise typer.BadParameter(f"{text!r} is not key=value")
    return Assignment(key.strip(), parse_value(value))


KEY_VALUE_METAVAR = "KEY=VALUE"


def as_attrs(items: Iterable[Assignment] | None) -> dict[str, Any]:
    """``key=value`` assignments as a dict (a later key wins)."""
    return {a.key: a.value for a in items or ()}


# ---------------------------------------------------------------------------- output


def print_json(obj: Any) -> None:
    """One JSON document on one line of stdout."""
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")


def say(text: str) -> None:
    """A line for people on stdout (no markup, no highlighting)."""
    out.print(text, highlight=False, markup=False)


def warn(text: str) -> None:
    """A line for people on stderr (no markup, no highlighting)."""
    err.print(text, highlight=False, markup=False)


def print_results(
    results: Sequence[SearchResult],
    fmt: OutputFormat,
    grouped: bool,
    band: Callable[[float], str] | None = None,
) -> None:
    """Search results: one JSON line each, or a table each (``rank score listing image``).

    ``band`` names each score's band (``lookalike.analytics.ScoreBands.band``): a ``band``
    column in the table, a ``"band"`` key in each JSON hit.
    """
    for res in results:
        if fmt == OutputFormat.JSON:
            d = res.to_dict()
            if band is not None:
                for hit in d["hits"]:
                    hit["band"] = band(hit["score"])
            print_json(d)
            continue
        title = f"query {res.query_id}" + (" (saved)" if res.saved else "")
        table = Table(title=title, title_justify="left")
        table.add_column("rank", justify="right")
        table.add_column("score", justify="right")
        if band is not None:
            table.add_column("band")
        table.add_column("listing_id")
        table.add_column("image_id")
        if grouped:
            table.add_column("images", justify="right")
        for h in res.hits:
            row = [str(h.rank), f"{h.score:.4f}"]
            if band is not None:
                row.append(band(h.score))
            row += [escape(h.listing_id), escape(h.image_id)]
            if grouped:
                row.append(str(h.n_images))
            table.add_row(*row)
        out.print(table)
        if not res.hits:
            say("no hits")


def print_hit_lines(result: SearchResult) -> None:
    """Hits as plain lines: ``rank  score  listing_id  image_id``."""
    for h in result.hits:
        say(f"{h.rank:>4}  {h.score:.4f}  {h.listing_id}  {h.image_id}")


# ---------------------------------------------------------------------------- catalog


@contextmanager
def opened(
    catalog: str,
    *,
    extractor: str | None = None,
    device: str = "auto",
    create: bool = False,
    engine: str | None = None,
) -> Iterator[Catalog]:
    """Open the catalog for one command and close it afterwards."""
    from ..catalog import open_catalog

    cat = open_catalog(catalog, extractor=extractor, device=device, create=create, engine=engine)
    with cat:
        yield cat


@contextmanager
def term_as_interrupt() -> Iterator[list[int]]:
    """Inside, SIGTERM raises ``KeyboardInterrupt`` in the main thread, as Ctrl-C does, so a
    long command commits the batch in hand and stops the same way for both; yields the list
    of signals received (empty for Ctrl-C). Outside the main thread it changes nothing."""
    import signal
    import threading

    received: list[int] = []

    def on_term(signum: int, frame: object) -> None:
        received.append(signum)
        raise KeyboardInterrupt

    in_main = threading.current_thread() is threading.main_thread()  # else signals cannot be set
    previous = signal.signal(signal.SIGTERM, on_term) if in_main else None
    try:
        yield received
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous or signal.SIG_DFL)


def interrupted_exit(received: Sequence[int]) -> int:
    """The exit code of a command stopped by a signal: 128 + its number (130 for Ctrl-C,
    143 for SIGTERM)."""
    import signal

    return 128 + (received[0] if received else signal.SIGINT)


# ---------------------------------------------------------------------------- errors


def one_line(text: str) -> str:
    """``text`` on one line (an error message must not span lines)."""
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def error_message(exc: BaseException) -> str:
    """What the user reads after ``error:`` for an exception a command raised.

    Project errors and backend errors (through :func:`lookalike.errors.translate`) give their
    message; ``OSError`` and ``ValueError`` (bad input: a missing file, a malformed ``.npy``)
    theirs; anything else is an internal error, named with its type.
    """
    mapped = translate(exc)
    if mapped is not None:
        return one_line(str(mapped)) or type(mapped).__name__
    if isinstance(exc, OSError):
        if exc.strerror and exc.filename is not None:
            return f"{exc.filename}: {exc.strerror}"
        return one_line(str(exc)) or type(exc).__name__
    if isinstance(exc, ValueError):
        return one_line(str(exc)) or type(exc).__name__
    return f"internal error: {type(exc).__name__}: {one_line(str(exc))}"


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    """Print ``error: message`` on stderr and exit with ``code``."""
    err.print(f"[red]error:[/red] {escape(one_line(message))}", highlight=False)
    raise typer.Exit(code)


def usage_error(message: str) -> NoReturn:
    """A usage error the option parser cannot see (exit 2, one line)."""
    fail(message, EXIT_USAGE)


def parse_threshold(text: str) -> float | None:
    """A ``--threshold`` value: ``auto`` -> None (the catalog's calibrated near-duplicate
    threshold, else the extractor's default), else a cosine in [-1, 1] (exit 2 otherwise)."""
    if text.strip().lower() == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        usage_error(f"--threshold: {text!r} is not a number or 'auto'")
    if not -1.0 <= value <= 1.0:
        usage_error(f"--threshold: {value} is not a cosine in [-1, 1]")
    return value


#: Seconds per unit of an age (``--older-than 7d``, ``--results-ttl 12h``).
AGE_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_AGE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*")


def parse_age(text: str, option: str) -> float:
    """An age such as ``7d``, ``12h``, ``30m``, ``90s``, ``2w`` or ``3600`` (seconds), in
    seconds; a usage error (exit 2, naming ``option``) otherwise."""
    m = _AGE.fullmatch(text.lower())
    if m is None or m.group(2) not in AGE_UNITS:
        usage_error(f"{option}: {text!r} is not an age such as 7d, 12h, 30m, 90s or 2w")
    return float(m.group(1)) * AGE_UNITS[m.group(2)]


P = ParamSpec("P")
R = TypeVar("R")


def handle_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """The CLI's one error handler: every command is wrapped in it at registration.

    ``LookalikeError``, backend errors (SQLite, PostgreSQL, NATS via
    :func:`lookalike.errors.translate`), ``OSError`` and ``ValueError`` become one line
    ``error: ...`` on stderr and exit 1. Anything else is a bug: one line ``error: internal
    error: <type>: <message>``, exit 1; with ``LOOKALIKE_DEBUG=1`` it is re-raised for the
    traceback. typer's own exits and usage errors pass through.
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except Exception as exc:
            known = isinstance(exc, LookalikeError | OSError | ValueError) or translate(exc)
            if not known and os.environ.get(DEBUG_ENV) == "1":
                raise
            fail(error_message(exc))

    return wrapper


# ---------------------------------------------------------------------------- registration


def reflow(doc: str) -> str:
    """A command docstring as ``--help`` should show it: typer keeps the single line breaks
    of every paragraph after the first, so join them; indented paragraphs (examples) stay."""
    paragraphs = inspect.cleandoc(doc).split("\n\n")
    return "\n\n".join(
        p if p.startswith((" ", "\b")) else " ".join(line.strip() for line in p.splitlines())
        for p in paragraphs
    )


F = TypeVar("F", bound=Callable[..., Any])


def command(group: typer.Typer, name: str | None = None) -> Callable[[F], F]:
    """Register the decorated function as a command of ``group``, wrapped in
    :func:`handle_errors`, with its docstring reflowed as the help. The function itself is
    returned unchanged (callable from Python and tests)."""

    def register(fn: F) -> F:
        group.command(name, help=reflow(fn.__doc__ or ""))(handle_errors(fn))
        return fn

    return register


def escape_help(app: typer.Typer) -> None:
    """Escape rich markup in every help text under ``app`` (groups, commands, parameters), so
    that ``--help`` shows text such as ``pip install 'lookalike[spark]'`` as written: typer's
    rich mode would read ``[spark]`` as a style tag and drop it. Call it once, after every
    command is registered; each text is escaped once even when an option alias is shared."""
    seen: set[int] = set()

    def fix(obj: Any) -> None:
        if obj is None or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(getattr(obj, "help", None), str):
            obj.help = escape(obj.help)

    def walk(group: typer.Typer) -> None:
        fix(group.info)
        for cmd in group.registered_commands:
            fix(cmd)
            if cmd.callback is not None:
                for param in inspect.signature(cmd.callback, eval_str=True).parameters.values():
                    for meta in getattr(param.annotation, "__metadata__", ()):
                        fix(meta)
        for sub in group.registered_groups:
            fix(sub)
            if sub.typer_instance is not None:
                walk(sub.typer_instance)

    walk(app)
