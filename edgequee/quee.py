"""The ``quee`` policy: QuEE (arXiv 2406.14404) on the device — exit, or continue at precision q — from predicted
probabilities of error, priced by the device's cost model. numpy and plain Python only.

**Path class.** The first block's precision p0 is chosen per λ, before any feature exists:
argmin_q min_m [prior error rate at exit m on the constant path q + λ·cost(blocks 0..m at q)]. After each exit l
the gate picks EXIT or CONTINUE at q, and the precision may change **at most once**; after the switch only EXIT or
continuing at the current precision remain. Why: every switch point multiplies the paths to trace and the
predictors to fit (with one switch, 2 precisions and 9 exits: 2 constant paths + 16 switched ones; two switches
would add ~100 more), while one switch already covers both useful patterns — a cheap int8 start upgraded to fp32
when the gate is unsure, and an accurate start downgraded once the answer looks settled. A reduced precision is
left out by default unless its whole-network cost on the device is at least 5 % below fp32's (``precisions=``
overrides): it never adds accuracy, so one that saves nothing only adds switches driven by the predictors' noise —
fp16 on CPUs without fp16 arithmetic, and int8 on x86 without VNNI (on this AVX2 host int8 is slower than fp32; with
it kept, ResNet-56's learned gate switched ~95 % of samples to int8 at small λ, for ~0.5 pt less accuracy at equal
cost on held-out images).

**Traces** (``trace_paths``, real TFLite blocks): per image, every exit of each constant path p0, and for every
switch boundary s and precision q ≠ p0 the exits s..L-1 of the path [p0]*s + [q]*(L-s). They are computed as a
tree: the constant path runs once, its hidden outputs stay in the p0 graphs' output buffers, and each branch
starts from them through the runtime's own hand-over (``EdgeRunner.boundary``, with the real quantization
parameters). Batched invokes are not possible with these graphs: resizing the batch dimension makes XNNPACK fail
to reshape (the exit head has a Reshape with batch 1 baked in), so the tree is the saving.

**Predictors**, one per state key — unswitched (p0, l), switched (p0, s, q, l) — estimate from the four softmax
statistics of exit l (``edgequee.features``) P̂(error at exit m | path continues at q) for every option
(EXIT = m = l, or (q, m) with m > l). Two kinds, fitted on 80 % of the calibration data and compared by Brier
score on the other 20 %, per key (keys see very different feature distributions: the first exit's features are
spread out, the last ones crowd at max p ≈ 1): **cells** — k-means on the standardised features (K ∈ {8, 16, 32}),
each cell's error rate per option smoothed toward the key's rate with a Beta prior of strength a ∈ {1, 4, 16}
(QuEE's targets smoothed by discretising the feature space); **logistic** — L2-regularised logistic regression
per option on the raw 0/1 targets (Newton). The winner is refitted on all the data it may use. ``calibrate``
fits them on the fitting images plus ``AUGMENT`` label-preserving copies of each (``data.augmented_copies``:
mirror, then random crop + mirror), an image and its copies always on the same side of the Brier hold-out; the
knob and any risk certificate use untouched images only. Why: the learned gate's margin over a max-softmax
threshold is a fraction of a point, and with 5000 images the predictors' variance eats it (ResNet-56, CIFAR-10,
host: QuEE is at least as accurate for no more measured latency at 15 of the threshold baseline's 22 points when
fitted on 5000 images, 18 with 3 copies of each, benchmarks/quee.py; fitted on the evaluation images themselves,
cell predictors dominated all 22 in a priced study, so the data is what is short).

**Decision** at exit l: argmin over options of P̂(err) + λ·cost(blocks l+1..m at q, plus the hand-over into block
l+1 when q changes precision), costs from the device's cost model (latency, energy or weighted), precomputed per
key, so the hot path is the features, one 4-vector dot product per row and an argmin (mean 16 µs per decision in
benchmarks/quee.py on the shared 2-core host, most of it the features). Cells fold the standardisation into a
linear scorer (nearest centroid = argmax of c·z − |c|²/2) and store each cell's decision for the policy's λ. λ = 0 (the safe knob) is special-cased to the full model: every block at the reference
precision (fp32), never an early exit — the reference of every risk.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

import numpy as np

from .errors import BundleError, DataError, DeviceError
from .features import softmax_stats, softmax_stats_one
from .policies import EXIT, Decisions, ExitState, Traces, register_policy
from .progress import Progress

if TYPE_CHECKING:
    from .bundle import Bundle
    from .cost import CostModel

__all__ = ["PathTraces", "PathDecisions", "QueePolicy", "choose_precisions", "trace_paths", "cost_arrays",
           "fit_predictors", "fit_policy", "path_costs", "kmeans", "fit_logistic", "calibrate_quee"]

CELLS, LOGISTIC = 0, 1
_KS = (8, 16, 32)
_PRIOR_STRENGTHS = (1.0, 4.0, 16.0)
_SLACK = 0.05
AUGMENT = 3  # augmented copies per fitting image (see QueePolicy.prepare and the module docstring)


# ------------------------------------------------------------------------------------------------- traces


@dataclass(frozen=True)
class PathTraces(Traces):
    """Traces along QuEE's paths. ``logits[p]`` (N, L, C): every exit of the constant path p (as ``Traces``, so
    constant-precision policies read them unchanged); ``switched[(p0, s, q)]`` (N, L - s, C): exits s..L-1 of the
    path [p0]*s + [q]*(L-s)."""

    switched: Mapping[tuple[str, int, str], np.ndarray] = field(default_factory=dict)

    @property
    def precisions(self) -> tuple[str, ...]:
        return tuple(self.logits)

    @property
    def num_exits(self) -> int:
        return next(iter(self.logits.values())).shape[1]

    def path(self, p0: str, s: int, q: str) -> np.ndarray:
        """(N, L, C) logits of every exit of [p0]*s + [q]*(L-s) (the constant path p0 when s == 0 or q == p0)."""
        const = self.logits[p0]
        if s == 0 or q == p0:
            return const
        return np.concatenate([const[:, :s], self.switched[p0, s, q]], axis=1)

    @functools.cached_property
    def features(self) -> dict[tuple[str, int, str], np.ndarray]:
        """softmax_stats of every exit of every path, keyed like ``path``: (N, L, 4) float64 (computed once)."""
        out = {(p, 0, p): softmax_stats(v) for p, v in self.logits.items()}
        for (p0, s, q), v in self.switched.items():
            out[p0, s, q] = np.concatenate([out[p0, 0, p0][:, :s], softmax_stats(v)], axis=1)
        return out

    def subset(self, rows: np.ndarray) -> "PathTraces":
        return PathTraces({p: v[rows] for p, v in self.logits.items()},
                          {k: v[rows] for k, v in self.switched.items()})

    @classmethod
    def concat(cls, parts: Sequence["PathTraces"]) -> "PathTraces":
        """The traces of several image sets, one after the other."""
        return cls({p: np.concatenate([t.logits[p] for t in parts]) for p in parts[0].logits},
                   {k: np.concatenate([t.switched[k] for t in parts]) for k in parts[0].switched})

    def save(self, file: str | Path, **meta: Any) -> None:
        """One .npz: ``const__<p>`` and ``switch__<p0>__<s>__<q>`` logits, plus ``meta__<name>`` entries."""
        arrays = {f"const__{p}": v for p, v in self.logits.items()}
        arrays |= {f"switch__{p0}__{s}__{q}": v for (p0, s, q), v in self.switched.items()}
        arrays |= {f"meta__{k}": np.asarray(v) for k, v in meta.items()}
        np.savez(file, **arrays)

    @classmethod
    def load(cls, file: str | Path) -> tuple["PathTraces", dict[str, np.ndarray]]:
        """(traces, meta) from ``save``'s file."""
        const, switched, meta = {}, {}, {}
        with np.load(file, allow_pickle=False) as z:
            for name in z.files:
                kind, *rest = name.split("__")
                if kind == "const":
                    const[rest[0]] = z[name]
                elif kind == "switch":
                    switched[rest[0], int(rest[1]), rest[2]] = z[name]
                else:
                    meta[rest[0]] = z[name]
        return cls(const, switched), meta


def choose_precisions(cm: "CostModel", precisions: Sequence[str] | None = None) -> tuple[str, ...]:
    """The precisions QuEE uses on this device: ``precisions`` when given (checked), else the cost model's, keeping a
    reduced precision only where its whole-network cost is at least 5 % below fp32's."""
    have = cm.precisions()
    if precisions:
        bad = [p for p in precisions if p not in have]
        if bad:
            raise BundleError(f"{cm.name} cannot run {', '.join(bad)} of this bundle (it runs {', '.join(have)})")
        return tuple(precisions)
    if "fp32" not in have:
        return have
    n = cm.manifest.num_exits
    full = cm.value(cm.path(["fp32"] * n))
    return tuple(p for p in have if p == "fp32" or cm.value(cm.path([p] * n)) < (1 - _SLACK) * full)


def trace_paths(bundle: "Bundle", images: np.ndarray, precisions: Sequence[str], *, num_threads: int = 1,
                progress: Progress | None = None, label: str = "path traces") -> PathTraces:
    """Real TFLite logits along every path of the class (see the module docstring), as a tree per image."""
    from .policies import ThresholdPolicy
    from .runtime import EdgeRunner

    if len(precisions) == 0:
        raise DataError("trace_paths needs at least one precision")
    runner = EdgeRunner(bundle, ThresholdPolicy(precisions[0]), num_threads=num_threads)
    n, num_exits, classes = len(images), bundle.manifest.num_exits, len(bundle.manifest.classes)
    const = {p: np.empty((n, num_exits, classes), np.float32) for p in precisions}
    branches = [(p0, s, q) for p0 in precisions for s in range(1, num_exits) for q in precisions if q != p0]
    switched = {b: np.empty((n, num_exits - b[1], classes), np.float32) for b in branches}
    stages = {(i, q): runner._stage(i, q) for i in range(num_exits) for q in precisions}
    enter = {b: runner.boundary(b[1], b[0], b[2]) for b in branches}
    step = {(i, q): runner.boundary(i + 1, q, q) for i in range(num_exits - 1) for q in precisions}
    every = max(1, n // 200)
    for k in range(n):
        for p0 in precisions:
            # the p0 graphs keep this image's hidden outputs until they run again: every branch starts from them
            const[p0][k] = runner.all_exits(images[k:k + 1], [p0] * num_exits)[0]
            for p, s, q in (b for b in branches if b[0] == p0):
                enter[p, s, q]()
                out = switched[p, s, q][k]
                for i in range(s, num_exits):
                    st = stages[i, q]
                    st.invoke()
                    st.head()
                    out[i - s] = st.logits
                    if i + 1 < num_exits:
                        step[i, q]()
        if progress and ((k + 1) % every == 0 or k + 1 == n):
            progress(k + 1, n, label)
    return PathTraces(const, switched)


# ---------------------------------------------------------------------------------------------- cost tables


def cost_arrays(cm: "CostModel", precisions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(block (P, L), transition (L, P, P)) in the cost model's objective units: running block i at precision p,
    and the hand-over into block i from p to q."""
    n = cm.manifest.num_exits
    block = np.array([[cm.value(cm.block(i, p)) for i in range(n)] for p in precisions], np.float64)
    trans = np.zeros((n, len(precisions), len(precisions)))
    for i in range(1, n):
        for a, p in enumerate(precisions):
            for b, q in enumerate(precisions):
                if p != q:
                    try:
                        trans[i, a, b] = cm.value(cm.transition(i, p, q))
                    except DeviceError as e:
                        raise DeviceError(
                            f"the cost model for {cm.name} cannot price the {p}→{q} hand-over into block {i} ({e}): "
                            "profile the bundle with transitions (edgequee profile, without --no-transitions) or "
                            "give a device descriptor of that name") from e
    return block, trans


# ------------------------------------------------------------------------------------------- state keys


def _keys(num_precisions: int, num_exits: int) -> list[tuple[int, int, int, int]]:
    """Every gate state (p0, s, q, l) as precision indices; s = 0 and q = p0 while unswitched."""
    out = []
    for p0 in range(num_precisions):
        out += [(p0, 0, p0, l) for l in range(num_exits - 1)]
        for q in range(num_precisions):
            if q != p0:
                out += [(p0, s, q, l) for s in range(1, num_exits) for l in range(s, num_exits - 1)]
    return out


def _options(key: tuple[int, int, int, int], num_precisions: int, num_exits: int) -> list[tuple[int, int]]:
    """The choices at a state: (-1, l) = EXIT, (q, m) = continue at q and (for the score) leave at exit m > l."""
    p0, s, q, l = key
    precs = range(num_precisions) if s == 0 else (q,)
    return [(-1, l)] + [(r, m) for r in precs for m in range(l + 1, num_exits)]


def _branch(key: tuple[int, int, int, int], option: tuple[int, int]) -> tuple[int, int, int]:
    """The path (p0, s, q) an option of a state continues on."""
    p0, s, q, l = key
    r = option[0]
    if r < 0 or r == q:
        return p0, s, q
    return p0, l + 1, r


def _option_costs(key: tuple[int, int, int, int], options: list[tuple[int, int]], block: np.ndarray,
                  trans: np.ndarray) -> np.ndarray:
    """Cost of each option from exit l: blocks l+1..m at q, plus the hand-over into block l+1 when q changes."""
    l, cur = key[3], key[2]
    cum = np.concatenate([np.zeros((len(block), 1)), np.cumsum(block, 1)], 1)  # cum[p, i] = blocks 0..i-1
    return np.array([0.0 if r < 0 else cum[r, m + 1] - cum[r, l + 1] + (trans[l + 1, cur, r] if r != cur else 0.0)
                     for r, m in options])


# ------------------------------------------------------------------------------------------------ predictors


def kmeans(x: np.ndarray, k: int, *, seed: int = 0, iterations: int = 50) -> np.ndarray:
    """Centroids (k', d) of k-means (k-means++ start, Lloyd steps) on x (n, d); k' = min(k, distinct points)."""
    rng = np.random.default_rng(seed)
    distinct = np.unique(x, axis=0)
    k = min(k, len(distinct))
    centers = [distinct[rng.integers(len(distinct))]]
    d2 = ((x - centers[0]) ** 2).sum(1)
    for _ in range(1, k):  # k ≤ distinct points, so some point is still away from every center: d2.sum() > 0
        centers.append(x[rng.choice(len(x), p=d2 / d2.sum())])
        d2 = np.minimum(d2, ((x - centers[-1]) ** 2).sum(1))
    c = np.array(centers, np.float64)
    for _ in range(iterations):
        assign = _nearest(x, c)
        counts = np.bincount(assign, minlength=k)
        sums = np.zeros_like(c)
        np.add.at(sums, assign, x)
        new = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], c)
        if np.allclose(new, c):
            break
        c = new
    return c


def _nearest(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    return (x @ centers.T - 0.5 * (centers ** 2).sum(1)).argmax(1)


def _cell_rates(assign: np.ndarray, y: np.ndarray, k: int, prior: np.ndarray, strength: float) -> np.ndarray:
    """Each cell's error rate per option (k, n_opt), smoothed toward ``prior`` with Beta pseudo-counts."""
    counts = np.bincount(assign, minlength=k)[:, None]
    errors = np.zeros((k, y.shape[1]))
    np.add.at(errors, assign, y)
    return (errors + strength * prior) / (counts + strength)


def fit_logistic(x: np.ndarray, y: np.ndarray, *, l2: float = 1.0, iterations: int = 30) -> np.ndarray:
    """Weights (n_opt, d + 1) = [w, b] of one L2-regularised logistic regression per column of y (n, n_opt) on x
    (n, d), by Newton's method with step halving (the bias gets a 1e-3 penalty, so all-0 or all-1 targets stay
    finite)."""
    n, d = x.shape
    xb = np.concatenate([x, np.ones((n, 1))], 1)
    pen = np.full(d + 1, l2)
    pen[-1] = 1e-3

    def loss(w: np.ndarray, t: np.ndarray) -> float:
        z = xb @ w
        return float(np.logaddexp(0, z).sum() - t @ z + 0.5 * (pen * w * w).sum())

    out = np.zeros((y.shape[1], d + 1))
    for j in range(y.shape[1]):
        t, w = y[:, j].astype(np.float64), np.zeros(d + 1)
        f = loss(w, t)
        for _ in range(iterations):
            p = 0.5 + 0.5 * np.tanh(0.5 * (xb @ w))
            grad = xb.T @ (p - t) + pen * w
            hess = (xb * (p * (1 - p))[:, None]).T @ xb + np.diag(pen)
            step = np.linalg.solve(hess, grad)
            for _ in range(30):
                f_new = loss(w - step, t)
                if f_new <= f:
                    break
                step = step / 2
            else:
                break
            w, done = w - step, f - f_new < 1e-10 * max(1.0, abs(f))
            f = f_new
            if done:
                break
        out[j] = w
    return out


@dataclass(frozen=True)
class _KeyData:
    x: np.ndarray  # (n, 4) features
    y: np.ndarray  # (n, n_opt) 0/1 errors of each option


def _key_data(traces: PathTraces, labels: np.ndarray, precisions: Sequence[str],
              key: tuple[int, int, int, int], options: list[tuple[int, int]]) -> _KeyData:
    p0, s, q, l = key
    x = traces.features[precisions[p0], s, precisions[q]][:, l]
    cols = []
    for opt in options:
        b0, bs, bq = _branch(key, opt)
        logits = traces.path(precisions[b0], bs, precisions[bq])
        cols.append(logits[:, opt[1]].argmax(-1) != labels)
    return _KeyData(x, np.stack(cols, 1).astype(np.float64))


def _brier(pred: np.ndarray, y: np.ndarray) -> float:
    return float(((pred - y) ** 2).mean())


def _standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu, sd = x.mean(0), x.std(0)
    return mu, np.where(sd > 1e-12, sd, 1.0)


def _cell_scorer(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k-means on the standardised features as a linear scorer (k', 5) on raw features: its argmax is the nearest
    centroid, c·(x − μ)/σ − |c|²/2."""
    mu, sd = _standardise(x)
    c = kmeans((x - mu) / sd, k, seed=seed)
    w = c / sd
    return np.concatenate([w, (-(w * mu).sum(1) - 0.5 * (c ** 2).sum(1))[:, None]], 1)


def _fit_logistic_raw(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Logistic weights (n_opt, 5) on raw features (standardised while fitting, folded back)."""
    mu, sd = _standardise(x)
    w = fit_logistic((x - mu) / sd, y)
    a = w[:, :4] / sd
    return np.concatenate([a, (w[:, 4] - (a * mu).sum(1))[:, None]], 1)


def _scores(rows: np.ndarray, x: np.ndarray) -> np.ndarray:
    return x @ rows[:, :4].T + rows[:, 4]


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 + 0.5 * np.tanh(0.5 * z)


def fit_predictors(traces: PathTraces, labels: np.ndarray, precisions: Sequence[str], *, holdout: float = 0.2,
                   groups: np.ndarray | None = None, seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Fit one predictor per state key (module docstring); returns (arrays for ``QueePolicy``, Brier report).

    Each key compares cells (best K and prior strength) and logistic regression by held-out Brier score on a
    ``holdout`` share of the samples, then refits the winner on all of them. ``groups`` (N,): samples of one group
    (an image and its augmented copies) are held out together, so the Brier scores are not flattered by a mirror
    image of a training sample.
    """
    labels = np.asarray(labels)
    n, num_exits = len(labels), traces.num_exits
    groups = np.arange(n) if groups is None else np.asarray(groups)
    if len(groups) != n:
        raise DataError(f"{n} calibration samples but {len(groups)} group ids")
    ids = np.unique(groups)
    if len(ids) < 20:
        raise DataError(f"quee needs at least 20 labelled calibration images to fit its predictors, got {len(ids)}")
    rank = np.argsort(np.random.default_rng(seed).permutation(len(ids)))[np.searchsorted(ids, groups)]
    order = np.argsort(rank, kind="stable")  # samples in a random order of their groups
    cut = max(1, int(round(holdout * len(ids))))
    held, train = order[rank[order] < cut], order[rank[order] >= cut]
    keys = _keys(len(precisions), num_exits)
    kinds, rows, rates, row_off, rate_off = [], [], [], [0], [0]
    sums = {"constant": 0.0, "cells": 0.0, "logistic": 0.0, "chosen": 0.0}
    weight = 0
    chosen_k: list[int] = []
    for key in keys:
        opts = _options(key, len(precisions), num_exits)
        data = _key_data(traces, labels, precisions, key, opts)
        xt, yt, xh, yh = data.x[train], data.y[train], data.x[held], data.y[held]
        best = (math.inf, 0, 0.0)
        for k in _KS:
            scorer = _cell_scorer(xt, k, seed)
            cell_t, cell_h = _scores(scorer, xt).argmax(1), _scores(scorer, xh).argmax(1)
            for a in _PRIOR_STRENGTHS:
                r = _cell_rates(cell_t, yt, len(scorer), yt.mean(0), a)
                best = min(best, (_brier(r[cell_h], yh), k, a))
        b_cells, k_best, a_best = best
        b_logit = _brier(_sigmoid(_scores(_fit_logistic_raw(xt, yt), xh)), yh)
        b_const = _brier(np.broadcast_to(yt.mean(0), yh.shape), yh)
        kind = CELLS if b_cells < b_logit else LOGISTIC
        if kind == CELLS:
            scorer = _cell_scorer(data.x, k_best, seed)
            rows.append(scorer)
            rates.append(_cell_rates(_scores(scorer, data.x).argmax(1), data.y, len(scorer), data.y.mean(0),
                                     a_best).ravel())
            chosen_k.append(len(scorer))
        else:
            rows.append(_fit_logistic_raw(data.x, data.y))
            rates.append(np.zeros(0))
        kinds.append(kind)
        row_off.append(row_off[-1] + len(rows[-1]))
        rate_off.append(rate_off[-1] + len(rates[-1]))
        w = yh.size
        weight += w
        for name, b in (("constant", b_const), ("cells", b_cells), ("logistic", b_logit),
                        ("chosen", min(b_cells, b_logit))):
            sums[name] += b * w
    prior = np.stack([(traces.logits[p].argmax(-1) != labels[:, None]).mean(0) for p in precisions])
    arrays = {
        "keys": np.asarray(keys, np.int32),
        "kinds": np.asarray(kinds, np.int8),
        "rows": np.concatenate(rows).astype(np.float64),
        "row_offsets": np.asarray(row_off, np.int64),
        "rates": np.concatenate(rates).astype(np.float64),
        "rate_offsets": np.asarray(rate_off, np.int64),
        "prior_error": prior,
    }
    report = {
        "n_fit": int(len(train)), "n_held_out": int(len(held)), "images": int(len(ids)), "keys": len(keys),
        "keys_cells": int(sum(k == CELLS for k in kinds)), "keys_logistic": int(sum(k == LOGISTIC for k in kinds)),
        "cells_k": sorted(set(chosen_k)),
        "brier_held_out": {name: v / weight for name, v in sums.items()},
    }
    return arrays, report


# --------------------------------------------------------------------------------------------------- policy


@dataclass(frozen=True)
class PathDecisions(Decisions):
    """Decisions with their paths: start precision (N,), switch block s (N,; 0 = never) and its precision (N,),
    as precision names' indices in ``precisions``."""

    start: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    switch: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    to: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    precisions: tuple[str, ...] = ()


def path_costs(d: PathDecisions, block: np.ndarray, trans: np.ndarray) -> np.ndarray:
    """Cost (N,) of each decision's path under cost tables ``cost_arrays`` (same precision order as ``d``)."""
    i = np.arange(block.shape[1])
    ran = i[None, :] <= d.exit[:, None]
    switched = (d.switch > 0)[:, None] & (i[None, :] >= d.switch[:, None])
    prec = np.where(switched, d.to[:, None], d.start[:, None])
    cost = (block[prec, i[None, :]] * ran).sum(1)
    hop = (d.switch > 0) & (d.switch <= d.exit)
    cost[hop] += trans[d.switch[hop], d.start[hop], d.to[hop]]
    return cost


@register_policy("quee")
class QueePolicy:
    """QuEE's gate (module docstring). ``lam`` (λ) is the knob: error probability traded per unit of cost
    (``objective`` on ``device``); 0 runs the full model at ``reference``.

    ``arrays`` (``fit_predictors`` + ``cost_block`` (P, L), ``cost_transition`` (L, P, P)) hold everything the gate
    needs; without them only λ = 0 runs. ``fit`` keeps the fitting report (Brier scores) for the record.
    """

    name = "quee"
    knob: ClassVar[str] = "lam"
    safe_knob: ClassVar[float] = 0.0

    def __init__(
        self,
        lam: float | None = 0.0,
        *,
        precisions: Sequence[str] = ("fp32",),
        reference: str = "fp32",
        device: str | None = None,
        objective: str = "latency",
        fit: Mapping[str, Any] | None = None,
        arrays: Mapping[str, np.ndarray] | None = None,
    ):
        self.lam = float(lam or 0.0)
        if self.lam < 0 or not math.isfinite(self.lam):
            raise DataError(f"quee's λ must be finite and ≥ 0, got {lam}")
        self._precisions = tuple(precisions)
        self.reference = reference if reference in self._precisions else self._precisions[0]
        self.device, self.objective = device, objective
        self.fit_report = dict(fit) if fit else None
        self._arrays = {k: np.asarray(v) for k, v in (arrays or {}).items()}
        if not self._arrays:
            if self.lam != 0:
                raise BundleError("quee without predictors can only run λ = 0 (the full model): fit it with "
                                  "edgequee calibrate --policy quee")
            self._p0 = self.reference
            return
        a = self._arrays
        self.block_cost, self.transition_cost = a["cost_block"], a["cost_transition"]
        num_p, self.num_exits = self.block_cost.shape
        if num_p != len(self._precisions) or len(a["keys"]) != len(_keys(num_p, self.num_exits)):
            raise BundleError(f"quee arrays ({num_p} precisions, {len(a['keys'])} keys) do not match precisions "
                              f"{self._precisions} with {self.num_exits} exits")
        self._keys = [tuple(int(v) for v in k) for k in a["keys"].tolist()]
        self._p0 = self._start_precision()
        self._gates = {self._name_key(k): self._gate(j, k) for j, k in enumerate(self._keys)}

    # ------------------------------------------------------------------------------------ construction

    def _name_key(self, key: tuple[int, int, int, int]) -> tuple[str, int, str, int]:
        p = self._precisions
        return p[key[0]], key[1], p[key[2]], key[3]

    def _start_precision(self) -> str:
        if self.lam == 0:
            return self.reference
        cum = np.cumsum(self.block_cost, 1)
        value = (self._arrays["prior_error"] + self.lam * cum).min(1)
        return self._precisions[int(value.argmin())]

    def _parts(self, j: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, list[tuple[int, int]]]:
        """Key j's kind, scorer rows (n, 5), cell rates (cells × options, or empty), λ-weighted option costs."""
        a, key = self._arrays, self._keys[j]
        rows = a["rows"][a["row_offsets"][j]:a["row_offsets"][j + 1]]
        opts = _options(key, len(self._precisions), self.num_exits)
        rates = a["rates"][a["rate_offsets"][j]:a["rate_offsets"][j + 1]].reshape(-1, len(opts))
        lam_cost = self.lam * _option_costs(key, opts, self.block_cost, self.transition_cost)
        return int(a["kinds"][j]), rows, rates, lam_cost, opts

    def _gate(self, j: int, key: tuple[int, int, int, int]) -> tuple[Any, ...]:
        """What ``decide`` needs at one state: (w (n, 4), b (n,), cell actions or None, 2λ·cost, option actions)."""
        kind, rows, rates, lam_cost, opts = self._parts(j)
        actions = [EXIT if r < 0 else self._precisions[r] for r, _ in opts]
        w, b = np.ascontiguousarray(rows[:, :4]), rows[:, 4].copy()
        if kind == CELLS:
            return w, b, [actions[i] for i in (rates + lam_cost).argmin(1).tolist()], None, actions
        # sigmoid(z) + λc has the argmin of tanh(z/2) + 2λc
        return 0.5 * w, 0.5 * b, None, 2.0 * lam_cost, actions

    def with_lam(self, lam: float) -> "QueePolicy":
        """The same predictors at another λ."""
        return QueePolicy(lam, **{k: v for k, v in self.params().items() if k != "lam"}, arrays=self._arrays)

    def for_device(self, cm: "CostModel") -> "QueePolicy":
        """The same predictors and λ priced by another device's cost model (its own policy there)."""
        block, trans = cost_arrays(cm, self._precisions)
        return QueePolicy(**{**self.params(), "device": cm.name, "objective": cm.objective},
                          arrays={**self._arrays, "cost_block": block, "cost_transition": trans})

    # ----------------------------------------------------------------------------------------- runtime

    @property
    def precisions(self) -> tuple[str, ...]:
        return self._precisions

    def start(self) -> str:
        return self._p0

    def decide(self, state: ExitState) -> str:
        if self.lam == 0:
            return self.reference
        path = state.path
        q = path[-1]
        w, b, cells, lam_cost, actions = self._gates[path[0], path.index(q), q, state.exit_index]
        z = w @ softmax_stats_one(state.logits.tolist()) + b
        if cells is not None:
            return cells[int(z.argmax())]
        return actions[int((np.tanh(z) + lam_cost).argmin())]

    # ------------------------------------------------------------------------------------ risk control

    def knob_grid(self) -> np.ndarray:
        """0 (the full model), then λ = g / C for g log-spaced over 1e-4 … 3 (160 values), C the full model's cost
        on the device: g is the error probability traded for one whole network's cost. Fixed by the cost model, not
        by the calibration data."""
        if not self._arrays:
            return np.zeros(1)
        full = self.block_cost[self._precisions.index(self.reference)].sum()
        return np.concatenate([[0.0], np.geomspace(1e-4, 3.0, 160) / full])

    def exits_for_knob(self, traces: Traces, knob: float, block_cost: Mapping[str, np.ndarray]) -> PathDecisions:
        """Vectorised decisions at λ = ``knob`` on path traces, the same as the runtime loop's. ``cost`` sums
        ``block_cost`` over the blocks run (the protocol's block costs have no hand-overs; ``path_costs`` prices
        paths with them under any cost model)."""
        pol = self if knob == self.lam else self.with_lam(knob)
        d = pol.simulate(traces)
        table = np.stack([np.asarray(block_cost[p], np.float64) for p in self._precisions])
        no_hops = np.zeros((traces.num_exits, len(table), len(table)))
        return dataclasses.replace(d, cost=path_costs(d, table, no_hops))

    def simulate(self, traces: Traces) -> PathDecisions:
        """Walk every traced sample through the gate (costs in this policy's own objective, hand-overs included)."""
        if not isinstance(traces, PathTraces):
            raise DataError("quee decides along switched paths: it needs PathTraces (quee.trace_paths), not "
                            "constant-precision traces")
        names = self._precisions
        num_exits = traces.num_exits
        n = len(next(iter(traces.logits.values())))
        p0 = names.index(self._p0)
        start = np.full(n, p0)
        switch, to = np.zeros(n, np.int64), np.full(n, p0)
        exit_ = np.full(n, num_exits - 1)
        if self.lam != 0:
            active = np.ones(n, bool)
            for l in range(num_exits - 1):
                for s in np.unique(switch[active]).tolist():
                    for q in np.unique(to[active & (switch == s)]).tolist():
                        rows = np.flatnonzero(active & (switch == s) & (to == q))
                        act = self._batch_actions((p0, s, q, l), traces, rows)
                        leave = act < 0
                        exit_[rows[leave]] = l
                        active[rows[leave]] = False
                        hop = (s == 0) & (act >= 0) & (act != q)
                        switch[rows[hop]], to[rows[hop]] = l + 1, act[hop]
        rows = np.arange(n)
        out = np.empty((n, next(iter(traces.logits.values())).shape[2]), np.float32)
        for s, q in {(int(a), int(b)) for a, b in zip(switch.tolist(), to.tolist())}:
            sel = (switch == s) & (to == q)
            out[sel] = traces.path(names[p0], s, names[q])[rows[sel], exit_[sel]]
        d = PathDecisions(exit_, out, np.zeros(n), start, switch, to, names)
        if not self._arrays:  # λ = 0 without predictors: no cost tables either
            return d
        return dataclasses.replace(d, cost=path_costs(d, self.block_cost, self.transition_cost))

    def _batch_actions(self, key: tuple[int, int, int, int], traces: PathTraces, rows: np.ndarray) -> np.ndarray:
        """Actions (precision index, -1 = EXIT) of samples ``rows`` at state ``key``: the runtime's rule, batched."""
        j = self._key_index[key]
        kind, table, rates, lam_cost, opts = self._parts(j)
        p = self._precisions
        x = traces.features[p[key[0]], key[1], p[key[2]]][rows, key[3]]
        z = _scores(table, x)
        choice = (rates + lam_cost).argmin(1)[z.argmax(1)] if kind == CELLS else \
            (np.tanh(0.5 * z) + 2.0 * lam_cost).argmin(1)
        return np.array([r for r, _ in opts])[choice]

    @functools.cached_property
    def _key_index(self) -> dict[tuple[int, int, int, int], int]:
        return {k: j for j, k in enumerate(self._keys)}

    # ------------------------------------------------------------------------------------------ storage

    def params(self) -> dict[str, Any]:
        return {"lam": self.lam, "precisions": list(self._precisions), "reference": self.reference,
                "device": self.device, "objective": self.objective, "fit": self.fit_report}

    def arrays(self) -> dict[str, np.ndarray]:
        return dict(self._arrays)

    # ------------------------------------------------------------------------------- calibrate hook

    def prepare(self, bundle: "Bundle", images: np.ndarray, labels: np.ndarray | None, *, device: str | None,
                objective: str, precisions: Sequence[str] | None = None, augment: int = AUGMENT,
                num_threads: int = 1, progress: Progress | None = None, fit_share: float = 0.5,
                seed: int = 0) -> tuple["QueePolicy", PathTraces, np.ndarray, np.ndarray]:
        """``edgequee calibrate``'s fit step: path traces of ``images``, predictors fitted on a random
        ``fit_share`` of them plus ``augment`` label-preserving copies of each (``data.augmented_copies``);
        returns (the fitted policy at λ = 0, and the traces, images and labels of the rest, on which the knob is
        then chosen — so a risk certificate is not computed on the data the gate learned from, and never on
        augmented images). ``precisions``: default ``choose_precisions`` on the device."""
        from .cost import CostModel
        from .data import augmented_copies

        if device is None:
            raise DataError("quee prices its paths with a device's cost model: give --device (a profile in "
                            "BUNDLE/profiles or a descriptor, e.g. rpi4)")
        if labels is None:
            raise DataError("quee learns probabilities of error: it needs labelled calibration images (--data)")
        cm = CostModel.for_bundle(bundle, device, objective=objective)
        precisions = choose_precisions(cm, precisions)
        traces = trace_paths(bundle, images, precisions, num_threads=num_threads, progress=progress)
        perm = np.random.default_rng(seed).permutation(len(images))
        cut = int(round(fit_share * len(images)))
        fit_rows, rest = np.sort(perm[:cut]), np.sort(perm[cut:])
        if len(rest) == 0:
            raise DataError(f"{len(images)} calibration images are too few to fit quee and choose its knob")
        fit_traces, fit_labels = traces.subset(fit_rows), labels[fit_rows]
        if augment > 0:
            extra = trace_paths(bundle, augmented_copies(images[fit_rows], augment, seed=seed), precisions,
                                num_threads=num_threads, progress=progress, label="augmented path traces")
            fit_traces, fit_labels = PathTraces.concat([fit_traces, extra]), np.tile(fit_labels, augment + 1)
        groups = np.tile(np.arange(len(fit_rows)), augment + 1)
        policy = fit_policy(fit_traces, fit_labels, cm, precisions=precisions, groups=groups, seed=seed)
        return policy, traces.subset(rest), images[rest], labels[rest]

    def __repr__(self) -> str:
        return (f"QueePolicy(lam={self.lam:g}, precisions={self._precisions}, start={self._p0!r}, "
                f"device={self.device!r}, objective={self.objective!r})")


def fit_policy(traces: PathTraces, labels: np.ndarray, cm: "CostModel", *, lam: float = 0.0,
               precisions: Sequence[str] | None = None, groups: np.ndarray | None = None,
               seed: int = 0) -> QueePolicy:
    """A QuEE policy for the device of ``cm``: predictors fitted on ``traces`` (``groups``: see
    ``fit_predictors``), the device's cost tables."""
    precisions = tuple(precisions or traces.precisions)
    missing = [p for p in precisions if p not in traces.logits]
    if missing:
        raise DataError(f"the traces have no {', '.join(missing)} paths (they have {', '.join(traces.precisions)})")
    arrays, report = fit_predictors(traces, labels, precisions, groups=groups, seed=seed)
    block, trans = cost_arrays(cm, precisions)
    arrays |= {"cost_block": block, "cost_transition": trans}
    return QueePolicy(lam, precisions=precisions, device=cm.name, objective=cm.objective, fit=report,
                      arrays=arrays)


# ------------------------------------------------------------------------------------ calibrate: λ directly


def calibrate_quee(
    bundle: "Bundle",
    images: np.ndarray,
    labels: np.ndarray,
    *,
    device: str,
    objective: str = "latency",
    lam: float | None = None,
    target_accuracy: float | None = None,
    budget_ms: float | None = None,
    precisions: Sequence[str] | None = None,
    augment: int = AUGMENT,
    num_threads: int = 1,
    write: bool = True,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Fit quee and choose λ directly (no risk control, no certificate): ``lam`` as given, the cheapest λ of the
    grid whose accuracy on the held-out calibration traces is ≥ ``target_accuracy``, or the most accurate λ whose
    mean latency there (the device's latency cost model) is ≤ ``budget_ms``. Returns a JSON-ready report."""
    from .calibrate import fingerprint, store_calibrated, versus_best_whole
    from .cost import CostModel
    from .data import check_labels
    from .policies import to_stored

    if sum(v is not None for v in (lam, target_accuracy, budget_ms)) != 1:
        raise DataError("give exactly one of lam, target_accuracy, budget_ms")
    labels = check_labels(labels, len(bundle.manifest.classes), "calibration labels", bundle.manifest.classes)
    fitted, traces, rest_images, rest_labels = QueePolicy().prepare(
        bundle, images, labels, device=device, objective=objective, precisions=precisions, augment=augment,
        num_threads=num_threads, progress=progress)
    grid = fitted.knob_grid() if lam is None else np.array([lam])
    latency_cm = CostModel.for_bundle(bundle, device, objective="latency")
    lat_block, lat_trans = cost_arrays(latency_cm, fitted.precisions)
    acc, ms = [], []
    for k in grid:
        d = fitted.with_lam(float(k)).simulate(traces)
        acc.append(float((d.logits.argmax(1) == rest_labels).mean()))
        ms.append(float(path_costs(d, lat_block, lat_trans).mean()))
    acc_a, ms_a = np.array(acc), np.array(ms)
    if lam is not None:
        index, message = 0, f"λ={lam:g} as given"
    elif target_accuracy is not None:
        ok = np.flatnonzero(acc_a >= target_accuracy)
        index = int(ok[ms_a[ok].argmin()]) if len(ok) else 0
        message = (f"the cheapest λ with accuracy ≥ {target_accuracy:g}" if len(ok) else
                   f"no λ reaches accuracy {target_accuracy:g}; keeping λ=0 (the full model)")
    else:
        ok = np.flatnonzero(ms_a <= budget_ms)
        index = int(ok[np.lexsort((ms_a[ok], -acc_a[ok]))[0]]) if len(ok) else int(ms_a.argmin())
        message = (f"the most accurate λ with mean latency ≤ {budget_ms:g} ms" if len(ok) else
                   f"no λ fits {budget_ms:g} ms; keeping the cheapest")
    chosen = fitted.with_lam(float(grid[index]))
    message += (f": accuracy {acc_a[index]:.4f}, mean latency {ms_a[index]:.3f} ms on {len(rest_labels)} held-out "
                f"calibration images (λ chosen without risk control: no certificate)")
    data_fp = fingerprint(images, labels)
    calibration = {"data_fingerprint": data_fp, "n_cal": int(len(images)), "n_select": int(len(rest_labels)),
                   "labels": True, "device": device, "objective": objective, "selection": message}
    versus = versus_best_whole(bundle, latency_cm, rest_images, rest_labels, float(ms_a[index]),
                               num_threads=num_threads)
    selection = {"index": index, "grid_size": len(grid), "knob": float(grid[index]), "message": message,
                 "accuracy": float(acc_a[index]), "mean_latency_ms": float(ms_a[index]), "risk_control": False,
                 "versus_best_whole": versus}
    return store_calibrated(bundle, to_stored(chosen, calibration=calibration), selection, write)
