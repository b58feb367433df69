"""Scores people can read: a band ("same image", "near copy", "similar", "unrelated") next to
the raw cosine, with limits measured on the catalog, not guessed.

A score's meaning depends on the extractor and the collection (HOG scores of unrelated photos
sit around 0.78, CNN ones around 0.18), so the limits come from measurements:

* **same image**: ``score >= same_image``: the 1st percentile of the scores of re-saved
  copies (JPEG, :data:`~lookalike.analytics.calibrate.RESAVE_QUALITY`) against their
  originals: what a re-upload of the very same photo scores. Measured by ``lookalike
  calibrate``; else the extractor's default (:data:`DEFAULT_SAME_IMAGE`, measured the same way
  on the demo photos).
* **near copy**: ``score > near_copy``: the calibrated near-duplicate threshold
  (:func:`lookalike.analytics.calibrate.near_duplicate_threshold`: edited copies at the target
  precision).
* **similar**: ``score > similar``: the 99th percentile of the scores of random pairs of
  images from *different* listings of this catalog, more alike than 99 in 100 pairs drawn at
  random (:func:`lookalike.analytics.calibrate.similar_threshold`; stored by ``calibrate``,
  else computed from the catalog's vectors when first asked).
* **unrelated**: the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..catalog import Catalog
from ..errors import LookalikeError
from .calibrate import Calibration, near_duplicate_threshold, similar_threshold

#: The bands, from the closest to the farthest.
BANDS: tuple[str, ...] = ("same image", "near copy", "similar", "unrelated")
#: "same image" limits per model (name and version, ``ModelInfo.tag``) without a calibration:
#: the 1st percentile of JPEG-q90 re-saved copies vs. originals on the 84 demo photos
#: (``lookalike demo``; ``benchmarks/calibrate.py`` prints it as ``same_image``), rounded down:
#: cnn 0.9914 (the pad-gem3 version; 0.9804 for the version before), cnn-int8 0.9642 (its
#: integer network moves more under re-compression), hog 0.9935. colorhist has none measured.
DEFAULT_SAME_IMAGE: dict[str, float] = {
    "cnn@efficientnet-lite0-0.1.0-pad-gem3/1": 0.991,
    "cnn-int8@efficientnet-lite0-0.1.0-pad-gem3-int8w7/1": 0.964,
    "cnn@efficientnet-lite0-0.1.0-gap/1": 0.98,
    "hog@opencv-hog-w128-c16-b32-s16-n9/1": 0.993,
}


@dataclass(frozen=True)
class ScoreBands:
    """The limits of the bands for one catalog (scores are inner products in [-1, 1]).

    Attributes:
        same_image: ``score >= same_image`` is "same image"; None: not known (no band).
        near_copy: ``score > near_copy`` is "near copy"; None: not known.
        similar: ``score > similar`` is "similar".
        source: where the limits come from, in words (one line).
    """

    same_image: float | None
    near_copy: float | None
    similar: float
    source: str

    def band(self, score: float) -> str:
        """The band of one score (one of :data:`BANDS`)."""
        if self.same_image is not None and score >= self.same_image:
            return BANDS[0]
        if self.near_copy is not None and score > self.near_copy:
            return BANDS[1]
        if score > self.similar:
            return BANDS[2]
        return BANDS[3]

    def to_dict(self) -> dict[str, float | str | None]:
        """JSON-ready limits (rounded to 4 digits)."""
        return {
            "same_image": None if self.same_image is None else round(self.same_image, 4),
            "near_copy": None if self.near_copy is None else round(self.near_copy, 4),
            "similar": round(self.similar, 4),
            "source": self.source,
        }


def score_bands(cat: Catalog) -> ScoreBands:
    """The band limits of the catalog: its stored calibration (``lookalike calibrate``) when it
    was made for the current model, else the extractor's defaults and the "similar" limit
    measured on the catalog's vectors now.

    Raises:
        LookalikeError: the catalog is empty.
    """
    model = cat.model
    if model is None:
        raise LookalikeError(f"{cat.uri} is empty; index some images first")
    stored = cat.calibration()
    if stored is not None and stored.get("model") == model.tag:
        cal = Calibration.from_dict(stored)
        if cal.same_image is not None and cal.similar is not None:
            return ScoreBands(cal.same_image, cal.threshold, cal.similar, "calibrated")
    try:
        near: float | None = near_duplicate_threshold(cat)[0]
    except LookalikeError:  # vectors from an outside model: no near-copy limit known
        near = None
    same = DEFAULT_SAME_IMAGE.get(model.tag)
    return ScoreBands(same, near, similar_threshold(cat), f"{model.name} defaults")
