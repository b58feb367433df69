"""``colorhist``: an 8x8x8 HSV colour histogram, the classic baseline for image retrieval.

Swain & Ballard, "Color Indexing", IJCV 1991. Each image is shrunk to 128x128, converted to HSV
(OpenCV, H in [0, 180)), binned 8x8x8, and the 512 counts are square-rooted (Hellinger kernel,
so that inner product of the normalized vectors is the Bhattacharyya coefficient) and
L2-normalized.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .base import BaseExtractor, l2_normalize

SIZE = 128
BINS = 8


class ColorHistExtractor(BaseExtractor):
    """8x8x8 HSV histogram -> ``(512,) float32``, square-rooted and L2-normalized."""

    name = "colorhist"
    version = f"hsv{BINS}x{BINS}x{BINS}-sqrt/1"
    dim = BINS**3
    draft_size = SIZE

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """RGB image -> ``(128, 128, 3) uint8`` (Pillow bilinear resize)."""
        return np.asarray(image.resize((SIZE, SIZE), Image.Resampling.BILINEAR))

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """``(n, 128, 128, 3) uint8`` RGB -> ``(n, 512) float32``, rows L2-normalized."""
        import cv2

        out = np.empty((len(batch), self.dim), dtype=np.float32)
        for i, rgb in enumerate(batch):
            hsv = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV)
            hist = cv2.calcHist([hsv], [0, 1, 2], None, [BINS] * 3, [0, 180, 0, 256, 0, 256])
            out[i] = np.sqrt(hist.reshape(-1))
        return l2_normalize(out)
