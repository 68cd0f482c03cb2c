"""The Coral path: compiler report parsing, a real --edgetpu conversion, and the runtime's probe and CPU fallback.

No Coral and no edgetpu_compiler exist on CI machines: the conversion test checks the uncompiled full-int8
per-block models for real (they must compute exactly what the CPU int8 blocks compute), and the runtime test
checks that a missing Edge TPU runtime is detected by the subprocess probe and the CPU takes over.

Recorded compiler outputs (tests/data):
- edgetpu_compiler_cocompiled.txt: two co-compiled models, compiler 16.0 (google-coral/edgetpu#458).
- edgetpu_compiler_partial.txt: a model partly on the CPU, compiler 2.1 (google-coral/edgetpu#60; the operator
  table is cut where the issue's excerpt ends, so its rows do not add up to the totals).
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgequee.backend import Graph, probe_edgetpu
from edgequee.bundle import load_bundle
from edgequee.errors import BundleError
from edgequee.runtime import EdgeRunner

DATA = Path(__file__).resolve().parents[1] / "data"


def test_parse_cocompiled_report() -> None:
    from converters.edgetpu import parse_compiler_output

    version, models = parse_compiler_output((DATA / "edgetpu_compiler_cocompiled.txt").read_text())
    assert version == "16.0.384591198"
    assert [m.input_model for m in models] == ["temp_models/1.tflite", "temp_models/2.tflite"]
    first = models[0]
    assert first.output_model == "temp_models/co-compiled/2/1_edgetpu.tflite"
    assert first.on_chip_bytes == pytest.approx(2.27 * 2**20) and first.off_chip_bytes == 0
    assert (first.subgraphs, first.total_ops, first.tpu_ops, first.cpu_ops) == (1, 57, 57, 0)
    assert (models[1].total_ops, models[1].tpu_ops) == (6, 6)


def test_parse_partly_mapped_report() -> None:
    from converters.edgetpu import parse_compiler_output

    version, (m,) = parse_compiler_output((DATA / "edgetpu_compiler_partial.txt").read_text())
    assert version == "2.1.302470888"
    assert (m.total_ops, m.tpu_ops, m.cpu_ops) == (93, 83, 10)
    assert m.off_chip_bytes == pytest.approx(1.22 * 2**20)
    assert m.operators[0] == {"op": "LOGISTIC", "count": 1, "status": "More than one subgraph is not supported"}
    assert {"op": "ADD", "count": 10, "status": "Mapped to Edge TPU"} in m.operators


def test_compile_without_or_with_a_failing_compiler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from converters.edgetpu import compile_edgetpu
    from edgequee.errors import ConversionError

    monkeypatch.setenv("PATH", str(tmp_path))  # no edgetpu_compiler on PATH
    report = compile_edgetpu([tmp_path / "block00_int8.tflite"], tmp_path)
    assert report["compiled"] is False and "edgetpu-compiler" in report["why"]
    with pytest.raises(ConversionError, match="failed \\(exit 1\\)"):
        compile_edgetpu([tmp_path / "block00_int8.tflite"], tmp_path, compiler=shutil.which("false", path="/bin:/usr/bin"))


@pytest.fixture(scope="module")
def tpu_bundle(tmp_path_factory: pytest.TempPathFactory, sample: Any, require: Any) -> Path:
    """The shipped ResNet-20 converted at int8 with --edgetpu (no compiler here: uncompiled Coral models)."""
    require("torch")
    require("onnx2tf")
    from converters.convert import convert_model
    from converters.multiexit import load_checkpoint

    model = load_checkpoint(Path(__file__).resolve().parents[2] / "converters" / "zoo" / "resnet20_cifar10_exits.pt")
    dest = tmp_path_factory.mktemp("tpu") / "bundle"
    convert_model(model, dest, sample.x_train[:64], parity_images=sample.x_test[:50], parity_labels=sample.y_test[:50],
                  precisions=("int8",), whole_precisions=(), edgetpu=True)
    return dest


@pytest.mark.slow
def test_edgetpu_models_are_full_int8_and_match_the_cpu_blocks(tpu_bundle: Path, sample: Any) -> None:
    bundle = load_bundle(tpu_bundle)  # verifies the Coral models' sha256 too
    m = bundle.manifest
    report = m.conversion["edgetpu"]
    if shutil.which("edgetpu_compiler") is None:
        assert report["compiled"] is False and "not found" in report["why"]
    for b in m.blocks:
        art = b.edgetpu
        assert art is not None and art.file.startswith("edgetpu/") and art.signature is None
        assert art.input.dtype == "int8" and art.input.quant is not None
        assert all(o.dtype == "int8" and o.quant is not None for o in art.outputs.values())
        cpu = b.artifacts["int8"]
        assert art.input.quant == cpu.input.quant  # same calibration: the int8 hidden state passes through
        # run both on the same int8 input: bit-identical outputs
        tpu_g = Graph.open(bundle.file(art), art)
        cpu_g = Graph.open(bundle.file(cpu), cpu)
        x = np.random.default_rng(b.index).integers(-128, 128, cpu_g.input.shape, dtype=np.int8)
        for g in (tpu_g, cpu_g):
            g.input[...] = x
            g.invoke()
        for role in cpu.outputs:
            np.testing.assert_array_equal(tpu_g.outputs[role], cpu_g.outputs[role])
    assert not list((tpu_bundle / "edgetpu").glob("*.log"))


@pytest.mark.slow
def test_runner_probes_the_edgetpu_and_falls_back_to_the_cpu(tpu_bundle: Path, sample: Any) -> None:
    why = probe_edgetpu()
    if why is None:
        pytest.skip("an Edge TPU is attached: the fallback path cannot be exercised here")
    assert "libedgetpu" in why and "\n" not in why
    from edgequee.policies import ThresholdPolicy

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tpu = EdgeRunner(tpu_bundle, ThresholdPolicy("int8"), edgetpu=True)
    messages = [str(w.message) for w in caught]
    assert any("were not compiled" in s for s in messages)
    assert any("Edge TPU unavailable" in s and "running int8 blocks on the CPU" in s for s in messages)
    assert tpu.edgetpu is False
    cpu = EdgeRunner(tpu_bundle, ThresholdPolicy("int8"))
    for image in sample.x_test[:10]:
        a, b = tpu.classify(image), cpu.classify(image)
        assert a.class_id == b.class_id and np.array_equal(a.probs, b.probs)


@pytest.mark.slow
def test_edgetpu_runner_needs_coral_models(converted: Any) -> None:
    with pytest.raises(BundleError, match="convert --edgetpu"):
        EdgeRunner(converted.path, edgetpu=True)
