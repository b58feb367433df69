"""Duplicates among the stored images: near (score above a threshold, or verified) and exact
(same bytes).

Owns :func:`near_duplicate_report` / :func:`near_duplicates` (connected components of the
near-duplicate graph, from the engine's batched threshold search or the blocked IVF cell join;
never an ``n x n`` matrix), :func:`exact_duplicates` (by file SHA-256) and the disjoint-set
structure (:class:`UnionFind`) that merges the edges. Two images are joined when their cosine
is above the near-duplicate threshold, or when it lies between the model's verification floor
and the threshold and their thumbnails are the same photo under local features and RANSAC
(:mod:`.verify`: crops and rotations score below the threshold). Nothing here writes to the
catalog but the thumbnails it reads (cached as the web page caches them).
"""

from __future__ import annotations

import os
from collections import OrderedDict, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..catalog import Catalog
from ..engine import SearchEngine
from ..engine.ann import AnnIndex
from ..errors import LookalikeError
from ..extract import default_verify_floor
from ..types import Key, SearchSpec
from .calibrate import near_duplicate_threshold
from .neighbours import (
    cell_blocks,
    ivf_index,
    live_positions,
    live_vectors,
    neighbours,
    progress_bar,
)
from .verify import Keypoints, keypoints, same_photo


class UnionFind:
    """Disjoint sets over ``0..n-1`` (Tarjan, JACM 1975: union by smaller root, path
    compression), with a vectorized :meth:`union_many` for blocks of edges."""

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        """The root of ``i`` (compressing the path to it)."""
        p = self.parent
        root = i
        while p[root] != root:
            root = p[root]
        while p[i] != root:
            p[i], i = root, p[i]
        return int(root)

    def union(self, a: int, b: int) -> None:
        """Merge the sets of ``a`` and ``b`` (the smaller root becomes the root)."""
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def roots(self, idx: np.ndarray) -> np.ndarray:
        """``(m,) int64`` roots of ``idx`` (pointer jumping in numpy)."""
        r = self.parent[idx]
        while True:
            nr = self.parent[r]
            if np.array_equal(nr, r):
                return r
            r = nr

    def union_many(self, a: np.ndarray, b: np.ndarray) -> None:
        """Union every edge ``(a[i], b[i])``: roots found in numpy, so only edges joining two
        different sets reach the Python loop (a dense group costs one pass, not one per edge)."""
        if not len(a):
            return
        ra, rb = self.roots(a), self.roots(b)
        self.parent[a], self.parent[b] = ra, rb  # path compression
        cut = ra != rb
        if cut.any():
            lo, hi = np.minimum(ra[cut], rb[cut]), np.maximum(ra[cut], rb[cut])
            pairs = np.unique(np.stack([lo, hi], axis=1), axis=0)
            for u, v in pairs.tolist():
                self.union(u, v)

    def groups(self, keys: list[Key]) -> list[list[Key]]:
        """Sets of two or more, largest first; keys within a set sorted."""
        roots = self.roots(np.arange(len(keys)))
        members: dict[int, list[Key]] = defaultdict(list)
        for i, r in enumerate(roots.tolist()):
            members[r].append(keys[i])
        out = [sorted(g) for g in members.values() if len(g) > 1]
        out.sort(key=lambda g: (-len(g), g[0]))
        return out


#: Candidate pairs per image checked geometrically: its best-scoring ones between the floor
#: and the threshold (pairs already in one group are skipped, but take their place here). On
#: the public near-duplicate set (``benchmarks/dedup.py``, threshold 0.9, before the edge
#: margin of :mod:`.verify`) 3 found 0.927 of the copies, 6 found 0.935, 10 found 0.938.
VERIFY_PER_IMAGE = 10
#: Thumbnails' keypoints kept in RAM while verifying (at most 64 KB each: 500 SIFT descriptors
#: of 128 bytes).
KEYPOINT_CACHE = 4096
#: Candidate arrays merged into one block at a time (:class:`PairList`).
PAIR_BLOCK = 4096
#: Pairs verified per round of the thread pool.
VERIFY_CHUNK = 256


@dataclass
class DedupReport:
    """What :func:`near_duplicate_report` found and how.

    Attributes:
        groups: sets of two or more keys, largest first; keys within a set sorted.
        threshold: the cosine above which two images are joined without a check.
        floor: the cosine above which pairs were verified geometrically; None: no pair was.
        candidates: distinct pairs in ``(floor, threshold]`` (at most
            :data:`VERIFY_PER_IMAGE` per image).
        verified: candidate pairs checked (the others were already in one group, or an image's
            thumbnail could not be read).
        joined: verified pairs found to be the same photo.
        unreadable: images with candidate pairs whose thumbnail could not be read (no cached
            thumbnail and the source file gone, remote or changed); their pairs are not joined.
        problems: why, for the first few of those (one line each).
    """

    groups: list[list[Key]]
    threshold: float
    floor: float | None = None
    candidates: int = 0
    verified: int = 0
    joined: int = 0
    unreadable: int = 0
    problems: list[str] = field(default_factory=list)


def near_duplicates(
    cat: Catalog, threshold: float | None = None, **options: Any
) -> list[list[Key]]:
    """Groups of near-duplicate images: :func:`near_duplicate_report`'s ``groups`` (the same
    arguments: ``k``, ``batch``, ``index``, ``nprobe``, ``progress``, ``verify``, ``floor``).
    """
    return near_duplicate_report(cat, threshold, **options).groups


def near_duplicate_report(
    cat: Catalog,
    threshold: float | None = None,
    k: int = 32,
    batch: int = 512,
    index: str = "exact",
    nprobe: int | None = None,
    progress: bool = False,
    verify: bool = True,
    floor: float | None = None,
) -> DedupReport:
    """Groups of images connected by ``score > threshold``, or by a geometric check of
    ``floor < score <= threshold`` (connected components).

    ``index="exact"``: every image queries the engine for its ``k`` best matches above the
    threshold, in batches of ``batch``; an image with ``k`` of them asks again without a limit
    (the engine's threshold scan), so no edge is missed. ``O(n^2 d)`` work on the engine's
    kernels, ``O(n k)`` memory, never an ``n x n`` matrix.

    Through an IVF index (``"ivf"``, ``"ivfpq"``): the vectors are bucketed by the index's
    coarse quantizer, and each cell's members are scored (float32 matrix products, exact
    scores) against the members of the ``nprobe`` cells nearest its centroid (its own among
    them): the blocked all-pairs join of an inverted file, ``O(n^2 d nprobe / nlist)`` work.
    A pair in two cells neither of which probes the other is missed; nothing is invented.
    Through ``"hnsw"``: the engine's per-image search, as for exact (pairs can be missed).

    Args:
        threshold: cosine above which two images are near-duplicates; None: the catalog's
            calibrated threshold, else its extractor's measured default
            (:func:`lookalike.analytics.calibrate.near_duplicate_threshold`).
        k: matches asked per image before the unlimited re-query (exact / HNSW).
        batch: images per engine call (exact / HNSW).
        index: ``"exact"`` or a built ANN index (``lookalike ann build``).
        nprobe: cells scanned per cell through IVF (default
            :data:`~lookalike.analytics.neighbours.JOIN_NPROBE`, at most ``nlist``); the
            index's own search settings are not touched.
        progress: a tqdm bar on stderr (images joined, images/s).

    Geometric verification (``verify``): each image's best :data:`VERIFY_PER_IMAGE` matches
    with ``floor < score <= threshold`` are candidates; a candidate pair not already in one
    group is joined when the two thumbnails are the same photo (:func:`.verify.same_photo`:
    SIFT, ratio test, RANSAC similarity transform). Thumbnails are read from the catalog's
    cache or made from the source files (:meth:`Catalog.thumbnail_data`) on a thread per core,
    about 7 ms per image and 0.2 ms per pair on one core.

    Args:
        verify: check candidate pairs geometrically (skipped when no floor is known).
        floor: the lowest cosine verified; None: the model's measured floor
            (:func:`lookalike.extract.default_verify_floor`), none for a model never measured.

    Returns:
        The groups (two or more keys, largest first; keys within a group sorted) and the
        verification's counts.

    Raises:
        QueryError: unknown index, or no such index built.
        LookalikeError: no threshold given and none known for the catalog's vectors.
    """
    if threshold is None:
        threshold = near_duplicate_threshold(cat)[0]
    if verify and floor is None and cat.model is not None:
        floor = default_verify_floor(cat.model)
    if not verify or floor is None or floor >= threshold:
        floor = None
    engine = cat.search_engine(index)
    keys, x = live_vectors(cat)
    uf = UnionFind(len(keys))
    ann = ivf_index(engine)
    band = PairList()
    with progress_bar(len(keys), "dedup", progress) as bar:
        if ann is not None:
            _cell_join(ann, x, threshold, floor, nprobe, uf, band, bar)
        else:
            _scan_join(cat, engine, x, threshold, floor, k, batch, index, uf, band, bar)
    report = DedupReport([], threshold, floor)
    pairs = band.distinct()
    if len(pairs):
        report.candidates = len(pairs)
        _verify_pairs(cat, keys, pairs, uf, report, progress)
    report.groups = uf.groups(keys)
    return report


def _scan_join(
    cat: Catalog,
    engine: SearchEngine,
    x: np.ndarray,
    threshold: float,
    floor: float | None,
    k: int,
    batch: int,
    index: str,
    uf: UnionFind,
    band: PairList,
    bar: Any,
) -> None:
    """Edges from the engine's batched threshold search, and each image's candidate pairs
    (``(m, 2) int64``, smaller position first) appended to ``band`` (see
    :func:`near_duplicate_report`)."""
    n = len(x)
    _, pos_of_row = live_positions(cat.vector_cache())
    lowest = threshold if floor is None else floor
    for i, found, scores in neighbours(cat, index, k, batch, lowest):
        high = scores > threshold
        matched = found[high]
        if len(matched) == min(k, n):  # saturated: this image's matches, however many
            raw = engine.search(x[i], SearchSpec(k=None, threshold=threshold))[0]
            matched = pos_of_row[raw.rows]
        matched = matched[matched != i]
        uf.union_many(np.full(len(matched), i), matched)
        if floor is not None:
            maybe = found[~high]
            band.add(i, maybe[maybe != i][:VERIFY_PER_IMAGE])
        bar.update(1)


class PairList:
    """Candidate pairs of positions, gathered a few at a time: small arrays are merged every
    :data:`PAIR_BLOCK` additions, so a million images do not keep a million numpy objects."""

    def __init__(self) -> None:
        self.blocks: list[np.ndarray] = []
        self.pending: list[np.ndarray] = []

    def add(self, a: int | np.ndarray, b: np.ndarray) -> None:
        """Add the pairs ``(a[i], b[i])`` (or ``(a, b[i])``), stored smaller position first."""
        a64 = np.broadcast_to(np.asarray(a, np.int64), b.shape)
        b64 = b.astype(np.int64)
        self.pending.append(np.stack([np.minimum(a64, b64), np.maximum(a64, b64)], axis=1))
        if len(self.pending) >= PAIR_BLOCK:
            self.blocks.append(np.concatenate(self.pending))
            self.pending = []

    def distinct(self) -> np.ndarray:
        """``(m, 2) int64`` distinct pairs, sorted."""
        every = self.blocks + self.pending
        if not every:
            return np.zeros((0, 2), np.int64)
        return np.unique(np.concatenate(every), axis=0)


def _cell_join(
    ann: AnnIndex,
    x: np.ndarray,
    threshold: float,
    floor: float | None,
    nprobe: int | None,
    uf: UnionFind,
    band: PairList,
    bar: Any,
) -> None:
    """Edges from the blocked join over the IVF cells of ``ann`` (:func:`cell_blocks`), and
    each row's best candidate pairs appended to ``band``."""
    for rows, cand, scores in cell_blocks(ann, x, nprobe):
        ii, jj = np.nonzero(scores > threshold)
        ii, jj = rows[ii], cand[jj]
        keep = ii != jj
        uf.union_many(ii[keep], jj[keep])
        if floor is not None and len(cand):
            inside = (scores > floor) & (scores <= threshold) & (rows[:, None] != cand[None, :])
            masked = np.where(inside, scores, -np.inf)
            top = min(VERIFY_PER_IMAGE, masked.shape[1])
            best = np.argpartition(-masked, top - 1, axis=1)[:, :top]
            r, c = np.nonzero(np.isfinite(np.take_along_axis(masked, best, axis=1)))
            band.add(rows[r], cand[best[r, c]])
        bar.update(len(rows))


def _verify_pairs(
    cat: Catalog,
    keys: list[Key],
    pairs: np.ndarray,
    uf: UnionFind,
    report: DedupReport,
    progress: bool,
) -> None:
    """Join the ``(m, 2)`` candidate pairs whose thumbnails are the same photo (skipping pairs
    already in one group); counts go to ``report``."""
    cache: OrderedDict[int, Keypoints | None] = OrderedDict()
    unreadable: set[int] = set()

    def load(pos: int) -> Keypoints | None:
        try:
            return keypoints(cat.thumbnail_data(keys[pos]))
        except (LookalikeError, OSError) as exc:
            if len(report.problems) < 5:
                report.problems.append(f"{keys[pos][0]}/{keys[pos][1]}: {exc}")
            return None

    def check(pair: tuple[int, int]) -> bool:
        a, b = cache.get(pair[0]), cache.get(pair[1])
        return a is not None and b is not None and same_photo(a, b)

    workers = max(1, min(4, os.cpu_count() or 1))
    with (
        ThreadPoolExecutor(workers) as pool,
        progress_bar(len(pairs), "verify", progress) as bar,
    ):
        for start in range(0, len(pairs), VERIFY_CHUNK):
            chunk = [
                (a, b)
                for a, b in pairs[start : start + VERIFY_CHUNK].tolist()
                if uf.find(a) != uf.find(b)
            ]
            used = {p for pair in chunk for p in pair}
            for pos in used & cache.keys():
                cache.move_to_end(pos)  # least recently used first out
            need = sorted(used - cache.keys())
            for pos, got in zip(need, pool.map(load, need), strict=True):
                cache[pos] = got
                if got is None:
                    unreadable.add(pos)
            chunk = [(a, b) for a, b in chunk if a not in unreadable and b not in unreadable]
            for (a, b), same in zip(chunk, pool.map(check, chunk), strict=True):
                report.verified += 1
                if same:
                    report.joined += 1
                    uf.union(a, b)
            while len(cache) > KEYPOINT_CACHE:
                cache.popitem(last=False)
            bar.update(min(VERIFY_CHUNK, len(pairs) - start))
    report.unreadable = len(unreadable)


def exact_duplicates(cat: Catalog) -> list[list[Key]]:
    """Groups of images whose files have the same SHA-256 (identical bytes).

    Returns:
        Groups of two or more keys, largest first; keys within a group sorted.
    """
    by_sha: dict[str, list[Key]] = defaultdict(list)
    for key, sha in cat.sha256s().items():
        by_sha[sha].append(key)
    out = [sorted(g) for g in by_sha.values() if len(g) > 1]
    out.sort(key=lambda g: (-len(g), g[0]))
    return out
