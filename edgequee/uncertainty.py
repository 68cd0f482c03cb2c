"""Calibrated uncertainty at the exit taken (numpy only): expected calibration error and conformal prediction sets.

- ``ece``: dataset-level expected calibration error of the top-1 confidence, 15 equal-mass bins (bin edges at the
  confidence quantiles, as sklearn's ``calibration_curve(strategy="quantile")``): Σ_b (n_b/n)·|acc_b − conf_b|.
  JEI-DNN's code averages per-batch ECEs of 64 samples instead; a dataset-level figure is lower and stabler.
- Split conformal prediction (JEI-DNN's ``conformal_eedn.py``): score s = 1 − p̂_y from the exit where the sample
  left, q̂ = the ⌈(n+1)(1−α)⌉-th smallest calibration score, set C(x) = {k : p̂_k ≥ 1 − q̂}. Then
  P(y ∈ C(x)) ≥ 1 − α for a test point exchangeable with the calibration set. ``fit_conformal`` gives one global q̂
  and one q̂ per exit (the samples that left there; with ``min_count`` or fewer of them, every calibration
  sample's score at that exit, as the paper's "gated" variant).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from .errors import DataError

__all__ = ["ECE_BINS", "ece", "conformal_scores", "conformal_quantile", "Conformal", "fit_conformal",
           "prediction_sets", "set_coverage"]

ECE_BINS = 15


def ece(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error (0–1) of confidences (N,) against 0/1 correctness (N,), equal-mass bins."""
    conf = np.asarray(confidence, np.float64)
    hit = np.asarray(correct, np.float64)
    if conf.ndim != 1 or conf.shape != hit.shape or not len(conf):
        raise DataError(f"ece needs two equal-length, non-empty 1-d arrays, got {conf.shape} and {hit.shape}")
    edges = np.quantile(conf, np.linspace(0.0, 1.0, bins + 1))
    ids = np.searchsorted(edges[1:-1], conf)  # ties stay together in one bin
    n_b = np.bincount(ids, minlength=bins)
    gap = np.abs(np.bincount(ids, hit, bins) - np.bincount(ids, conf, bins))  # n_b·|acc_b − conf_b|
    return float(gap[n_b > 0].sum() / len(conf))


def conformal_scores(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Non-conformity score 1 − p̂_y per sample: probs (N, C), labels (N,) → (N,) float64."""
    return 1.0 - probs[np.arange(len(labels)), labels].astype(np.float64)


def conformal_quantile(scores: np.ndarray, alpha: float) -> float:
    """q̂: the ⌈(n+1)(1−α)⌉-th smallest score; 1.0 (every class in the set) when n is too small for level α."""
    if not 0.0 < alpha < 1.0:
        raise DataError(f"alpha must lie in (0, 1), got {alpha}")
    n = len(scores)
    k = math.ceil((n + 1) * (1.0 - alpha))
    return 1.0 if k > n else float(np.partition(np.asarray(scores, np.float64), k - 1)[k - 1])


@dataclass(frozen=True)
class Conformal:
    """Fitted conformal quantiles: global ``qhat``, per-exit ``qhat_exit``; ``n_exit`` calibration samples that left
    at each exit; ``knob``: the policy knob whose exits they were fitted for."""

    alpha: float
    qhat: float
    qhat_exit: tuple[float, ...]
    n_exit: tuple[int, ...]
    knob: float | None = None

    def threshold(self, exit_index: int, per_exit: bool = True) -> float:
        """1 − q̂: the smallest probability a class needs to be in the set."""
        return 1.0 - (self.qhat_exit[exit_index] if per_exit else self.qhat)

    def to_json(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "qhat": self.qhat, "qhat_exit": list(self.qhat_exit),
                "n_exit": list(self.n_exit), "knob": self.knob}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Conformal":
        return cls(float(d["alpha"]), float(d["qhat"]), tuple(float(q) for q in d["qhat_exit"]),
                   tuple(int(n) for n in d["n_exit"]), d.get("knob"))


def fit_conformal(exit_probs: np.ndarray, labels: np.ndarray, exits: np.ndarray, alpha: float, *,
                  min_count: int = 20, knob: float | None = None) -> Conformal:
    """q̂ global and per exit from calibration traces: exit_probs (N, L, C) softmax of every exit, labels (N,),
    exits (N,) the exit each sample took under the policy."""
    n, num_exits = exit_probs.shape[:2]
    if labels.shape != (n,) or exits.shape != (n,) or not n:
        raise DataError(f"fit_conformal: {exit_probs.shape} probs, {labels.shape} labels, {exits.shape} exits")
    rows = np.arange(n)
    taken = conformal_scores(exit_probs[rows, exits], labels)
    per_exit, counts = [], []
    for e in range(num_exits):
        here = exits == e
        counts.append(int(here.sum()))
        pool = taken[here] if counts[-1] > min_count else conformal_scores(exit_probs[:, e], labels)
        per_exit.append(conformal_quantile(pool, alpha))
    return Conformal(float(alpha), conformal_quantile(taken, alpha), tuple(per_exit), tuple(counts),
                     None if knob is None else float(knob))


def prediction_sets(probs: np.ndarray, exits: np.ndarray, conformal: Conformal, per_exit: bool = True) -> np.ndarray:
    """Membership mask (N, C) of the conformal sets for probs (N, C) at the exits taken (N,)."""
    q = np.asarray(conformal.qhat_exit, np.float64)[exits] if per_exit else np.full(len(probs), conformal.qhat)
    return probs.astype(np.float64) >= (1.0 - q)[:, None]


def set_coverage(sets: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(empirical coverage, mean set size) of membership masks (N, C)."""
    return float(sets[np.arange(len(labels)), labels].mean()), float(sets.sum(1).mean())
