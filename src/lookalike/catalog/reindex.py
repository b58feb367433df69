"""Re-extracting a catalog with the installed extractor: ``lookalike reindex``,
:meth:`CatalogReindex.reindex`.

A changed extractor is a new model version (``ModelInfo``); a catalog holds the vectors of one
model. When the installed extractor makes another version than the stored vectors, searches by
vector or stored id keep working and anything that embeds an image says so in one line
(:class:`~lookalike.errors.ModelVersionError`). ``reindex`` brings the catalog to the installed
version (or, with ``extractor=``, to another extractor: a new model and dimension):

* **From what the catalog keeps.** The store keeps each image's source (path or URL) and the
  SHA-256 of its bytes, not the bytes; images written from bytes while a reindex runs (HTTP
  uploads, the stream) have their bytes kept until the swap; uploads have a 192-px thumbnail.
  Each image is re-read from, in order: its kept bytes; its source, when that still hashes to
  the stored SHA-256; its thumbnail (only with ``thumbnails=True``: lower fidelity). An image
  none of these give is reported in one line and counted; the run goes on.
* **Beside the live vectors.** New vectors go to a second generation in the store
  (:mod:`lookalike.store.reindex`), committed in batches: searches keep answering from the old
  vectors, and a killed run (even ``kill -9``) resumes where it stopped: committed batches are
  not extracted again.
* **Catch-up, then one swap.** Images written during the run (with the old model) are
  re-extracted by passes over the rows written since it started, then one transaction under the
  store's write lock switches the model and every vector, or changes nothing when a write
  slipped in (another pass follows) or when images could not be re-extracted (the catalog stays
  as it was unless ``drop_missing``: then they are deleted).
* **What follows the swap.** The engine files are rebuilt for the new model, ANN indexes are
  rebuilt with their parameters, the near-duplicate calibration is dropped, the per-image
  analysis cleared, a classifier trained on the old vectors set aside, and watchlist entries
  taken from stored images re-pointed to the new vectors; the report says each.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..engine.ann import AnnParams
from ..errors import LookalikeError, QueryError, StoreError
from ..extract import BaseExtractor
from ..images import ImageSource, is_url, read_bytes, sha256_hex
from ..store import ReindexItem, ReindexProgress, ReindexRow, SwapOutcome
from ..types import IndexKind, ModelInfo
from .base import CatalogBase
from .classifier import META_FILE, MODEL_FILE
from .ingest import Prepared, Progress, default_workers, prepare_bytes
from .rows import CALIBRATION_SETTING
from .thumbs import thumbnail_path

log = logging.getLogger(__name__)

#: Swaps tried (each after a catch-up pass) before giving up on a stream of writes.
SWAP_ATTEMPTS = 20
#: Where the bytes of a re-extracted image came from (:attr:`ReindexReport.origins`).
ORIGINS = ("file", "url", "bytes", "thumbnail")


@dataclass
class ReindexReport:
    """What a reindex did (or, with ``dry_run``, would do).

    Attributes:
        source_model: tag (``name@version``) of the model the catalog held.
        target: tag of the model it is reindexed to.
        status: ``swapped`` (the catalog now holds ``target``), ``current`` (it already did),
            ``incomplete`` (some images or watchlist entries could not be re-extracted: nothing
            switched), ``dry-run``.
        reindexed: images re-extracted by this run (with ``dry_run``: that would be).
        resumed: images an earlier, interrupted run re-extracted (not extracted again).
        caught_up: of ``reindexed``, images written during the run and caught up before the swap.
        origins: images per origin of their bytes (:data:`ORIGINS`).
        missing: ``(image, reason)`` of each image that could not be re-extracted.
        watch_missing: ``watchlist/entry`` of entries that get no new vector.
        dropped: images deleted at the swap (``drop_missing``).
        after: one sentence per thing that followed the swap (engine files, ANN indexes,
            calibration, classifier, analysis, watchlists).
        seconds: wall time, seconds.
    """

    source_model: str
    target: str
    status: str = "swapped"
    reindexed: int = 0
    resumed: int = 0
    caught_up: int = 0
    origins: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ORIGINS, 0))
    missing: list[tuple[str, str]] = field(default_factory=list)
    watch_missing: list[str] = field(default_factory=list)
    dropped: int = 0
    after: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        """Images re-extracted per second of wall time."""
        return self.reindexed / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        """One line for people: what happened and what the catalog answers from now."""
        n_miss, n_watch = len(self.missing), len(self.watch_missing)
        rate = f"in {self.seconds:.1f} s ({self.images_per_s:.1f} images/s)"
        if self.status == "current":
            return f"the catalog already holds {self.target}: nothing to reindex"
        if self.status == "dry-run":
            where = ", ".join(f"{n} from {k}s" for k, n in self.origins.items() if n)
            return (
                f"dry run: would re-extract {self.reindexed} images with {self.target} "
                f"(from {self.source_model}; {self.resumed} already done)"
                f"{': ' + where if where else ''}; "
                f"{n_miss} have no readable source and {n_watch} watchlist entries no stored "
                "image (listed above): they would keep the catalog from switching, unless "
                "--drop-missing"
            )
        done = (
            f"re-extracted {self.reindexed} images with {self.target} {rate}"
            f" ({self.resumed} done by an earlier run, {self.caught_up} written meanwhile)"
        )
        if self.status == "swapped":
            gone = f"; {self.dropped} that could not be were deleted" if self.dropped else ""
            return f"{done}{gone}; the catalog now answers from {self.target}"
        return (
            f"{done}; {n_miss} images and {n_watch} watchlist entries could not be reindexed "
            f"(listed above): the catalog still answers from {self.source_model}. Restore "
            "their files and run again (only they are redone), or add --drop-missing to "
            "switch without them (they are deleted)"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``images_per_s`` included)."""
        d = dict(self.__dict__)
        d["missing"] = [{"image": img, "reason": why} for img, why in self.missing]
        d["seconds"] = round(self.seconds, 3)
        d["images_per_s"] = round(self.images_per_s, 2)
        return d


@dataclass
class _Job:
    """One run's extractor, options and counters."""

    ext: BaseExtractor
    report: ReindexReport
    batch_size: int
    thumbnails: bool
    pool: ThreadPoolExecutor | None
    bar: Progress
    on_failure: Callable[[str, str], None] | None


class CatalogReindex(CatalogBase):
    """The reindex part of :class:`~lookalike.catalog.Catalog` (module docstring)."""

    def model_status(self) -> dict[str, Any]:
        """Whether the stored vectors are the installed extractor's: ``model_current`` (True,
        False, or None when no installed extractor has the stored model's name),
        ``installed_model`` (the tag it makes, or None) and ``reindex`` (the reindex in
        progress: ``target``, ``done``, ``failed``, ``pending`` images; None)."""
        stored = self._store.model()
        out: dict[str, Any] = {"model_current": None, "installed_model": None, "reindex": None}
        if stored is not None:
            with contextlib.suppress(LookalikeError):  # no installed extractor of that name
                info = self.make_extractor(stored.name).info
                out.update(model_current=info == stored, installed_model=info.tag)
        running = self._store.reindex_progress()
        if running is not None:
            out["reindex"] = {
                "target": running.model.tag,
                "done": running.done,
                "failed": running.failed,
                "pending": running.pending,
            }
        return out

    def reindex(
        self,
        extractor: str | None = None,
        *,
        batch_size: int = 32,
        workers: int | None = None,
        drop_missing: bool = False,
        thumbnails: bool = False,
        dry_run: bool = False,
        progress: bool = False,
        on_failure: Callable[[str, str], None] | None = None,
    ) -> ReindexReport:
        """Re-extract every stored image with the installed extractor and switch the catalog
        to its model atomically (module docstring); resumable, one at a time per catalog.

        Args:
            extractor: the extractor to move to (default: the stored model's, as installed);
                another name migrates the catalog (e.g. ``hog`` -> ``cnn``: a new dimension).
            batch_size: images per model call and per committed batch.
            workers: threads reading and decoding images (default one per core; 0: inline).
            drop_missing: switch even when images or watchlist entries could not be
                re-extracted; they are deleted.
            thumbnails: re-extract an image whose source is gone from its stored thumbnail
                (<= 192 px: its vector is close to, not equal to, a fresh index's).
            dry_run: only count what would be re-extracted and from where (reads no image).
            progress: a progress bar with images/s on stderr.
            on_failure: called with ``(image, reason)`` for each image that cannot be
                re-extracted, as it happens.

        Returns:
            :class:`ReindexReport`.

        Raises:
            QueryError: the catalog is empty, or ``batch_size`` < 1.
            LookalikeError: unknown extractor, or another reindex of this catalog is running.
            StoreError: writes kept arriving faster than the catch-up (run it again).
        """
        t0 = time.perf_counter()
        if batch_size < 1:
            raise QueryError(f"batch_size must be >= 1, got {batch_size}")
        stored = self._store.model()
        if stored is None:
            raise QueryError(f"catalog {self.name!r} is empty: nothing to reindex")
        ext = self.make_extractor(extractor or stored.name)
        target = ext.info
        report = ReindexReport(stored.tag, target.tag)
        with self._store.reindex_lock():
            running = self._store.reindex_progress()
            if running is not None and running.model != target:
                report.after.append(
                    f"{'would discard' if dry_run else 'discarded'} the unfinished reindex to "
                    f"{running.model.tag} ({running.done} images done)"
                )
                if not dry_run:
                    self._store.reindex_abort()
                running = None
            if stored == target and running is None:
                report.status = "current"
            elif dry_run:
                self._reindex_plan(report, running, thumbnails, on_failure)
            else:
                outcome = self._reindex_run(
                    ext, report, batch_size, workers, drop_missing, thumbnails, progress, on_failure
                )
                if outcome.swapped:
                    self._follow_swap(outcome, stored, target, report)
        report.seconds = time.perf_counter() - t0
        return report

    # ------------------------------------------------------------------ the run

    def _reindex_run(
        self,
        ext: BaseExtractor,
        report: ReindexReport,
        batch_size: int,
        workers: int | None,
        drop_missing: bool,
        thumbnails: bool,
        progress: bool,
        on_failure: Callable[[str, str], None] | None,
    ) -> SwapOutcome:
        """Begin (or resume), extract every row not done, catch up and swap."""
        state = self._store.reindex_begin(ext.info)
        report.resumed = state.done
        n_threads = default_workers() if workers is None else workers
        pool = ThreadPoolExecutor(n_threads, "lookalike-reindex") if n_threads > 0 else None
        bar = Progress(state.pending + state.failed, progress, desc="reindex")
        job = _Job(ext, report, batch_size, thumbnails, pool, bar, on_failure)
        try:
            after = None  # the main pass: every row not done, by key (failed ones once more)
            while items := self._store.reindex_todo(after=after, limit=batch_size):
                self._reindex_batch(job, items)
                after = items[-1].key
            for _ in range(SWAP_ATTEMPTS):
                # catch-up: rows written since the start (behind the main pass's key)
                while items := self._store.reindex_todo(
                    since_seq=state.seq, retry_failed=False, limit=batch_size
                ):
                    bar.grow(len(items))
                    report.caught_up += len(items)
                    self._reindex_batch(job, items)
                outcome = self._store.reindex_swap(
                    ext.info, drop_missing, drop_settings=(CALIBRATION_SETTING,)
                )
                if outcome.swapped or not outcome.pending:
                    break
            else:
                raise StoreError(
                    "writes kept arriving faster than the reindex caught up with them; run it "
                    "again when they slow down (the work done is kept)"
                )
        finally:
            bar.close()
            if pool is not None:
                pool.shutdown(cancel_futures=True)
        report.missing = [(f"{k[0]}/{k[1]}", why) for k, why in outcome.missing]
        report.watch_missing = [f"{name}/{entry}" for name, entry in outcome.watch_missing]
        if not outcome.swapped:
            report.status = "incomplete"
        report.dropped = len(outcome.missing) if outcome.swapped else 0
        return outcome

    def _reindex_batch(self, job: _Job, items: Sequence[ReindexItem]) -> None:
        """Read, decode and embed ``items``; commit their new vectors (and failures) in one
        transaction, then count and report them."""
        folder = self.folder

        def prep(item: ReindexItem) -> tuple[Prepared, str]:
            return _prepare(item, job.ext, folder, job.thumbnails)

        prepared = list(job.pool.map(prep, items) if job.pool is not None else map(prep, items))
        ok = [i for i, (p, _) in enumerate(prepared) if p.status == "ok"]
        arrays = [a for i in ok if (a := prepared[i][0].array) is not None]
        vectors = job.ext.embed(np.stack(arrays)) if arrays else None
        rows = [
            ReindexRow(it.listing_id, it.image_id, it.seq, None, prepared[i][0].reason)
            for i, it in enumerate(items)
        ]
        for j, i in enumerate(ok):
            assert vectors is not None
            rows[i].vector = vectors[j]
        self._store.reindex_write(rows)
        report = job.report
        report.reindexed += len(ok)
        for i in ok:
            report.origins[prepared[i][1]] += 1
        failed = [(f"{r.listing_id}/{r.image_id}", r.reason) for r in rows if r.vector is None]
        for image, reason in failed:
            log.warning("not reindexed: %s", reason)
            if job.on_failure is not None:
                job.on_failure(image, reason)
        job.bar.update(len(items), len(failed))

    def _reindex_plan(
        self,
        report: ReindexReport,
        running: ReindexProgress | None,
        thumbnails: bool,
        on_failure: Callable[[str, str], None] | None,
    ) -> None:
        """Fill ``report`` with what a run would re-extract and from where (reads no image)."""
        report.status = "dry-run"
        report.resumed = running.done if running is not None else 0
        for item in self._planned(running):
            origin, reason = _origin(item, self.folder, thumbnails)
            if origin is None:
                report.missing.append((f"{item.listing_id}/{item.image_id}", reason))
                if on_failure is not None:
                    on_failure(*report.missing[-1])
            else:
                report.reindexed += 1
                report.origins[origin] += 1
        report.watch_missing = [
            f"{e.name}/{e.entry_id}" for e in self._store.watch_entries() if e.ref_image_id is None
        ]

    def _planned(self, running: ReindexProgress | None) -> Iterator[ReindexItem]:
        """The rows a run would re-extract: those not done of the reindex in progress, else
        every row."""
        if running is not None:
            after = None
            while items := self._store.reindex_todo(after=after, limit=1024):
                yield from items
                after = items[-1].key
            return
        for batch in self._store.iter_records(1024):
            for r in batch:
                yield ReindexItem(r.listing_id, r.image_id, 0, r.source, r.sha256)

    # ------------------------------------------------------------------ after the swap

    def _follow_swap(
        self, outcome: SwapOutcome, stored: ModelInfo, target: ModelInfo, report: ReindexReport
    ) -> None:
        """Bring what belongs to the old vectors in line with the new ones (module docstring)
        and say so in ``report.after``."""
        notes = report.after
        if outcome.watch_updated:
            notes.append(
                f"{outcome.watch_updated} watchlist entries taken from stored images use their "
                "new vectors"
            )
        if outcome.watch_missing:
            notes.append(
                f"{len(outcome.watch_missing)} watchlist entries made from image files or "
                "vectors were removed: add them again (lookalike watch add)"
            )
        if CALIBRATION_SETTING in outcome.settings_dropped:
            notes.append(
                f"the near-duplicate calibration made for {stored.tag} was dropped: the "
                f"{target.name} default threshold applies until `lookalike calibrate` runs again"
            )
        if outcome.analysis_cleared:
            notes.append(
                f"the analysis of {outcome.analysis_cleared} images (clusters, outliers, map) "
                "was cleared: run `lookalike analyze` again"
            )
        moved = self._set_aside_classifier(target)
        if moved is not None:
            notes.append(
                f"the classifier trained on {stored.tag} vectors was moved to {moved}: train "
                "one again (lookalike train)"
            )
        self._engines.snapshot(attributes=False)  # a new cache: the engine files follow
        if self._engines.source.files is not None:
            notes.append(f"engine files rebuilt for {target.tag}")
        for kind in IndexKind.ann():
            note = self._rebuild_ann(kind, stored, target)
            if note:
                notes.append(note)

    def _rebuild_ann(self, kind: str, stored: ModelInfo, target: ModelInfo) -> str | None:
        """Rebuild the saved ``kind`` index with its parameters over the new vectors (or
        remove it when that fails); what happened, or None when there is none."""
        meta = self.ann_folder / f"{kind}.json"
        if not meta.exists():
            return None
        try:
            params = dict(json.loads(meta.read_text(encoding="utf-8"))["params"])
        except (OSError, ValueError, KeyError, TypeError):
            params = {"kind": kind}
        if stored.dim != target.dim:
            params["pq_m"] = 0  # sub-quantizers must divide the new dimension: choose again
        try:
            self._engines.build(AnnParams(**params))
        except (LookalikeError, TypeError) as exc:
            for suffix in (".faiss", ".json"):
                (self.ann_folder / f"{kind}{suffix}").unlink(missing_ok=True)
            return (
                f"the {kind} index could not be rebuilt ({exc}) and was removed: build it again "
                f"(lookalike ann build --kind {kind})"
            )
        return f"the {kind} index was rebuilt for {target.tag} with its parameters"

    def _set_aside_classifier(self, target: ModelInfo) -> Path | None:
        """Move a classifier trained on another model than ``target`` to
        ``models/stale-<its model>/``; its new folder, or None when there is none to move."""
        models = self.folder / "models"
        try:
            meta = json.loads((models / META_FILE).read_text(encoding="utf-8"))
            info = ModelInfo(**meta["model"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if info == target:
            return None
        safe = "".join(c if c.isalnum() or c in "-." else "_" for c in info.tag)
        dest = models / f"stale-{safe}"
        dest.mkdir(parents=True, exist_ok=True)
        for name in (MODEL_FILE, META_FILE):
            with contextlib.suppress(FileNotFoundError):
                shutil.move(models / name, dest / name)
        return dest


def _read(item: ReindexItem, folder: Path, thumbnails: bool) -> tuple[bytes, str] | str:
    """The bytes of a stored image and their origin (:data:`ORIGINS`), or why there are none
    (one line naming the image)."""
    if item.data is not None:
        return item.data, "bytes"
    problems = []
    if item.source:
        try:
            data = read_bytes(item.source)
        except LookalikeError as exc:
            problems.append(str(exc))
        else:
            if sha256_hex(data) == item.sha256:
                return data, "url" if is_url(item.source) else "file"
            problems.append(f"{item.source}: changed since it was indexed (another SHA-256)")
    else:
        problems.append("no source recorded")
    if thumbnails:
        with contextlib.suppress(ValueError, OSError):
            return thumbnail_path(folder, item.sha256).read_bytes(), "thumbnail"
        problems.append("no thumbnail")
    return f"{item.listing_id}/{item.image_id}: {'; '.join(problems)}; its bytes are not kept"


def _prepare(
    item: ReindexItem, ext: BaseExtractor, folder: Path, thumbnails: bool
) -> tuple[Prepared, str]:
    """Read, decode and preprocess one image (never raises for a bad one)."""
    got = _read(item, folder, thumbnails)
    src = ImageSource(item.listing_id, item.image_id, item.source or item.image_id)
    if isinstance(got, str):
        return Prepared(src, "failed", reason=got), ""
    data, origin = got
    return prepare_bytes(data, src, ext), origin


def _origin(item: ReindexItem, folder: Path, thumbnails: bool) -> tuple[str | None, str]:
    """Where a run would read ``item`` from, without reading it: ``(origin, "")`` or
    ``(None, why not)``."""
    if item.data is not None:
        return "bytes", ""
    if item.source and is_url(item.source):
        return "url", ""
    if item.source and os.path.isfile(item.source):
        return "file", ""
    with contextlib.suppress(ValueError):
        if thumbnails and thumbnail_path(folder, item.sha256).is_file():
            return "thumbnail", ""
    where = f"{item.source}: no such file" if item.source else "no source recorded"
    return None, f"{item.listing_id}/{item.image_id}: {where}; its bytes are not kept"
