"""An int8 copy of the cnn network, made with ONNX Runtime's static quantization.

``onnxruntime.quantization.quantize_static`` (QDQ format: signed symmetric weights per output
channel, 7-bit by default; 8-bit unsigned activations, one scale per tensor) with activation ranges
calibrated on :data:`CALIBRATION_PHOTOS`, photos that ship inside scikit-image and
scikit-learn (so nothing is downloaded and the result is the same on every machine), each
seen whole (squashed to the square input), as its centre crop, and mirrored. ONNX Runtime
then runs the convolutions as 8-bit integer products (VNNI where the CPU has it).

Why 7-bit weights (``reduce_range``): on an x86 CPU without AVX-512 VNNI, ONNX Runtime multiplies
unsigned 8-bit activations by signed 8-bit weights with ``VPMADDUBSW``, which adds two products
into a *saturating* 16-bit sum (255 x 127 x 2 > 32,767): the network computes something else
there than on a VNNI CPU, so the same photo gets another vector on another machine (ONNX
Runtime's quantization guide, "U8S8 ... saturation"). With weights in [-64, 64] a pair sums to
at most 32,640 and every CPU computes the same integers. Measured on the evaluation sets
(README "Evaluation"): the 7-bit network is as fast as the 8-bit one and within 0.005 mAP of the
float32 network; the 8-bit one lost 0.03-0.07 mAP on the AMD AVX2 build machine.

Whether it is worth it is measured, not assumed: ``benchmarks/descriptors.py`` compares its
retrieval mAP and images/s with the float32 network's in the same run (README, "Evaluation").
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import LookalikeError
from .base import center_crop_resize

#: ``skimage.data`` functions and scikit-learn sample images used to calibrate the ranges.
CALIBRATION_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "motorcycle",
    "camera",
    "coins",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "moon",
    "page",
    "brick",
    "grass",
    "gravel",
    "china.jpg",
    "flower.jpg",
)


def calibration_images(size: int) -> np.ndarray:
    """``(3 * len(CALIBRATION_PHOTOS), size, size, 3) uint8``: each photo squashed to the
    square, centre-cropped (224/256), and mirrored."""
    from skimage import data
    from sklearn.datasets import load_sample_image

    out = []
    for name in CALIBRATION_PHOTOS:
        if name.endswith(".jpg"):
            arr = load_sample_image(name)
        elif name == "motorcycle":
            arr = data.stereo_motorcycle()[0]
        else:
            arr = getattr(data, name)()
        img = Image.fromarray(np.asarray(arr)).convert("RGB")
        squashed = img.resize((size, size), Image.Resampling.BICUBIC)
        cropped = center_crop_resize(img, size, 224 / 256)
        out += [np.asarray(v) for v in (squashed, cropped, ImageOps.mirror(cropped))]
    return np.stack(out)


def quantize_int8(
    model: bytes,
    size: int,
    scale_input: Callable[[np.ndarray], np.ndarray],
    weight_bits: int = 7,
) -> bytes:
    """The float32 ONNX network ``model`` quantized to int8 (module docstring).

    Args:
        model: serialized ONNX model with input ``input`` ``(batch, 3, size, size) float32``.
        size: its input size in pixels.
        scale_input: ``(n, size, size, 3) uint8 -> (n, 3, size, size) float32`` pixel scaling.
        weight_bits: 7 (``reduce_range``: the same results on every CPU, module docstring) or 8.

    Returns:
        The serialized int8 (QDQ) model, same input and output.

    Raises:
        LookalikeError: ONNX Runtime's quantization tools fail.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    batches = [scale_input(img[None]) for img in calibration_images(size)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it: Iterator[np.ndarray] = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self.it, None)
            return None if x is None else {"input": x}

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(model)
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)  # the tool's advice to pre-process, on the root logger
        try:
            quantize_static(
                str(src),
                str(dst),
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=weight_bits == 7,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
        except Exception as exc:  # the tools raise anything from onnx/numpy
            raise LookalikeError(f"int8 quantization failed: {exc}") from exc
        finally:
            logging.disable(previous)
        return dst.read_bytes()
