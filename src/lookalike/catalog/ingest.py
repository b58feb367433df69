"""The batch ingest pipeline: sources -> parallel decode -> batched extraction -> store.

Worker processes read each file, hash it, skip it if the store already holds the same bytes
under the same key, decode and validate it (:func:`lookalike.images.decode_image`) and run the
extractor's cheap ``preprocess``. The parent process stacks the results into batches, runs the
model once per batch and writes each batch to the store in one transaction.

Guarantees:

* **one bad file never stops the run**: it is recorded in :attr:`IndexReport.failed` with its
  path and the reason, and the batch goes on;
* **idempotent**: a source whose ``(listing_id, image_id)`` is stored with the same SHA-256 is
  skipped without decoding; changed bytes under a stored key replace the row;
* **resumable**: batches are committed as they complete, so re-running an interrupted command
  skips what was committed and does the rest;
* **bounded memory**: at most ``workers * 4`` chunks of work are in flight;
* **no orphans**: a worker process dies with its parent, even when the parent is killed with
  ``kill -9`` (Linux ``prctl(PR_SET_PDEATHSIG)``; elsewhere a thread polling the parent);
  workers ignore SIGINT, so Ctrl-C in a terminal reaches the parent only, which shuts them
  down;
* **interrupted cleanly**: on ``KeyboardInterrupt`` (Ctrl-C, or SIGTERM in ``lookalike
  index``) the batch in hand is committed before :class:`IndexInterrupted` (a
  ``KeyboardInterrupt`` carrying the partial :class:`IndexReport`) propagates.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..errors import ImageError
from ..extract import BaseExtractor, get_extractor
from ..images import ImageSource, decode_image, read_bytes, sha256_hex
from ..store import Store
from ..types import FeatureBatch, Key, MatchRecord
from .thumbs import make_thumbnail

log = logging.getLogger(__name__)

#: The watchlist check of a write batch: ``(keys, sha256s, (n, d) float32 vectors)`` -> the
#: matches to record in the batch's transaction (``Catalog.watch_matches``).
WatchCheck = Callable[[Sequence[Key], Sequence[str], np.ndarray], list[MatchRecord]]

#: Below this many sources, decoding runs in the calling process (a pool costs ~1 s to start).
INLINE_BELOW = 48
#: Sources per task sent to a worker process.
CHUNK = 8


@dataclass
class IndexReport:
    """What an ingest run did.

    Attributes:
        added: new images stored.
        updated: stored images whose bytes changed and were re-extracted.
        skipped: images already stored with the same bytes (no work done).
        failed: ``(location, reason)`` for every source that could not be ingested.
        seconds: wall time of the run, in seconds.
    """

    added: int = 0
    updated: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def total(self) -> int:
        """Sources seen."""
        return self.added + self.updated + self.skipped + len(self.failed)

    @property
    def images_per_s(self) -> float:
        """Sources processed per second of wall time (images/s)."""
        return self.total / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        """One line for humans."""
        return (
            f"{self.added} added, {self.updated} updated, {self.skipped} unchanged, "
            f"{len(self.failed)} failed in {self.seconds:.1f} s ({self.images_per_s:.1f} images/s)"
        )


class IndexInterrupted(KeyboardInterrupt):
    """An ingest run was interrupted; the batch in hand was committed first.

    Attributes:
        report: what the run did up to then (``seconds`` included).
    """

    def __init__(self, report: IndexReport) -> None:
        super().__init__("interrupted")
        self.report = report


@dataclass
class _Task:
    source: ImageSource
    known_sha256: str | None


@dataclass
class Prepared:
    """One image after decoding and the extractor's ``preprocess``, ready to embed.

    Attributes:
        source: where it came from and its key.
        status: ``"ok"`` (decoded), ``"same"`` (the store holds these bytes under this key:
            nothing to do) or ``"failed"`` (``reason`` says why, naming the file).
        array: the preprocessed image (``status == "ok"`` only).
        data: the encoded bytes, when the writer keeps them for a running reindex
            (written from bytes: ``Catalog.add_many``).
    """

    source: ImageSource
    status: str
    sha256: str = ""
    width: int = 0
    height: int = 0
    array: np.ndarray | None = None
    reason: str = ""
    thumbnail: bytes | None = None
    data: bytes | None = None


_worker_extractor: BaseExtractor | None = None


#: Seconds between checks of the parent, where ``prctl`` is not available.
PARENT_POLL_S = 0.5
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _kill_me_with_parent() -> bool:
    """Ask Linux to SIGKILL this process when its parent dies; False where that is not
    possible (not Linux, or the call failed)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int) -> None:
    """Exit this process as soon as ``parent`` is no longer its parent (it died)."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(1)


def _init_worker(extractor_name: str, parent: int) -> None:
    global _worker_extractor
    if not _kill_me_with_parent():
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)
    # Ctrl-C goes to the whole process group: only the parent handles it (and shuts the pool
    # down); a SIGTERM handler the parent installed must not run in a worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _worker_extractor = get_extractor(extractor_name)


def prepare_bytes(
    data: bytes,
    source: ImageSource,
    extractor: BaseExtractor,
    known_sha256: str | None = None,
    thumbnail: bool = False,
) -> Prepared:
    """Hash, decode and preprocess one image's bytes; never raises for a bad image.

    Args:
        data: the encoded file.
        source: key and location (the location names the image in error reasons).
        extractor: whose ``preprocess`` to run.
        known_sha256: the SHA-256 stored under this key, if any: equal bytes are ``"same"``.
        thumbnail: also make a JPEG thumbnail (:func:`lookalike.thumbs.make_thumbnail`).
    """
    try:
        digest = sha256_hex(data)
        if digest == known_sha256:
            return Prepared(source, "same", sha256=digest)
        decoded = decode_image(data, name=source.location, draft_size=extractor.draft_size)
        array = extractor.preprocess(decoded.image)
        thumb = make_thumbnail(decoded.image) if thumbnail else None
    except ImageError as exc:
        return Prepared(source, "failed", reason=str(exc))
    except Exception as exc:  # a decoder bug must not stop a run of a million images
        reason = f"{source.location}: {type(exc).__name__}: {exc}"
        return Prepared(source, "failed", reason=reason)
    return Prepared(
        source,
        "ok",
        sha256=digest,
        width=decoded.width,
        height=decoded.height,
        array=array,
        thumbnail=thumb,
    )


def write_prepared(
    store: Store,
    extractor: BaseExtractor,
    items: Sequence[Prepared],
    labels: Sequence[dict | None] | None = None,
    label_fn: Callable[[np.ndarray], list[dict]] | None = None,
    watch: WatchCheck | None = None,
) -> tuple[int, int]:
    """Embed the ``"ok"`` items in one batch and upsert them in one transaction.

    Args:
        labels: optional per-item metadata stored in the ``labels`` column (same order as
            ``items``; entries of items that are not ``"ok"`` are ignored).
        label_fn: computes more metadata from the ``(m, d)`` vectors of the ``"ok"`` items
            (e.g. a classifier's prediction), merged into ``labels``.
        watch: the watchlist check; its matches are recorded in the same transaction.

    Returns:
        ``(added, updated)``: new keys, and stored keys whose bytes changed.
    """
    pairs = [(p, labels[i] if labels else None) for i, p in enumerate(items) if p.status == "ok"]
    if not pairs:
        return 0, 0
    ok = [p for p, _ in pairs]
    vectors = extractor.embed(np.stack([p.array for p in ok]))  # type: ignore[misc]
    if label_fn is not None:
        more = label_fn(vectors)
        pairs = [(p, {**(lab or {}), **m}) for (p, lab), m in zip(pairs, more, strict=True)]
    keys = [(p.source.listing_id, p.source.image_id) for p in ok]
    known = store.existing(keys)
    sha256s = [p.sha256 for p in ok]
    blobs = [p.data for p in ok]
    matches = watch(keys, sha256s, vectors) if watch is not None else []
    store.upsert(
        FeatureBatch(
            listing_ids=[k[0] for k in keys],
            image_ids=[k[1] for k in keys],
            vectors=vectors,
            sha256s=sha256s,
            sources=[p.source.location for p in ok],
            widths=[p.width for p in ok],
            heights=[p.height for p in ok],
            labels=[lab for _, lab in pairs],
            model=extractor.info,
            blobs=blobs if any(b is not None for b in blobs) else None,
        ),
        matches=matches,
    )
    updated = sum(1 for k in keys if k in known)
    return len(keys) - updated, updated


def _prepare_one(task: _Task, extractor: BaseExtractor) -> Prepared:
    try:
        data = read_bytes(task.source.location)
    except ImageError as exc:
        return Prepared(task.source, "failed", reason=str(exc))
    return prepare_bytes(data, task.source, extractor, task.known_sha256)


def _prepare_chunk(tasks: list[_Task]) -> list[Prepared]:
    assert _worker_extractor is not None
    return [_prepare_one(t, _worker_extractor) for t in tasks]


def default_workers() -> int:
    """Decode worker processes: one per core (``LOOKALIKE_WORKERS`` overrides)."""
    env = os.environ.get("LOOKALIKE_WORKERS")
    if env:
        return max(0, int(env))
    return os.cpu_count() or 1


class Progress:
    """The ingest progress bar: tqdm on stderr counting images (``img``, images/s) and the
    failures so far; a no-op when not ``enabled``.

    Args:
        total: images expected. desc: the bar's label (``index``, ``reindex``).
    """

    def __init__(self, total: int, enabled: bool, desc: str = "index") -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                unit="img",
                desc=desc,
                file=sys.stderr,
                dynamic_ncols=True,
                smoothing=0.1,
            )

    def update(self, n: int, failed: int) -> None:
        """Count ``n`` more images done; show ``failed`` (the failures so far)."""
        if self.bar is not None:
            self.bar.update(n)
            if failed:
                self.bar.set_postfix(failed=failed, refresh=False)

    def grow(self, n: int) -> None:
        """Expect ``n`` more images than said so far."""
        if self.bar is not None and n:
            self.bar.total = (self.bar.total or 0) + n
            self.bar.refresh()

    def close(self) -> None:
        """Close the bar (its last state stays on the terminal)."""
        if self.bar is not None:
            self.bar.close()


def run_index(
    store: Store,
    extractor: BaseExtractor,
    sources: Iterable[ImageSource],
    *,
    workers: int | None = None,
    batch_size: int = 32,
    progress: bool = False,
    on_failure: Callable[[str, str], None] | None = None,
    watch: WatchCheck | None = None,
) -> IndexReport:
    """Ingest ``sources`` into ``store`` with ``extractor`` (see the module docstring).

    Args:
        store: destination; its model must already be claimed for ``extractor.info``.
        extractor: makes the vectors (the model runs in this process).
        sources: images to ingest; a key seen twice in one run is a failure of the second.
        workers: decode processes (default :func:`default_workers`); 0 decodes in-process.
        batch_size: images per model call and per store transaction.
        progress: show a tqdm bar on stderr with images/s.
        on_failure: called with ``(location, reason)`` as each failure happens.
        watch: the watchlist check of every batch (:func:`write_prepared`).

    Returns:
        :class:`IndexReport`.

    Raises:
        IndexInterrupted: ``KeyboardInterrupt`` during the run; the batch in hand was
            committed, and the exception carries the partial report.
    """
    t0 = time.perf_counter()
    report = IndexReport()
    srcs = list(sources)
    seen: dict[Key, str] = {}
    unique: list[ImageSource] = []
    for s in srcs:
        key = (s.listing_id, s.image_id)
        if key in seen:
            _fail(
                report,
                on_failure,
                s.location,
                f"{s.location}: duplicate key {key} (already used by {seen[key]})",
            )
        else:
            seen[key] = s.location
            unique.append(s)
    n_workers = default_workers() if workers is None else workers
    if len(unique) < INLINE_BELOW:
        n_workers = 0
    bar = Progress(len(srcs), progress)
    bar.update(len(srcs) - len(unique), len(report.failed))
    pending: list[Prepared] = []

    def flush() -> None:
        added, updated = write_prepared(store, extractor, pending, watch=watch)
        report.added += added
        report.updated += updated
        bar.update(len(pending), len(report.failed))
        pending.clear()

    def consume(items: Sequence[Prepared]) -> None:
        for p in items:
            if p.status == "failed":
                _fail(report, on_failure, p.source.location, p.reason)
            elif p.status == "same":
                report.skipped += 1
            pending.append(p)
            if sum(1 for x in pending if x.status == "ok") >= batch_size:
                flush()

    try:
        if n_workers == 0:
            for tasks in _task_chunks(store, unique, CHUNK * 8):
                consume([_prepare_one(t, extractor) for t in tasks])
        else:
            _run_pool(store, extractor, unique, n_workers, consume)
        flush()
    except KeyboardInterrupt as exc:
        try:
            flush()  # commit the batch in hand (idempotent if it was being written)
        except (Exception, KeyboardInterrupt):  # a second interrupt abandons it
            log.warning("the last batch was not committed", exc_info=True)
        report.seconds = time.perf_counter() - t0
        raise IndexInterrupted(report) from exc
    finally:
        bar.close()
        report.seconds = time.perf_counter() - t0
    return report


def _fail(report: IndexReport, cb: Callable[[str, str], None] | None, loc: str, why: str) -> None:
    report.failed.append((loc, why))
    log.warning("skipped %s", why)
    if cb is not None:
        cb(loc, why)


def _task_chunks(store: Store, sources: Sequence[ImageSource], size: int) -> Iterable[list[_Task]]:
    """Tasks in chunks, each with the stored SHA-256 of its key (one store query per chunk)."""
    for start in range(0, len(sources), size):
        chunk = sources[start : start + size]
        known = store.existing([(s.listing_id, s.image_id) for s in chunk])
        yield [_Task(s, known.get((s.listing_id, s.image_id))) for s in chunk]


def _run_pool(
    store: Store,
    extractor: BaseExtractor,
    sources: Sequence[ImageSource],
    n_workers: int,
    consume: Callable[[Sequence[Prepared]], None],
) -> None:
    # fork, not spawn/forkserver: those re-import the caller's __main__, which breaks scripts
    # without an ``if __name__ == "__main__"`` guard. Workers only decode with Pillow and never
    # touch the parent's ONNX Runtime / OpenMP thread pools, which is what makes fork unsafe.
    ctx = multiprocessing.get_context("fork")
    max_in_flight = n_workers * 4
    with ProcessPoolExecutor(
        max_workers=n_workers,
        mp_context=ctx,
        initializer=_init_worker,
        initargs=(extractor.name, os.getpid()),
    ) as pool:
        in_flight: deque[Future[list[Prepared]]] = deque()
        try:
            for big in _task_chunks(store, sources, CHUNK * max_in_flight):
                for start in range(0, len(big), CHUNK):
                    while len(in_flight) >= max_in_flight:
                        consume(in_flight.popleft().result())
                    in_flight.append(pool.submit(_prepare_chunk, big[start : start + CHUNK]))
            while in_flight:
                consume(in_flight.popleft().result())
        except BaseException:
            for fut in in_flight:
                fut.cancel()
            raise
