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
    """The same four features for one exit's logits (a Python list), in one pass over the classes.

    With e_i = exp(l_i - max l), S = Σe, S2 = Σe²: max p = 1/S, entropy = log S - Σe(l-max)/S, and for
    q = p²/Σp² = e²/S2, entropy_sq = log S2 - 2·Σe²(l-max)/S2.
    """
    m = max(logits)
    s = s2 = a = a2 = 0.0
    second = 0.0
    top_seen = False
    exp = math.exp
    for x in logits:
        d = x - m
        e = exp(d)
        s += e
        a += e * d
        e2 = e * e
        s2 += e2
        a2 += e2 * d
        if second < e:
            if e < 1.0:
                second = e
            elif top_seen:
                second = 1.0  # a tie for the top class
            else:
                top_seen = True
    return 1.0 / s, math.log(s) - a / s, (1.0 - second) / s, math.log(s2) - 2.0 * a2 / s2
