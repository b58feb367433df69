"""``hog``: histogram of oriented gradients (Dalal & Triggs, CVPR 2005) with OpenCV 4.

OpenCV 5 moved ``HOGDescriptor`` out of the main package, so lookalike pins OpenCV 4.14.

The seed's real-time recognition demo used OpenCV's ``HOGDescriptor``. Here the whole image is
resized (aspect ratio not kept) to one fixed 128x128 grey window and described with 16x16-pixel
cells, 32x32-pixel blocks (2x2 cells) moved by 16 pixels, and 9 unsigned orientation bins:
7x7 blocks x 4 cells x 9 bins = 1764 values, L2-normalized as a whole.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from .base import BaseExtractor, l2_normalize

if TYPE_CHECKING:
    import cv2

WINDOW = 128
CELL = 16
BLOCK = 32
BLOCK_STRIDE = 16
BINS = 9


class HogExtractor(BaseExtractor):
    """OpenCV HOG descriptor of a 128x128 grey window -> ``(1764,) float32``, L2-normalized."""

    name = "hog"
    version = f"opencv-hog-w{WINDOW}-c{CELL}-b{BLOCK}-s{BLOCK_STRIDE}-n{BINS}/1"
    dim = ((WINDOW - BLOCK) // BLOCK_STRIDE + 1) ** 2 * (BLOCK // CELL) ** 2 * BINS
    draft_size = WINDOW

    def __init__(self) -> None:
        self._hog: cv2.HOGDescriptor | None = None  # made on first use (cv2 imports lazily)

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """RGB image -> ``(128, 128) uint8`` grey window (bilinear resize, ITU-R 601 luma)."""
        return np.asarray(image.convert("L").resize((WINDOW, WINDOW), Image.Resampling.BILINEAR))

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """``(n, 128, 128) uint8`` -> ``(n, 1764) float32``, rows L2-normalized."""
        import cv2

        hog = self._hog
        if hog is None:
            hog = self._hog = cv2.HOGDescriptor(
                (WINDOW, WINDOW), (BLOCK, BLOCK), (BLOCK_STRIDE, BLOCK_STRIDE), (CELL, CELL), BINS
            )
        out = np.empty((len(batch), self.dim), dtype=np.float32)
        for i, window in enumerate(batch):
            out[i] = np.asarray(hog.compute(np.ascontiguousarray(window))).reshape(-1)
        return l2_normalize(out)
