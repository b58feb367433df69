"""Crash-safe file writes: the one atomic-write helper every module uses.

A file is written under a temporary name in the target's own folder (so the rename stays on
one file system), flushed to disk, and renamed over the target with :func:`os.replace`, which
POSIX and Windows make atomic: a reader sees the old file or the new one, never a torn one,
and a crash mid-write leaves at most a stray ``*.tmp`` file. Imports nothing of the project.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import platform
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on normal exit it replaces ``target``.

    For writers that want a path (``faiss.write_index``, ``joblib.dump``). On an exception the
    temporary file is removed and ``target`` is left as it was. Parent folders are created.

    Raises:
        OSError: the folder cannot be created or written.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(target: str | os.PathLike[str], data: bytes | str) -> Path:
    """Write ``data`` (bytes, or text as UTF-8) to ``target`` atomically; returns the path.

    Raises:
        OSError: the folder cannot be created or written.
    """
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(target) as tmp, open(tmp, "wb") as fh:
        fh.write(payload)
        fh.flush()
        os.fsync(fh.fileno())
    return Path(target)


def _map_noreserve() -> int:
    """``MAP_NORESERVE`` of this platform (``mmap`` names it from Python 3.13), or 0."""
    flag = getattr(mmap, "MAP_NORESERVE", None)
    if flag is not None:
        return int(flag)
    if sys.platform == "linux" and platform.machine() in ("x86_64", "aarch64", "arm64"):
        return 0x4000  # asm-generic/mman-common.h
    return 0


def map_private(path: str | os.PathLike[str], dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
    """A copy-on-write memory map of the start of a file, as an array of ``shape`` and
    ``dtype``: its pages are read from the file on first access and shared with the page
    cache; a page written is copied into this process (the file never changes).

    Mapped ``MAP_PRIVATE | MAP_NORESERVE``: Linux's default overcommit heuristic charges a
    private writable mapping's whole length to the commit limit and refuses one larger than
    RAM + swap (``ENOMEM``; ``np.memmap(mode="c")`` does), so a 20 GB file would not map on a
    24 GB machine. ``MAP_NORESERVE`` charges only the pages actually copied (``mmap(2)``,
    ``Documentation/mm/overcommit-accounting.rst``; under strict accounting,
    ``vm.overcommit_memory=2``, it is ignored and a larger file still fails).

    Raises:
        OSError: the file cannot be opened or mapped, or is shorter than ``shape``.
    """
    dt = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    length = count * dt.itemsize
    if length == 0:
        return np.zeros(shape, dtype=dt)
    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size < length:
            raise OSError(f"{path}: shorter than {length} bytes")
        mm = mmap.mmap(
            fh.fileno(),
            length,
            flags=mmap.MAP_PRIVATE | _map_noreserve(),
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
        )
    return np.frombuffer(mm, dtype=dt, count=count).reshape(shape)
