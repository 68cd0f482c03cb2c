"""Quantization arithmetic and the input lookup table, against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from edgequee.bundle import InputSpec, QuantParams
from edgequee.preprocess import InputTable, make_lut, normalize
from edgequee.quant import copy_boundary, dequantize, fold_dequantize_into_linear, quantize, requantize


def test_quantize_rounds_half_to_even_and_clips() -> None:
    qp = QuantParams(0.5, 3)
    x = np.array([0.25, 0.75, -0.25, 1.25, 0.3, 1000.0, -1000.0], np.float32)
    # x / 0.5 = 0.5, 1.5, -0.5, 2.5, 0.6 → 0, 2, -0, 2, 1; then + 3; the last two clip to int8.
    q = quantize(x, qp)
    assert q.dtype == np.int8
    assert q.tolist() == [3, 5, 3, 5, 4, 127, -128]


def test_quantize_into_buffer() -> None:
    out = np.zeros(3, np.int8)
    assert quantize(np.array([0.5, -1.0, 1.25]), QuantParams(0.5, 0), out=out) is out
    assert out.tolist() == [1, -2, 2]  # 2.5 → 2 (half to even)


def test_dequantize_uses_int64() -> None:
    q = np.array([-128, 0, 127], np.int8)
    # q - zero_point leaves int8's range on both sides: int8 arithmetic would wrap around.
    np.testing.assert_array_equal(dequantize(q, QuantParams(0.5, 100)), np.float32([-114.0, -50.0, 13.5]))
    x = dequantize(q, QuantParams(0.25, -128))
    assert x.dtype == np.float32 and x.tolist() == [0.0, 32.0, 63.75]


def test_dequantize_into_buffer() -> None:
    out = np.empty(2, np.float32)
    assert dequantize(np.array([1, -1], np.int8), QuantParams(2.0, 1), out=out) is out
    assert out.tolist() == [0.0, -4.0]


def test_requantize() -> None:
    src, dst = QuantParams(0.1, 0), QuantParams(0.2, 10)
    # (q - 0) * 0.5 = 2.5, -2.5, 50, 1.5 → 2, -2, 50, 2 (half to even); + 10
    q = np.array([5, -5, 100, 3], np.int8)
    assert requantize(q, src, dst).tolist() == [12, 8, 60, 12]
    assert requantize(np.array([100, -100], np.int8), QuantParams(1.0, 0), QuantParams(0.01, 0)).tolist() == [127, -128]
    out = np.empty(1, np.int8)
    assert requantize(np.array([-128], np.int8), QuantParams(0.5, -128), QuantParams(0.5, 127), out=out) is out
    assert out.tolist() == [127]


def test_requantize_matches_dequantize_then_quantize() -> None:
    q = np.arange(-128, 128, dtype=np.int8)
    src, dst = QuantParams(0.0132, -128), QuantParams(0.0217, -7)
    expected = quantize(dequantize(q, src), dst)
    assert np.abs(requantize(q, src, dst).astype(int) - expected).max() <= 1  # float32 vs float64 at ties only


def test_fold_dequantize_into_linear_equals_dequantize_then_linear() -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(10, 16)).astype(np.float32)
    b = rng.normal(size=10).astype(np.float32)
    qp = QuantParams(0.047, -128)
    q = rng.integers(-128, 128, (5, 16)).astype(np.int8)
    a, c = fold_dequantize_into_linear(w, b, qp)
    assert a.shape == (16, 10) and a.dtype == c.dtype == np.float32 and a.flags.c_contiguous
    np.testing.assert_allclose(q.astype(np.float32) @ a + c, dequantize(q, qp) @ w.T + b, rtol=1e-5, atol=1e-4)


def test_fold_without_quantization_is_transpose() -> None:
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    a, c = fold_dequantize_into_linear(w, np.float32([1, 2]), None)
    np.testing.assert_array_equal(a, w.T)
    assert c.tolist() == [1.0, 2.0]


@pytest.mark.parametrize(
    "src_qp, dst_qp",
    [(None, None), (QuantParams(0.1, 0), QuantParams(0.1, 0)), (QuantParams(0.1, 0), QuantParams(0.2, 10)),
     (None, QuantParams(0.2, 10)), (QuantParams(0.1, 0), None)],
)
def test_copy_boundary(src_qp: QuantParams | None, dst_qp: QuantParams | None) -> None:
    real = np.float32([0.0, 0.4, -1.2, 2.0])
    src = real if src_qp is None else quantize(real, src_qp)
    dst = np.zeros(4, np.float32 if dst_qp is None else np.int8)
    copy_boundary(src, src_qp, dst, dst_qp)
    expected = real if dst_qp is None else quantize(real, dst_qp)
    np.testing.assert_allclose(dst, expected, atol=1e-6)


def test_lut_matches_normalize_then_quantize() -> None:
    spec = InputSpec(1, 256, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    image = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)  # every pixel value, every channel
    chan = np.arange(3)
    lut = make_lut(spec, None)
    assert lut.shape == (256, 3) and lut.dtype == np.float32
    np.testing.assert_allclose(lut[image, chan], normalize(image, spec), rtol=1e-6)
    qp = QuantParams(0.0187, -14)
    qlut = make_lut(spec, qp)
    assert qlut.dtype == np.int8
    np.testing.assert_array_equal(qlut[image, chan], quantize(normalize(image, spec), qp))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("qp", [None, QuantParams(0.0187, -14)])
def test_input_table_fill_is_the_lookup(channels: int, qp: QuantParams | None) -> None:
    """The flat-table fill (index = pixel + 256·channel, one take) gives exactly ``make_lut(...)[image, c]``."""
    spec = InputSpec(5, 7, channels, mean=(0.4,) * channels, std=(0.25,) * channels)
    image = np.random.default_rng(0).integers(0, 256, (5, 7, channels), dtype=np.uint8)
    table = InputTable(spec, qp)
    dst = np.full((5, 7, channels), 99, table.table.dtype)
    table.fill(dst, image)
    np.testing.assert_array_equal(dst, table.table[image, np.arange(channels)])
    expected = normalize(image, spec) if qp is None else quantize(normalize(image, spec), qp)
    np.testing.assert_allclose(dst, expected, rtol=1e-6)
