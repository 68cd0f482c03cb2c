"""Gates: after each exit, a policy decides EXIT or the precision of the next block. One registry, one interface.

A policy sees an ``ExitState`` (exit index, the exit's logits, the precisions used so far) and returns ``EXIT`` or a
precision name. Decisions must cost microseconds: they run after every block, between two invokes (at 2 threads
XNNPACK's worker thread falls asleep if the gap grows). On 10 classes, plain Python on ``logits.tolist()`` beats a
chain of numpy calls (~1.7 µs for the max probability vs ~12 µs for a numpy softmax + max).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np

from .errors import EdgequeeError

__all__ = ["EXIT", "ExitState", "softmax", "max_softmax", "Policy", "register_policy", "create_policy", "list_policies", "ThresholdPolicy"]

EXIT = "exit"


@dataclass
class ExitState:
    exit_index: int
    logits: np.ndarray  # float32 (num_classes,); a buffer the runtime overwrites after the next block
    path: list[str]

    def max_prob(self) -> float:
        """Largest softmax probability, 1 / Σ exp(l - max l)."""
        v = self.logits.tolist()
        m = max(v)
        return 1.0 / sum([math.exp(x - m) for x in v])

    def probs(self) -> np.ndarray:
        """Softmax probabilities (a new array)."""
        return softmax(self.logits)


def max_softmax(logits: np.ndarray) -> np.ndarray:
    """``ExitState.max_prob`` over the last axis of a batch, in float64 (same decisions, vectorized)."""
    z = logits.astype(np.float64)
    return 1.0 / np.exp(z - z.max(-1, keepdims=True)).sum(-1)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in float32."""
    e = np.exp(logits - logits.max(-1, keepdims=True), dtype=np.float32)
    return e / e.sum(-1, keepdims=True)


class Policy(Protocol):
    name: str

    @property
    def precisions(self) -> tuple[str, ...]:
        """Every precision this policy may run a block at (the runner loads those graphs up front)."""
        ...

    def start(self) -> str:
        """Precision of the first block."""
        ...

    def decide(self, state: ExitState) -> str:
        """EXIT, or the precision to run the next block at."""
        ...


_POLICIES: dict[str, Callable[..., Policy]] = {}


def register_policy(name: str) -> Callable[[Callable[..., Policy]], Callable[..., Policy]]:
    def deco(factory: Callable[..., Policy]) -> Callable[..., Policy]:
        _POLICIES[name] = factory
        return factory

    return deco


def list_policies() -> list[str]:
    return sorted(_POLICIES)


def create_policy(name: str, **params: Any) -> Policy:
    try:
        factory = _POLICIES[name]
    except KeyError:
        raise EdgequeeError(f"unknown policy {name!r}; choose one of: {', '.join(list_policies())}") from None
    return factory(**params)


@register_policy("threshold")
class ThresholdPolicy:
    """Max-softmax early exit at one fixed precision: exit at the first exit whose top probability ≥ threshold.

    ``threshold=inf`` (the default) never exits early: the whole network runs block by block.
    """

    name = "threshold"

    def __init__(self, precision: str = "fp32", threshold: float = math.inf):
        self.precision = precision
        self.threshold = float(threshold)

    @property
    def precisions(self) -> tuple[str, ...]:
        return (self.precision,)

    def start(self) -> str:
        return self.precision

    def decide(self, state: ExitState) -> str:
        return EXIT if state.max_prob() >= self.threshold else self.precision

    def __repr__(self) -> str:
        return f"ThresholdPolicy(precision={self.precision!r}, threshold={self.threshold})"
