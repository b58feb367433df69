"""Public evaluation sets, written by lookalike itself from images that ship in packages.

Nothing is downloaded: every set is made from files that an ordinary package install puts on
the machine, with seeded edits, so the same sources write the same bytes everywhere. A set
whose package is not installed is skipped (its builder returns None and says what to install).

=================== ========== ===============================================================
set                 kind       what (source package, licence)
=================== ========== ===============================================================
``near-duplicates`` near-dup   originals: :data:`PACKAGE_PHOTOS` (scikit-image ``skimage.data``
                               and scikit-learn sample images: NASA public-domain, CC0 and
                               CC-BY photos; BSD-3 packages), the Tux Paint photos below and
                               Fashion-MNIST images below, one listing each; queries: one
                               edited copy per :data:`~lookalike.analytics.calibrate.AUGMENTATIONS`
                               kind (crop, flip, rotation, colour, blur, JPEG; the edits of
                               ``lookalike calibrate``) of a seeded part of them. Relevant: the
                               copy's original; every other original is a negative.
``fashion-mnist``   category   Zalando's Fashion-MNIST test set (Debian ``dataset-fashion-mnist``,
                               MIT/Expat): 28x28 grey product photos, 10 clothing classes, the
                               first ``per_class`` of each class.
``tuxpaint``        category   the photographic stamps of Tux Paint (Debian
                               ``tuxpaint-stamps-default``, GPL-2): cut-out photos of animals,
                               fruit, flowers, tools, instruments, ... on white;
                               :data:`TUXPAINT_CLASSES` names the 10 classes (folders).
``demo``            queries    ``lookalike demo`` (:mod:`lookalike.demo`): 14 photos x 6
                               re-shot variants indexed, 28 held-out queries (the motorcycle's
                               from the other camera of a stereo pair).
=================== ========== ===============================================================

Kinds: a *category* set is searched image by image (each image queries all the others;
relevant: the same class); a *near-dup* and a *queries* set have separate queries whose
relevant images are those of their label. Layout: ``<folder>/<set>/images/<label>/<file>``
and, for query sets, ``<folder>/<set>/queries/<label>/<file>``; labels are folder names, so
``lookalike index`` files each label as a listing.
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .analytics.calibrate import AUGMENTATIONS, augment
from .demo import write_demo

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
#: Fashion-MNIST's label names (``README.md`` of the data set), label 0 to 9.
FASHION_CLASSES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
)
#: Side of the Fashion-MNIST originals of the near-duplicate set, upscaled (bicubic) from 28 px
#: so that the edits have pixels to work on (the blur's radius is relative to the side; the
#: weakest, under half a pixel here, can still leave a picture unchanged).
FASHION_SIDE = 224
TUXPAINT_DIR = Path("/usr/share/tuxpaint/stamps")
#: Tux Paint stamp folders whose PNG stamps are photographs (cut-outs; the ``cartoon``
#: subfolders and the SVG drawings are left out), at least 9 per class.
TUXPAINT_CLASSES = {
    "mammal": "animals/mammals",
    "bird": "animals/birds",
    "fish": "animals/fish",
    "insect": "animals/insects",
    "fruit": "food/fruit",
    "vegetable": "food/vegetables",
    "flower": "plants/flowers",
    "tool": "household/tools",
    "instrument": "hobbies/music",
    "planet": "space/planets",
}


def _skimage(name: str, index: int | None = None) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from skimage import data

        arr = getattr(data, name)()
        return np.asarray(arr if index is None else arr[index])

    return load


def _sklearn(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return np.asarray(load_sample_image(name))

    return load


#: Photos inside the scikit-image and scikit-learn wheels (licences: ``skimage.data``
#: docstrings; scikit-learn's ``load_sample_image``), originals of the near-duplicate set.
PACKAGE_PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    **{
        name: _skimage(name)
        for name in (
            "astronaut",
            "brick",
            "camera",
            "cell",
            "chelsea",
            "clock",
            "coffee",
            "coins",
            "grass",
            "gravel",
            "hubble_deep_field",
            "immunohistochemistry",
            "moon",
            "page",
            "retina",
            "rocket",
            "text",
        )
    },
    "motorcycle": _skimage("stereo_motorcycle", 0),
    "china": _sklearn("china.jpg"),
    "flower": _sklearn("flower.jpg"),
}


@dataclass
class EvalSet:
    """One written evaluation set.

    Attributes:
        name: the set's name; kind: ``category``, ``near-dup`` or ``queries`` (module
            docstring); folder: where it was written.
        images: ``(path, label)`` of the indexed images, sorted.
        queries: ``(path, label)`` of the queries (empty for a category set), sorted.
        source: the packages it comes from and their licences.
    """

    name: str
    kind: str
    folder: Path
    images: list[tuple[str, str]]
    queries: list[tuple[str, str]] = field(default_factory=list)
    source: str = ""


def _write(img: Image.Image, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG", optimize=False)
    return str(path)


def _fashion_images(split: str = "t10k") -> tuple[np.ndarray, np.ndarray] | None:
    images = FASHION_DIR / f"{split}-images-idx3-ubyte.gz"
    labels = FASHION_DIR / f"{split}-labels-idx1-ubyte.gz"
    if not (images.exists() and labels.exists()):
        return None
    x = np.frombuffer(gzip.decompress(images.read_bytes()), np.uint8, offset=16)
    y = np.frombuffer(gzip.decompress(labels.read_bytes()), np.uint8, offset=8)
    return x.reshape(-1, 28, 28), y


def fashion_mnist(folder: str | Path, per_class: int = 200) -> EvalSet | None:
    """Fashion-MNIST's first ``per_class`` test images of each class, as 28x28 PNGs.

    Returns:
        The set, or None when ``dataset-fashion-mnist`` is not installed.
    """
    data = _fashion_images()
    if data is None:
        return None
    x, y = data
    root = Path(folder) / "fashion-mnist"
    images = []
    for label, name in enumerate(FASHION_CLASSES):
        for i in np.flatnonzero(y == label)[:per_class]:
            path = root / "images" / name / f"t10k-{i:05d}.png"
            images.append((_write(Image.fromarray(x[i]), path), name))
    return EvalSet(
        "fashion-mnist",
        "category",
        root,
        sorted(images),
        source="Debian dataset-fashion-mnist (Zalando Research, MIT/Expat)",
    )


def _tuxpaint_stamps() -> dict[str, list[Path]]:
    """Photographic stamps per class (:data:`TUXPAINT_CLASSES`), sorted; {} when absent."""
    out = {}
    for label, sub in TUXPAINT_CLASSES.items():
        files = sorted(p for p in (TUXPAINT_DIR / sub).rglob("*.png") if "cartoon" not in p.parts)
        if files:
            out[label] = files
    return out


def _on_white(path: Path) -> Image.Image:
    """A stamp composited onto white (as ``lookalike index`` decodes transparency)."""
    img = Image.open(path)
    img.load()
    rgba = img.convert("RGBA")
    canvas = Image.new("RGB", rgba.size, (255, 255, 255))
    canvas.paste(rgba, mask=rgba.getchannel("A"))
    return canvas


def tuxpaint(folder: str | Path) -> EvalSet | None:
    """Tux Paint's photographic stamps in 10 classes, composited onto white, as PNGs.

    Returns:
        The set, or None when ``tuxpaint-stamps-default`` is not installed.
    """
    stamps = _tuxpaint_stamps()
    if not stamps:
        return None
    root = Path(folder) / "tuxpaint"
    images = []
    for label, files in stamps.items():
        for p in files:
            name = "-".join(p.relative_to(TUXPAINT_DIR).with_suffix("").parts)
            images.append((_write(_on_white(p), root / "images" / label / f"{name}.png"), label))
    return EvalSet(
        "tuxpaint",
        "category",
        root,
        sorted(images),
        source="Debian tuxpaint-stamps-default (Tux Paint stamps, GPL-2)",
    )


def demo(folder: str | Path) -> EvalSet:
    """The demo collection (:func:`lookalike.demo.write_demo`) as a query set."""
    root = Path(folder) / "demo"
    write_demo(root)

    def pairs(sub: str) -> list[tuple[str, str]]:
        return sorted((str(p), p.parent.name) for p in (root / sub).glob("*/*.jpg"))

    return EvalSet(
        "demo",
        "queries",
        root,
        pairs("photos"),
        pairs("queries"),
        source="lookalike demo: scikit-image and scikit-learn sample photos",
    )


def _stem(path: Path) -> str:
    return re.sub(r"[_-]?\d+$", "", path.stem)


def near_duplicates(
    folder: str | Path,
    tux: int = 300,
    fashion: int = 200,
    copied_tux: int = 80,
    copied_fashion: int = 80,
    seed: int = 0,
    photos: tuple[str, ...] | None = None,
) -> EvalSet:
    """Originals and their edited copies (module docstring).

    Args:
        tux: Tux Paint stamps among the originals (seeded sample; at most one of stamps named
            alike, such as ``pig_golden`` and ``pig_golden2``, which are near-copies of each
            other). 0 or an absent package: none.
        fashion: Fashion-MNIST training images among the originals (the first ones, upscaled
            to :data:`FASHION_SIDE`).
        copied_tux, copied_fashion: how many of those get copies (seeded); every package
            photo gets copies.
        seed: the sampling and the edits.
        photos: the :data:`PACKAGE_PHOTOS` to use (default: all).

    Returns:
        The set: ``images`` the originals (label = the original's name), ``queries`` the
        copies (label = their original's name, file = the edit kind).
    """
    rng = np.random.default_rng([seed, 14])
    root = Path(folder) / "near-duplicates"
    originals: dict[str, Image.Image] = {
        name: Image.fromarray(PACKAGE_PHOTOS[name]()).convert("RGB")
        for name in (PACKAGE_PHOTOS if photos is None else photos)
    }
    copied = list(originals)
    unique: dict[str, Path] = {}
    for files in _tuxpaint_stamps().values():
        for p in files:
            unique.setdefault(f"{p.parent.name}-{_stem(p)}", p)
    if unique and tux:
        names = sorted(unique)
        picked = sorted(rng.choice(len(names), min(tux, len(names)), replace=False))
        tux_names = [f"tux-{names[i]}" for i in picked]
        for name, i in zip(tux_names, picked, strict=True):
            originals[name] = _on_white(unique[names[i]])
        n = min(copied_tux, len(tux_names))
        copied += [tux_names[i] for i in sorted(rng.choice(len(tux_names), n, replace=False))]
    data = _fashion_images("train") if fashion else None
    if data is not None:
        fm_names = [f"fashion-{i:05d}" for i in range(fashion)]
        for i, name in enumerate(fm_names):
            small = Image.fromarray(data[0][i]).convert("RGB")  # 28 px: edits need room
            originals[name] = small.resize((FASHION_SIDE,) * 2, Image.Resampling.BICUBIC)
        n = min(copied_fashion, fashion)
        copied += [fm_names[i] for i in sorted(rng.choice(fashion, n, replace=False))]
    images = [
        (_write(img, root / "images" / name / "original.png"), name)
        for name, img in originals.items()
    ]
    queries = []
    for index, name in enumerate(copied):
        edit_rng = np.random.default_rng([seed, index])
        for kind in AUGMENTATIONS:
            copy = augment(originals[name], kind, edit_rng)
            queries.append((_write(copy, root / "queries" / name / f"{kind}.png"), name))
    return EvalSet(
        "near-duplicates",
        "near-dup",
        root,
        sorted(images),
        sorted(queries),
        source="scikit-image, scikit-learn sample photos; Tux Paint stamps; Fashion-MNIST",
    )


#: The builders by set name, in the order of the README's table.
BUILDERS: dict[str, Callable[[Path], EvalSet | None]] = {
    "near-duplicates": near_duplicates,
    "fashion-mnist": fashion_mnist,
    "tuxpaint": tuxpaint,
    "demo": demo,
}
#: What to install for a set that was skipped.
INSTALL_HINTS = {
    "fashion-mnist": "apt-get install dataset-fashion-mnist",
    "tuxpaint": "apt-get install tuxpaint-stamps-default",
}


def build(folder: str | Path, names: list[str] | None = None) -> dict[str, EvalSet]:
    """Write the sets ``names`` (default: all of :data:`BUILDERS`) under ``folder``; the
    ones whose package is missing are left out (see :data:`INSTALL_HINTS`).

    Raises:
        KeyError: an unknown set name.
    """
    out = {}
    for name in names or list(BUILDERS):
        built = BUILDERS[name](Path(folder))
        if built is not None:
            out[name] = built
    return out
