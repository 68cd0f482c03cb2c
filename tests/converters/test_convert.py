"""The host pipeline: misuse errors, MAC counting, and what a real conversion writes into the bundle."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import numpy as np
import pytest

from edgequee.bundle import TensorSpec, load_bundle, sha256_file
from edgequee.errors import BundleError, ConversionError

CALIB_SHAPE = (0, 32, 32, 3)


@pytest.fixture
def torch(require: Callable[..., ModuleType]) -> ModuleType:
    return require("torch")


@pytest.fixture
def small_model(torch: ModuleType) -> Any:
    from converters._registry import create_model

    torch.manual_seed(0)
    return create_model("resnet20", exits="stages", head="linear").eval()


def test_count_macs_hand_computed(torch: ModuleType) -> None:
    from torch import nn

    from converters.convert import count_macs

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))
    # conv: 4*8*8 outputs × 3*3*3 taps = 6912; linear: 5 outputs × 256 inputs = 1280
    # params: conv 4*3*3*3 + 4 = 112; linear 256*5 + 5 = 1285
    assert count_macs(model, torch.zeros(2, 3, 8, 8)) == (6912 + 1280, 112 + 1285)  # batch 1 is counted
    grouped = nn.Conv2d(4, 8, 3, padding=1, groups=2, bias=False)
    assert count_macs(grouped, torch.zeros(1, 4, 8, 8)) == (8 * 8 * 8 * 3 * 3 * 2, 8 * 2 * 3 * 3)
    assert all(not m._forward_hooks for m in model.modules())  # hooks are removed


def test_int8_without_calibration_data(small_model, tmp_path: Path, require: Callable[..., ModuleType]) -> None:
    require("onnx2tf")
    from converters.convert import convert_model

    with pytest.raises(ConversionError, match="int8 needs calibration data: pass --calib DATA with real images"):
        convert_model(small_model, tmp_path / "bundle", np.empty(CALIB_SHAPE, np.uint8), precisions=("int8",))
    assert list(tmp_path.iterdir()) == []  # the staging directory is gone


def test_convert_misuse(small_model, sample, tmp_path: Path) -> None:
    from converters.convert import convert_model

    dest = tmp_path / "bundle"
    dest.mkdir()
    (dest / "keep.txt").write_text("old")
    for force in (False, True):  # a folder that is not a bundle is never replaced, with --force neither
        with pytest.raises(BundleError, match="is not an edgequee bundle .*will not delete it"):
            convert_model(small_model, dest, sample.x_train[:4], overwrite=force)
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BundleError, match="empty exists; pass --force"):
        convert_model(small_model, empty, sample.x_train[:4])
    empty.rmdir()
    fresh = tmp_path / "fresh"
    with pytest.raises(ConversionError, match=r"calibration images must be uint8 NHWC, got float32 \(4, 32, 32, 3\)"):
        convert_model(small_model, fresh, sample.x_train[:4].astype(np.float32))
    with pytest.raises(ConversionError, match="no precisions to convert"):
        convert_model(small_model, fresh, sample.x_train[:4], precisions=("fp64",))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def _tiny_model() -> Any:
    """Two conv blocks with pooled linear exits: converts in seconds."""
    from torch import nn

    from converters.multiexit import ExitHead, MultiExitModel
    from edgequee.bundle import InputSpec

    def head(channels: int) -> ExitHead:
        return ExitHead(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1)), nn.Linear(channels, 10))

    blocks = [nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU()),
              nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())]
    return MultiExitModel(blocks, [head(8), head(16)], name="tiny", classes=[str(i) for i in range(10)],
                          input_spec=InputSpec(32, 32)).eval()


@pytest.mark.slow
def test_convert_without_fp32(torch: ModuleType, sample, tmp_path: Path, require: Callable[..., ModuleType]) -> None:
    """--precisions int8 is a valid request: the parity check must not need an fp32 graph."""
    require("onnx2tf")
    from converters.convert import convert_model

    torch.manual_seed(0)
    bundle = convert_model(_tiny_model(), tmp_path / "bundle", sample.x_train[:16], precisions=("int8",),
                           whole_precisions=())
    assert bundle.manifest.precisions == ("int8",) and bundle.manifest.whole_model == {}
    assert [c.precision for c in bundle.manifest.parity.chained] == ["int8"]


@pytest.mark.slow
def test_parity_report(converted, sample) -> None:
    m = load_bundle(converted.path).manifest
    parity = m.parity
    assert parity is not None and parity.n_images == 200
    torch_acc = (converted.torch_logits[:200].argmax(2) == sample.y_test[:200, None]).mean(0)
    np.testing.assert_allclose(parity.torch_exit_accuracy, torch_acc)
    last = m.num_exits - 1
    assert sorted((p.block, p.precision) for p in parity.isolated) == sorted(
        (i, p) for i in range(m.num_exits) for p in ("fp32", "fp16", "int8"))
    for p in parity.isolated:
        assert (p.hidden_max_abs_err is None) == (p.block == last)
        if p.precision == "fp32":
            assert p.exit_agreement >= 0.999
            assert p.features_max_abs_err < 1e-3 and (p.hidden_max_abs_err or 0.0) < 1e-3
        elif p.precision == "fp16":
            assert p.exit_agreement >= 0.99
        else:
            assert p.exit_agreement >= 0.85  # a broken int8 graph agrees on ~10 %
    assert [c.precision for c in parity.chained] == ["fp32", "fp16", "int8"]
    for c in parity.chained:
        assert len(c.exit_agreement) == len(c.exit_accuracy or ()) == m.num_exits
    fp32 = parity.chained_for("fp32")
    assert min(fp32.exit_agreement) >= 0.99
    np.testing.assert_allclose(fp32.exit_accuracy, torch_acc, atol=0.01)


def _check_spec(spec: TensorSpec, detail: dict[str, Any]) -> None:
    assert spec.shape == tuple(int(s) for s in detail["shape"])
    assert spec.dtype == np.dtype(detail["dtype"]).name
    scale, zero_point = detail["quantization"]
    if spec.dtype == "int8":
        assert spec.quant is not None
        assert spec.quant.scale == pytest.approx(scale) and spec.quant.zero_point == zero_point
    else:
        assert spec.dtype == "float32" and spec.quant is None


@pytest.mark.slow
def test_artifact_specs_match_the_interpreter(converted) -> None:
    from ai_edge_litert.interpreter import Interpreter

    bundle = load_bundle(converted.path)
    m = bundle.manifest
    artifacts = [a for b in m.blocks for a in b.artifacts.values()] + list(m.whole_model.values())
    assert len(artifacts) == 3 * m.num_exits + 2
    for art in artifacts:
        path = bundle.file(art)
        assert art.sha256 == sha256_file(path) and art.size_bytes == path.stat().st_size
        assert art.file == f"{path.parent.name}/{path.name}" and art.precision in path.name
        runner = Interpreter(model_path=str(path)).get_signature_runner(art.signature)
        assert list(runner.get_input_details()) == [art.input.name] == ["input"]
        (inp,) = runner.get_input_details().values()
        _check_spec(art.input, inp)
        outs = runner.get_output_details()
        assert len(outs) == len(art.outputs)
        for spec in art.outputs.values():
            _check_spec(spec, outs[spec.name])
        assert (art.input.dtype == "int8") == (art.precision == "int8")


@pytest.mark.slow
def test_block_shapes_chain(converted) -> None:
    m = load_bundle(converted.path).manifest
    assert m.input.height == m.input.width == 32
    assert m.blocks[0].input_shape == (1, 32, 32, 3)
    for i, b in enumerate(m.blocks):
        assert b.index == i and b.name == f"block{i:02d}"
        for art in b.artifacts.values():
            assert art.input.shape == b.input_shape
            assert art.outputs["features"].shape == (1, b.num_features)
            assert (art.outputs["hidden"].shape if "hidden" in art.outputs else None) == b.hidden_shape
        if i + 1 < m.num_exits:
            assert b.hidden_shape == m.blocks[i + 1].input_shape
            # Consecutive int8 blocks are calibrated on the same activations: the boundary needs no requantization.
            out_q = b.artifacts["int8"].outputs["hidden"].quant
            in_q = m.blocks[i + 1].artifacts["int8"].input.quant
            assert out_q.zero_point == in_q.zero_point and out_q.scale == pytest.approx(in_q.scale, rel=1e-6)
    assert m.blocks[-1].hidden_shape is None
    for art in m.whole_model.values():
        assert art.input.shape == (1, 32, 32, 3) and art.outputs["logits"].shape == (1, len(m.classes))


@pytest.mark.slow
def test_blocks_heads_and_macs_match_the_model(converted, torch: ModuleType) -> None:
    from converters.convert import count_macs

    model = converted.model
    bundle = load_bundle(converted.path)
    m = bundle.manifest
    assert m.num_exits == model.num_exits >= 3
    assert m.model == model.name and m.classes == model.classes and m.input == model.input_spec
    for (w, b), head in zip(bundle.heads(), model.heads):
        np.testing.assert_array_equal(w, head.classifier.weight.detach().numpy())
        np.testing.assert_array_equal(b, head.classifier.bias.detach().numpy())
    macs, params = count_macs(model, torch.zeros(1, 3, 32, 32))
    assert sum(b.macs for b in m.blocks) == macs and 40e6 < macs < 42e6  # ResNet-20: 40.8 M MACs (+ exit heads)
    assert sum(b.params for b in m.blocks) == params
    assert m.conversion["calibration_images"] == 64 and m.conversion["precisions"] == ["fp32", "fp16", "int8"]
    assert m.conversion["model_config"] == model.config
