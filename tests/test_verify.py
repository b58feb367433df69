"""Geometric verification (lookalike.analytics.verify): the same photo after a crop and a
rotation passes, other photos, blank images and shared frames do not, bad bytes are a one-line
error."""

from __future__ import annotations

import pytest
from PIL import Image, ImageOps
from skimage import data

from lookalike.analytics.verify import MIN_INLIERS, inliers, keypoints, same_photo
from lookalike.catalog.thumbs import make_thumbnail
from lookalike.errors import ImageError


def _kp(image: Image.Image):
    return keypoints(make_thumbnail(image))


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    names = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")
    return {n: Image.fromarray(getattr(data, n)()).convert("RGB") for n in names}


def test_a_cropped_and_rotated_copy_is_the_same_photo(photos):
    for name, im in photos.items():
        w, h = im.size
        copy = im.crop((w // 8, h // 10, w - w // 12, h)).rotate(
            11, expand=True, fillcolor=(255, 255, 255)
        )
        a, b = _kp(im), _kp(copy)
        assert inliers(a, b) >= MIN_INLIERS, name
        assert same_photo(a, b) and same_photo(b, a), name


def test_different_photos_are_not(photos):
    kps = {n: _kp(im) for n, im in photos.items()}
    for a in kps:
        for b in kps:
            if a != b:
                assert not same_photo(kps[a], kps[b]), (a, b)
    assert not same_photo(kps["chelsea"], _kp(ImageOps.mirror(photos["coffee"])))


def test_a_shared_frame_does_not_make_two_photos_the_same(photos):
    """Two different photos pasted on the same black square and rotated alike (white corners):
    the square's edges and corners match, the photos do not."""

    def framed(im: Image.Image) -> Image.Image:
        canvas = Image.new("RGB", (600, 600), (0, 0, 0))
        small = im.copy()
        small.thumbnail((300, 300))
        canvas.paste(small, (150, 150))
        return canvas.rotate(9, expand=True, fillcolor=(255, 255, 255))

    assert not same_photo(_kp(framed(photos["coffee"])), _kp(framed(photos["rocket"])))


def test_blank_images_and_bad_bytes():
    blank = _kp(Image.new("RGB", (300, 200), (128, 128, 128)))
    assert len(blank.points) == 0 and blank.descriptors.shape == (0, 128)
    assert inliers(blank, blank) == 0 and not same_photo(blank, blank)
    with pytest.raises(ImageError, match="decode"):
        keypoints(b"not an image at all")
