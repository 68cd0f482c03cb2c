"""Quantization arithmetic, all in one place: real = scale * (q - zero_point)."""

from __future__ import annotations

import numpy as np

from .bundle import QuantParams

__all__ = ["quantize", "dequantize", "requantize", "same_params", "copy_boundary", "fold_dequantize_into_linear"]

_INT8_MIN, _INT8_MAX = -128, 127


def quantize(x: np.ndarray, qp: QuantParams, out: np.ndarray | None = None) -> np.ndarray:
    """float → int8 with round-half-to-even, as TFLite's QUANTIZE does, clipped to [-128, 127]."""
    q = np.rint(np.asarray(x, np.float32) / np.float32(qp.scale)) + qp.zero_point
    q = np.clip(q, _INT8_MIN, _INT8_MAX)
    if out is None:
        return q.astype(np.int8)
    np.copyto(out, q, casting="unsafe")
    return out


def dequantize(q: np.ndarray, qp: QuantParams, out: np.ndarray | None = None) -> np.ndarray:
    # int64 so that q - zero_point cannot overflow int8.
    x = np.float32(qp.scale) * (q.astype(np.int64) - qp.zero_point).astype(np.float32)
    if out is None:
        return x
    np.copyto(out, x)
    return out


def requantize(q: np.ndarray, src: QuantParams, dst: QuantParams, out: np.ndarray | None = None) -> np.ndarray:
    """int8 with ``src`` parameters → int8 with ``dst``: round((q - z1) * s1 / s2) + z2."""
    r = np.rint((q.astype(np.int64) - src.zero_point) * (src.scale / dst.scale)) + dst.zero_point
    r = np.clip(r, _INT8_MIN, _INT8_MAX)
    if out is None:
        return r.astype(np.int8)
    np.copyto(out, r, casting="unsafe")
    return out


def copy_boundary(src: np.ndarray, src_qp: QuantParams | None, dst: np.ndarray, dst_qp: QuantParams | None) -> None:
    """Move a hidden state from one graph's output buffer into the next graph's input buffer.

    The int8 tensor passes through unchanged when both sides share quantization parameters (the common case:
    both were calibrated on the same activations); otherwise it is requantized, quantized or dequantized.
    """
    if same_params(src_qp, dst_qp):
        np.copyto(dst, src)
    elif src_qp is not None and dst_qp is not None:
        requantize(src, src_qp, dst_qp, out=dst)
    elif dst_qp is not None:
        quantize(src, dst_qp, out=dst)
    else:
        dequantize(src, src_qp, out=dst)  # type: ignore[arg-type]


def same_params(a: QuantParams | None, b: QuantParams | None) -> bool:
    """Equal for passing an int8 tensor through unchanged: same zero point, scales within float32 rounding
    (two graphs calibrated on the same activations can differ by one ulp)."""
    if a is None or b is None:
        return a is b
    return a.zero_point == b.zero_point and abs(a.scale - b.scale) <= 1e-6 * max(a.scale, b.scale)


def fold_dequantize_into_linear(
    w: np.ndarray, b: np.ndarray, qp: QuantParams | None
) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) of logits = x @ W.T + b → (A, c) with logits = q @ A + c for q the (possibly int8) features.

    Folding the dequantization into the float classifier saves a pass over the features per exit.
    """
    w = np.asarray(w, np.float64)
    b = np.asarray(b, np.float64)
    if qp is None:
        return np.ascontiguousarray(w.T, np.float32), b.astype(np.float32)
    a = qp.scale * w.T
    c = b - qp.scale * qp.zero_point * w.sum(axis=1)
    return np.ascontiguousarray(a, np.float32), c.astype(np.float32)
