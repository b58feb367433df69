"""The torch-free cnn model: the weights reader refuses pickled code, the ONNX graph built
from the weights matches the torch reference (``efficientnet_lite_pytorch``) within
``ONNX_TOLERANCE``, and a Python that cannot import torch indexes and searches the demo with
the reference's results."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

import lookalike
from lookalike.errors import LookalikeError
from lookalike.extract import get_extractor
from lookalike.extract.cnn import (
    IMAGE_SIZE,
    MODEL_NAME,
    ONNX_TOLERANCE,
    TORCH_INSTALL_HINT,
    build_torch_model,
    export_onnx,
    onnx_path,
    scale_input,
    weights_path,
)
from lookalike.extract.cnn_options import GraphSpec
from lookalike.extract.onnx_graph import (
    CONVERTER_VERSION,
    LITE_VARIANTS,
    blocks_of,
    build_onnx_model,
    same_pads,
)
from lookalike.extract.torch_weights import LEGACY_MAGIC, _Storage, _TensorStub, load_state_dict
from lookalike.images import load_image

SRC = Path(__file__).resolve().parents[1] / "src"

# A meta-path finder that makes torch (and the reference code, which needs it) unimportable in
# every Python started with this folder first on PYTHONPATH, decode workers included.
NO_TORCH_SITECUSTOMIZE = """
import sys


class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "efficientnet_lite_pytorch"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None


sys.meta_path.insert(0, _NoTorch())
"""


@pytest.fixture(scope="module")
def state():
    return load_state_dict(weights_path())


@pytest.fixture(scope="module")
def torch_model():
    """The reference with average pooling (what ``build_onnx_model`` builds by default)."""
    return build_torch_model(GraphSpec(MODEL_NAME, "avg", 3.0, IMAGE_SIZE))


@pytest.fixture(scope="module")
def demo_batch(demo_dir):
    """The first photo of each demo listing, preprocessed as ``index`` does, plus a seeded
    random batch: ``(14 + 4, 224, 224, 3) uint8``."""
    cnn = get_extractor("cnn", device="cpu")
    photos = [sorted(d.iterdir())[0] for d in sorted((demo_dir / "photos").iterdir())]
    real = [cnn.preprocess(load_image(p, draft_size=IMAGE_SIZE).image) for p in photos]
    noise = np.random.default_rng(7).integers(0, 256, (4, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    return np.concatenate([np.stack(real), noise])


def run_onnx(model, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


# ------------------------------------------------------------------ the weights reader


def test_reader_gives_what_torch_load_gives(state):
    ref = torch.load(weights_path(), weights_only=True)
    assert list(state) == list(ref)
    for key, tensor in ref.items():
        want = tensor.numpy()
        assert state[key].dtype == want.dtype and state[key].shape == want.shape, key
        assert np.array_equal(state[key], want), key


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_reader_handles_both_formats_views_and_dtypes(tmp_path, zip_format):
    x = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    saved = {
        "w": x,
        "transposed": x.t(),  # strides (1, 6) into the same storage
        "slice": x[1:3, 2:],  # an offset into it
        "half": torch.linspace(-1, 1, 5, dtype=torch.float16),
        "count": torch.tensor(7),  # 0-d int64, like BN num_batches_tracked
        "empty": torch.zeros(0, 3),
    }
    path = tmp_path / "w.pth"
    torch.save(saved, path, _use_new_zipfile_serialization=zip_format)
    got = load_state_dict(path)
    assert list(got) == list(saved)
    for key, tensor in saved.items():
        want = tensor.numpy()
        assert got[key].dtype == want.dtype and got[key].shape == want.shape, key
        assert np.array_equal(got[key], want), key
        assert got[key].flags.c_contiguous


class _RunsCode:
    """Pickles as a call of ``func(arg)``: what a hostile weights file would contain."""

    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return (self.func, (self.arg,))


def _legacy_file(obj) -> bytes:
    head = [LEGACY_MAGIC, 1001, {"protocol_version": 1001, "little_endian": True}]
    return b"".join(pickle.dumps(o, protocol=2) for o in [*head, obj, []])


def _zip_file(obj) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps(obj, protocol=2))
        zf.writestr("archive/version", "3\n")
    return buf.getvalue()


@pytest.mark.parametrize("make", [_legacy_file, _zip_file], ids=["legacy", "zip"])
@pytest.mark.parametrize("func", [os.system, exec], ids=["os.system", "exec"])
def test_reader_refuses_pickled_code(tmp_path, make, func):
    marker = tmp_path / "ran"
    code = f"touch {marker}" if func is os.system else f"open({str(marker)!r}, 'w').close()"
    path = tmp_path / "evil.pth"
    path.write_bytes(make(OrderedDict(weight=_RunsCode(func, code))))
    with pytest.raises(LookalikeError, match=r"refers to \w+\.(system|exec); refusing"):
        load_state_dict(path)
    assert not marker.exists()


def test_reader_rejects_damaged_files(tmp_path):
    data = weights_path().read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(LookalikeError, match="truncated"):
        load_state_dict(tmp_path / "cut.pth")
    (tmp_path / "junk.pth").write_bytes(b"\x80\x02K\x07." + bytes(100))
    with pytest.raises(LookalikeError, match="magic"):
        load_state_dict(tmp_path / "junk.pth")
    (tmp_path / "text.pth").write_bytes(b"not a pickle at all")
    with pytest.raises(LookalikeError, match="damaged"):
        load_state_dict(tmp_path / "text.pth")


def test_tensor_records_are_bounds_checked():
    storage = _Storage(np.dtype("<f4"), 4)
    storage.data = np.arange(4, dtype="<f4")
    assert _TensorStub(storage, 1, (3,), (1,)).to_numpy().tolist() == [1.0, 2.0, 3.0]
    for offset, size, stride in [(2, (3,), (1,)), (0, (2, 2), (3, 1)), (-1, (1,), (1,))]:
        with pytest.raises(LookalikeError):
            _TensorStub(storage, offset, size, stride).to_numpy()


# ------------------------------------------------------------------ the graph


def test_same_padding_is_tensorflows():
    assert same_pads(224, 3, 2) == ([0, 0, 1, 1], 112)  # the stem: nothing before, 1 after
    assert same_pads(56, 5, 2) == ([1, 1, 2, 2], 28)
    assert same_pads(14, 5, 1) == ([2, 2, 2, 2], 14)
    assert same_pads(7, 1, 1) == ([0, 0, 0, 0], 7)


def test_onnx_graph_matches_torch_on_demo_photos_and_noise(state, torch_model, demo_batch):
    x = scale_input(demo_batch)
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(x)).numpy()
    got = run_onnx(build_onnx_model(state), x)
    assert got.shape == (len(x), 1280) and got.dtype == np.float32
    assert np.abs(got - ref).max() <= ONNX_TOLERANCE
    # the features are not trivially close: the photos differ from each other by far more
    assert np.abs(ref[0] - ref[1]).max() > 100 * ONNX_TOLERANCE


def test_gem_pooling_matches_torch(state, torch_model, demo_batch):
    """GeM (p=3, Radenović et al. 2018) over the same last feature map."""
    x = scale_input(demo_batch[:6])
    with torch.no_grad():
        fmap = torch_model.backbone.extract_features(torch.from_numpy(x))
        ref = fmap.clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3).numpy()
    got = run_onnx(build_onnx_model(state, pooling="gem", gem_p=3.0), x)
    assert np.abs(got - ref).max() <= ONNX_TOLERANCE
    avg = run_onnx(build_onnx_model(state), x)
    assert np.all(got >= avg - ONNX_TOLERANCE)  # power mean >= arithmetic mean
    assert np.abs(got - avg).max() > 0.1


@pytest.mark.parametrize("variant", ["efficientnet-lite1", "efficientnet-lite2"])
def test_other_lite_variants_match_the_reference_architecture(variant):
    """Lite1 and Lite2 from the reference's ``from_name`` with seeded random weights (their
    weights packages are not installed): the same widths, depths, strides and padding as the
    graph builder's. The batch-norm statistics are measured on a random batch (train-mode
    pass), so the features depend on the input rather than fading to a constant."""
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(0)
    net = EfficientNet.from_name(variant)
    size = LITE_VARIANTS[variant].image_size
    x = np.random.default_rng(1).standard_normal((2, 3, size, size)).astype(np.float32)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # running statistics = the average over the calibration pass
            m.reset_running_stats()
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(0.0, 0.5)
    net.train()
    with torch.no_grad():
        net.extract_features(torch.from_numpy(x))
        net.eval()
        ref = net.extract_features(torch.from_numpy(x)).mean(dim=(2, 3)).numpy()
    assert len(net._blocks) == len(blocks_of(LITE_VARIANTS[variant]))
    assert np.abs(ref[0] - ref[1]).max() > 0.1  # the output depends on the input
    weights = {k: v.numpy() for k, v in net.state_dict().items()}
    got = run_onnx(build_onnx_model(weights, variant), x)
    assert np.abs(got - ref).max() <= ONNX_TOLERANCE


def test_weights_of_another_variant_are_refused(state):
    with pytest.raises(LookalikeError, match="do not fit efficientnet-lite1"):
        build_onnx_model(state, "efficientnet-lite1")
    with pytest.raises(LookalikeError, match="is missing"):
        build_onnx_model({k: v for k, v in state.items() if k != "_bn1.running_var"})
    with pytest.raises(LookalikeError, match="unknown pooling"):
        build_onnx_model(state, pooling="max")


def test_the_cache_file_is_named_by_weights_and_converter(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOKALIKE_CACHE_DIR", str(tmp_path))
    path = onnx_path()
    assert path.parent == tmp_path
    assert f"-c{CONVERTER_VERSION}-" in path.name and "579344248a93e230" in path.name
    assert export_onnx() == path
    first = path.stat().st_mtime_ns
    ext = get_extractor("cnn", device="cpu")
    assert ext.device == "cpu (onnxruntime)"
    assert path.stat().st_mtime_ns == first  # the cached file is used, not rebuilt
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no stray temp file


def test_an_unwritable_cache_only_costs_a_conversion_per_start(
    tmp_path, monkeypatch, caplog, demo_batch
):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("LOOKALIKE_CACHE_DIR", str(tmp_path / "file" / "cache"))
    ext = get_extractor("cnn", device="cpu")
    with caplog.at_level("WARNING", logger="lookalike.extract.cnn"):
        got = ext.embed(demo_batch[:3])
    assert "cannot cache the cnn ONNX model" in caplog.text
    monkeypatch.setenv("LOOKALIKE_CACHE_DIR", str(tmp_path / "ok"))
    assert np.array_equal(got, get_extractor("cnn", device="cpu").embed(demo_batch[:3]))


# ------------------------------------------------------------------ without torch


@pytest.mark.slow
def test_index_and_search_the_demo_without_torch(demo_dir, tmp_path, no_orphans):
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(NO_TORCH_SITECUSTOMIZE)
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(blocker), str(SRC)]),
        LOOKALIKE_CACHE_DIR=str(tmp_path / "cache"),  # empty: converts without torch
    )

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, *args], env=env, capture_output=True, text=True, timeout=300
        )

    blocked = run("-c", "import torch")
    assert blocked.returncode != 0 and "blocked" in blocked.stderr  # the blocker works
    catalog = tmp_path / "cat"
    index = run("-m", "lookalike.cli", "index", str(demo_dir / "photos"), "-c", str(catalog))
    assert index.returncode == 0, index.stderr
    assert len(list((tmp_path / "cache").glob("*.onnx"))) == 1
    query = sorted((demo_dir / "queries" / "chelsea").iterdir())[0]
    found = run("-m", "lookalike.cli", "search", str(query), "-c", str(catalog), "-k", "5",
                "--format", "json")  # fmt: skip
    assert found.returncode == 0, found.stderr
    hits = json.loads(found.stdout)["hits"]
    cuda = run("-m", "lookalike.cli", "search", str(query), "-c", str(catalog), "--device", "cuda")
    assert cuda.returncode == 1
    assert TORCH_INSTALL_HINT in cuda.stderr and len(cuda.stderr.strip().splitlines()) == 1

    # the stored vectors and the hits are the torch reference's
    cnn = get_extractor("cnn", device="cpu")
    with lookalike.open_catalog(catalog) as cat:
        stored = {
            key[1]: vec
            for keys, vecs in cat.iter_vectors()
            for key, vec in zip(keys, vecs, strict=True)
        }
        assert len(stored) == 84
        names = sorted(stored)[::6]  # one image of each listing
        batch = [load_image(demo_dir / "photos" / n, draft_size=IMAGE_SIZE).image for n in names]
        batch.append(load_image(query, draft_size=IMAGE_SIZE).image)
        x = scale_input(np.stack([cnn.preprocess(im) for im in batch]))
        with torch.no_grad():  # the reference of the default cnn
            pooled = build_torch_model()(torch.from_numpy(x)).numpy()
        ref = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
        got = np.stack([stored[n] for n in names])
        assert np.abs(got - ref[:-1]).max() <= ONNX_TOLERANCE
        want = cat.search(vector=ref[-1], k=5).hits
    assert [h["image_id"] for h in hits] == [h.image_id for h in want]
    assert hits[0]["listing_id"] == "chelsea"
    np.testing.assert_allclose([h["score"] for h in hits], [h.score for h in want], atol=1e-4)
