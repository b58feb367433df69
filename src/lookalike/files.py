"""Crash-safe file writes: the one atomic-write helper every module uses.

A file is written under a temporary name in the target's own folder (so the rename stays on
one file system), flushed to disk, and renamed over the target with :func:`os.replace`, which
POSIX and Windows make atomic: a reader sees the old file or the new one, never a torn one,
and a crash mid-write leaves at most a stray ``*.tmp`` file. Imports nothing of the project.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


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
