"""Extractors: image(s) -> ``(n, d) float32`` L2-normalized feature vectors, behind one protocol.

An extractor is split in two so that decoding and resizing can run in worker processes while
the model runs batched in one place:

* :meth:`Extractor.preprocess` turns one decoded RGB image into a fixed-shape ``uint8`` array.
  It is cheap, needs no model, and is called in the ingest worker processes.
* :meth:`Extractor.embed` turns a stacked batch of those arrays into feature vectors.

Extractors are looked up by name with :func:`get_extractor`. Built in:

========== ====== ===========================================================================
name        d      what
========== ====== ===========================================================================
``cnn``     1280   EfficientNet-Lite0 (ImageNet), whole photo padded to a square, GeM pooling
                   (options and versions: :mod:`.cnn_options`)
``cnn-int8`` 1280  the same on the network quantized to 8-bit integers (CPU only, ~1.6x faster)
``hog``     1764   OpenCV histogram of oriented gradients, 128x128 grey window
``colorhist`` 512  8x8x8 HSV colour histogram (a baseline for evaluations)
========== ====== ===========================================================================
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import LookalikeError
from ..types import ModelInfo
from .base import BaseExtractor, Extractor, center_crop_resize, l2_normalize

#: Near-duplicate thresholds (``score > t``) per model tag, measured by ``benchmarks/calibrate.py``
#: on edited copies (crop, flip, rotation, colour, blur, JPEG) of the demo photos and of 2,000
#: Fashion-MNIST images: the lowest threshold that keeps precision 0.99 on both sets (README,
#: "Near-duplicate thresholds"). ``colorhist`` has none: no threshold reaches that precision on
#: Fashion-MNIST. A catalog's own calibration (``lookalike calibrate``) takes precedence.
NEAR_DUPLICATE_THRESHOLDS: dict[str, float] = {
    # the cnn default: the highest of three public sets' thresholds at precision 0.99
    # (benchmarks/calibrate.py: demo 0.535, Fashion-MNIST 0.876; benchmarks/descriptors.py:
    # the near-duplicate set 0.903)
    "cnn@efficientnet-lite0-0.1.0-pad-gem3/1": 0.903,
    "cnn@efficientnet-lite0-0.1.0-gap/1": 0.936,  # the cnn default before the pad-gem3 version
    # the int8 network, by the same rule (demo 0.486, Fashion-MNIST 0.852, the near-duplicate
    # set 0.869)
    "cnn-int8@efficientnet-lite0-0.1.0-pad-gem3-int8w7/1": 0.869,
    "hog@opencv-hog-w128-c16-b32-s16-n9/1": 0.981,
}


#: Lowest cosine at which ``dedup`` checks a pair of images geometrically
#: (:mod:`lookalike.analytics.verify`): below the near-duplicate threshold, crops and rotations
#: of a photo score among look-alike photos. Measured with ``benchmarks/dedup.py``: on the
#: public near-duplicate set every copy of the cnn default scores above 0.5 with its original
#: (the lowest 0.564, the 1st percentile 0.679); with the int8 network above 0.45 (the lowest
#: 0.488, the 1st percentile 0.625).
VERIFY_FLOORS: dict[str, float] = {
    "cnn@efficientnet-lite0-0.1.0-pad-gem3/1": 0.5,
    "cnn-int8@efficientnet-lite0-0.1.0-pad-gem3-int8w7/1": 0.45,
}


def default_verify_floor(model: ModelInfo) -> float | None:
    """The cosine above which ``dedup`` verifies candidate pairs of an extractor's vectors
    geometrically (:data:`VERIFY_FLOORS`), or None when the model was never measured."""
    return VERIFY_FLOORS.get(model.tag)


def default_near_duplicate_threshold(model: ModelInfo) -> float | None:
    """The measured near-duplicate threshold of an extractor's vectors, or None when the
    model (name and version) was never measured."""
    return NEAR_DUPLICATE_THRESHOLDS.get(model.tag)


#: The extractors that run a network: they take the ``device`` and ``threads`` options.
NETWORK_EXTRACTORS: tuple[str, ...] = ("cnn", "cnn-int8")

_REGISTRY: dict[str, Callable[..., BaseExtractor]] = {}


def register(name: str, factory: Callable[..., BaseExtractor]) -> None:
    """Make an extractor available to :func:`get_extractor` under ``name``."""
    _REGISTRY[name] = factory


def available_extractors() -> list[str]:
    """Names accepted by :func:`get_extractor`, sorted."""
    _load_builtins()
    return sorted(_REGISTRY)


def get_extractor(name: str, **options: object) -> BaseExtractor:
    """Build the extractor called ``name`` (models load lazily, on the first :meth:`embed`).

    Args:
        name: one of :func:`available_extractors`.
        **options: passed to the extractor (e.g. ``device="cuda"`` for ``cnn``).

    Raises:
        LookalikeError: unknown name.
    """
    _load_builtins()
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise LookalikeError(
            f"unknown extractor {name!r}; available: {', '.join(sorted(_REGISTRY))}"
        ) from None
    return factory(**options)


def _load_builtins() -> None:
    if _REGISTRY:
        return
    from .cnn import CnnExtractor, CnnInt8Extractor
    from .colorhist import ColorHistExtractor
    from .hog import HogExtractor

    register(CnnExtractor.name, CnnExtractor)
    register(CnnInt8Extractor.name, CnnInt8Extractor)
    register(HogExtractor.name, HogExtractor)
    register(ColorHistExtractor.name, ColorHistExtractor)


__all__ = [
    "NETWORK_EXTRACTORS",
    "BaseExtractor",
    "Extractor",
    "available_extractors",
    "center_crop_resize",
    "default_near_duplicate_threshold",
    "default_verify_floor",
    "get_extractor",
    "l2_normalize",
    "register",
]
