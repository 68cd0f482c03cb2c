"""Raw uint8 RGB images → the first graph's input (float, or int8 for int8 graphs), via a lookup table."""

from __future__ import annotations

import numpy as np

from .bundle import InputSpec, QuantParams
from .errors import DataError
from .quant import quantize

__all__ = ["normalize", "make_lut", "InputTable", "check_images"]


def normalize(images: np.ndarray, spec: InputSpec) -> np.ndarray:
    """uint8 (N, H, W, C) or (H, W, C) → float32 (x * scale - mean) / std, same layout (NHWC)."""
    check_images(images, spec)
    x = images.astype(np.float32) * np.float32(spec.scale)
    return (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)


def make_lut(spec: InputSpec, qp: QuantParams | None) -> np.ndarray:
    """A (256, C) table: lut[v, c] is the graph input for channel c of pixel value v.

    Preprocessing (and int8 quantization) of a frame then costs one gather: ``lut[img, arange(C)]``.
    """
    v = np.arange(256, dtype=np.float32)[:, None] * np.float32(spec.scale)
    x = (v - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return quantize(x, qp) if qp is not None else x.astype(np.float32)


class InputTable:
    """``make_lut`` for one graph input, applied to a frame straight into the graph's input buffer.

    The table is flattened channel-major (entry ``c * 256 + v``), so a frame costs two preallocated numpy calls:
    index = pixel + 256·channel, then one ``take`` into the input buffer. 8.5 µs for a 32×32×3 frame here, against
    15 µs for the fancy-indexed ``table[image, arange(C)]`` plus a copy (it runs once per inference, in every model).
    """

    def __init__(self, spec: InputSpec, qp: QuantParams | None):
        self.table = make_lut(spec, qp)
        self._flat = np.ascontiguousarray(self.table.T).reshape(-1)
        self._offsets = np.arange(spec.channels, dtype=np.uint16) * np.uint16(256)
        self._index = np.empty((spec.height, spec.width, spec.channels), np.uint16)

    def fill(self, dst: np.ndarray, image: np.ndarray) -> None:
        """dst[...] = preprocessed ``image`` (uint8 H×W×C, the spec's shape)."""
        np.add(image, self._offsets, out=self._index)
        np.take(self._flat, self._index, out=dst)


def check_images(images: np.ndarray, spec: InputSpec) -> None:
    want = (spec.height, spec.width, spec.channels)
    if images.dtype != np.uint8 or images.shape[-3:] != want or images.ndim not in (3, 4):
        raise DataError(
            f"images must be uint8 {spec.layout} of shape (N, {want[0]}, {want[1]}, {want[2]}) or {want}, "
            f"got {images.dtype} {images.shape}; resize to {want[0]}x{want[1]} "
            f"{'RGB' if want[2] == 3 else f'with {want[2]} channel(s)'} and pass raw 0-255 pixels"
        )
