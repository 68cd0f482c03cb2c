"""The ``jei`` policy (edgequee.jei): exit rule, vectorised decisions vs the runtime loop, storage, prediction sets."""

from __future__ import annotations

import contextlib
import math
import time

import numpy as np
import pytest

from edgequee.bundle import load_bundle, write_policy
from edgequee.features import softmax_stats
from edgequee.jei import JeiPolicy, conditional_exit, exit_probabilities, exit_scores, gate_outputs
from edgequee.policies import EXIT, ExitState, KnobPolicy, Traces, create_policy, policy_from_bundle, softmax, to_stored
from edgequee.runtime import EdgeRunner
from edgequee.uncertainty import prediction_sets

# g = σ(8·max p − 6) at both gates of the 3-exit ResNet-20: exits spread over all three on the sample
GATES = np.array([[8.0, 0.0, 0.0, 0.0, -6.0], [8.0, 0.0, 0.0, 0.0, -6.0]])


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _decisions(policy: JeiPolicy, logits: np.ndarray) -> list[str]:
    state = ExitState(0, logits[0], ["fp32"])
    out = []
    for i in range(len(logits)):
        state.exit_index, state.logits = i, logits[i]
        out.append(policy.decide(state))
    return out


def test_both_rules_by_hand() -> None:
    # g = (0.3, 0.5, 0.4): P = (0.3, min(0.5, 0.7), min(0.4, 1 − 0.8)) = (0.3, 0.5, 0.2)
    assert np.allclose(exit_probabilities(np.array([[0.3, 0.5, 0.4]])), [[0.3, 0.5, 0.2]])
    # a0 = 0.3; a1 = 0.5 / 0.7; a2 = 0.2 / (0.7 · (1 − 5/7)) = 1
    assert np.allclose(conditional_exit(np.array([[0.3, 0.5, 0.4]])), [[0.3, 0.5 / 0.7, 1.0]])
    gates = np.array([[0, 0, 0, 0, _logit(g)] for g in (0.3, 0.5, 0.4)])
    logits = np.zeros((1, 4, 5), np.float32)
    assert np.allclose(gate_outputs(gates, logits), [[0.3, 0.5, 0.4]])
    assert np.allclose(exit_scores(gates, logits, "conditional"), [[0.3, 0.5 / 0.7, 1.0]])
    conditional = JeiPolicy(threshold=0.6, arrays={"gates": gates}, rule="conditional")
    assert _decisions(conditional, logits[0, :3]) == ["fp32", EXIT, EXIT]  # 0.3 < 0.6 ≤ 0.714: leaves at exit 1
    # a2 = 1: it leaves at exit 2 even at threshold 0.99 ...
    assert _decisions(JeiPolicy(threshold=0.99, arrays={"gates": gates}, rule="conditional"), logits[0, :3]) == [
        "fp32", "fp32", EXIT]
    gate = JeiPolicy(threshold=0.45, arrays={"gates": gates})  # ... the gate rule compares g itself
    assert _decisions(gate, logits[0, :3]) == ["fp32", EXIT, "fp32"]
    with pytest.raises(Exception, match="jei rule 'max'"):
        JeiPolicy(rule="max")


@pytest.mark.parametrize("rule", ["gate", "conditional"])
def test_decide_matches_the_vectorised_rule_and_is_cheap(rule: str) -> None:
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(300, 4, 10)) * 3).astype(np.float32)
    gates = np.array([[6.0, -1.0, 2.0, 0.5, -5.0]] * 3) + rng.normal(size=(3, 5)) * 0.1
    policy = JeiPolicy("int8", 0.5, arrays={"gates": gates}, rule=rule)
    a = exit_scores(gates, logits, rule)
    want = policy.exits_for_knob(Traces({"int8": logits}), 0.5, {"int8": np.ones(4)}).exit
    assert np.array_equal(want, np.where((a >= 0.5).any(1), (a >= 0.5).argmax(1), 3))
    assert np.bincount(want, minlength=4).min() > 30
    state = ExitState(0, logits[0, 0], ["int8"])
    got = []
    t0 = time.perf_counter()
    for n in range(len(logits)):
        for i in range(3):
            state.exit_index, state.logits = i, logits[n, i]
            if policy.decide(state) == EXIT:
                break
        else:
            i = 3
        got.append(i)
    per_decision_us = (time.perf_counter() - t0) / (len(logits) * 3) * 1e6
    assert got == want.tolist()
    assert per_decision_us < 50  # a few µs on a desktop core; generous for a loaded CI machine


def test_features_are_the_shared_softmax_statistics() -> None:
    gates = np.array([[1.0, -2.0, 3.0, -0.5, 0.25]])
    logits = np.array([[[2.0, 0.5, -1.0], [0.0, 0.0, 0.0]]], np.float32)
    u = softmax_stats(logits[:, 0])[0]
    g = 1 / (1 + math.exp(-(u @ gates[0, :4] + gates[0, 4])))
    assert gate_outputs(gates, logits)[0, 0] == pytest.approx(g)
    assert exit_scores(gates, logits, "conditional")[0, 0] == pytest.approx(g)  # a_0 = P_0 = g_0


def test_knob_interface_and_round_trip() -> None:
    policy = JeiPolicy("fp16", 0.7, arrays={"gates": GATES}, trained={"lam": 0.1})
    assert isinstance(policy, KnobPolicy) and policy.knob == "threshold"
    grid = policy.knob_grid()
    assert grid[0] == policy.safe_knob == math.inf and np.all(np.diff(grid[1:]) <= 0)
    again = create_policy("jei", **policy.params(), arrays=policy.arrays())
    assert again.params() == policy.params() and np.array_equal(again.gates, GATES)
    safe = JeiPolicy("fp16", None, arrays={"gates": GATES})
    state = ExitState(0, np.array([50.0, 0.0], np.float32), ["fp16"])
    assert safe.decide(state) == "fp16" and safe.params()["threshold"] is None
    assert JeiPolicy().decide(state) == "fp32"  # no gates: never exits


def test_wrong_gate_count_is_reported() -> None:
    policy = JeiPolicy(arrays={"gates": GATES})
    with pytest.raises(Exception, match="2 jei gates for 4 exits"):
        policy.exits_for_knob(Traces({"fp32": np.zeros((2, 4, 3), np.float32)}), 0.5, {"fp32": np.ones(4)})


@pytest.fixture(scope="module")
def traces(converted, sample) -> np.ndarray:
    from edgequee.calibrate import compute_traces

    return compute_traces(load_bundle(converted.path), sample.x_test, ["fp32"]).logits["fp32"]


@pytest.mark.slow
@pytest.mark.parametrize(("rule", "threshold"), [("gate", 0.2), ("gate", 0.5), ("gate", 0.8), ("conditional", 0.3),
                                                 ("conditional", 0.7), ("gate", math.inf)])
def test_vectorised_exits_equal_the_runtime_loop(converted, sample, traces, rule: str, threshold: float) -> None:
    policy = JeiPolicy("fp32", threshold, arrays={"gates": GATES}, rule=rule)
    d = policy.exits_for_knob(Traces({"fp32": traces}), threshold, {"fp32": np.ones(3)})
    if math.isfinite(threshold):
        assert len(set(d.exit.tolist())) == 3
    uncertified = math.isfinite(threshold)
    with pytest.warns(UserWarning, match="no risk certificate") if uncertified else contextlib.nullcontext():
        runner = EdgeRunner(converted.path, policy)
    results = [runner.classify(im) for im in sample.x_test[:300]]
    assert [r.exit_index for r in results] == d.exit[:300].tolist()
    assert [r.class_id for r in results] == d.logits[:300].argmax(1).tolist()
    assert all(r.prediction_set is None for r in results)


@pytest.mark.slow
def test_prediction_set_from_a_calibrated_policy(converted, bundle_copy, sample, traces) -> None:
    cal, test = np.arange(500), np.arange(500, 1000)
    policy = JeiPolicy("fp32", 0.5, arrays={"gates": GATES}).with_conformal(Traces({"fp32": traces[cal]}),
                                                                            sample.y_test[cal])
    assert policy.conformal is not None and policy.conformal.knob == 0.5 and sum(policy.conformal.n_exit) == 500
    bundle = write_policy(load_bundle(bundle_copy), to_stored(policy))
    stored = policy_from_bundle(bundle)
    assert isinstance(stored, JeiPolicy) and stored.params() == policy.params()
    with pytest.warns(UserWarning, match="no risk certificate"):
        runner = EdgeRunner(bundle)
    d = policy.exits_for_knob(Traces({"fp32": traces[test]}), 0.5, {"fp32": np.ones(3)})
    want = prediction_sets(softmax(d.logits), d.exit, policy.conformal)
    for n, i in enumerate(test[:150]):
        r = runner.classify(sample.x_test[i])
        assert r.exit_index == d.exit[n]
        assert r.prediction_set == tuple(np.flatnonzero(want[n]).tolist())
    coverage = want[np.arange(len(test)), sample.y_test[test]].mean()
    assert coverage > 0.8
    runner.set_policy(create_policy("jei", **{**policy.params(), "threshold": 0.6}, arrays=policy.arrays()))
    assert runner.classify(sample.x_test[0]).prediction_set is None  # q̂ was fitted for 0.5's exits


@pytest.mark.slow
def test_calibrate_tunes_the_stored_gates_and_refits_conformal(converted, bundle_copy, sample) -> None:
    from edgequee.calibrate import calibrate_bundle

    bundle = write_policy(load_bundle(bundle_copy), to_stored(JeiPolicy("fp32", 0.5, arrays={"gates": GATES})))
    report = calibrate_bundle(bundle, sample.x_test[:400], sample.y_test[:400], policy="jei", epsilon=0.05,
                              method="crc")
    stored = load_bundle(bundle_copy).policy()
    assert stored is not None and stored.name == "jei" and stored.certificate is not None
    assert np.array_equal(stored.arrays["gates"], GATES)
    knob = stored.params["threshold"]
    assert knob == report["selection"]["knob"]
    assert stored.params["conformal"]["knob"] == knob and stored.params["conformal"]["alpha"] == 0.1
    runner = EdgeRunner(bundle_copy)
    assert runner.certificate is not None
    assert runner.classify(sample.x_test[500]).prediction_set is not None
