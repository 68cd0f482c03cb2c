"""EdgeRunner and WholeModelRunner on the converted bundle, with the real CIFAR-10 sample images."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from edgequee.backend import runtime_name
from edgequee.bundle import load_bundle, sha256_file
from edgequee.errors import BundleError, DataError
from edgequee.policies import NEVER_FIRES, ExitState, ThresholdPolicy
from edgequee.runtime import EdgeRunner, WholeModelRunner

pytestmark = pytest.mark.slow

PRECISIONS = ("fp32", "fp16", "int8")
# Points of accuracy a precision may lose against torch, and the least top-1 agreement with torch at the last exit.
ACCURACY_SLACK = {"fp32": 0.02, "fp16": 0.02, "int8": 0.04}
MIN_AGREEMENT = {"fp32": 0.99, "fp16": 0.98, "int8": 0.90}
N_PARITY = 200  # the parity images the fixture converted with (sample.x_test[:200])


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


class _PathPolicy:
    """Never exits early; runs block i at ``path[i]``."""

    name = "path"

    def __init__(self, path: tuple[str, ...]):
        self.path = path
        self.precisions = tuple(sorted(set(path)))

    def start(self) -> str:
        return self.path[0]

    def decide(self, state: ExitState) -> str:
        return self.path[state.exit_index + 1]


@pytest.fixture(scope="module")
def runner(converted) -> EdgeRunner:
    return EdgeRunner(converted.path)


@pytest.fixture(scope="module")
def exit_logits(runner: EdgeRunner, sample) -> dict[str, np.ndarray]:
    """(1000, num_exits, num_classes) logits of every exit on the sample test images, per precision."""
    n = runner.manifest.num_exits
    return {p: runner.all_exits(sample.x_test, [p] * n) for p in PRECISIONS}


@pytest.mark.parametrize("precision", PRECISIONS)
def test_chained_parity_with_torch(converted, exit_logits, precision: str) -> None:
    top = exit_logits[precision][:N_PARITY].argmax(2)
    agreement = (top == converted.torch_logits[:N_PARITY].argmax(2)).mean(0)
    recorded = load_bundle(converted.path).manifest.parity.chained_for(precision)
    np.testing.assert_array_equal(agreement, recorded.exit_agreement)  # same graphs, same images: same answers
    assert agreement[-1] >= MIN_AGREEMENT[precision], f"{precision} agreement per exit {agreement}"
    if precision == "fp32":
        assert agreement.min() >= MIN_AGREEMENT["fp32"]
        np.testing.assert_allclose(exit_logits["fp32"], converted.torch_logits, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_last_exit_accuracy_floor(converted, exit_logits, sample, precision: str) -> None:
    accuracy = float((exit_logits[precision][:, -1].argmax(1) == sample.y_test).mean())
    floor = converted.torch_accuracy(sample.y_test) - ACCURACY_SLACK[precision]
    assert accuracy >= floor, f"{precision} accuracy {accuracy:.3f} on 1000 images, torch - slack = {floor:.3f}"


def test_low_threshold_exits_earlier(runner: EdgeRunner, exit_logits, sample) -> None:
    images = sample.x_test[:40]
    last = runner.manifest.num_exits - 1
    max_probs = _softmax(exit_logits["fp32"][:40]).max(-1)  # float32, as the runtime computes them
    levels = np.unique(max_probs[:, 0])
    k = len(levels) // 2
    threshold = (float(levels[k - 1]) + float(levels[k])) / 2  # about half the images exit at exit 0

    def histogram(policy: ThresholdPolicy) -> np.ndarray:
        runner.set_policy(policy)
        return np.bincount([runner.classify(im).exit_index for im in images], minlength=last + 1)

    try:
        never = histogram(ThresholdPolicy("fp32"))
        always = histogram(ThresholdPolicy("fp32", 0.0))
        middle = histogram(ThresholdPolicy("fp32", threshold))
    finally:
        runner.set_policy(ThresholdPolicy())
    assert never.tolist() == [0] * last + [40]
    assert always.tolist() == [40] + [0] * last
    hit = max_probs[:, :-1] >= threshold
    expected = np.where(hit.any(1), hit.argmax(1), last)
    assert middle.tolist() == np.bincount(expected, minlength=last + 1).tolist()
    assert 0 < middle[0] < 40


def test_result_fields(runner: EdgeRunner, sample) -> None:
    last = runner.manifest.num_exits - 1
    r = runner.classify(sample.x_test[0])
    assert type(r.class_id) is int and r.class_id == int(r.probs.argmax())
    assert r.probs.shape == (10,) and r.probs.dtype == np.float32
    assert r.probs.sum() == pytest.approx(1.0, abs=1e-5) and r.probs.min() >= 0
    assert r.exit_index == last and r.precision_path == ("fp32",) * (last + 1)
    assert 0 < r.latency_ms < 1e4
    kept = r.probs.copy()
    runner.classify(sample.x_test[1])
    np.testing.assert_array_equal(r.probs, kept)  # results do not alias the runner's buffers
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.class_id = 3  # type: ignore[misc]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_all_exits_agrees_with_classify(converted, exit_logits, sample, precision: str) -> None:
    runner = EdgeRunner(converted.path, ThresholdPolicy(precision))
    for n, image in enumerate(sample.x_test[:10]):
        r = runner.classify(image)
        np.testing.assert_allclose(r.probs, _softmax(exit_logits[precision][n, -1]), rtol=1e-5, atol=1e-7)
        assert r.precision_path == (precision,) * runner.manifest.num_exits


@pytest.mark.parametrize("precision", PRECISIONS)
def test_no_exit_loop_equals_the_gated_loop(converted, sample, precision: str) -> None:
    """A policy at its safe knob runs without gate; a gate that never fires runs the gated loop: same answers."""
    plain = EdgeRunner(converted.path, ThresholdPolicy(precision))
    with pytest.warns(UserWarning, match="no risk certificate"):
        gated = EdgeRunner(converted.path, ThresholdPolicy(precision, threshold=NEVER_FIRES))
    assert plain._chain is not None and gated._chain is None
    for image in sample.x_test[:20]:
        a, b = plain.classify(image), gated.classify(image)
        np.testing.assert_array_equal(a.probs, b.probs)
        assert (a.class_id, a.exit_index, a.precision_path) == (b.class_id, b.exit_index, b.precision_path)
    plain.set_policy(ThresholdPolicy(precision, threshold=0.0))  # switching policy switches the loop
    assert plain._chain is None and plain.classify(sample.x_test[0]).exit_index == 0


@pytest.mark.parametrize("pattern", [("int8", "fp32", "fp16"), ("fp32", "int8")])
def test_mixed_precision_path(converted, sample, pattern: tuple[str, ...]) -> None:
    """Boundaries between precisions quantize or dequantize the hidden state; classify and all_exits agree."""
    path = tuple(pattern[i % len(pattern)] for i in range(converted.model.num_exits))
    runner = EdgeRunner(converted.path, _PathPolicy(path))
    images = sample.x_test[:10]
    logits = runner.all_exits(images, path)
    for n, image in enumerate(images):
        r = runner.classify(image)
        assert r.precision_path == path
        np.testing.assert_allclose(r.probs, _softmax(logits[n, -1]), rtol=1e-5, atol=1e-7)
    agreement = (logits[:, -1].argmax(1) == converted.torch_logits[:10, -1].argmax(1)).mean()
    assert agreement >= 0.8


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((32, 32, 3), np.float32), r"images must be uint8 NHWC of shape \(N, 32, 32, 3\) or \(32, 32, 3\), "
                                            r"got float32 \(32, 32, 3\)"),
        (np.zeros((28, 28, 3), np.uint8), r"got uint8 \(28, 28, 3\); resize to 32x32 RGB"),
        (np.zeros((32, 32), np.uint8), r"got uint8 \(32, 32\)"),
        (np.zeros((2, 32, 32, 3), np.uint8), r"classify takes one image \(H, W, C\), got \(2, 32, 32, 3\)"),
    ],
)
def test_classify_rejects_bad_input(runner: EdgeRunner, image: np.ndarray, message: str) -> None:
    with pytest.raises(DataError, match=message):
        runner.classify(image)


def test_all_exits_rejects_bad_arguments(runner: EdgeRunner, sample) -> None:
    n = runner.manifest.num_exits
    with pytest.raises(DataError, match=rf"need one precision per block \({n}\), got {n - 1}"):
        runner.all_exits(sample.x_test[:2], ["fp32"] * (n - 1))
    with pytest.raises(DataError, match="images must be uint8"):
        runner.all_exits(sample.x_test[:2].astype(np.float32), ["fp32"] * n)


@pytest.mark.parametrize("runner_kind", ["edge", "whole"])
def test_batch_functions_do_not_split_one_image_into_rows(converted, sample, runner_kind: str) -> None:
    """check_images accepts (H, W, C); the batch functions must refuse it or treat it as a batch of one."""
    if runner_kind == "edge":
        runner = EdgeRunner(converted.path)
        run = lambda x: runner.all_exits(x, ["fp32"] * runner.manifest.num_exits)  # noqa: E731
    else:
        run = WholeModelRunner(converted.path).logits
    try:
        out = run(sample.x_test[0])
    except DataError:
        return
    assert out.shape == run(sample.x_test[:1]).shape, f"one (32, 32, 3) image gave {out.shape}"


def test_policy_needing_a_missing_precision(converted) -> None:
    with pytest.raises(BundleError, match="policy threshold needs bf16 but the bundle has fp32, fp16, int8"):
        EdgeRunner(converted.path, ThresholdPolicy("bf16"))


@pytest.fixture(scope="module")
def whole_logits(converted, sample) -> dict[str, np.ndarray]:
    return {p: WholeModelRunner(converted.path, p).logits(sample.x_test) for p in ("fp32", "int8")}


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_whole_model_matches_torch(converted, whole_logits, exit_logits, sample, precision: str) -> None:
    logits = whole_logits[precision]
    assert logits.shape == (1000, 10) and logits.dtype == np.float32
    agreement = (logits.argmax(1) == converted.torch_logits[:, -1].argmax(1)).mean()
    assert agreement >= MIN_AGREEMENT[precision]
    accuracy = float((logits.argmax(1) == sample.y_test).mean())
    assert accuracy >= converted.torch_accuracy(sample.y_test) - ACCURACY_SLACK[precision]
    if precision == "fp32":
        np.testing.assert_allclose(logits, converted.torch_logits[:, -1], rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(logits, exit_logits["fp32"][:, -1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_whole_model_classify(converted, whole_logits, sample, precision: str) -> None:
    runner = WholeModelRunner(converted.path, precision)
    for n, image in enumerate(sample.x_test[:5]):
        r = runner.classify(image)
        assert r.exit_index == converted.model.num_exits - 1 and r.precision_path == (precision,) and r.latency_ms > 0
        np.testing.assert_allclose(r.probs, _softmax(whole_logits[precision][n]), rtol=1e-5, atol=1e-7)


def test_whole_model_errors(converted, sample) -> None:
    with pytest.raises(BundleError, match=r"no whole-model fp16 graph in this bundle \(has fp32, int8\)"):
        WholeModelRunner(converted.path, "fp16")
    with pytest.raises(DataError, match="images must be uint8"):
        WholeModelRunner(converted.path).classify(sample.x_test[0].astype(np.float32))


def test_whole_model_classify_refuses_a_batch(converted, sample) -> None:
    """Like EdgeRunner.classify: a (N, H, W, C) batch is a DataError, not a numpy broadcast error."""
    with pytest.raises(DataError, match=r"\(2, 32, 32, 3\)"):
        WholeModelRunner(converted.path).classify(sample.x_test[:2])


def test_builtin_kernels_match_xnnpack(converted, sample) -> None:
    images, path = sample.x_test[:5], ["fp32"] * converted.model.num_exits
    default = EdgeRunner(converted.path).all_exits(images, path)
    builtin = EdgeRunner(converted.path, use_xnnpack=False).all_exits(images, path)
    np.testing.assert_allclose(builtin, default, rtol=1e-4, atol=1e-4)
    assert runtime_name().startswith("ai-edge-litert ")


def test_graph_checks_the_manifest_against_the_file(bundle_copy) -> None:
    path = bundle_copy / "manifest.json"
    data = json.loads(path.read_text())
    features = data["blocks"][1]["artifacts"]["fp16"]["outputs"]["features"]
    real = features["shape"]
    features["dtype"] = "float16"  # well-formed (the schema passes it) but not what the graph holds
    path.write_text(json.dumps(data))
    with pytest.raises(BundleError, match=rf"blocks_fp16.tflite: tensor '.*' is float32\[1, {real[1]}\], manifest "
                                          rf"says float16\[1, {real[1]}\]; the bundle is inconsistent"):
        EdgeRunner(bundle_copy, ThresholdPolicy("fp16"))
    EdgeRunner(bundle_copy, ThresholdPolicy("int8"))  # other precisions still load


def test_unloadable_graph_is_a_bundle_error(bundle_copy) -> None:
    graph = bundle_copy / "blocks" / "blocks_int8.tflite"
    graph.write_bytes(b"TFL3 but not really a model")
    path = bundle_copy / "manifest.json"
    data = json.loads(path.read_text())
    for block in data["blocks"]:
        block["artifacts"]["int8"]["sha256"] = sha256_file(graph)
    path.write_text(json.dumps(data))
    with pytest.raises(BundleError, match="blocks_int8.tflite: the TFLite runtime cannot load this graph"):
        EdgeRunner(bundle_copy, ThresholdPolicy("int8"))
