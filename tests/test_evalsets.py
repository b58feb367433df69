"""The public evaluation sets: written from packaged images, deterministically, with the labels
and edits they claim."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lookalike import evalsets
from lookalike.analytics.calibrate import AUGMENTATIONS

#: A few small package photos: the full list takes minutes to write on 2 cores.
PHOTOS = ("chelsea", "coins", "page", "text")


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _small(folder: Path) -> dict[str, evalsets.EvalSet | None]:
    return {
        "near-duplicates": evalsets.near_duplicates(
            folder, tux=12, fashion=10, copied_tux=3, copied_fashion=2, photos=PHOTOS
        ),
        "fashion-mnist": evalsets.fashion_mnist(folder, per_class=4),
        "tuxpaint": evalsets.tuxpaint(folder),
    }


def test_sets_build_deterministically(tmp_path):
    """Two builds write the same files, byte for byte, and list them the same way."""
    first, second = _small(tmp_path / "a"), _small(tmp_path / "b")
    assert first["near-duplicates"] is not None
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    for name, s in first.items():
        other = second[name]
        if s is None:
            assert other is None
            continue
        assert other is not None
        strip = len(str(tmp_path / "a"))
        assert [(p[strip:], lbl) for p, lbl in s.images] == [
            (p[len(str(tmp_path / "b")) :], lbl) for p, lbl in other.images
        ]
        assert len(s.queries) == len(other.queries)
    assert len(_digests(tmp_path / "a")) > 100


def test_near_duplicates_are_edited_copies_of_their_originals(tmp_path):
    s = evalsets.near_duplicates(
        tmp_path, tux=8, fashion=6, copied_tux=2, copied_fashion=2, photos=PHOTOS
    )
    originals = {label: path for path, label in s.images}
    assert len(originals) == len(s.images)  # one image per listing
    has_tux = evalsets.TUXPAINT_DIR.exists()
    has_fashion = evalsets.FASHION_DIR.exists()
    assert len(originals) == len(PHOTOS) + 8 * has_tux + 6 * has_fashion
    copied = {label for _, label in s.queries}
    assert set(PHOTOS) <= copied
    assert len(copied) == len(PHOTOS) + 2 * has_tux + 2 * has_fashion
    assert len(s.queries) == len(copied) * len(AUGMENTATIONS)
    for path, label in s.queries:
        kind = Path(path).stem
        assert kind in AUGMENTATIONS and Path(path).parent.name == label
        copy, original = Image.open(path), Image.open(originals[label])
        if kind in ("flip", "colour", "blur", "jpeg"):
            assert copy.size == original.size
            if label in PHOTOS:  # a weak blur of a small picture may change nothing
                assert not np.array_equal(np.asarray(copy), np.asarray(original))
        else:
            assert copy.size != original.size
        if kind == "flip":
            mirrored = np.asarray(original.convert("RGB"))[:, ::-1]
            assert np.array_equal(np.asarray(copy), mirrored)


def test_category_sets_have_their_classes(tmp_path):
    fashion = evalsets.fashion_mnist(tmp_path, per_class=3)
    if fashion is None:
        pytest.skip(f"Fashion-MNIST not installed: {evalsets.INSTALL_HINTS['fashion-mnist']}")
    assert [lbl for _, lbl in fashion.images] == sorted(
        [c for c in evalsets.FASHION_CLASSES for _ in range(3)]
    )
    assert Image.open(fashion.images[0][0]).size == (28, 28)
    tux = evalsets.tuxpaint(tmp_path)
    if tux is None:
        pytest.skip(f"Tux Paint stamps not installed: {evalsets.INSTALL_HINTS['tuxpaint']}")
    labels = [lbl for _, lbl in tux.images]
    assert set(labels) == set(evalsets.TUXPAINT_CLASSES)
    assert min(labels.count(c) for c in evalsets.TUXPAINT_CLASSES) >= 9
    # composited onto white: the corners of a cut-out photo are white, the middle is not
    arr = np.asarray(Image.open(tux.images[0][0]))
    assert arr.shape[2] == 3 and (arr[0, 0] == 255).all()
    assert arr.std() > 20


def test_build_leaves_out_sets_whose_package_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(evalsets, "FASHION_DIR", tmp_path / "nowhere")
    monkeypatch.setattr(evalsets, "TUXPAINT_DIR", tmp_path / "nowhere")
    sets = evalsets.build(tmp_path, ["fashion-mnist", "tuxpaint", "demo"])
    assert list(sets) == ["demo"]
    assert len(sets["demo"].images) == 84 and len(sets["demo"].queries) == 28
