"""Reading, validating and decoding images, and discovering image sources.

Everything that touches image bytes lives here, so the rest of the pipeline sees either a clean
8-bit RGB :class:`PIL.Image.Image` or an :class:`~lookalike.errors.ImageError` that names the file
and the reason.

Decoding rules (applied to every image, whatever its origin):

* Pillow's decompression-bomb guard is on and strict: an image of more than
  :data:`MAX_IMAGE_PIXELS` pixels is refused (Pillow would only warn below twice that size).
  Images that arrive from strangers (HTTP uploads) get a lower limit,
  :data:`MAX_UPLOAD_PIXELS`, checked from the header by :func:`probe_image` before decoding.
* Truncated files raise (Pillow's ``LOAD_TRUNCATED_IMAGES`` stays ``False``).
* The EXIF orientation tag is applied (:func:`PIL.ImageOps.exif_transpose`).
* 16-bit and 32-bit grey images are scaled to 8 bits, CMYK is converted to RGB, and images with an
  alpha channel or a transparent palette are composited onto white.

Decoding is bounded in memory: with a ``draft_size`` (what the extractor needs), a JPEG is
decoded at a reduced DCT scale (``draft``) and any other image is reduced (box filter) right
after loading, to a shorter side of at least twice ``draft_size``, *before* any mode
conversion; the conversions themselves never widen the pixels of a full-size image (16-bit
grey is reduced in its own mode, then scaled to 8 bits). So a 9400 x 9400 16-bit PNG costs its
loaded pixels (2 bytes each) once, not float64 copies of them.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, ImageFile

from .errors import ImageError, SourceError, optional_import

#: Largest accepted image, in pixels. Pillow's own default (``Image.MAX_IMAGE_PIXELS``, about
#: 89.5 M pixels, i.e. a 1024 MB 24-bit image); lookalike treats Pillow's warning level as an error.
MAX_IMAGE_PIXELS: int = 89_478_485

#: Default largest image, in pixels, for images sent by strangers (HTTP uploads): 40 M pixels,
#: under half of Pillow's guard. Checked from the header (:func:`probe_image`), before decoding.
MAX_UPLOAD_PIXELS: int = 40_000_000

#: Largest accepted file, in bytes (64 MiB). A larger file is refused before decoding.
MAX_FILE_BYTES: int = 64 * 1024 * 1024

#: File name endings that folder discovery treats as images (case-insensitive).
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
)

#: File name endings read as a manifest (``listing_id,image_id,path``) rather than an image.
MANIFEST_EXTENSIONS: frozenset[str] = frozenset({".csv", ".parquet", ".pq"})

#: File name endings read as a plain list of paths/URLs, one a line.
LIST_EXTENSIONS: frozenset[str] = frozenset({".txt", ".lst", ".list"})

#: Timeout for fetching an ``http(s)://`` image, in seconds.
URL_TIMEOUT_S: float = 30.0

Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass(frozen=True)
class ImageSource:
    """One image to ingest: where its bytes are and the key it is stored under.

    Attributes:
        listing_id: group key (partition key of ``features``), e.g. ``"truck-17"``.
        image_id: image key within the listing (clustering key), e.g. ``"truck-17/front.jpg"``.
        location: a local file path or an ``http(s)://`` URL.
    """

    listing_id: str
    image_id: str
    location: str


@dataclass
class DecodedImage:
    """A decoded image with the facts the store records about its file.

    Attributes:
        image: 8-bit RGB image, EXIF orientation applied (possibly reduced by JPEG draft mode).
        width: width of the original image in pixels (after EXIF rotation).
        height: height of the original image in pixels (after EXIF rotation).
        sha256: hex SHA-256 of the file bytes.
    """

    image: Image.Image
    width: int
    height: int
    sha256: str


def is_url(location: str) -> bool:
    """Return True if ``location`` is an ``http://`` or ``https://`` URL."""
    return location.startswith(("http://", "https://"))


def read_bytes(location: str | os.PathLike[str], max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """Read the bytes of an image file or ``http(s)`` URL.

    Args:
        location: local path or URL.
        max_bytes: refuse anything larger (bytes).

    Returns:
        The raw file bytes.

    Raises:
        ImageError: missing file, unreadable file, HTTP error, or more than ``max_bytes``.
    """
    loc = os.fspath(location)
    try:
        if is_url(loc):
            with urllib.request.urlopen(loc, timeout=URL_TIMEOUT_S) as resp:
                data = resp.read(max_bytes + 1)
        else:
            size = os.path.getsize(loc)
            if size > max_bytes:
                raise ImageError(f"{loc}: file is {size} bytes, over the {max_bytes}-byte limit")
            with open(loc, "rb") as fh:
                data = fh.read(max_bytes + 1)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{loc}: no such file") from None
    except (OSError, ValueError) as exc:  # urllib errors derive from OSError
        raise ImageError(f"{loc}: cannot read: {exc}") from None
    if len(data) > max_bytes:
        raise ImageError(f"{loc}: over the {max_bytes}-byte limit")
    return data


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of ``data`` (the identity of an image's bytes in the store)."""
    return hashlib.sha256(data).hexdigest()


_WIDE_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
#: EXIF orientation -> the transpose that makes the image upright (as ImageOps.exif_transpose).
_UPRIGHT: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _grey_peak(img: Image.Image) -> float:
    """The value that maps to 255 when a wide grey image is scaled to 8 bits."""
    if img.mode.startswith("I;16"):
        return 65535.0
    extrema = img.getextrema()
    hi = max(float(extrema[1]), 1.0)  # type: ignore[arg-type]
    if img.mode == "I" and hi <= 255:  # 8-bit data stored in a 32-bit container
        hi = 255.0
    return hi


def _to_rgb8(img: Image.Image, grey_peak: float | None = None) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (see the module docstring for the rules).

    ``grey_peak``: for 16/32-bit grey, the value that maps to 255 (measured on the full image
    when this one is a reduced copy); by default taken from ``img``.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _WIDE_GREY:
        hi = _grey_peak(img) if grey_peak is None else grey_peak
        arr = np.asarray(img, dtype=np.float64)
        arr8 = np.clip(arr * (255.0 / hi), 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _reduce(img: Image.Image, draft_size: int) -> Image.Image:
    """``img`` shrunk by an integer box filter to a shorter side of at least ``2 * draft_size``
    (itself when it is not that large). Palette and 1-bit images are expanded first (their
    pixels cannot be averaged); 16-bit grey is resized in its own mode."""
    factor = min(img.size) // (2 * draft_size)
    if factor < 2:
        return img
    if img.mode == "1":
        img = img.convert("L")
    elif img.mode in ("P", "PA"):
        img = img.convert("RGBA" if img.mode == "PA" or "transparency" in img.info else "RGB")
    if img.mode.startswith("I;16"):
        size = (img.width // factor, img.height // factor)
        return img.resize(size, Image.Resampling.BOX)
    return img.reduce(factor)


def probe_image(
    data: bytes, name: str = "<bytes>", max_pixels: int = MAX_UPLOAD_PIXELS
) -> tuple[int, int]:
    """``(width, height)`` of encoded image bytes, read from the header only (no decoding).

    Raises:
        ImageError: empty data, not an image, or more than ``max_pixels`` pixels.
    """
    if not data:
        raise ImageError(f"{name}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
    except Image.UnidentifiedImageError:
        raise ImageError(f"{name}: not an image (Pillow cannot identify the format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{name}: decompression-bomb guard: {exc}") from None
    except Exception as exc:
        raise ImageError(f"{name}: corrupt or truncated image: {exc}") from None
    if width * height > max_pixels:
        raise ImageError(
            f"{name}: {width}x{height} pixels is over this server's {max_pixels}-pixel limit "
            "for uploads"
        )
    return width, height


def decode_image(data: bytes, name: str = "<bytes>", draft_size: int | None = None) -> DecodedImage:
    """Decode image bytes into an 8-bit RGB image.

    Args:
        data: the encoded file (JPEG, PNG, WebP, TIFF, BMP, GIF: whatever Pillow reads).
        name: file name or URL used in error messages.
        draft_size: if given, a JPEG is decoded at the smallest DCT scale whose shorter side is
            still at least this many pixels (Pillow's ``draft`` mode), and any other image at
            least twice this size on its shorter side is box-reduced right after loading:
            much faster and smaller for large images that will be shrunk anyway.
            ``width``/``height`` still report the full size.

    Returns:
        :class:`DecodedImage` with the RGB image, original size and SHA-256 of ``data``.

    Raises:
        ImageError: empty data, not an image, truncated or corrupt data, or more than
            :data:`MAX_IMAGE_PIXELS` pixels (decompression bomb).
    """
    if not data:
        raise ImageError(f"{name}: empty file (0 bytes)")
    digest = sha256_hex(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > MAX_IMAGE_PIXELS:
                raise ImageError(
                    f"{name}: {width}x{height} pixels is over the {MAX_IMAGE_PIXELS}-pixel "
                    "limit (decompression-bomb guard)"
                )
            if draft_size and img.format == "JPEG" and img.mode in ("RGB", "L", "CMYK"):
                short = min(width, height)
                if short > 2 * draft_size:
                    scale = draft_size / short
                    img.draft(img.mode, (int(width * scale) + 1, int(height * scale) + 1))
            img.load()
            orientation = img.getexif().get(0x0112, 1)
            peak = _grey_peak(img) if img.mode in _WIDE_GREY else None
            small = _reduce(img, draft_size) if draft_size else img
            if small is not img:
                img.close()  # the full-size pixels go now, before any conversion
            upright = small.transpose(_UPRIGHT[orientation]) if orientation in _UPRIGHT else small
            if orientation in (5, 6, 7, 8):
                width, height = height, width
            rgb = _to_rgb8(upright, peak)
    except ImageError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageError(f"{name}: not an image (Pillow cannot identify the format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{name}: decompression-bomb guard: {exc}") from None
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, struct.error...
        raise ImageError(f"{name}: corrupt or truncated image: {exc}") from None
    return DecodedImage(image=rgb, width=width, height=height, sha256=digest)


def load_image(location: str | os.PathLike[str], draft_size: int | None = None) -> DecodedImage:
    """Read and decode one image file or URL: :func:`read_bytes` then :func:`decode_image`.

    Raises:
        ImageError: as :func:`read_bytes` and :func:`decode_image`.
    """
    loc = os.fspath(location)
    return decode_image(read_bytes(loc), name=loc, draft_size=draft_size)


# --------------------------------------------------------------------------- sources


def _check_key(value: object, what: str, where: str) -> str:
    if value is None:
        raise SourceError(f"{where}: {what} is missing")
    text = str(value).strip()
    if not text:
        raise SourceError(f"{where}: {what} is empty")
    if len(text) > 1024:
        raise SourceError(f"{where}: {what} is longer than 1024 characters")
    if any(ord(ch) < 32 for ch in text):
        raise SourceError(f"{where}: {what} contains control characters")
    return text


def source_for_path(path: Path, root: Path | None = None) -> ImageSource:
    """The :class:`ImageSource` of one image file, by the folder convention.

    ``listing_id`` is the name of the file's parent folder. ``image_id`` is the path relative
    to ``root`` in POSIX form, prefixed by the root's own name when the file sits directly in
    ``root`` (and ``<parent>/<name>`` without a root). So a file gets the same key whichever
    level it is indexed from: ``photos/truck-17/front.jpg`` gives
    ``("truck-17", "truck-17/front.jpg")`` from root ``photos`` and from root
    ``photos/truck-17``. A file with no parent folder name (in ``/``) is its own listing,
    named by its stem.
    """
    if root is not None:
        rel = PurePosixPath(path.relative_to(root).as_posix())
        if not rel.parent.name:
            root_name = root.resolve().name
            rel = PurePosixPath(root_name, rel) if root_name else rel
    else:
        parent = path.resolve().parent.name
        rel = PurePosixPath(parent, path.name) if parent else PurePosixPath(path.name)
    listing = rel.parent.name if rel.parent.name else rel.stem
    return ImageSource(listing_id=listing, image_id=str(rel), location=str(path))


def iter_folder(root: Path) -> Iterator[ImageSource]:
    """Every image file under ``root`` (recursive, sorted, hidden files skipped).

    Files are recognised by :data:`IMAGE_EXTENSIONS`; other files are ignored.
    """
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fname in sorted(filenames):
            if fname.startswith(".") or Path(fname).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            yield source_for_path(Path(dirpath) / fname, root)


def _resolve(location: str, base: Path) -> str:
    if is_url(location) or os.path.isabs(location):
        return location
    return str(base / location)


def _source_for_listed(location: str, base: Path) -> ImageSource:
    if is_url(location):
        parts = PurePosixPath(urllib.parse.urlparse(location).path)
        listing = parts.parent.name or parts.stem
        return ImageSource(listing, f"{listing}/{parts.name}", location)
    src = source_for_path(Path(_resolve(location, base)))
    return src


def iter_list_file(path: Path) -> Iterator[ImageSource]:
    """Sources from a text file of paths or URLs, one a line (a line starting ``#`` is a comment).

    Relative paths are resolved against the list file's folder. Keys follow
    :func:`source_for_path` (``listing_id`` = parent folder name, ``image_id`` =
    ``<parent>/<name>``).
    """
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            entry = line.strip()
            if entry and not entry.startswith("#"):
                yield _source_for_listed(entry, path.parent)


MANIFEST_COLUMNS: tuple[str, str, str] = ("listing_id", "image_id", "path")


def iter_manifest(path: Path) -> Iterator[ImageSource]:
    """Sources from a CSV or Parquet manifest with columns ``listing_id,image_id,path``.

    Relative paths are resolved against the manifest's folder.

    Raises:
        SourceError: a required column is missing (names the file), or a row has an empty or
            invalid key (names the file and the 1-based data row).
    """
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in MANIFEST_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise SourceError(f"{path}: manifest lacks column(s) {', '.join(missing)}")
            rows: Iterable[dict] = list(reader)
    else:
        pq = optional_import("pyarrow.parquet", "parquet", "a Parquet manifest")

        try:
            table = pq.read_table(path)
        except Exception as exc:
            raise SourceError(f"{path}: cannot read Parquet manifest: {exc}") from None
        missing = [c for c in MANIFEST_COLUMNS if c not in table.column_names]
        if missing:
            raise SourceError(f"{path}: manifest lacks column(s) {', '.join(missing)}")
        rows = table.select(list(MANIFEST_COLUMNS)).to_pylist()
    for i, row in enumerate(rows, start=1):
        where = f"{path}: row {i}"
        yield ImageSource(
            listing_id=_check_key(row.get("listing_id"), "listing_id", where),
            image_id=_check_key(row.get("image_id"), "image_id", where),
            location=_resolve(_check_key(row.get("path"), "path", where), path.parent),
        )


def iter_sources(inputs: Sequence[str | os.PathLike[str]]) -> Iterator[ImageSource]:
    """Expand ingest inputs into image sources.

    Each input may be a folder (recursive, :func:`iter_folder`), a manifest (``.csv``,
    ``.parquet``: :func:`iter_manifest`), a list file (``.txt``, ``.lst``: :func:`iter_list_file`),
    a single image file, or an ``http(s)`` URL.

    Raises:
        SourceError: an input does not exist, or a manifest is malformed.
    """
    for item in inputs:
        text = os.fspath(item)
        if is_url(text):
            yield _source_for_listed(text, Path("."))
            continue
        path = Path(text)
        if path.is_dir():
            yield from iter_folder(path)
        elif not path.exists():
            raise SourceError(f"{path}: no such file or folder")
        elif path.suffix.lower() in MANIFEST_EXTENSIONS:
            yield from iter_manifest(path)
        elif path.suffix.lower() in LIST_EXTENSIONS:
            yield from iter_list_file(path)
        else:
            yield source_for_path(path)
