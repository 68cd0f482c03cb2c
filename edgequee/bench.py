"""Accuracy vs measured latency of threshold policies at each precision, against the whole model.

Accuracy and exit histograms come from every test image's exit logits, computed once per precision with the
real TFLite blocks (``EdgeRunner.all_exits``); a max-softmax threshold policy is a deterministic function of
those. Latency is *measured* in the runtime loop (``EdgeRunner.classify``) on ``latency_samples`` images per
policy, and the runtime's answers on those images are checked against the trace-derived ones.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Sequence

import numpy as np

from .bundle import Bundle
from .errors import DataError, InternalError
from .policies import NEVER_FIRES, Policy, ThresholdPolicy, max_softmax
from .progress import Progress, Ticker
from .runtime import EdgeRunner, WholeModelRunner

__all__ = ["DEFAULT_THRESHOLDS", "exits_for_threshold", "measure_split_overhead", "bench_bundle"]

DEFAULT_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, math.inf)


def exits_for_threshold(max_probs: np.ndarray, threshold: float) -> np.ndarray:
    """Exit index per sample: the first exit whose max softmax ≥ threshold, else the last. (N, L) → (N,)"""
    hit = max_probs[:, :-1] >= threshold
    return np.where(hit.any(1), hit.argmax(1), max_probs.shape[1] - 1)


def _mean_latency_ms(classify: Callable[[np.ndarray], object], images: np.ndarray, warmup: int = 20) -> tuple[float, list]:
    for im in images[:warmup]:
        classify(im)
    results = [classify(im) for im in images]
    return float(np.mean([r.latency_ms for r in results])), results  # type: ignore[attr-defined]


def measure_split_overhead(
    bundle: Bundle, images: np.ndarray, precision: str, num_threads: int = 1, rounds: int = 7, *, gated: bool = False
) -> dict[str, float]:
    """Runtime loop with every block and no early exit ÷ the whole model, same precision and threads.

    Without ``gated`` the policy is the no-exit one (``ThresholdPolicy(precision)``): the runner's loop without
    gate, the cost of running block by block. With ``gated`` a threshold of ``NEVER_FIRES`` makes the runner
    evaluate every exit head and the max-softmax gate as an early-exit policy would, and still run every block.
    Both run end to end (preprocessing, invokes, softmax) on the same images in alternating rounds; the median of
    the per-round ratios is reported, so slow drifts of a noisy machine hit both sides alike. Every round makes
    both runners afresh: the same graph runs a few % faster or slower depending on where its interpreter's
    memory lands, and one lucky or unlucky pair of allocations would bias every round alike.
    """
    policy = ThresholdPolicy(precision, NEVER_FIRES if gated else None)
    ratios, split_ms, whole_ms = [], [], []
    for _ in range(rounds):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the gated policy has no certificate; it never exits
            split = EdgeRunner(bundle, policy, num_threads=num_threads)
        whole = WholeModelRunner(bundle, precision, num_threads=num_threads)
        s, _ = _mean_latency_ms(split.classify, images)
        w, _ = _mean_latency_ms(whole.classify, images)
        ratios.append(s / w)
        split_ms.append(s)
        whole_ms.append(w)
    return {
        "ratio": float(np.median(ratios)),
        "split_latency_ms": float(np.median(split_ms)),
        "whole_latency_ms": float(np.median(whole_ms)),
        "rounds": rounds,
        "images": int(len(images)),
        "gated": gated,
    }


def bench_bundle(
    bundle: Bundle,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    precisions: Sequence[str] | None = None,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    num_threads: int = 1,
    latency_samples: int = 500,
    progress: Progress | None = None,
    policy: Policy | None = None,
) -> dict:  # type: ignore[type-arg]
    """Run the benchmark; returns the JSON-ready report (see module docstring).

    ``policy`` (e.g. the bundle's stored, calibrated one) adds a row measured in the runtime loop on every image.
    """
    m = bundle.manifest
    precisions = list(precisions or m.precisions)
    if latency_samples < 1:
        raise DataError(f"latency_samples must be >= 1, got {latency_samples}")
    lat_x = images[:latency_samples]
    runner = EdgeRunner(bundle, ThresholdPolicy(precisions[0]), num_threads=num_threads)
    tick = Ticker(len(precisions) * (1 + len(thresholds)) + len(m.whole_model) + (policy is not None), progress)

    whole = {}
    for p in m.whole_model:
        wr = WholeModelRunner(bundle, p, num_threads=num_threads)
        acc = float((wr.logits(images).argmax(1) == labels).mean())
        lat, _ = _mean_latency_ms(wr.classify, lat_x)
        whole[p] = {"accuracy": acc, "latency_ms": lat}
        tick(f"whole model {p}")
    policies, split_overhead, gated_overhead, exit_accuracy = [], {}, {}, {}
    macs = np.asarray(m.cumulative_macs(), np.float64)
    for p in precisions:
        logits = runner.all_exits(images, [p] * m.num_exits)
        max_p, top = max_softmax(logits), logits.argmax(-1)
        exit_accuracy[p] = [float(a) for a in (top == labels[:, None]).mean(0)]
        tick(f"exit traces {p}")
        for t in thresholds:
            ex = exits_for_threshold(max_p, t)
            pred = top[np.arange(len(ex)), ex]
            runner.set_policy(ThresholdPolicy(p, t))
            lat, results = _mean_latency_ms(runner.classify, lat_x)
            got = np.array([(r.exit_index, r.class_id) for r in results])
            if not (np.array_equal(got[:, 0], ex[: len(lat_x)]) and np.array_equal(got[:, 1], pred[: len(lat_x)])):
                raise InternalError(f"runtime loop and exit traces disagree at {p} threshold {t}")
            policies.append(
                {
                    "name": "threshold",
                    "precision": p,
                    "threshold": None if math.isinf(t) else t,
                    "accuracy": float((pred == labels).mean()),
                    "mean_latency_ms": lat,
                    "mean_macs": float(macs[ex].mean()),
                    "exit_histogram": np.bincount(ex, minlength=m.num_exits).tolist(),
                }
            )
            tick(f"{p} threshold {t}")
        if p in whole:
            split_overhead[p] = measure_split_overhead(bundle, lat_x, p, num_threads, rounds=3)["ratio"]
            gated_overhead[p] = measure_split_overhead(bundle, lat_x, p, num_threads, rounds=3, gated=True)["ratio"]
    if policy is not None:
        policies.append(_policy_row(bundle, policy, images, labels, lat_x, num_threads, macs))
        tick(f"{policy.name} (stored)")
    return {
        "model": m.model,
        "n_images": int(len(images)),
        "latency_samples": int(len(lat_x)),
        "threads": num_threads,
        "exit_accuracy": exit_accuracy,
        "whole_model": whole,
        "policies": policies,
        "split_overhead": split_overhead,
        "split_overhead_gated": gated_overhead,
    }


def _policy_row(bundle: Bundle, policy: Policy, images: np.ndarray, labels: np.ndarray, lat_x: np.ndarray,
                num_threads: int, macs: np.ndarray) -> dict:  # type: ignore[type-arg]
    """One policy run through the runtime loop on every image (no traces needed, so any policy works)."""
    runner = EdgeRunner(bundle, policy, num_threads=num_threads)
    lat, _ = _mean_latency_ms(runner.classify, lat_x)
    results = [runner.classify(im) for im in images]
    ex = np.array([r.exit_index for r in results])
    knob = getattr(policy, "knob", None)
    value = getattr(policy, knob) if knob else None
    return {
        "name": f"{policy.name} (stored)",
        "precision": "/".join(policy.precisions),
        "threshold": None if value is None or math.isinf(value) else value,
        "accuracy": float((np.array([r.class_id for r in results]) == labels).mean()),
        "mean_latency_ms": lat,
        "mean_macs": float(macs[ex].mean()),
        "exit_histogram": np.bincount(ex, minlength=bundle.manifest.num_exits).tolist(),
        "certified": runner.certificate is not None,
    }
