"""A demo collection of real photos, built offline from images that ship inside installed wheels.

Sources: scikit-image's ``skimage.data`` (astronaut, chelsea, coffee, rocket, the stereo
motorcycle pair, Hubble deep field, immunohistochemistry, retina, camera, coins, moon, page) and
scikit-learn's two sample images (china, flower). Nothing is downloaded.

Each photo becomes one *listing* of several seeded *variants* (random crop, mirror, rotation,
brightness/contrast/saturation, size, JPEG quality), and a few further *query* variants made
with other seeds are held out. The motorcycle listing is indexed from the left camera of the
stereo pair and queried with the right one: a real change of viewpoint.

Layout written by :func:`write_demo`::

    DIR/photos/<listing>/<listing>-NN.jpg     indexed images
    DIR/queries/<listing>/q-NN.jpg            held-out queries (folder = relevant listing)
    DIR/listings.csv                          listing_id,stock_level,category
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from skimage import data

        return getattr(data, name)()

    return load


def _motorcycle(side: int) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from skimage import data

        return data.stereo_motorcycle()[side]

    return load


def _sklearn(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(name)

    return load


@dataclass(frozen=True)
class DemoPhoto:
    """One demo listing: how to load its index photo and its query photo, and attributes."""

    listing_id: str
    load: Callable[[], np.ndarray]
    load_query: Callable[[], np.ndarray] | None
    category: str
    stock_level: int


PHOTOS: tuple[DemoPhoto, ...] = (
    DemoPhoto("astronaut", _skimage("astronaut"), None, "person", 3),
    DemoPhoto("chelsea", _skimage("chelsea"), None, "animal", 5),
    DemoPhoto("coffee", _skimage("coffee"), None, "food", 0),
    DemoPhoto("rocket", _skimage("rocket"), None, "vehicle", 1),
    DemoPhoto("motorcycle", _motorcycle(0), _motorcycle(1), "vehicle", 2),
    DemoPhoto("hubble", _skimage("hubble_deep_field"), None, "space", 0),
    DemoPhoto("ihc", _skimage("immunohistochemistry"), None, "science", 4),
    DemoPhoto("retina", _skimage("retina"), None, "science", 1),
    DemoPhoto("camera", _skimage("camera"), None, "person", 2),
    DemoPhoto("coins", _skimage("coins"), None, "object", 7),
    DemoPhoto("moon", _skimage("moon"), None, "space", 0),
    DemoPhoto("page", _skimage("page"), None, "document", 9),
    DemoPhoto("china", _sklearn("china.jpg"), None, "building", 6),
    DemoPhoto("flower", _sklearn("flower.jpg"), None, "nature", 8),
)


def make_variant(photo: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, int]:
    """A random but plausible re-shot of ``photo``: crop, mirror, rotate, colour, size.

    Args:
        photo: RGB source image.
        rng: seeded generator (same seed -> same variant).

    Returns:
        The variant (RGB) and a JPEG quality (20-95) to save it with.
    """
    w, h = photo.size
    fw, fh = rng.uniform(0.72, 0.95, size=2)
    cw, ch = int(w * fw), int(h * fh)
    x0 = int(rng.integers(0, w - cw + 1))
    y0 = int(rng.integers(0, h - ch + 1))
    img = photo.crop((x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    angle = float(rng.uniform(-10, 10))
    fill = tuple(int(c) for c in np.asarray(img).reshape(-1, 3).mean(axis=0))
    img = img.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=fill)
    img = ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.75, 1.25)))
    img = ImageEnhance.Contrast(img).enhance(float(rng.uniform(0.75, 1.25)))
    img = ImageEnhance.Color(img).enhance(float(rng.uniform(0.7, 1.3)))
    longest = int(rng.integers(240, 520))
    scale = longest / max(img.size)
    img = img.resize(
        (max(1, int(img.width * scale)), max(1, int(img.height * scale))), Image.Resampling.LANCZOS
    )
    return img, int(rng.integers(20, 96))


def _rgb(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(arr).convert("RGB")


def write_demo(
    folder: str | Path,
    images_per_listing: int = 6,
    queries_per_listing: int = 2,
    seed: int = 0,
    photos: tuple[DemoPhoto, ...] = PHOTOS,
) -> dict[str, int]:
    """Write the demo collection (layout in the module docstring) into ``folder``.

    Deterministic: the same arguments write the same bytes.

    Returns:
        ``{"listings": ..., "images": ..., "queries": ...}`` counts.
    """
    root = Path(folder)
    n_images = n_queries = 0
    for p_index, photo in enumerate(photos):
        base = _rgb(photo.load())
        query_base = _rgb(photo.load_query()) if photo.load_query else base
        for kind, count, src, sub, stem in (
            ("image", images_per_listing, base, "photos", photo.listing_id),
            ("query", queries_per_listing, query_base, "queries", "q"),
        ):
            out = root / sub / photo.listing_id
            out.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                rng = np.random.default_rng([seed, p_index, 0 if kind == "image" else 1, i])
                img, quality = make_variant(src, rng)
                img.save(out / f"{stem}-{i + 1:02d}.jpg", quality=quality)
            if kind == "image":
                n_images += count
            else:
                n_queries += count
    with open(root / "listings.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["listing_id", "stock_level", "category"])
        for photo in photos:
            writer.writerow([photo.listing_id, photo.stock_level, photo.category])
    return {"listings": len(photos), "images": n_images, "queries": n_queries}
