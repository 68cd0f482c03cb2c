"""Gate features: cheap statistics of one exit's softmax, shared by every learned gate (QuEE, JEI).

``[max p, entropy, top-2 margin, entropy of p²/Σp²]`` (natural log). ``softmax_stats`` computes them for a batch
of logits (training, traces); ``softmax_stats_one`` for one exit in the hot loop, in plain Python on
``logits.tolist()`` (for 10 classes ~3 µs, several times faster than a chain of numpy calls on tiny arrays).
Both give the same numbers (float64).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["FEATURE_NAMES", "softmax_stats", "softmax_stats_one"]

FEATURE_NAMES = ("max_prob", "entropy", "margin", "entropy_sq")


def softmax_stats(logits: np.ndarray) -> np.ndarray:
    """(..., C) logits → (..., 4) float64 features."""
    z = logits.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    p = e / e.sum(-1, keepdims=True)
    logp = z - np.log(e.sum(-1, keepdims=True))
    top2 = np.sort(p, axis=-1)[..., -2:]
    q = p * p
    q /= q.sum(-1, keepdims=True)
    ent_q = -(q * np.log(np.maximum(q, 1e-300))).sum(-1)
    return np.stack([top2[..., 1], -(p * logp).sum(-1), top2[..., 1] - top2[..., 0], ent_q], axis=-1)


def softmax_stats_one(logits: list[float]) -> tuple[float, float, float, float]:
    """The same four features for one exit's logits (a Python list)."""
    m = max(logits)
    e = [math.exp(x - m) for x in logits]
    s = sum(e)
    p = [v / s for v in e]
    log_s = math.log(s)
    entropy = -sum(pi * (x - m - log_s) for pi, x in zip(p, logits))
    first = second = 0.0
    for pi in p:
        if pi > first:
            first, second = pi, first
        elif pi > second:
            second = pi
    sq = [pi * pi for pi in p]
    t = sum(sq)
    entropy_sq = -sum(v / t * math.log(v / t) for v in sq if v > 0)
    return first, entropy, first - second, entropy_sq
