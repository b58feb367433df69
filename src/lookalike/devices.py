"""Accelerator detection and the machine's memory, shared by the extractors and the engine (a
leaf module)."""

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


def ram_bytes() -> int | None:
    """The machine's physical memory in bytes (``sysconf``), or None where it cannot be read."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None
