"""Near-duplicate thresholds people can trust: measured on edited copies, not guessed.

A near-duplicate is the same photo after an edit (crop, flip, rotation, colour change, blur,
JPEG re-compression). :func:`calibrate` measures, on the catalog itself, where the scores of
such copies fall against the scores of everything else:

1. sample stored images whose source file can be read (seeded);
2. make one edited copy per :data:`AUGMENTATIONS` kind of each (:func:`augment`) and embed them
   with the catalog's extractor;
3. **positives**: each copy's score against its own original; **negatives**: its ``k`` best
   scores against the images of every *other* listing (the exact engine's top-k; identical
   files, same SHA-256, are not counted as negatives). The other photos of the copy's own
   listing are neither: views of one item are often near-copies of each other, and which of
   them count as duplicates is the user's call. Nor are duplicates already in the catalog:
   a listing holding an image that scores with the original above the lower quartile of the
   copy-vs-original scores (:data:`KNOWN_COPY_QUANTILE`: closer to it than 3 in 4 edited
   copies are) holds a copy of it, and is left out for that original like its own listing, so
   a catalog full of duplicates does not push the threshold up;
4. the threshold is the lowest ``t`` at which ``precision = TP / (TP + FP) >= target`` over
   those pairs (``score > t``), i.e. the highest recall that keeps the target precision.

Negatives below a copy's ``k``-th best score are not seen; when the chosen threshold is below
some copy's ``k``-th negative, the precision is an upper bound and :attr:`Calibration.exact`
is False (raise ``k``). Photos of the same object in *another* listing count as negatives:
near-duplicate means the same image, not the same thing.

:func:`near_duplicate_threshold` says which threshold ``dedup`` uses: the catalog's stored
calibration, else the extractor's default measured with ``benchmarks/calibrate.py``
(:func:`lookalike.extract.default_near_duplicate_threshold`).
"""

from __future__ import annotations

import io
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from ..catalog import Catalog
from ..errors import ImageError, LookalikeError
from ..extract import default_near_duplicate_threshold
from ..images import decode_image, is_url, read_bytes
from ..types import Key
from .neighbours import progress_bar

#: The edits a near-duplicate may have undergone, one copy of each per sampled image.
AUGMENTATIONS: tuple[str, ...] = ("crop", "flip", "rotate", "colour", "blur", "jpeg")
#: Precision the threshold must keep, by default.
DEFAULT_PRECISION = 0.99
#: Images sampled by default (each gives ``len(AUGMENTATIONS)`` copies).
DEFAULT_SAMPLE = 100
#: Hits asked beyond ``k`` per copy, to skip its own listing's images.
MAX_LISTING_SKIP = 32
#: A stored image of another listing that scores with an original above this quantile of the
#: copy-vs-original scores (closer to it than 3 in 4 edited copies are) is taken as a copy
#: already in the catalog, and its listing is left out of that original's negatives.
KNOWN_COPY_QUANTILE = 0.25
#: Fewest sampled images that make a calibration.
MIN_SAMPLE = 8
#: JPEG quality of the re-saved copies that define "same image".
RESAVE_QUALITY = 90
#: Quantile of the re-saved copies' scores taken as the "same image" band limit (:mod:`.bands`).
SAME_IMAGE_QUANTILE = 0.01
#: Quantile of random different-listing pair scores taken as the "similar" limit.
SIMILAR_QUANTILE = 0.99
#: Images sampled for the random pairs (``n (n - 1) / 2`` pairs, minus same-listing ones).
SIMILAR_SAMPLE = 2000


@dataclass
class Calibration:
    """A measured near-duplicate threshold.

    Attributes:
        threshold: near-duplicates are pairs with ``score > threshold``.
        target_precision: the precision asked for.
        precision, recall: measured at ``threshold`` over the sampled pairs.
        recall_by_kind: recall per edit kind (:data:`AUGMENTATIONS`).
        sampled: images sampled; positives / negatives: pairs scored.
        exact: False when negatives below the seen top-k could lie above the threshold.
        model: the model tag the scores come from. created_at: Unix time, seconds.
        same_image, similar: the limits of the "same image" and "similar" score bands
            (:mod:`lookalike.analytics.bands`); None in calibrations stored before them.
    """

    threshold: float
    target_precision: float
    precision: float
    recall: float
    recall_by_kind: dict[str, float]
    sampled: int
    positives: int
    negatives: int
    exact: bool
    model: str
    created_at: float = field(default_factory=time.time)
    same_image: float | None = None
    similar: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (scores rounded to 6 digits)."""
        d = asdict(self)
        for key in ("threshold", "precision", "recall", "same_image", "similar"):
            if d[key] is not None:
                d[key] = round(float(d[key]), 6)
        d["recall_by_kind"] = {k: round(v, 4) for k, v in self.recall_by_kind.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        """The inverse of :meth:`to_dict`."""
        return cls(**d)


def augment(image: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    """An edited copy of an RGB image.

    Kinds: ``crop`` (a random window of 70-90% of each side), ``flip`` (mirror left-right),
    ``rotate`` (5-15 degrees either way, expanded, white corners), ``colour`` (brightness and
    saturation scaled by 0.7-1.3), ``blur`` (Gaussian, radius 1-2.5 px of a 512 px side),
    ``jpeg`` (re-encoded at quality 20-40).

    Raises:
        ValueError: unknown kind.
    """
    w, h = image.size
    if kind == "crop":
        fw, fh = rng.uniform(0.7, 0.9, size=2)
        cw, ch = max(1, int(w * fw)), max(1, int(h * fh))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        return image.crop((x0, y0, x0 + cw, y0 + ch))
    if kind == "flip":
        return ImageOps.mirror(image)
    if kind == "rotate":
        angle = float(rng.uniform(5, 15) * rng.choice([-1, 1]))
        return image.rotate(
            angle, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=(255, 255, 255)
        )
    if kind == "colour":
        out = ImageEnhance.Brightness(image).enhance(float(rng.uniform(0.7, 1.3)))
        return ImageEnhance.Color(out).enhance(float(rng.uniform(0.7, 1.3)))
    if kind == "blur":
        radius = float(rng.uniform(1.0, 2.5)) * max(w, h) / 512
        return image.filter(ImageFilter.GaussianBlur(radius))
    if kind == "jpeg":
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=int(rng.integers(20, 41)))
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    raise ValueError(f"unknown augmentation {kind!r}; use one of {', '.join(AUGMENTATIONS)}")


def _readable(cat: Catalog) -> list[tuple[Key, str]]:
    """Stored images whose recorded source is a local file that exists, by key."""
    return sorted(
        (key, src)
        for key, src in cat.sources().items()
        if src and not is_url(src) and os.path.isfile(src)
    )


def choose_threshold(
    positives: np.ndarray, negatives: np.ndarray, target_precision: float
) -> tuple[float, float, float]:
    """The lowest threshold ``t`` with ``precision(score > t) >= target_precision``.

    Args:
        positives, negatives: ``(p,)`` and ``(n,)`` scores of matching / non-matching pairs.

    Returns:
        ``(t, precision, recall)``; ``t`` lies halfway between the lowest accepted score and
        the next lower one. When no threshold reaches the target, the one with the best
        precision (ties: most recall).
    """
    scores = np.concatenate([positives, negatives]).astype(np.float64)
    is_pos = np.r_[np.ones(len(positives), bool), np.zeros(len(negatives), bool)]
    order = np.argsort(-scores, kind="stable")
    scores, is_pos = scores[order], is_pos[order]
    tp = np.cumsum(is_pos)
    fp = np.cumsum(~is_pos)
    # only cut between distinct scores: a cut inside a tie would not match `score > t`
    last = np.r_[scores[1:] != scores[:-1], True]
    precision = np.where(last, tp / np.maximum(tp + fp, 1), -1.0)
    ok = np.flatnonzero(precision >= target_precision)
    i = int(ok[-1]) if len(ok) else int(np.argmax(precision))
    below = scores[i + 1] if i + 1 < len(scores) else scores[i] - 1e-3
    t = float((scores[i] + below) / 2)
    recall = float(tp[i] / max(len(positives), 1))
    return t, float(precision[i]), recall


@dataclass
class PairScores:
    """Scores of edited copies against the catalog (see the module docstring).

    Attributes:
        positives: ``(p,) float32`` copy-vs-original scores; kinds: the edit of each.
        resaved: ``(s,) float32`` scores of JPEG re-saved copies (quality
            :data:`RESAVE_QUALITY`) vs. their originals.
        negatives: ``(n,) float32`` copy-vs-other-listing scores (each copy's best ``k``).
        kth: ``(m,) float32`` the ``k``-th negative of each copy that had ``k`` of them.
        sampled: images the copies were made from.
    """

    positives: np.ndarray
    kinds: np.ndarray
    negatives: np.ndarray
    kth: np.ndarray
    sampled: int
    resaved: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))

    def at(self, threshold: float) -> tuple[float, float, dict[str, float]]:
        """``(precision, recall, recall by edit kind)`` of ``score > threshold``."""
        tp = int(np.sum(self.positives > threshold))
        fp = int(np.sum(self.negatives > threshold))
        by_kind = {
            kind: float(np.mean(self.positives[self.kinds == kind] > threshold))
            for kind in AUGMENTATIONS
            if np.any(self.kinds == kind)
        }
        return tp / max(tp + fp, 1), tp / max(len(self.positives), 1), by_kind


def score_pairs(
    cat: Catalog,
    sample: int = DEFAULT_SAMPLE,
    k: int = 50,
    seed: int = 0,
    progress: bool = False,
) -> PairScores:
    """Make and embed edited copies of sampled stored images and score them (module
    docstring, steps 1-3).

    Args:
        sample: images sampled (at most; those with a readable source file).
        k: negatives kept per copy (its best scores against other listings).
        seed: sampling and edit randomness.
        progress: a progress bar on stderr while the copies are embedded.

    Raises:
        LookalikeError: an empty catalog, or fewer than :data:`MIN_SAMPLE` stored images whose
            source file can be read and decoded.
    """
    if cat.model is None:
        raise LookalikeError(f"{cat.uri} is empty; index some images first")
    readable = _readable(cat)
    if len(readable) < MIN_SAMPLE:
        raise LookalikeError(
            f"calibration needs at least {MIN_SAMPLE} stored images whose source file can be "
            f"read; {len(readable)} found"
        )
    rng = np.random.default_rng(seed)
    picked = [
        readable[i]
        for i in sorted(rng.choice(len(readable), min(sample, len(readable)), replace=False))
    ]
    sha = cat.sha256s()
    copies: list[Image.Image] = []
    owners: list[Key] = []
    kinds: list[str] = []
    resaves: list[Image.Image] = []
    for key, src in picked:
        try:
            image = decode_image(read_bytes(src), name=src).image
        except ImageError:
            continue
        for kind in AUGMENTATIONS:
            copies.append(augment(image, kind, rng))
            owners.append(key)
            kinds.append(kind)
        resaves.append(_resave(image))
    if len(copies) < MIN_SAMPLE * len(AUGMENTATIONS):
        raise LookalikeError("too few sampled images could be decoded to calibrate")
    embedded = _embed(cat, copies + resaves, progress)
    vectors, resaved_vectors = embedded[: len(copies)], embedded[len(copies) :]
    sampled = sorted(set(owners))
    stored = {key: cat.get_image_vector(key[1], key[0]) for key in sampled}  # one read each
    originals = np.stack([stored[key] for key in owners])
    positives = np.einsum("ij,ij->i", vectors, originals).astype(np.float32)
    resave_owners = owners[:: len(AUGMENTATIONS)]  # one re-save per decoded original
    resaved = np.einsum(
        "ij,ij->i", resaved_vectors, np.stack([stored[key] for key in resave_owners])
    ).astype(np.float32)
    # Copies already in the catalog: listings with an image that scores with the original
    # above most edited copies do. Neither positive nor negative (module docstring).
    typical = float(np.quantile(positives, KNOWN_COPY_QUANTILE))
    known = cat.search_batch(
        np.stack([stored[key] for key in sampled]), k=None, threshold=typical, index="exact"
    )
    already = {key: {h.listing_id for h in r.hits} for key, r in zip(sampled, known, strict=True)}
    skip = MAX_LISTING_SKIP * (1 + max(len(v) for v in already.values()))
    negatives: list[float] = []
    kth: list[float] = []
    results = cat.search_batch(vectors, k=k + skip, index="exact")
    for owner, result in zip(owners, results, strict=True):
        others = [
            h.score
            for h in result.hits
            if h.listing_id != owner[0]
            and h.listing_id not in already[owner]
            and sha.get((h.listing_id, h.image_id)) != sha.get(owner)
        ][:k]
        negatives.extend(others)
        if len(others) == k:
            kth.append(others[-1])
    return PairScores(
        positives=positives,
        kinds=np.asarray(kinds),
        negatives=np.asarray(negatives, dtype=np.float32),
        kth=np.asarray(kth, dtype=np.float32),
        sampled=len(set(owners)),
        resaved=resaved,
    )


def _resave(image: Image.Image) -> Image.Image:
    """The image saved as a JPEG at :data:`RESAVE_QUALITY` and read
    back: a re-upload of the same photo."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=RESAVE_QUALITY)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def calibrate(
    cat: Catalog,
    sample: int = DEFAULT_SAMPLE,
    target_precision: float = DEFAULT_PRECISION,
    k: int = 50,
    seed: int = 0,
    save: bool = True,
    progress: bool = False,
) -> Calibration:
    """Measure the catalog's near-duplicate threshold on edited copies of its own images
    (see the module docstring) and store it with the catalog (``save``).

    Args:
        sample, k, seed, progress: as :func:`score_pairs`.
        target_precision: precision the threshold must keep, in (0, 1].

    Raises:
        LookalikeError: a bad argument, too few readable images (:func:`score_pairs`), or no
            extractor for the catalog's vectors.
    """
    if not 0 < target_precision <= 1:
        raise LookalikeError(f"target precision must be in (0, 1], got {target_precision}")
    pairs = score_pairs(cat, sample=sample, k=k, seed=seed, progress=progress)
    t, precision, recall = choose_threshold(pairs.positives, pairs.negatives, target_precision)
    model = cat.model
    cal = Calibration(
        threshold=t,
        target_precision=target_precision,
        precision=precision,
        recall=recall,
        recall_by_kind=pairs.at(t)[2],
        sampled=pairs.sampled,
        positives=len(pairs.positives),
        negatives=len(pairs.negatives),
        exact=not len(pairs.kth) or t >= float(pairs.kth.max()),
        model=model.tag if model else "",
        same_image=float(np.quantile(pairs.resaved, SAME_IMAGE_QUANTILE)),
        similar=similar_threshold(cat, seed=seed),
    )
    if save:
        cat.save_calibration(cal.to_dict())
    return cal


def _embed(cat: Catalog, images: list[Image.Image], progress: bool, batch: int = 32) -> np.ndarray:
    """``(n, d) float32`` vectors of PIL images through the catalog's extractor, in batches."""
    out = []
    with progress_bar(len(images), "calibrating", progress) as bar:
        for start in range(0, len(images), batch):
            out.append(cat.embed(images[start : start + batch]))
            bar.update(len(images[start : start + batch]))
    return np.concatenate(out)


def near_duplicate_threshold(cat: Catalog) -> tuple[float, str]:
    """The threshold ``dedup`` uses by default, and where it comes from (one line).

    The catalog's stored calibration when it was made for the catalog's current model, else
    the extractor's default (measured on edited copies of public photos).

    Raises:
        LookalikeError: neither exists (vectors from an outside model): give a threshold or
            run ``lookalike calibrate``.
    """
    model = cat.model
    stored = cat.calibration()
    if stored is not None and model is not None and stored.get("model") == model.tag:
        cal = Calibration.from_dict(stored)
        return cal.threshold, (
            f"calibrated on this catalog: precision {cal.precision:.3f}, recall "
            f"{cal.recall:.3f} on {cal.positives} edited copies"
        )
    default = default_near_duplicate_threshold(model) if model is not None else None
    if default is not None:
        return default, f"the {model.tag if model else ''} default (benchmarks/calibrate.py)"
    raise LookalikeError(
        "no near-duplicate threshold known for this catalog's vectors; pass --threshold or run "
        "`lookalike calibrate`"
    )


def similar_threshold(cat: Catalog, sample: int = SIMILAR_SAMPLE, seed: int = 0) -> float:
    """The :data:`SIMILAR_QUANTILE` quantile of scores of random image pairs from different
    listings, over at most ``sample`` images (seeded), drawn from the catalog's vector cache:
    the one a search uses, so a search pays nothing more (reading the sample's rows from the
    store instead streamed every vector: 28 s on a 1M x 512 catalog).

    Returns:
        The limit, a float in [-1, 1]; 1.0 when fewer than two listings are sampled (nothing
        can be called similar).

    Raises:
        LookalikeError: the catalog is empty.
    """
    cache = cat.vector_cache(attributes=False)
    live = np.flatnonzero(cache.alive)
    if not len(live):
        raise LookalikeError(f"{cat.uri} is empty; index some images first")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(live, min(sample, len(live)), replace=False))
    listings = [cache.keys[r][0] for r in rows]
    picked = np.asarray(cache.vectors[rows], dtype=np.float32)
    listing = np.asarray(listings)
    scores = picked @ picked.T
    upper = np.triu(np.ones(scores.shape, bool), k=1) & (listing[:, None] != listing[None, :])
    pairs = scores[upper]
    return float(np.quantile(pairs, SIMILAR_QUANTILE)) if len(pairs) else 1.0
