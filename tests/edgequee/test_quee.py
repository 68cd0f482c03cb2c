"""QuEE: path traces against the runtime, the predictors, the decision rule, runtime == vectorised decisions, and
calibrate --policy quee end to end on the shipped sample and a real converted ResNet-20 (3 exits)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from clirun import invoke

from edgequee.bundle import load_bundle
from edgequee.cost import CostModel
from edgequee.errors import BundleError, DataError
from edgequee.policies import EXIT, ExitState, KnobPolicy, create_policy, never_exits_early, policy_from_bundle
from edgequee.quee import (
    PathTraces,
    QueePolicy,
    choose_precisions,
    fit_logistic,
    fit_policy,
    fit_predictors,
    kmeans,
    path_costs,
    trace_paths,
)
from edgequee.runtime import EdgeRunner

SAMPLE_NPZ = Path(__file__).resolve().parents[2] / "converters" / "zoo" / "cifar10_sample.npz"
N_TRACE = 300


@pytest.fixture(scope="module")
def traces(converted, sample) -> PathTraces:
    return trace_paths(load_bundle(converted.path), sample.x_test[:N_TRACE], ("fp32", "int8"))


@pytest.fixture(scope="module")
def rpi4(converted) -> CostModel:
    return CostModel.for_bundle(load_bundle(converted.path), "rpi4")


# ------------------------------------------------------------------------------------------------- traces


@pytest.mark.slow
def test_path_traces_equal_the_runtime(converted, sample, traces: PathTraces, tmp_path: Path) -> None:
    runner = EdgeRunner(converted.path)
    x = sample.x_test[:N_TRACE]
    for p in ("fp32", "int8"):
        np.testing.assert_array_equal(traces.logits[p], runner.all_exits(x, [p] * 3))
    assert sorted(traces.switched) == [("fp32", 1, "int8"), ("fp32", 2, "int8"), ("int8", 1, "fp32"),
                                       ("int8", 2, "fp32")]
    for p0, s, q in traces.switched:  # a direct run of the switched path through the runtime's hand-overs
        np.testing.assert_array_equal(traces.path(p0, s, q), runner.all_exits(x, [p0] * s + [q] * (3 - s)))
    traces.save(tmp_path / "t.npz", key="abc")
    back, meta = PathTraces.load(tmp_path / "t.npz")
    assert str(meta["key"]) == "abc" and back.switched.keys() == traces.switched.keys()
    np.testing.assert_array_equal(back.path("int8", 1, "fp32"), traces.path("int8", 1, "fp32"))
    np.testing.assert_array_equal(back.subset(np.array([3, 1])).logits["fp32"], traces.logits["fp32"][[3, 1]])


def test_reduced_precisions_are_kept_only_where_they_save(converted, rpi4: CostModel) -> None:
    assert rpi4.precisions() == ("fp32", "fp16", "int8")
    assert choose_precisions(rpi4) == ("fp32", "int8")  # the Pi 4 has no fp16 arithmetic: fp16 costs what fp32 does
    slow_int8 = CostModel(rpi4.manifest, rpi4.device, {"device": "box", "blocks": [
        {"block": i, "precision": p, "latency_ms": {"p50_ms": t}}
        for i in range(3) for p, t in (("fp32", 1.0), ("fp16", 0.5), ("int8", 0.97))]})
    assert choose_precisions(slow_int8) == ("fp32", "fp16")  # int8 only 3 % cheaper: left out
    assert choose_precisions(rpi4, ["fp16", "int8"]) == ("fp16", "int8")
    with pytest.raises(BundleError, match="cannot run int4"):
        choose_precisions(rpi4, ["int4"])


# --------------------------------------------------------------------------------------------- predictors


def test_kmeans_cells_recover_known_error_rates() -> None:
    """Three well-separated clusters with error rates 0.1, 0.5, 0.9: the cells find them, and the Beta-smoothed
    rates equal (errors + a·prior) / (n + a)."""
    rng = np.random.default_rng(1)
    centers = np.array([[0, 0, 0, 0], [5, 5, 0, 0], [0, 5, 5, 5]], float)
    which = rng.integers(3, size=3000)
    x = centers[which] + 0.3 * rng.standard_normal((3000, 4))
    truth = np.array([0.1, 0.5, 0.9])
    y = (rng.random(3000) < truth[which]).astype(float)[:, None]
    c = kmeans(x, 3, seed=0)
    assign = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
    assert len(np.unique(assign)) == 3
    for k in range(3):  # each cell is one cluster
        assert len(np.unique(which[assign == k])) == 1
        rate = y[assign == k].mean()
        assert abs(rate - truth[which[assign == k][0]]) < 0.05
    from edgequee.quee import _cell_rates

    prior = y.mean(0)
    smoothed = _cell_rates(assign, y, 3, prior, 10.0)
    for k in range(3):
        n, e = (assign == k).sum(), y[assign == k].sum()
        assert smoothed[k, 0] == pytest.approx((e + 10 * prior[0]) / (n + 10))
    assert kmeans(np.ones((50, 4)), 8).shape == (1, 4)  # fewer distinct points than cells


def test_logistic_on_separable_data_is_confident_and_finite() -> None:
    x = np.linspace(-3, 3, 200)[:, None]
    y = np.stack([(x[:, 0] > 0.5), np.zeros(200, bool)], 1).astype(float)  # separable; and all-zero targets
    w = fit_logistic(x, y, l2=0.1)
    assert np.isfinite(w).all()
    p = 1 / (1 + np.exp(-(x @ w[:, :1].T + w[:, 1])))
    assert (p[x[:, 0] > 1.0, 0] > 0.95).all() and (p[x[:, 0] < 0.0, 0] < 0.05).all()
    assert (p[:, 1] < 0.01).all()


def _synthetic_traces(n: int, rng: np.random.Generator, error_prob) -> tuple[PathTraces, np.ndarray]:
    """One precision, 2 exits, 10 classes; exit 0's max prob spans (0.1, 1); exit 1 is always right. The label
    is wrong at exit 0 with probability error_prob(max prob)."""
    margin = rng.uniform(0, 6, n)
    logits = np.zeros((n, 2, 10), np.float32)
    logits[:, 0, 0] = margin
    logits[:, 1, 0] = 10
    maxp = 1 / (1 + 9 * np.exp(-margin))
    labels = np.where(rng.random(n) < error_prob(maxp), 1, 0)
    logits[labels == 1, 1, 0], logits[labels == 1, 1, 1] = 0, 10
    return PathTraces({"fp32": logits}), labels


def test_brier_selection_picks_the_kind_that_fits() -> None:
    rng = np.random.default_rng(0)
    band, lab_band = _synthetic_traces(3000, rng, lambda p: ((p > 0.4) & (p < 0.7)).astype(float))
    _, report = fit_predictors(band, lab_band, ["fp32"])
    b = report["brier_held_out"]
    assert report["keys"] == 1 and report["keys_cells"] == 1  # a band: no logistic curve fits it, cells do
    assert b["cells"] < 0.5 * b["logistic"] and b["chosen"] == b["cells"] < b["constant"]
    smooth, lab_smooth = _synthetic_traces(3000, rng, lambda p: 1 / (1 + np.exp(12 * (p - 0.55))))
    _, report = fit_predictors(smooth, lab_smooth, ["fp32"])
    b = report["brier_held_out"]
    assert report["keys_logistic"] == 1 and b["logistic"] < b["cells"] and b["chosen"] == b["logistic"]


def test_copies_of_an_image_are_held_out_together() -> None:
    rng = np.random.default_rng(0)
    traces, labels = _synthetic_traces(400, rng, lambda p: 1 - p)
    doubled = PathTraces.concat([traces, traces])
    _, report = fit_predictors(doubled, np.tile(labels, 2), ["fp32"], groups=np.tile(np.arange(400), 2))
    assert report["images"] == 400 and report["n_held_out"] == 2 * 80 and report["n_fit"] == 2 * 320
    with pytest.raises(DataError, match="group ids"):
        fit_predictors(doubled, np.tile(labels, 2), ["fp32"], groups=np.arange(400))


# ------------------------------------------------------------------------------------------ decision rule


def _hand_made(lam: float, p_exit: float, p_fp32: float, p_int8: float, hop: float) -> QueePolicy:
    """fp32/int8, 2 exits, logistic predictors with constant outputs (w = 0, b = logit p) at the start state
    (fp32, exit 0): P̂(err | EXIT) = p_exit, continue at fp32: p_fp32, switch to int8: p_int8. A block costs 1 at
    fp32, 0.5 at int8; the fp32 → int8 hand-over costs ``hop``."""
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    rows = np.zeros((6, 5))
    rows[:3, 4] = [logit(p_exit), logit(p_fp32), logit(p_int8)]
    rows[3:, 4] = logit(0.5)
    trans = np.zeros((2, 2, 2))
    trans[1, 0, 1] = trans[1, 1, 0] = hop
    arrays = {"keys": np.array([[0, 0, 0, 0], [1, 0, 1, 0]]), "kinds": np.array([1, 1]), "rows": rows,
              "row_offsets": np.array([0, 3, 6]), "rates": np.zeros(0), "rate_offsets": np.array([0, 0, 0]),
              "prior_error": np.array([[0.3, 0.1], [0.3, 0.5]]), "cost_block": np.array([[1.0, 1.0], [0.5, 0.5]]),
              "cost_transition": trans}
    return QueePolicy(lam, precisions=("fp32", "int8"), arrays=arrays)


@pytest.mark.parametrize(
    "lam, hop, expected",
    [
        (0.1, 0.1, "int8"),  # exit .3, fp32 .1 + .1, int8 .12 + .1 × (.5 + .1) = .18
        (0.1, 0.5, "fp32"),  # the hand-over makes int8 .22 > .2
        (0.01, 0.1, "fp32"),  # cost hardly matters: the lowest error wins
        (0.4, 0.1, EXIT),  # exit .3 < fp32 .5, int8 .36
        (5.0, 0.1, EXIT),
    ],
)
def test_decision_rule_by_hand(lam: float, hop: float, expected: str) -> None:
    policy = _hand_made(lam, 0.3, 0.1, 0.12, hop)
    assert policy.decide(ExitState(0, np.zeros(10, np.float32), ["fp32"])) == expected


def test_start_precision_and_the_safe_end() -> None:
    # p0 = argmin_q min_m prior[q, m] + λ·cumulative cost: λ = .01: fp32 .1 + .02 < int8 .3 + .005;
    # λ = 1: int8 .3 + .5 < fp32 .3 + 1
    assert _hand_made(0.01, 0.3, 0.1, 0.12, 0.1).start() == "fp32"
    assert _hand_made(1.0, 0.3, 0.1, 0.12, 0.1).start() == "int8"
    safe = _hand_made(0.0, 0.9, 0.9, 0.9, 0.0)
    assert never_exits_early(safe) and safe.start() == "fp32"
    assert safe.decide(ExitState(0, np.zeros(10, np.float32), ["fp32"])) == "fp32"  # the full model, not argmin
    with pytest.raises(BundleError, match="only run λ = 0"):
        QueePolicy(0.1)
    with pytest.raises(DataError, match="≥ 0"):
        QueePolicy(-1.0)
    assert isinstance(safe, KnobPolicy) and safe.knob_grid()[0] == 0.0 and np.all(np.diff(safe.knob_grid()) > 0)


# ------------------------------------------------------------------------ runtime == vectorised, real images


def _check_runtime(runner: EdgeRunner, policy: QueePolicy, test: PathTraces, images: np.ndarray,
                   cm: CostModel | None) -> tuple[bool, bool]:
    """Runtime loop == vectorised decisions (exit, class, precision path, cost under ``cm``) over λ's grid;
    returns whether some sample switched precision and some exited early."""
    seen_switch = seen_exit = False
    names = policy.precisions
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no certificate: this is a test of the decisions
        for lam in policy.knob_grid()[::20]:
            p = policy.with_lam(float(lam))
            d = p.simulate(test)
            runner.set_policy(p)
            got = [runner.classify(im) for im in images]
            assert [r.exit_index for r in got] == d.exit.tolist(), lam
            assert [r.class_id for r in got] == d.logits.argmax(1).tolist(), lam
            paths = [r.precision_path for r in got]
            assert paths == [tuple(names[t] if 0 < s <= i else names[a] for i in range(e + 1))
                             for a, s, t, e in zip(d.start, d.switch, d.to, d.exit)]
            if cm is not None:
                np.testing.assert_allclose(d.cost, [cm.value(cm.path(list(pp))) for pp in paths])
            seen_switch |= bool((d.switch > 0).any())
            seen_exit |= bool((d.exit < test.num_exits - 1).any())
    return seen_switch, seen_exit


@pytest.mark.slow
def test_runtime_decisions_equal_the_vectorised_ones(converted, sample, traces: PathTraces, rpi4: CostModel) -> None:
    fit, held = np.arange(150), np.arange(150, N_TRACE)
    policy = fit_policy(traces.subset(fit), sample.y_test[fit], rpi4)
    assert policy.precisions == ("fp32", "int8") and policy.fit_report["keys"] == 6
    assert set(policy.fit_report["brier_held_out"]) == {"constant", "cells", "logistic", "chosen"}
    test, images = traces.subset(held), sample.x_test[held]
    runner = EdgeRunner(converted.path, policy)
    _, exited = _check_runtime(runner, policy, test, images, rpi4)
    # a device where int8 is cheap for block 0 only: paths start at int8 and switch to fp32
    skewed = QueePolicy(0.0, **{k: v for k, v in policy.params().items() if k != "lam"},
                        arrays={**policy.arrays(), "cost_block": np.array([[1.0, 1.0, 1.0], [0.2, 5.0, 5.0]])})
    switched, _ = _check_runtime(runner, skewed, test, images, None)
    assert exited and switched  # the checks covered early exits and switched paths
    d = policy.with_lam(float(policy.knob_grid()[60])).simulate(test)
    np.testing.assert_allclose(path_costs(d, policy.block_cost, policy.transition_cost), d.cost)
    full = policy.with_lam(0.0).simulate(test)
    assert (full.exit == 2).all() and np.array_equal(full.logits, test.logits["fp32"][:, 2])


# ------------------------------------------------------------------------------------------------------- CLI


@pytest.mark.slow
def test_calibrate_quee_with_a_lambda_then_run(bundle_copy: Path, sample) -> None:
    result = invoke("calibrate", bundle_copy, "--data", SAMPLE_NPZ, "--policy", "quee", "--device", "rpi4",
                     "--n-cal", "200", "--lam", "0.01", "--json", "-")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["selection"]["risk_control"] is False and report["policy"]["certificate"] is None
    assert "without risk control" in report["selection"]["message"]
    stored = load_bundle(bundle_copy).policy()
    assert stored.name == "quee" and stored.params["lam"] == 0.01 and stored.params["device"] == "rpi4"
    assert {"rows", "kinds", "cost_block", "cost_transition", "prior_error"} <= set(stored.arrays)
    fit = stored.params["fit"]  # half of the 200 images, each with 3 augmented copies (the default)
    assert fit["images"] == 100 and fit["n_fit"] + fit["n_held_out"] == 400
    with pytest.warns(UserWarning, match="no risk certificate"):
        runner = EdgeRunner(bundle_copy)  # the stored policy by default
    assert isinstance(runner.policy, QueePolicy) and runner.policy.lam == 0.01
    results = [runner.classify(im) for im in sample.x_test[:20]]
    assert all(r.precision_path[0] == runner.policy.start() for r in results)
    rebuilt = create_policy("quee", **stored.params, arrays=dict(stored.arrays))
    assert rebuilt.params() == policy_from_bundle(load_bundle(bundle_copy)).params()

    budget = invoke("calibrate", bundle_copy, "--data", SAMPLE_NPZ, "--policy", "quee", "--device", "rpi4",
                     "--n-cal", "200", "--budget-ms", "3.0", "--json", "-")
    assert budget.exit_code == 0, budget.output
    sel = json.loads(budget.stdout)["selection"]
    assert sel["mean_latency_ms"] <= 3.0 and "most accurate λ with mean latency ≤ 3" in sel["message"]


@pytest.mark.slow
def test_calibrate_quee_with_risk_control(bundle_copy: Path) -> None:
    result = invoke("calibrate", bundle_copy, "--data", SAMPLE_NPZ, "--policy", "quee", "--device", "rpi4",
                     "--n-cal", "400", "--epsilon", "0.05", "--method", "crc", "--json", "-")
    assert result.exit_code == 0, result.output
    cert = json.loads(result.stdout)["policy"]["certificate"]
    assert cert["knob"] == "lam" and cert["n_cal"] == 200 and cert["empirical_risk"] <= 0.05  # the half not fitted on
    runner = EdgeRunner(bundle_copy)
    assert isinstance(runner.policy, QueePolicy) and runner.certificate is not None


def test_calibrate_quee_option_errors(bundle_copy: Path) -> None:
    cases = [
        (["--lam", "0.1"], "only with --policy quee"),
        (["--policy", "quee", "--lam", "0.1", "--budget-ms", "2"], "one way"),
        (["--policy", "quee"], "--epsilon .*or --lam"),
        (["--policy", "quee", "--lam", "0.1"], "needs labelled --data and a --device"),
        (["--policy", "quee", "--precision", "int8", "--epsilon", "0.1"], "quee picks precisions"),
        (["--precision", "int8", "--epsilon", "0.1"], "auto picks precisions"),
        (["--policy", "threshold", "--augment", "2", "--epsilon", "0.1"], "drop it for threshold"),
    ]
    for extra, message in cases:
        result = invoke("calibrate", bundle_copy, "--data", SAMPLE_NPZ, "--n-cal", "30", *extra)
        assert result.exit_code == 1 and message.split(" .*")[0] in result.stderr, (extra, result.output)
