"""Gates: after each exit, a policy decides EXIT or the precision of the next block. One registry, one interface.

A policy sees an ``ExitState`` (exit index, the exit's softmax probabilities, the precisions used so far) and
returns ``EXIT`` or a precision name. Decisions must cost microseconds: they run after every block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np

from .errors import EdgequeeError

__all__ = ["EXIT", "ExitState", "Policy", "register_policy", "create_policy", "list_policies", "ThresholdPolicy"]

EXIT = "exit"


@dataclass
class ExitState:
    exit_index: int
    probs: np.ndarray
    path: list[str]


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
        return EXIT if state.probs.max() >= self.threshold else self.precision

    def __repr__(self) -> str:
        return f"ThresholdPolicy(precision={self.precision!r}, threshold={self.threshold})"
