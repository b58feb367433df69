"""Extractors on real photos: the cnn ONNX path matches torch, preprocessing is the trained one."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from skimage import data

from lookalike.extract import available_extractors, get_extractor
from lookalike.extract.cnn import ONNX_TOLERANCE, build_torch_model, scale_input

PHOTOS = {
    "chelsea": data.chelsea,
    "coffee": data.coffee,
    "rocket": data.rocket,
    "astronaut": data.astronaut,
}


@pytest.fixture(scope="module")
def cnn():
    ext = get_extractor("cnn", device="cpu")
    assert ext.device == "cpu (onnxruntime)"
    return ext


@pytest.fixture(scope="module")
def photos():
    return {name: Image.fromarray(load()) for name, load in PHOTOS.items()}


@pytest.fixture(scope="module")
def torch_model():
    return build_torch_model()


def test_registry_lists_the_builtins():
    assert {"cnn", "hog", "colorhist"} <= set(available_extractors())


def test_cnn_vectors_are_unit_float32_1280(cnn, photos):
    vecs = cnn.embed_images(list(photos.values()))
    assert vecs.shape == (4, 1280) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert cnn.info.dim == 1280 and cnn.info.name == "cnn"


def test_onnx_matches_torch_within_tolerance(cnn, photos, torch_model):
    import torch

    batch = np.stack([cnn.preprocess(im) for im in photos.values()])
    with torch.no_grad():
        pooled = torch_model(torch.from_numpy(scale_input(batch))).numpy()
    ref = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    got = cnn.embed(batch)
    assert np.abs(got - ref).max() <= ONNX_TOLERANCE
    raw = cnn.pooled(scale_input(batch))
    assert np.abs(raw - pooled).max() <= ONNX_TOLERANCE


def test_preprocessing_is_the_trained_one(photos, torch_model):
    """The ImageNet head on our features recognises the photos: a wrong colour order, scale or
    crop would not give these classes (281-285 cats, 967 espresso). The head was trained on
    the centre crop with average pooling (the original options), so those are checked."""
    import torch

    cnn = get_extractor("cnn", device="cpu", fit="crop", pooling="avg")
    batch = np.stack([cnn.preprocess(photos[n]) for n in ("chelsea", "coffee")])
    pooled = cnn.pooled(scale_input(batch))
    with torch.no_grad():
        # the ImageNet head, named ``_fc`` by efficientnet_lite_pytorch (torch's public lookup)
        head = torch_model.backbone.get_submodule("_fc")
        logits = head(torch.from_numpy(pooled)).numpy()
    top = logits.argmax(axis=1)
    assert 281 <= top[0] <= 285
    assert top[1] == 967


def test_cnn_torch_cpu_backend_agrees_with_onnx(cnn, photos):
    torch_ext = get_extractor("cnn", device="torch-cpu")
    imgs = list(photos.values())[:2]
    assert np.abs(torch_ext.embed_images(imgs) - cnn.embed_images(imgs)).max() <= ONNX_TOLERANCE


def test_cnn_is_invariant_enough_to_a_mirror_and_discriminative(cnn, photos):
    cat = photos["chelsea"]
    v = cnn.embed_images([cat, cat.transpose(Image.Transpose.FLIP_LEFT_RIGHT), photos["rocket"]])
    assert v[0] @ v[1] > 0.9
    assert v[0] @ v[2] < 0.5


@pytest.mark.parametrize(("name", "dim"), [("hog", 1764), ("colorhist", 512)])
def test_classic_extractors(name, dim, photos):
    ext = get_extractor(name)
    vecs = ext.embed_images(list(photos.values()))
    assert vecs.shape == (4, dim) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    again = ext.embed_images(list(photos.values()))
    assert np.array_equal(vecs, again)


def test_colorhist_separates_colours():
    ext = get_extractor("colorhist")
    red, blue, red2 = (
        Image.new("RGB", (50, 50), c) for c in [(250, 10, 10), (10, 10, 250), (240, 20, 15)]
    )
    v = ext.embed_images([red, blue, red2])
    assert v[0] @ v[1] == pytest.approx(0.0)
    assert v[0] @ v[2] > 0.99


def test_hog_sees_edges_not_colour():
    ext = get_extractor("hog")
    stripes = np.zeros((128, 128, 3), np.uint8)
    stripes[:, ::16] = 255
    vert = Image.fromarray(stripes)
    v = ext.embed_images(
        [vert, Image.fromarray(255 - stripes), vert.transpose(Image.Transpose.ROTATE_90)]
    )
    assert v[0] @ v[1] > 0.95  # inverted contrast: same unsigned gradients
    assert v[0] @ v[2] < 0.5  # rotated: other orientation bins
