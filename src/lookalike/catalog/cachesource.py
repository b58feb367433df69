"""Where a process's live vector cache comes from: the engine files beside the catalog, checked
against the store; or, when there are none (or they are wrong), files written from the store
batch by batch and then mapped, so that a collection larger than RAM loads (10M x 512 is 20 GB
of float32 rows); or, with the files off or unwritable, the store's rows read into RAM.

:class:`CacheSource` is used by :class:`~lookalike.catalog.engines.EngineSet` under its sync
lock. The engine files (:mod:`lookalike.engine.mapped`) are never trusted blindly: after the
header's digests and counts, the store's changes since the files' sequence number are applied,
the live count is compared with the store's, :data:`CHECKED_ROWS` rows are compared bit for bit
with the store, and every vector is checked against its chunk digest in a background thread
(on a mismatch the files and the cache are dropped and the next search reads the store).

A cache holds the vectors of one model (:attr:`VectorCache.model`): when a reindex switches the
catalog's model while a cache is read, the read starts over with the new model, and the files
of a model the catalog no longer holds are never written.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..devices import ram_bytes
from ..engine import VectorCache
from ..engine.codes import BLOCK, CodeTable
from ..engine.mapped import EngineFiles
from ..errors import StoreError
from ..store import Store
from ..types import CodeKind, ModelInfo

log = logging.getLogger(__name__)

#: Set to ``0`` to neither map nor write the engine files (``<catalog>/engine``).
FILES_ENV = "LOOKALIKE_ENGINE_FILES"
#: Rows compared bit for bit with the store before mapped files are used.
CHECKED_ROWS = 16
#: A long-running process rewrites the engine files once this many rows (or a tenth of the
#: collection) were added since they were last written.
SAVE_EVERY_ROWS = 100_000
#: Rows read from the store per batch while the engine files are built from it (128 MiB at
#: d = 512).
BUILD_BATCH = 65536
#: The largest share of the machine's memory the rows may take when read into RAM (without
#: the engine files, :meth:`CacheSource._check_fits`).
RAM_FRACTION = 0.6
#: :meth:`CacheSource._catch_up`'s answer when a reindex switched the catalog's model.
OTHER_MODEL = "the store holds another model"
#: Reads of the cache before giving up while the catalog's model keeps changing under them.
LOAD_ATTEMPTS = 5


def model_dict(model: ModelInfo) -> dict[str, Any]:
    """``{"name", "version", "dim"}`` of a model (the engine files' model field)."""
    return {"name": model.name, "version": model.version, "dim": model.dim}


class CacheSource:
    """Builds and saves the live vector cache of one catalog (module docstring).

    Args:
        store: the system of record.
        folder: where the engine files are kept (``<catalog>/engine``); None: not kept.

    Attributes:
        from_files: whether the last :meth:`load` mapped the engine files.
        verified: whether every mapped vector matched its digest (set by the background
            check after a load from files).
    """

    def __init__(self, store: Store, folder: Path | None) -> None:
        self.store = store
        self.folder = folder
        self.files: EngineFiles | None = None
        self.from_files = False
        self.verified = False
        self._saved_rows = 0
        self._saved_version = -1
        self._verifying: threading.Thread | None = None
        self._codes: tuple[dict[str, Any], np.ndarray] | None = None  # restored, to verify
        # rows the saved codes cover, by (generation, code kind)
        self._saved_codes: dict[tuple[str, str], int] = {}

    def load(self, model: ModelInfo, drop: Callable[[VectorCache], None]) -> VectorCache:
        """A new live cache, synced with the store: from the engine files when they hold the
        store's rows, else from the store (and the files are written).

        Args:
            model: the catalog's model as last read; when the store holds another one by the
                time the rows are read, the read starts over with that one.
            drop: called with the cache if the background check finds a corrupt vector.

        Raises:
            StoreError: the model changed under every one of :data:`LOAD_ATTEMPTS` reads.
        """
        for _ in range(LOAD_ATTEMPTS):
            cache = self._load(model, drop)
            if cache is not None:
                cache.model = model.tag
                return cache
            model = self.store.model() or model
        raise StoreError("the catalog's model kept changing while its vectors were read; retry")

    def _load(self, model: ModelInfo, drop: Callable[[VectorCache], None]) -> VectorCache | None:
        """:meth:`load` of ``model``'s rows; None when the store holds another model."""
        self.files = None
        self.from_files = self.verified = False
        self._codes, self._saved_codes = None, {}
        if self.folder is not None and os.environ.get(FILES_ENV, "1") != "0":
            self.files = EngineFiles(self.folder, model_dict(model))
            seen = (self.files.header() or {}).get("generation")
            cache = self.files.load()
            if cache is not None:
                problem = self._catch_up(cache, model)
                if problem == OTHER_MODEL:
                    return None
                if problem is None:
                    self._saved_rows = self.files.state.n_rows if self.files.state else 0
                    self.from_files = True
                    self._verify_in_background(self.files, cache, drop)
                    return cache
                log.warning("engine files of %s not used: %s", self.store.uri, problem)
            built = self._build(model, seen, drop)
            if built is not False:
                return built
        self._check_fits(model)
        cache = VectorCache(model.dim)
        changes = self.store.changes_since(cache.seq)
        if changes.model not in (None, model):
            return None
        cache.apply(changes)
        cache.model = model.tag
        self.save(cache)
        return cache

    def _build(
        self, model: ModelInfo, seen: str | None, drop: Callable[[VectorCache], None]
    ) -> VectorCache | Literal[False] | None:
        """Write the engine files straight from the store's rows, one batch of
        :data:`BUILD_BATCH` rows in memory at a time (:meth:`EngineFiles.build`), and map
        them: a collection larger than RAM loads, and rows are never read into RAM twice.
        Files that another process committed while this one waited for the lock (a header of
        another generation than ``seen``, the one this load found missing, unreadable or
        wrong) are mapped instead, checked like any files; ``seen`` itself is not read again.
        None when the store holds another model; False when the files cannot be written or
        do not hold the store's rows after all (then the rows are read into RAM)."""
        files = self.files
        assert files is not None
        try:
            with files.exclusive():
                head = files.header()
                fresh = head is not None and head.get("generation") != seen
                cache = files.load() if fresh else None  # another process built them meanwhile
                built = cache is None
                if built:
                    seq = self.store.seq()
                    if self.store.model() not in (None, model):
                        return None
                    if not files.build(seq, self.store.iter_vectors(BUILD_BATCH)):
                        return False
                    cache = files.load()
        except OSError as exc:  # a read-only folder, a full disk
            log.warning("engine files of %s not written: %s", self.store.uri, exc)
            self.files = None
            return False
        if cache is None:
            return False
        problem = self._catch_up(cache, model)
        if problem == OTHER_MODEL:
            return None
        if problem is not None:
            log.warning("engine files of %s built wrong: %s", self.store.uri, problem)
            files.discard()
            return False
        self._saved_rows = files.state.n_rows if files.state else 0
        if built:
            self.verified = True  # digested as they were written
        else:
            self.from_files = True
            self._verify_in_background(files, cache, drop)
        cache.model = model.tag
        self.save_if_changed(cache)
        return cache

    def _check_fits(self, model: ModelInfo) -> None:
        """Refuse to read the store's rows into RAM when they would take more than
        :data:`RAM_FRACTION` of the machine's memory (the engine files were off or could not
        be written): a clear error instead of the machine running out of memory.

        Raises:
            StoreError: the rows do not fit (the message says how much they need and why the
                files were not used).
        """
        ram = ram_bytes()
        need = self.store.count() * model.dim * 4
        if ram is None or need <= RAM_FRACTION * ram:
            return
        why = (
            f"{FILES_ENV}=0 turns them off"
            if os.environ.get(FILES_ENV, "1") == "0"
            else "they could not be written; see the warning above"
        )
        raise StoreError(
            f"the catalog's vectors need {need / 2**30:.1f} GiB of RAM without its engine files "
            f"({why}); this machine has {ram / 2**30:.1f} GiB"
        )

    def _catch_up(self, cache: VectorCache, model: ModelInfo) -> str | None:
        """Apply the store's changes since the sequence number of a cache read from files, then
        :meth:`_mismatch`: None when it holds the store's rows, else why not
        (:data:`OTHER_MODEL` when the store holds another model by now)."""
        self._saved_version = cache.version
        changes = self.store.changes_since(cache.seq)
        if changes.model not in (None, model):
            return OTHER_MODEL
        cache.apply(changes)
        return self._mismatch(cache)

    def _mismatch(self, cache: VectorCache) -> str | None:
        """Why a cache read from files does not hold the store's rows, or None: the live count,
        and :data:`CHECKED_ROWS` rows (first, last, evenly spaced) compared bit for bit."""
        count = self.store.count()
        if count != cache.n_alive:
            return f"the files hold {cache.n_alive} live rows, the store {count}"
        live = np.flatnonzero(cache.alive)
        if not len(live):
            return None
        picks = np.unique(live[np.linspace(0, len(live) - 1, CHECKED_ROWS).astype(np.int64)])
        for row in picks.tolist():
            rec = self.store.get(cache.keys[row])
            if rec is None or not np.array_equal(rec.vector, cache.vectors[row]):
                return f"row {row} {cache.keys[row]} differs from the store"
        return None

    def _verify_in_background(
        self, files: EngineFiles, cache: VectorCache, drop: Callable[[VectorCache], None]
    ) -> None:
        vectors = cache.vectors  # rows read from the files: never written in place

        def run() -> None:
            codes = self._codes  # restored by the first search, before this thread starts
            if files.verify_vectors(vectors) and (codes is None or files.verify_codes(*codes)):
                self.verified = True
                return
            log.error("engine files of %s are corrupt: rebuilding from the store", self.store.uri)
            files.discard()
            drop(cache)

        self._verifying = threading.Thread(target=run, name="lookalike-engine-verify", daemon=True)

    def start_background(self) -> None:
        """Start the check of the mapped vectors, if a load left one (after the first answer,
        so that it does not compete with it)."""
        thread = self._verifying
        if thread is not None and thread.ident is None:
            with contextlib.suppress(RuntimeError):  # started by another thread meanwhile
                thread.start()

    def await_verified(self, timeout: float | None = None) -> bool:
        """Wait for the background check of the mapped vectors (if any); returns
        :attr:`verified` (False also on timeout)."""
        if self._verifying is not None:
            self.start_background()
            self._verifying.join(timeout)
        return self.verified

    def counts(self, model: ModelInfo) -> tuple[int, int] | None:
        """``(images, listings with an image)`` from the engine files' header when it reflects
        the store's newest change (no write since), else None: ``stats`` then needs no scan
        of the store's keys."""
        if self.folder is None or os.environ.get(FILES_ENV, "1") == "0":
            return None
        head = EngineFiles(self.folder, model_dict(model)).header()
        if head is None or head.get("model") != model_dict(model):
            return None
        try:
            seq, listings = int(head["seq"]), int(head["listings_with_rows"])
            images = int(head["n_alive"])
        except (KeyError, TypeError, ValueError):
            return None
        high, changed = self.store.listings_since(seq)
        return (images, listings) if high == seq and not changed else None

    def restore_codes(self, table: CodeTable, layout: int) -> bool:
        """Give ``table`` the codes saved with the engine files this process mapped
        (:meth:`EngineFiles.load_codes`), for the cache whose ``layout`` is ``layout``:
        the next sync encodes only the rows added since. Their digest is checked in the
        background with the vectors' (a mismatch drops the files and the cache, like a corrupt
        vector). Returns whether codes were restored."""
        files = self.files
        if not self.from_files or files is None or files.state is None:
            return False
        if files.state.layout != layout:
            return False
        got = files.load_codes(str(table.code_kind))
        if got is None:
            return False
        try:
            table.restore(*got, layout=layout)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("saved codes of %s not used: %s", self.store.uri, exc)
            return False
        self._codes = got
        self._saved_codes[files.state.generation, str(table.code_kind)] = int(got[0]["n_encoded"])
        return True

    def save_codes(self, table: CodeTable, lock: AbstractContextManager[Any]) -> None:
        """Save ``table``'s codes beside the engine files (:meth:`EngineFiles.save_codes`), when
        the files still hold its rows in the same order and it covers more of them than the
        saved codes: all of them the first time, then :data:`SAVE_EVERY_ROWS` (or a tenth)
        more. The next process maps them instead of encoding every row (11-18 s for 1M x 512
        int8 on 2 cores). ``lock`` keeps encodes out while the state is taken; the writing
        happens after it. An error is logged."""
        files = self.files
        if files is None or table.code_kind == CodeKind.FLOAT32:
            return
        with lock:
            state = files.state
            if state is None or table.layout != state.layout:
                return
            n = min(table.n_encoded, state.n_rows)
            saved = (state.generation, str(table.code_kind))
            if n - self._saved_codes.get(saved, 0) < min(SAVE_EVERY_ROWS, max(n // 10, BLOCK)):
                return
            meta, packed = table.state(n)
        try:
            if files.save_codes(meta, packed):
                self._saved_codes[saved] = int(meta["n_encoded"])
        except OSError as exc:  # a read-only folder, a full disk
            log.warning("codes of %s not saved: %s", self.store.uri, exc)

    def codes_kind(self) -> str:
        """``files`` when the exact engine's codes were mapped from the engine files, else
        ``built``."""
        return "files" if self._codes is not None else "built"

    def kind(self) -> str:
        """``files`` when the last load mapped the engine files, else ``store``."""
        return "files" if self.from_files else "store"

    def save(self, cache: VectorCache) -> None:
        """Write ``cache`` to the engine files (an error is logged: searches go on without
        them); not when the catalog holds another model by now (a reindex swapped)."""
        if self.files is None or cache.model != _tag(self.files.model):
            return
        stored = self.store.model()
        if stored is None or stored.tag != cache.model:
            return
        try:
            if self.files.save(cache):
                self._saved_rows = cache.n_rows
                self._saved_version = cache.version
        except OSError as exc:  # a read-only folder, a full disk
            log.warning("engine files of %s not written: %s", self.store.uri, exc)
            self.files = None

    def save_if_due(self, cache: VectorCache) -> None:
        """:meth:`save` once :data:`SAVE_EVERY_ROWS` rows (or a tenth) were added since."""
        if self.files is not None and cache.n_rows - self._saved_rows >= max(
            SAVE_EVERY_ROWS, cache.n_rows // 10
        ):
            self.save(cache)

    def save_if_changed(self, cache: VectorCache) -> None:
        """:meth:`save` if rows changed since the files were written."""
        if self.files is not None and cache.version != self._saved_version:
            self.save(cache)


def _tag(model: dict[str, Any]) -> str:
    """``name@version`` of a model dict (:func:`model_dict`)."""
    return f"{model['name']}@{model['version']}"
