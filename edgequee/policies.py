"""Gates: after each exit, a policy decides EXIT or the precision of the next block. One registry, one interface.

A policy sees an ``ExitState`` (exit index, the exit's logits, the precisions used so far) and returns ``EXIT`` or a
precision name. Decisions must cost microseconds: they run after every block, between two invokes (at 2 threads
XNNPACK's worker thread falls asleep if the gap grows). On 10 classes, plain Python on ``logits.tolist()`` beats a
chain of numpy calls (~1.7 µs for the max probability vs ~12 µs for a numpy softmax + max).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Protocol, runtime_checkable

import numpy as np

from .bundle import Bundle, Certificate, StoredPolicy
from .errors import BundleError, EdgequeeError

__all__ = ["EXIT", "NEVER_FIRES", "ExitState", "softmax", "max_softmax", "Policy", "register_policy", "create_policy", "list_policies", "ThresholdPolicy",
           "Traces", "Decisions", "KnobPolicy", "never_exits_early", "to_stored", "from_stored", "policy_from_bundle"]

EXIT = "exit"
# A max-softmax threshold no probability reaches: the gate runs after every exit (as any early-exit policy's does)
# and never fires. What timing the gated loop without early exits uses (bench, profiler).
NEVER_FIRES = 2.0


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


@dataclass(frozen=True)
class Traces:
    """Every exit's logits on N calibration images, per precision, every block at that precision: (N, L, C)."""

    logits: Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Decisions:
    """What a policy does on traced images: exit taken (N,), the logits it answers with (N, C), cost spent (N,)."""

    exit: np.ndarray
    logits: np.ndarray
    cost: np.ndarray


@runtime_checkable
class KnobPolicy(Policy, Protocol):
    """A policy with one scalar knob that risk control tunes (max-softmax threshold, QuEE's λ, a JEI gate threshold).

    ``knob`` names the constructor parameter (and the attribute holding it); ``safe_knob`` is the value that never
    exits early (the full model). ``params()`` gives the JSON-ready constructor arguments, so that
    ``create_policy(name, **params)`` rebuilds the policy (learned gates also take ``arrays=``: the dict of
    numpy arrays their ``arrays()`` method returns).
    """

    knob: ClassVar[str]
    safe_knob: ClassVar[float]

    def knob_grid(self) -> np.ndarray:
        """Candidate knob values, ordered from the safe end (``safe_knob`` first) to the most aggressive."""
        ...

    def exits_for_knob(self, traces: Traces, knob: float, block_cost: Mapping[str, np.ndarray]) -> Decisions:
        """Vectorised decisions at ``knob``; ``block_cost[precision]`` is each block's cost (L,) at that precision."""
        ...

    def params(self) -> dict[str, Any]:
        ...


def never_exits_early(policy: Policy) -> bool:
    """True when ``policy`` is a knob policy set to its safe end (it always runs the full model)."""
    knob = getattr(policy, "knob", None)
    return knob is not None and getattr(policy, knob, None) == getattr(policy, "safe_knob", None)


def to_stored(policy: Policy, *, calibration: Mapping[str, Any] | None = None,
              certificate: Certificate | None = None) -> StoredPolicy:
    """The bundle form of ``policy`` (see ``bundle.write_policy``); it needs a ``params()`` method."""
    params = getattr(policy, "params", None)
    if params is None:
        raise EdgequeeError(f"policy {policy.name} has no params() method, so it cannot be stored in a bundle")
    arrays = getattr(policy, "arrays", None)
    return StoredPolicy(policy.name, params(), getattr(policy, "knob", None), calibration, certificate,
                        arrays() if arrays is not None else None)


def from_stored(stored: StoredPolicy) -> Policy:
    """The runtime policy of a stored spec: ``create_policy(name, **params[, arrays=arrays])``."""
    if stored.name not in _POLICIES:
        raise BundleError(f"the stored policy {stored.name!r} is not registered in this edgequee "
                          f"(has {', '.join(list_policies())}); install the edgequee that calibrated it")
    extra = {"arrays": dict(stored.arrays)} if stored.arrays else {}
    return create_policy(stored.name, **stored.params, **extra)


def policy_from_bundle(bundle: Bundle) -> Policy | None:
    """The runtime policy stored in ``bundle`` (None when it has none)."""
    stored = bundle.policy()
    return None if stored is None else from_stored(stored)


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

    ``threshold=inf`` (the default; ``None`` in stored params) never exits early: the whole network runs block by
    block.
    """

    name = "threshold"
    knob: ClassVar[str] = "threshold"
    safe_knob: ClassVar[float] = math.inf

    def __init__(self, precision: str = "fp32", threshold: float | None = math.inf):
        self.precision = precision
        self.threshold = math.inf if threshold is None else float(threshold)

    def params(self) -> dict[str, Any]:
        return {"precision": self.precision, "threshold": None if math.isinf(self.threshold) else self.threshold}

    def knob_grid(self) -> np.ndarray:
        """inf, then 1 − 10^(−u) for u = 8 … 2.1 in steps of 0.1, then 0.99 … 0 in steps of 0.005.

        Fixed, independent of the calibration data (which the guarantees assume); fine near 1, where max-softmax
        values crowd, and evenly spaced below.
        """
        near_one = 1 - 10.0 ** -np.linspace(8, 2.1, 60)
        return np.concatenate([[math.inf], near_one, np.linspace(0.99, 0, 199)])

    def exits_for_knob(self, traces: Traces, knob: float, block_cost: Mapping[str, np.ndarray]) -> Decisions:
        from .bench import exits_for_threshold  # bench imports the runtime, which imports this module

        logits = traces.logits[self.precision]
        exit_ = exits_for_threshold(max_softmax(logits), knob)
        rows = np.arange(len(exit_))
        return Decisions(exit_, logits[rows, exit_], np.cumsum(block_cost[self.precision])[exit_])

    @property
    def precisions(self) -> tuple[str, ...]:
        return (self.precision,)

    def start(self) -> str:
        return self.precision

    def decide(self, state: ExitState) -> str:
        return EXIT if state.max_prob() >= self.threshold else self.precision

    def __repr__(self) -> str:
        return f"ThresholdPolicy(precision={self.precision!r}, threshold={self.threshold})"


from . import jei as _jei  # noqa: E402,F401  registers "jei"
from . import quee as _quee  # noqa: E402,F401  registers "quee"
