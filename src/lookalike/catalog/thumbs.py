"""Thumbnails for result pages, in a content-addressed cache inside the catalog folder.

A thumbnail is a JPEG of at most :data:`THUMB_SIZE` pixels on its longer side, stored as
``<catalog>/thumbs/<sha[:2]>/<sha>.jpg`` where ``sha`` is the SHA-256 of the image file. File
names are derived from hashes only, never from ids or paths given by a client, so a request can
not make the server read or write outside the cache. Images written from bytes (HTTP uploads,
the stream) get their thumbnail at write time; images indexed from files get it on first
request, from the source path recorded in the store.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

from PIL import Image

from ..errors import ImageError
from ..files import atomic_write
from ..images import decode_image, is_url, read_bytes

#: Longer side of a thumbnail, pixels.
THUMB_SIZE = 192
_SHA = re.compile(r"^[0-9a-f]{64}$")


def thumbnail_path(folder: str | os.PathLike[str], sha256: str) -> Path:
    """Where the thumbnail of the image with this SHA-256 lives (the file may not exist).

    Raises:
        ValueError: ``sha256`` is not 64 lowercase hex digits.
    """
    if not _SHA.match(sha256):
        raise ValueError("not a SHA-256 hex digest")
    return Path(folder) / "thumbs" / sha256[:2] / f"{sha256}.jpg"


def make_thumbnail(image: Image.Image, size: int = THUMB_SIZE) -> bytes:
    """JPEG bytes of ``image`` shrunk to at most ``size`` pixels on its longer side."""
    thumb = image.convert("RGB").copy()
    thumb.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    thumb.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def save_thumbnail(folder: str | os.PathLike[str], sha256: str, image: Image.Image) -> Path:
    """Write the thumbnail of ``image`` into the cache (atomically); returns its path."""
    path = thumbnail_path(folder, sha256)
    if path.exists():
        return path
    return atomic_write(path, make_thumbnail(image))


def ensure_thumbnail(folder: str | os.PathLike[str], sha256: str, source: str | None) -> Path:
    """The cached thumbnail, made from the recorded ``source`` file if it is not cached yet.

    Raises:
        ImageError: not cached and the source is gone, remote, or no longer the same image.
    """
    path = thumbnail_path(folder, sha256)
    if path.exists():
        return path
    return atomic_write(path, _from_source(sha256, source))


def thumbnail_bytes(folder: str | os.PathLike[str], sha256: str, source: str | None) -> bytes:
    """The JPEG bytes of an image's thumbnail: the cached one, else one made from the recorded
    ``source`` file and cached when the folder is writable (a read-only catalog still gets
    the bytes).

    Raises:
        ImageError: not cached and the source is gone, remote, or no longer the same image.
    """
    path = thumbnail_path(folder, sha256)
    with contextlib.suppress(FileNotFoundError):
        return path.read_bytes()
    data = _from_source(sha256, source)
    with contextlib.suppress(OSError):
        atomic_write(path, data)
    return data


def _from_source(sha256: str, source: str | None) -> bytes:
    """A new thumbnail made from the recorded source file, checked against its SHA-256."""
    if not source or is_url(source) or not os.path.isfile(source):
        raise ImageError("no thumbnail cached and the source file is not available")
    decoded = decode_image(read_bytes(source), name=source, draft_size=THUMB_SIZE)
    if decoded.sha256 != sha256:
        raise ImageError("the source file has changed since it was indexed")
    return make_thumbnail(decoded.image)
