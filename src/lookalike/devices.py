"""Accelerator detection shared by the extractors and the engine (a leaf module)."""

from __future__ import annotations

import os


def cuda_available() -> bool:
    """True when torch sees a CUDA device.

    Torch is imported only where a GPU may exist (``/dev/nvidiactl`` present, or
    ``LOOKALIKE_DEVICE=cuda``), so CPU-only machines do not pay its import time.
    """
    if not (os.path.exists("/dev/nvidiactl") or os.environ.get("LOOKALIKE_DEVICE") == "cuda"):
        return False
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())
