"""The ``jei`` policy: JEI-DNN's learned gates (arXiv 2310.09163) on the device, numpy and plain Python only.

Gate l (after exits 0..L-2) is linear on the four softmax statistics u_l of its exit (``edgequee.features``):
g_l = σ(w_l·u_l + b_l). Two exit rules, both "leave at the first l whose score ≥ ``threshold``, else at the last
exit":

- ``rule="gate"`` (default): the score is the gate output g_l itself.
- ``rule="conditional"``: the official code's inference rule. P_l = max(0, min(g_l, 1 − Σ_{j<l} g_j)) (the
  probability of leaving at l) and a_l = min(P_l / Π_{j<l}(1 − a_j), 1); the paper uses threshold 0.5. Once
  Σ g reaches 1, a_l = 1 and every sample leaves whatever the threshold, so raising the threshold cannot buy back
  the accuracy of the deeper exits (on CIFAR-10 ResNet-56 it tops out ~10 points below the full model): it is a
  poor knob for risk control, hence not the default.

``threshold`` is the knob risk control tunes: scores lie in [0, 1], so any threshold above 1 (``inf``, the safe
end) never exits early. A decision costs a few µs: the features in plain Python on ``logits.tolist()``, a 5-float
dot product, a sigmoid. The conditional rule's running Σg and Π(1 − a) live on the policy and restart at exit 0,
so one policy object serves one runner at a time (as every policy does).

With conformal quantiles (``conformal``, fitted for this knob on held-out data by ``with_conformal``) the policy
also gives the conformal prediction set at the exit taken (``prediction_set``), which ``EdgeRunner.classify``
returns in ``Result.prediction_set``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from .errors import BundleError, DataError
from .features import softmax_stats, softmax_stats_one
from .policies import EXIT, Decisions, ExitState, ThresholdPolicy, Traces, register_policy, softmax
from .uncertainty import Conformal, fit_conformal

__all__ = ["RULES", "JeiPolicy", "gate_outputs", "exit_probabilities", "conditional_exit", "exit_scores"]

RULES = ("gate", "conditional")
_W = 4  # gate inputs: the four softmax statistics; gates[l] = [w_0..w_3, b]


def gate_outputs(gates: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """g_l of every sample at every gate: gates (L-1, 5), logits (N, L, C) of every exit → (N, L-1) float64."""
    num_gates = len(gates)
    z = np.einsum("nlf,lf->nl", softmax_stats(logits[:, :num_gates]), gates[:, :_W]) + gates[:, _W]
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-z))


def exit_probabilities(g: np.ndarray) -> np.ndarray:
    """P_l = max(0, min(g_l, 1 − Σ_{j<l} g_j)) from gate outputs g (N, L-1): the probability of leaving at l."""
    g = np.asarray(g, np.float64)
    return np.maximum(0.0, np.minimum(g, 1.0 - (np.cumsum(g, 1) - g)))


def conditional_exit(g: np.ndarray) -> np.ndarray:
    """a_l = min(P_l / Π_{j<l}(1 − a_j), 1) from gate outputs g (N, L-1) (1 when nothing is left to leave)."""
    p = exit_probabilities(g)
    a = np.empty_like(p)
    no_exit = np.ones(len(p))
    for l in range(p.shape[1]):
        with np.errstate(divide="ignore", invalid="ignore"):
            a[:, l] = np.where(no_exit > 0, np.minimum(p[:, l] / no_exit, 1.0), (p[:, l] > 0).astype(np.float64))
        no_exit *= 1.0 - a[:, l]
    return a


def exit_scores(gates: np.ndarray, logits: np.ndarray, rule: str = "gate") -> np.ndarray:
    """The score each rule thresholds, (N, L-1): g_l (``gate``) or a_l (``conditional``)."""
    g = gate_outputs(gates, logits)
    return g if rule == "gate" else conditional_exit(g)


@register_policy("jei")
class JeiPolicy(ThresholdPolicy):
    """JEI-DNN gates at one precision: the threshold rule on the gate's score (``rule``) instead of max softmax.

    ``arrays={"gates": (L-1, 5)}`` holds the learned gates (``edgequee train --method jei``, stored in the bundle by
    ``edgequee convert``). Without gates the policy never exits early. ``conformal``: ``Conformal.to_json()``
    fitted for ``threshold``; ``per_exit`` picks its per-exit q̂ (default) or the global one. ``trained``: what the
    gates were trained with (λ, cost vector, device, objective, loss), kept for the record.
    """

    name = "jei"

    def __init__(
        self,
        precision: str = "fp32",
        threshold: float | None = 0.5,
        *,
        arrays: Mapping[str, np.ndarray] | None = None,
        conformal: Mapping[str, Any] | None = None,
        per_exit: bool = True,
        rule: str = "gate",
        trained: Mapping[str, Any] | None = None,
    ):
        if rule not in RULES:
            raise BundleError(f"jei rule {rule!r}; valid: {', '.join(RULES)}")
        super().__init__(precision, threshold)
        self.rule = rule
        self._conditional = rule == "conditional"
        gates = (arrays or {}).get("gates")
        self.gates = np.zeros((0, _W + 1)) if gates is None else np.asarray(gates, np.float64)
        if self.gates.ndim != 2 or self.gates.shape[1] != _W + 1:
            raise BundleError(f"jei gates must be (L-1, {_W + 1}) = [w (4), b] per gate, got {self.gates.shape}")
        self._rows = [tuple(r) for r in self.gates.tolist()]
        self.conformal = Conformal.from_json(conformal) if conformal else None
        self.per_exit = bool(per_exit)
        self.trained = dict(trained) if trained else None
        self._sum_g = 0.0
        self._no_exit = 1.0

    # ----------------------------------------------------------------------------------------- runtime

    def decide(self, state: ExitState) -> str:
        i = state.exit_index
        if self.threshold > 1.0 or i >= len(self._rows):  # scores ≤ 1: no gate can fire
            return self.precision
        w0, w1, w2, w3, b = self._rows[i]
        u0, u1, u2, u3 = softmax_stats_one(state.logits.tolist())
        z = w0 * u0 + w1 * u1 + w2 * u2 + w3 * u3 + b
        g = 1.0 / (1.0 + math.exp(-z)) if z > -700.0 else 0.0
        if not self._conditional:
            return EXIT if g >= self.threshold else self.precision
        if i == 0:
            self._sum_g, self._no_exit = 0.0, 1.0
        p = max(0.0, min(g, 1.0 - self._sum_g))
        no_exit = self._no_exit
        a = min(p / no_exit, 1.0) if no_exit > 0.0 else (1.0 if p > 0.0 else 0.0)
        self._sum_g += g
        self._no_exit = no_exit * (1.0 - a)
        return EXIT if a >= self.threshold else self.precision

    def prediction_set(self, exit_index: int, probs: np.ndarray) -> tuple[int, ...] | None:
        """Classes in the conformal set at the exit taken; None without conformal q̂ for the current threshold."""
        c = self.conformal
        if c is None or c.knob != _knob_value(self.threshold):
            return None
        t = c.threshold(exit_index, self.per_exit)
        return tuple(k for k, p in enumerate(probs.tolist()) if p >= t)

    # ------------------------------------------------------------------------------------ risk control

    def scores(self, traces: Traces) -> np.ndarray:
        """The rule's score (N, L-1) on the traces at this policy's precision."""
        logits = traces.logits[self.precision]
        if len(self.gates) != logits.shape[1] - 1:
            raise BundleError(f"{len(self.gates)} jei gates for {logits.shape[1]} exits (need one gate per exit but "
                              "the last): train them with edgequee train --method jei on this model")
        return exit_scores(self.gates, logits, self.rule)

    def exits_for_knob(self, traces: Traces, knob: float, block_cost: Mapping[str, np.ndarray]) -> Decisions:
        logits = traces.logits[self.precision]
        exit_ = _first_exit(self.scores(traces), knob)
        return Decisions(exit_, logits[np.arange(len(exit_)), exit_], np.cumsum(block_cost[self.precision])[exit_])

    def with_conformal(self, traces: Traces, labels: np.ndarray, alpha: float | None = None) -> "JeiPolicy":
        """This policy with conformal q̂ (global and per exit) fitted on labelled calibration traces at its knob;
        ``alpha`` defaults to the current q̂'s, else 0.1."""
        alpha = alpha if alpha is not None else self.conformal.alpha if self.conformal else 0.1
        logits = traces.logits[self.precision]
        if len(labels) != len(logits):
            raise DataError(f"{len(logits)} traces but {len(labels)} labels")
        exits = _first_exit(self.scores(traces), self.threshold)
        conformal = fit_conformal(softmax(logits), labels, exits, alpha, knob=_knob_value(self.threshold))
        return JeiPolicy(**{**self.params(), "conformal": conformal.to_json()}, arrays=self.arrays())

    def params(self) -> dict[str, Any]:
        return {"precision": self.precision, "threshold": _knob_value(self.threshold),
                "conformal": self.conformal.to_json() if self.conformal else None, "per_exit": self.per_exit,
                "rule": self.rule, "trained": self.trained}

    def arrays(self) -> dict[str, np.ndarray]:
        return {"gates": self.gates} if len(self.gates) else {}

    def __repr__(self) -> str:
        conf = f", conformal α={self.conformal.alpha:g}" if self.conformal else ""
        return (f"JeiPolicy(precision={self.precision!r}, threshold={self.threshold}, rule={self.rule!r}, "
                f"gates={len(self.gates)}{conf})")


def _first_exit(scores: np.ndarray, threshold: float) -> np.ndarray:
    """Exit index per sample: the first gate whose score ≥ threshold, else the last exit. (N, L-1) → (N,)"""
    from .bench import exits_for_threshold  # bench imports the runtime, which imports the policies

    return exits_for_threshold(np.pad(scores, ((0, 0), (0, 1))), threshold)


def _knob_value(threshold: float) -> float | None:
    return None if math.isinf(threshold) else threshold
