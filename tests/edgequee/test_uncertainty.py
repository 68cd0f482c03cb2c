"""ECE and conformal prediction sets (edgequee.uncertainty), on hand-made examples and on real exit traces."""

from __future__ import annotations

import numpy as np
import pytest

from edgequee.errors import DataError
from edgequee.policies import softmax
from edgequee.uncertainty import (
    Conformal,
    conformal_quantile,
    conformal_scores,
    ece,
    fit_conformal,
    prediction_sets,
    set_coverage,
)


def test_ece_one_confidence_level() -> None:
    # ten answers at confidence 0.8, seven right: every bin edge is 0.8, all samples share one bin
    assert ece(np.full(10, 0.8), np.array([1] * 7 + [0] * 3)) == pytest.approx(0.1)


def test_ece_two_equal_mass_bins_by_hand() -> None:
    # bins {0.2, 0.4}: accuracy 0.5 vs confidence 0.3; {0.6, 0.8}: 1.0 vs 0.7 → 0.5·0.2 + 0.5·0.3
    assert ece(np.array([0.6, 0.2, 0.8, 0.4]), np.array([1, 0, 1, 1]), bins=2) == pytest.approx(0.25)


def test_ece_matches_sorted_equal_groups() -> None:
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.1, 1.0, 150)  # distinct values, 10 per bin
    correct = rng.uniform(size=150) < conf**2  # overconfident
    order = np.argsort(conf)
    expected = sum(abs(correct[g].mean() - conf[g].mean()) * len(g) for g in np.split(order, 15)) / 150
    assert ece(conf, correct) == pytest.approx(expected)
    assert ece(conf, correct) > 0.05
    perfect = rng.uniform(size=150) < conf
    assert ece(conf, perfect) < ece(conf, correct)


def test_ece_rejects_bad_shapes() -> None:
    with pytest.raises(DataError, match="equal-length"):
        ece(np.ones(3), np.ones(4))


def test_conformal_quantile_is_the_finite_sample_corrected_order_statistic() -> None:
    scores = np.arange(1, 20) / 20  # n = 19
    assert conformal_quantile(scores[::-1], 0.1) == pytest.approx(18 / 20)  # ⌈20 · 0.9⌉ = 18th smallest
    assert conformal_quantile(scores, 0.5) == pytest.approx(10 / 20)
    assert conformal_quantile(scores[:5], 0.1) == 1.0  # ⌈6 · 0.9⌉ = 6 > 5: every class
    with pytest.raises(DataError):
        conformal_quantile(scores, 1.0)


def test_prediction_sets_and_coverage_by_hand() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]], np.float32)
    assert np.allclose(conformal_scores(probs, np.array([1, 0])), [0.8, 0.6])
    c = Conformal(alpha=0.1, qhat=0.7, qhat_exit=(0.5, 0.8), n_exit=(1, 1))
    sets = prediction_sets(probs, np.array([0, 1]), c)
    assert sets.tolist() == [[True, False, False], [True, True, True]]  # p ≥ 0.5; p ≥ 0.2
    assert prediction_sets(probs, np.array([0, 1]), c, per_exit=False).tolist() == [[True, False, False],
                                                                                       [True, True, False]]
    assert set_coverage(sets, np.array([1, 2])) == (0.5, 2.0)
    assert Conformal.from_json(c.to_json()) == c


def test_fit_conformal_falls_back_to_every_sample_at_a_rare_exit() -> None:
    rng = np.random.default_rng(1)
    probs = softmax(rng.normal(size=(200, 3, 4)).astype(np.float32))
    labels = rng.integers(0, 4, 200)
    exits = np.where(np.arange(200) < 10, 0, 2)  # exit 0: 10 samples (≤ 20), exit 1: none
    c = fit_conformal(probs, labels, exits, 0.1)
    assert c.n_exit == (10, 0, 190)
    assert c.qhat_exit[0] == conformal_quantile(conformal_scores(probs[:, 0], labels), 0.1)
    assert c.qhat_exit[1] == conformal_quantile(conformal_scores(probs[:, 1], labels), 0.1)
    assert c.qhat_exit[2] == conformal_quantile(conformal_scores(probs[10:, 2], labels[10:]), 0.1)
    taken = probs[np.arange(200), exits]
    assert c.qhat == conformal_quantile(conformal_scores(taken, labels), 0.1)


@pytest.mark.slow
@pytest.mark.parametrize("per_exit", [True, False])
def test_conformal_coverage_on_real_traces(converted, sample, per_exit: bool) -> None:
    """Real TFLite exit traces, sample exits from a max-softmax threshold: held-out coverage ≈ 1 − α."""
    from edgequee.bench import exits_for_threshold
    from edgequee.bundle import load_bundle
    from edgequee.calibrate import compute_traces
    from edgequee.policies import max_softmax

    logits = compute_traces(load_bundle(converted.path), sample.x_test, ["fp32"]).logits["fp32"]
    probs = softmax(logits)
    exits = exits_for_threshold(max_softmax(logits), 0.8)
    assert len(set(exits.tolist())) == 3
    rng = np.random.default_rng(0)
    alpha, coverage = 0.1, []
    for _ in range(200):
        perm = rng.permutation(len(probs))
        cal, test = perm[:500], perm[500:]
        c = fit_conformal(probs[cal], sample.y_test[cal], exits[cal], alpha)
        sets = prediction_sets(probs[test, exits[test]], exits[test], c, per_exit)
        coverage.append(set_coverage(sets, sample.y_test[test])[0])
    # E[coverage] ∈ [1 − α, 1 − α + 1/(n+1)] for exchangeable data; 200 splits average out the noise
    assert abs(np.mean(coverage) - (1 - alpha)) < 0.015
    assert np.mean(coverage) > 1 - alpha - 0.01
