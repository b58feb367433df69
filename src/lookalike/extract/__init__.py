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
``cnn``     1280   EfficientNet-Lite0 (ImageNet), global average pool of the last feature map
``hog``     1764   OpenCV histogram of oriented gradients, 128x128 grey window
``colorhist`` 512  8x8x8 HSV colour histogram (a baseline for evaluations)
========== ====== ===========================================================================
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

from ..errors import LookalikeError
from ..types import ModelInfo


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Scale each row of ``x`` to unit L2 norm, so inner product equals cosine similarity.

    Args:
        x: ``(n, d)`` or ``(d,)`` array, any float dtype.

    Returns:
        float32 array of the same shape. An all-zero row stays all zero (norm floor 1e-12).
    """
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, np.float32(1e-12))


@runtime_checkable
class Extractor(Protocol):
    """The extractor protocol. See the module docstring for the split of work."""

    @property
    def info(self) -> ModelInfo:
        """Name, version and dimension of the vectors this extractor makes."""
        ...

    #: If set, JPEGs are decoded in draft mode at about this many pixels on the shorter side.
    draft_size: int | None

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """One 8-bit RGB image -> fixed-shape ``uint8`` array (model input, before scaling)."""
        ...

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """``(n, *input_shape) uint8`` -> ``(n, d) float32``, rows L2-normalized."""
        ...


class BaseExtractor:
    """Shared helpers for the built-in extractors (subclasses set ``name``/``version``/``dim``)."""

    name: str = ""
    version: str = ""
    dim: int = 0
    draft_size: int | None = None

    @property
    def info(self) -> ModelInfo:
        """Name, version and dimension of the vectors this extractor makes."""
        return ModelInfo(self.name, self.version, self.dim)

    def preprocess(self, image: Image.Image) -> np.ndarray:  # pragma: no cover - abstract
        """One 8-bit RGB image -> fixed-shape ``uint8`` array (each subclass's own shape).

        Raises:
            NotImplementedError: always; subclasses implement it.
        """
        raise NotImplementedError

    def embed(self, batch: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        """``(n, *input_shape) uint8`` -> ``(n, d) float32``, rows L2-normalized.

        Raises:
            NotImplementedError: always; subclasses implement it.
        """
        raise NotImplementedError

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Preprocess and embed RGB images: ``len(images)`` -> ``(n, d) float32``."""
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.embed(np.stack([self.preprocess(im) for im in images]))


def center_crop_resize(
    image: Image.Image, size: int, crop_fraction: float, resample: int = Image.Resampling.BICUBIC
) -> Image.Image:
    """Crop the central square of side ``crop_fraction * min(w, h)`` and resize to ``size``².

    This is the evaluation transform of the EfficientNet reference code
    (``tensorflow/tpu`` ``models/official/efficientnet/preprocessing.py``,
    ``_decode_and_center_crop``: crop ``image_size / (image_size + CROP_PADDING)`` with
    ``CROP_PADDING = 32``, then bicubic resize).
    """
    w, h = image.size
    side = max(1, round(crop_fraction * min(w, h)))
    left = (w - side) // 2
    top = (h - side) // 2
    return image.resize((size, size), resample=resample, box=(left, top, left + side, top + side))


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
    from .cnn import CnnExtractor
    from .colorhist import ColorHistExtractor
    from .hog import HogExtractor

    register(CnnExtractor.name, CnnExtractor)
    register(HogExtractor.name, HogExtractor)
    register(ColorHistExtractor.name, ColorHistExtractor)
