"""Accuracy vs measured latency of threshold policies at each precision, against the best whole model.

Accuracy and exit histograms come from every test image's exit logits, computed once per precision with the
real TFLite blocks (``EdgeRunner.all_exits``); a max-softmax threshold policy is a deterministic function of
those. Latency is *measured* in the runtime loop (``EdgeRunner.classify``) on ``latency_samples`` images per
policy, in interleaved rounds over every policy and whole model, and the runtime's answers on those images are
checked against the trace-derived ones. The yardstick is ``best_whole``: the cheapest whole model within 0.5 pt
of fp32 on this device (int8 where it pays: every Pi, x86 with VNNI), measured in the same run.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .bundle import Bundle
from .data import check_labels
from .errors import DataError, InternalError
from .policies import NEVER_FIRES, Policy, ThresholdPolicy, max_softmax
from .preprocess import check_images
from .progress import Progress, Ticker
from .runtime import EdgeRunner, WholeModelRunner
from .sysinfo import machine_info

__all__ = ["DEFAULT_THRESHOLDS", "BEST_WHOLE_TOLERANCE", "exits_for_threshold", "measure_interleaved", "best_whole",
           "measure_split_overhead", "bench_bundle"]

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


# A point to time: a policy (run by EdgeRunner) or a precision name (the whole model, WholeModelRunner), with the
# (exit, class) per image the runtime must reproduce (None: not checked).
Point = tuple["Policy | str", "np.ndarray | None"]


def measure_interleaved(bundle: Bundle, points: Mapping[str, Point], images: np.ndarray, *, rounds: int = 3,
                        num_threads: int = 1, progress: Callable[[str], None] | None = None) -> dict[str, float]:
    """Mean latency (ms) per image of every point, measured in ``rounds`` interleaved rounds over all points; the
    median of each point's round means is kept.

    A burst of outside load then hits one round of every point instead of every round of one point: on a loaded
    machine a sequential bench once put the whole int8 model at 0.85 ms minutes after its profile measured 0.25 ms.
    The runtime's answers are checked against the expected (exit, class) of a point that carries them.
    """
    if rounds < 1:
        raise DataError(f"rounds must be >= 1, got {rounds}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timing uncertified policies on purpose
        runner = EdgeRunner(bundle, ThresholdPolicy(bundle.manifest.precisions[0]), num_threads=num_threads)
    whole = {p: WholeModelRunner(bundle, p, num_threads=num_threads) for p in bundle.manifest.whole_model
             if any(what == p for what, _ in points.values())}
    per: dict[str, list[float]] = {name: [] for name in points}
    for r in range(rounds):
        for name, (what, expected) in points.items():
            if isinstance(what, str):
                ms, _ = _mean_latency_ms(whole[what].classify, images)
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    runner.set_policy(what)
                ms, results = _mean_latency_ms(runner.classify, images)
                got = np.array([(x.exit_index, x.class_id) for x in results])
                if expected is not None and not np.array_equal(got, expected):
                    raise InternalError(f"{name}: the runtime loop and the trace-derived decisions disagree")
            per[name].append(ms)
            if progress:
                progress(f"{name} (round {r + 1}/{rounds})")
    return {name: float(np.median(v)) for name, v in per.items()}


BEST_WHOLE_TOLERANCE = 0.005


def best_whole(whole: Mapping[str, Mapping[str, float]], tolerance: float = BEST_WHOLE_TOLERANCE) -> dict[str, Any]:
    """The whole model a user would ship on this device: of ``whole`` ({precision: {"accuracy", "latency_ms"}},
    measured in one run), the cheapest precision whose accuracy is within ``tolerance`` of fp32's (of the most
    accurate one's when there is no fp32). Every saving edgequee claims is against this model."""
    if not whole:
        raise DataError("no whole-model measurements to choose the best whole model from")
    ref = whole["fp32"]["accuracy"] if "fp32" in whole else max(w["accuracy"] for w in whole.values())
    ok = [p for p, w in whole.items() if w["accuracy"] >= ref - tolerance - 1e-12]
    p = min(ok, key=lambda q: whole[q]["latency_ms"])
    return {"precision": p, "accuracy": float(whole[p]["accuracy"]), "latency_ms": float(whole[p]["latency_ms"]),
            "rule": f"cheapest whole-model precision with accuracy within {100 * tolerance:g} pt of "
                    f"{'fp32' if 'fp32' in whole else 'the most accurate'}, measured in the same run"}


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
    rounds: int = 3,
    progress: Progress | None = None,
    policy: Policy | None = None,
) -> dict:  # type: ignore[type-arg]
    """Run the benchmark; returns the JSON-ready report (see module docstring).

    Every latency (whole models, threshold policies, ``policy``) is measured in ``rounds`` interleaved rounds
    (``measure_interleaved``) on the first ``latency_samples`` images. ``policy`` (e.g. the bundle's stored,
    calibrated one) adds a row run through the runtime loop on every image. ``best_whole`` is the whole model a user
    would ship here (``best_whole``), and every policy row carries its latency as a ratio to it.
    """
    m = bundle.manifest
    precisions = list(precisions or m.precisions)
    if len(images) == 0:
        raise DataError("no test images to benchmark; pass --data with at least one labelled image")
    labels = check_labels(labels, len(m.classes), "bench labels", m.classes)
    if len(labels) != len(images):
        raise DataError(f"{len(images)} test images but {len(labels)} labels; give one label per image")
    check_images(images, m.input)
    if images.ndim != 4:
        raise DataError(f"images must be a batch (N, H, W, C), got shape {images.shape}")
    if latency_samples < 1:
        raise DataError(f"latency_samples must be >= 1, got {latency_samples}")
    lat_x = images[:latency_samples]
    runner = EdgeRunner(bundle, ThresholdPolicy(precisions[0]), num_threads=num_threads)
    n_points = len(m.whole_model) + len(precisions) * len(thresholds) + (policy is not None)
    n_split = 2 * sum(p in m.whole_model for p in precisions)
    tick = Ticker(len(m.whole_model) + len(precisions) + (policy is not None) + rounds * n_points + n_split, progress)

    points: dict[str, Point] = {}
    whole = {}
    for p in m.whole_model:
        wr = WholeModelRunner(bundle, p, num_threads=num_threads)
        whole[p] = {"accuracy": float((wr.logits(images).argmax(1) == labels).mean())}
        points[f"whole {p}"] = (p, None)
        tick(f"whole model {p} accuracy")
    rows, exit_accuracy = [], {}
    macs = np.asarray(m.cumulative_macs(), np.float64)
    for p in precisions:
        logits = runner.all_exits(images, [p] * m.num_exits)
        max_p, top = max_softmax(logits), logits.argmax(-1)
        exit_accuracy[p] = [float(a) for a in (top == labels[:, None]).mean(0)]
        for t in thresholds:
            ex = exits_for_threshold(max_p, t)
            pred = top[np.arange(len(ex)), ex]
            name = f"threshold {p} {t}"
            points[name] = (ThresholdPolicy(p, t), np.stack([ex, pred], 1)[: len(lat_x)])
            rows.append((name, {
                "name": "threshold",
                "precision": p,
                "threshold": None if math.isinf(t) else t,
                "accuracy": float((pred == labels).mean()),
                "mean_macs": float(macs[ex].mean()),
                "exit_histogram": np.bincount(ex, minlength=m.num_exits).tolist(),
            }))
        tick(f"exit traces {p}")
    if policy is not None:
        row, expected = _policy_row(bundle, policy, images, labels, num_threads, macs)
        points["stored"] = (policy, expected[: len(lat_x)])
        rows.append(("stored", row))
        tick(f"{policy.name} (stored) on every image")
    measured = measure_interleaved(bundle, points, lat_x, rounds=rounds, num_threads=num_threads, progress=tick)
    for p in whole:
        whole[p]["latency_ms"] = measured[f"whole {p}"]
    best = best_whole(whole)
    policies = []
    for name, row in rows:
        lat = measured[name]
        policies.append({**row, "mean_latency_ms": lat, "latency_vs_best_whole": lat / best["latency_ms"]})
    split_overhead, gated_overhead = {}, {}
    for p in precisions:
        if p in whole:
            split_overhead[p] = measure_split_overhead(bundle, lat_x, p, num_threads, rounds=3)["ratio"]
            tick(f"split overhead {p}")
            gated_overhead[p] = measure_split_overhead(bundle, lat_x, p, num_threads, rounds=3, gated=True)["ratio"]
            tick(f"split overhead {p}, gated")
    return {
        "model": m.model,
        "machine": machine_info(),
        "n_images": int(len(images)),
        "latency_samples": int(len(lat_x)),
        "rounds": rounds,
        "threads": num_threads,
        "exit_accuracy": exit_accuracy,
        "whole_model": whole,
        "best_whole": best,
        "policies": policies,
        "split_overhead": split_overhead,
        "split_overhead_gated": gated_overhead,
    }


def _policy_row(bundle: Bundle, policy: Policy, images: np.ndarray, labels: np.ndarray, num_threads: int,
                macs: np.ndarray) -> tuple[dict, np.ndarray]:  # type: ignore[type-arg]
    """One policy run through the runtime loop on every image (no traces needed, so any policy works): its row
    (latency filled in by the caller) and its (exit, class) per image."""
    runner = EdgeRunner(bundle, policy, num_threads=num_threads)
    results = [runner.classify(im) for im in images]
    got = np.array([(r.exit_index, r.class_id) for r in results])
    knob = getattr(policy, "knob", None)
    value = getattr(policy, knob) if knob else None
    return {
        "name": f"{policy.name} (stored)",
        "precision": "/".join(policy.precisions),
        "threshold": None if value is None or math.isinf(value) else value,
        "accuracy": float((got[:, 1] == labels).mean()),
        "mean_macs": float(macs[got[:, 0]].mean()),
        "exit_histogram": np.bincount(got[:, 0], minlength=bundle.manifest.num_exits).tolist(),
        "certified": (cert := runner.certificate) is not None and cert.feasible,
    }, got
