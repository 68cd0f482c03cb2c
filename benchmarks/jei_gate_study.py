"""Why JEI's gates lose to the max-softmax threshold here: the gate objective, not the training, is the limit.

    python benchmarks/jei_gate_study.py --json benchmarks/results/jei_gate_study.json

Uses the caches of benchmarks/jei.py (run it, or ``benchmarks/jei.py --only-cache``, first): the frozen ResNet-56's
exit-head inputs for the first 20,000 training images and the 10,000 test images, the baseline's pool heads
(runs/resnet56_every3_pool.pt) and exit costs from runs/resnet56.bundle's host profile.

Every curve is scored on the evaluation half of the test split (test[5000:]) with costs priced by the measured
profile (cumulative block cost of the exit taken), against the max-softmax threshold at ``bench.DEFAULT_THRESHOLDS``:
``dominance`` is the share of those threshold points for which some knob value of the gate policy is at least as
accurate at no more priced cost (the knob swept over ``JeiPolicy.knob_grid``, i.e. the best any measured subset of
points could do). ``gap_pt`` is, per threshold point, the best gate accuracy at no more cost minus the threshold's.

Gate sets compared, all linear on the four softmax statistics, exit rule "first gate ≥ knob" (``edgequee.jei``):
- ``jei``: ``converters.jei.train_jei`` as benchmarks/jei.py runs it (bi-level, heads trained too), λ grid;
- ``logistic``: each gate fitted to convergence (L-BFGS) on JEI's targets 1[l ≥ l*], l* = argmin CE_l + λ·c_l, with
  the baseline heads frozen: on the training images or on held-out test[0:5000], with or without the official
  pos-weights; this is the best a JEI gate can fit its own targets;
- ``logistic_01``: the same with l* from 0/1 errors instead of cross-entropy (a diagnostic, not JEI);
- ``max_prob_family``: the gate w = (k, 0, 0, 0), b = −k·c — JEI's gate family contains the threshold rule: at
  the knobs σ(k(t − c)) of the threshold points it is the threshold policy, dominance 1.0 (a check of the
  scoring, and the proof that the family is not what limits JEI).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.jei import cached_features  # noqa: E402
from converters.jei import exit_ce, exit_costs, gate_targets, logits_from_cache, pos_weights, train_jei  # noqa: E402
from converters.multiexit import load_checkpoint  # noqa: E402
from edgequee.bench import DEFAULT_THRESHOLDS, exits_for_threshold  # noqa: E402
from edgequee.bundle import write_json_atomic  # noqa: E402
from edgequee.data import load_dataset  # noqa: E402
from edgequee.features import softmax_stats  # noqa: E402
from edgequee.jei import JeiPolicy, exit_scores  # noqa: E402
from edgequee.policies import max_softmax  # noqa: E402

LAMBDAS = (0.2, 0.5, 1.0, 2.0)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def curve(logits: np.ndarray, scores: np.ndarray, labels: np.ndarray, cum_cost: np.ndarray,
          knobs: np.ndarray) -> list[tuple[float, float]]:
    """(accuracy, mean priced cost) of "exit at the first score ≥ knob" for every knob; scores (N, L-1)."""
    top = logits.argmax(-1)
    padded = np.pad(scores, ((0, 0), (0, 1)))
    out = []
    for k in knobs:
        ex = exits_for_threshold(padded, k)
        out.append((float((top[np.arange(len(ex)), ex] == labels).mean()), float(cum_cost[ex].mean())))
    return out


def score(points: list[tuple[float, float]], baseline: list[tuple[float, float]]) -> dict:
    gaps = [max([a for a, c in points if c <= bc + 1e-9], default=0.0) - ba for ba, bc in baseline]
    return {"dominance": float(np.mean([g >= -1e-12 for g in gaps])), "gap_pt": [round(100 * g, 2) for g in gaps]}


def fit_logistic(stats: np.ndarray, targets: torch.Tensor, pos_weight: torch.Tensor | None) -> np.ndarray:
    """Per gate, logistic regression of the targets on the 4 statistics to convergence: (L-1, 5) = [w, b]."""
    gates = np.zeros((stats.shape[1], 5))
    for g in range(stats.shape[1]):
        x = torch.from_numpy(stats[:, g].astype(np.float32))
        mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
        xs = (x - mu) / sd
        w = torch.zeros(4, requires_grad=True)
        b = torch.zeros(1, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")
        pw = None if pos_weight is None else pos_weight[g]

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(xs @ w + b, targets[:, g], pos_weight=pw)
            loss.backward()
            return loss

        opt.step(closure)
        w_raw = (w / sd).detach()
        gates[g, :4] = w_raw.numpy()
        gates[g, 4] = float(b.detach() - (w_raw * mu).sum())
    return gates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10.npz"))
    ap.add_argument("--bundle", default="runs/resnet56.bundle")
    ap.add_argument("--checkpoint", default="runs/resnet56_every3_pool.pt")
    ap.add_argument("--n-train", type=int, default=20000)
    ap.add_argument("--cache-dir", default="runs")
    ap.add_argument("--json", default="benchmarks/results/jei_gate_study.json")
    args = ap.parse_args()
    data = load_dataset(args.data).subset(n_train=args.n_train)
    ckpt = Path(args.checkpoint)
    f_train = cached_features(ckpt, data.x_train, "train", Path(args.cache_dir))
    f_test = cached_features(ckpt, data.x_test, "test", Path(args.cache_dir))
    base = load_checkpoint(ckpt)
    cost = exit_costs(base, args.bundle, "host")
    cum_cost = np.asarray(cost.raw)
    cost_t = torch.tensor(cost.values, dtype=torch.float32)
    y = data.y_test
    fit_rows, ev = np.arange(len(y) // 2), np.arange(len(y) // 2, len(y))
    knobs = JeiPolicy("fp32").knob_grid()

    test_logits = logits_from_cache(base, f_test)
    mp = max_softmax(test_logits[ev])
    top = test_logits[ev].argmax(-1)
    baseline = []
    for t in DEFAULT_THRESHOLDS:
        ex = exits_for_threshold(mp, t)
        baseline.append((float((top[np.arange(len(ex)), ex] == y[ev]).mean()), float(cum_cost[ex].mean())))
    report: dict = {"evaluation": f"test[{ev[0]}:{ev[-1] + 1}], cost priced by {cost.source}",
                    "threshold_curve": [{"threshold": None if np.isinf(t) else t, "accuracy": a, "cost_ms": c}
                                        for t, (a, c) in zip(DEFAULT_THRESHOLDS, baseline)],
                    "exit_costs_ms": list(cost.raw), "rows": []}

    def add(kind: str, gates: np.ndarray, logits: np.ndarray, grid: np.ndarray = knobs, **info: object) -> None:
        row = {"kind": kind, **info, **score(curve(logits[ev], exit_scores(gates, logits)[ev], y[ev], cum_cost,
                                                    grid), baseline)}
        report["rows"].append(row)
        log(f"{kind} {info}: dominance {row['dominance']:.3f}, gap {row['gap_pt']}")

    # sanity: the threshold rule inside JEI's gate family
    k, c = 10.0, 0.9  # knob t ↔ max prob ≥ c + logit(t)/k; scored at the knobs of the threshold points
    at_thresholds = np.array([np.inf if np.isinf(t) else 1 / (1 + np.exp(-k * (t - c))) for t in DEFAULT_THRESHOLDS])
    add("max_prob_family", np.tile([k, 0.0, 0.0, 0.0, -k * c], (base.num_exits - 1, 1)), test_logits, at_thresholds)

    train_logits = logits_from_cache(base, f_train)
    sources = {"train": (train_logits, data.y_train), "test[0:5000]": (test_logits[fit_rows], y[fit_rows])}
    for lam in LAMBDAS:
        for src, (logits, labels) in sources.items():
            lab = torch.from_numpy(labels.astype(np.int64))
            lg = torch.from_numpy(logits)
            stats = softmax_stats(logits[:, :-1])
            for targets_from, loss in (("cross-entropy", exit_ce(lg, lab)),
                                       ("0/1 error", (lg.argmax(-1) != lab[:, None]).float())):
                best, targets = gate_targets(loss, cost_t, lam)
                for pw in (False, True) if targets_from == "cross-entropy" else (False,):
                    gates = fit_logistic(stats, targets, pos_weights(best, base.num_exits - 1) if pw else None)
                    add("logistic" if targets_from == "cross-entropy" else "logistic_01", gates, test_logits,
                        lam=lam, fitted_on=src, pos_weight=pw, targets=targets_from)
        model = load_checkpoint(ckpt)
        trained = train_jei(model, data.x_train, data.y_train, cost, lam=lam, features=f_train)
        add("jei", np.asarray(trained["policy"]["gates"]), logits_from_cache(model, f_test), lam=lam,
            fitted_on="train", loss="weighted")
    best = max(report["rows"][1:], key=lambda r: r["dominance"])
    report["best_gate_dominance"] = best["dominance"]
    report["best_gate"] = {k: v for k, v in best.items() if k != "gap_pt"}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(args.json), report)
    print(json.dumps({"best_gate_dominance": report["best_gate_dominance"], "best_gate": report["best_gate"]},
                     indent=1))
    log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
