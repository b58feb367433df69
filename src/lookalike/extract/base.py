"""The extractor protocol and the helpers every extractor shares (normalization, cropping).

Kept apart from the registry in ``lookalike.extract`` so that the extractors import it without
importing their own package (no import cycle).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

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
