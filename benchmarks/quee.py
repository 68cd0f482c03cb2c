"""QuEE on ResNet-56 (9 exits) / CIFAR-10: accuracy vs measured latency against quantization only, early exit only
and the oracle, and the policies QuEE picks for the same λ under different devices' cost models.

Runs from a fresh clone with one command: the ResNet-56 bundle (runs/resnet56.bundle) and its exit heads are made
and profiled here when missing (``benchmarks/_artifacts.py``; --models is the pretrained checkpoints folder).

Every saving is against ``best_whole``, the whole model a user would ship on the device: the cheapest whole-model
precision within 0.5 pt of fp32 (``edgequee.bench.best_whole``), measured in the same run (priced per device for
the priced ratios). The JSON records the machine (CPU model, the ISA flags that decide int8 speed, runtime).

Data: test split of ../shared/data/cifar10.npz (JPEG-q75 derived; the split is shuffled, so slices are roughly
class-balanced): images [0, n_cal) calibrate (the predictors are fitted there, with ``--augment`` augmented copies
of each: mirror, then random crop + mirror), images [5000, 5000 + n_eval) evaluate — disjoint. Path traces (real TFLite logits along every path of QuEE's class at fp32 and int8) are cached
in chunks of 500 images under runs/quee_traces/ (resumable).

Every policy point is **measured** in the runtime loop on this machine (``EdgeRunner.classify`` on
``--latency-samples`` evaluation images; each point is timed in ``--rounds`` interleaved rounds and the median of
the round means is kept, so a burst of load on the shared machine hits one round, not one policy; the runtime's
answers are checked against the vectorised ones) and **priced** under the rpi4, rpi5 and coral-usb-rpi4 cost
models (mean cost of the paths taken, hand-overs included). Accuracy is over all evaluation images (vectorised
decisions on the traces, identical to the runtime's). Host pricing uses the measured profile profiles/host.json;
it has no hand-over timings, so those come from the x86-host descriptor.

    python benchmarks/quee.py --data ../shared/data/cifar10.npz --models ../shared/models/akamaster_resnet_cifar10 \
        --json benchmarks/results/quee.json --plot benchmarks/results/quee.png
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _artifacts import resnet56_bundle  # noqa: E402
from edgequee.bench import best_whole, measure_interleaved, measure_split_overhead  # noqa: E402
from edgequee.bundle import json_default, load_bundle, sha256_file, write_json_atomic  # noqa: E402
from edgequee.calibrate import fingerprint  # noqa: E402
from edgequee.cost import CostModel  # noqa: E402
from edgequee.data import augmented_copies, load_dataset  # noqa: E402
from edgequee.policies import ExitState, ThresholdPolicy  # noqa: E402
from edgequee.quee import (PathDecisions, PathTraces, QueePolicy, choose_precisions, cost_arrays,  # noqa: E402
                           fit_policy, path_costs, trace_paths)
from edgequee.runtime import WholeModelRunner  # noqa: E402
from edgequee.sysinfo import machine_info  # noqa: E402

PRECISIONS = ("fp32", "int8")
DEVICES = {"host": "x86-host", "rpi4": None, "rpi5": None, "coral-usb-rpi4": None}  # cost model: descriptor
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, math.inf)
CHUNK = 500


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def path_traces(bundle_dir: Path, images: np.ndarray, cache_dir: Path) -> PathTraces:
    """Path traces of ``images``, in chunks cached under ``cache_dir`` (keyed on the manifest and the chunk's
    sha256)."""
    bundle = load_bundle(bundle_dir)
    manifest = sha256_file(bundle_dir / "manifest.json")
    cache_dir.mkdir(parents=True, exist_ok=True)
    parts, t0 = [], time.perf_counter()
    for start in range(0, len(images), CHUNK):
        chunk = images[start:start + CHUNK]
        key = f"{manifest}/{fingerprint(chunk)}/{','.join(PRECISIONS)}"
        file = cache_dir / f"{bundle.manifest.model}_{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
        if file.is_file():
            parts.append(PathTraces.load(file)[0])
            continue
        parts.append(trace_paths(bundle, chunk, PRECISIONS))
        parts[-1].save(file, key=key)
        log(f"path traces {start + len(chunk)}/{len(images)} ({time.perf_counter() - t0:.0f} s)")
    return PathTraces.concat(parts)


# ---------------------------------------------------------------------------------------------- measuring


def gate_us(policy: QueePolicy, traces: PathTraces, n: int = 3000, repeats: int = 5) -> float:
    """Mean time of one ``decide`` on real states (the policy's own paths on evaluation images), best of
    ``repeats`` (the least disturbed by other work on the machine)."""
    d = policy.simulate(traces)
    names = policy.precisions
    logits = {(a, s, q): traces.path(names[a], s, names[q]) for a, s, q in set(zip(d.start, d.switch, d.to))}
    states = []
    for k in range(min(n, len(d.exit))):
        path = [names[d.to[k]] if 0 < d.switch[k] <= i else names[d.start[k]] for i in range(d.exit[k] + 1)]
        for l in range(min(d.exit[k] + 1, traces.num_exits - 1)):  # the states the runtime asked the gate about
            states.append(ExitState(l, logits[d.start[k], d.switch[k], d.to[k]][k, l].copy(), path[:l + 1]))
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        for st in states:
            policy.decide(st)
        best = min(best, (time.perf_counter() - t0) / len(states))
    return best * 1e6


# ------------------------------------------------------------------------------------------------ analysis


def threshold_decisions(traces: PathTraces, precision: str, t: float) -> PathDecisions:
    i = PRECISIONS.index(precision)
    d = ThresholdPolicy(precision, t).exits_for_knob(traces, t, {p: np.zeros(traces.num_exits) for p in PRECISIONS})
    n = len(d.exit)
    return PathDecisions(d.exit, d.logits, d.cost, np.full(n, i), np.zeros(n, np.int64), np.full(n, i), PRECISIONS)


def oracle(traces: PathTraces, labels: np.ndarray, block: np.ndarray) -> tuple[float, float]:
    """(accuracy, mean cost) of the oracle: the cheapest (constant precision, exit) that is correct; the cheapest
    exit when none is."""
    cum = np.cumsum(block, 1)  # (P, L)
    correct = np.stack([traces.logits[p].argmax(-1) == labels[:, None] for p in PRECISIONS], 1)  # (N, P, L)
    cost = np.where(correct, cum[None], np.inf).reshape(len(labels), -1).min(1)
    ok = np.isfinite(cost)
    return float(ok.mean()), float(np.where(ok, cost, cum.min()).mean())


def dominance(quee: list[tuple[float, float]], base: list[tuple[float, float]]) -> float:
    """Share of the baseline's (accuracy, latency) points where some QuEE point is at least as accurate for no more
    latency."""
    return float(np.mean([any(a >= ab and c <= cb for a, c in quee) for ab, cb in base]))


def summarize(d: PathDecisions, labels: np.ndarray, priced: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict:
    int8 = d.precisions.index("int8") if "int8" in d.precisions else -1
    runs_int8 = np.where((d.switch > 0) & (d.switch <= d.exit), d.to, d.start) == int8
    return {
        "accuracy": float((d.logits.argmax(1) == labels).mean()),
        "mean_exit": float(d.exit.mean()),
        "exit_histogram": np.bincount(d.exit, minlength=9).tolist(),
        "start_int8": float((d.start == int8).mean()),
        "switched": float(((d.switch > 0) & (d.switch <= d.exit)).mean()),
        "ends_int8": float(runs_int8.mean()),
        "priced_ms": {dev: float(path_costs(d, *tables).mean()) for dev, tables in priced.items()},
    }


def sweep_points(rows: list[dict], n: int, span: float) -> list[int]:
    """Indices of up to ``n`` rows on the host-priced Pareto front of ``rows`` (the λ sweep on the calibration
    images, so the evaluation images play no part in which λ are timed) down to ``span`` below the safe end's
    accuracy, spread evenly over it (safe end included)."""
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["priced_ms"]["host"], -rows[i]["accuracy"]))
    front, best = [], -1.0
    for i in order:
        if rows[i]["accuracy"] > best:
            front.append(i)
            best = rows[i]["accuracy"]
    front = [i for i in front if rows[i]["accuracy"] >= rows[0]["accuracy"] - span] or front
    pick = np.unique(np.round(np.linspace(0, len(front) - 1, min(n, len(front)))).astype(int))
    return sorted({front[i] for i in pick} | {0})


def run(args: argparse.Namespace) -> dict:  # type: ignore[type-arg]
    bundle_dir = Path(args.bundle)
    bundle = resnet56_bundle(args.data, Path(args.models), bundle_dir)
    ds = load_dataset(args.data)
    cal = np.arange(args.n_cal)
    ev = np.arange(5000, 5000 + args.n_eval)
    traces = path_traces(bundle_dir, ds.x_test[np.concatenate([cal, ev])], Path(args.cache_dir))
    tr_cal, tr_ev = traces.subset(np.arange(len(cal))), traces.subset(np.arange(len(cal), len(cal) + len(ev)))
    y_cal, y_ev, x_ev = ds.y_test[cal], ds.y_test[ev], ds.x_test[ev]
    fit_traces, fit_labels, groups = tr_cal, y_cal, np.arange(len(cal))  # augmented copies: predictors only
    if args.augment:
        extra = path_traces(bundle_dir, augmented_copies(ds.x_test[cal], args.augment), Path(args.cache_dir))
        fit_traces = PathTraces.concat([tr_cal, extra])
        fit_labels, groups = np.tile(y_cal, args.augment + 1), np.tile(groups, args.augment + 1)
    cms = {d: CostModel.for_bundle(bundle, d, descriptor=desc) for d, desc in DEVICES.items()}
    precisions = {d: tuple(p for p in choose_precisions(cm) if p in PRECISIONS) for d, cm in cms.items()}
    log(f"precisions per device: {precisions}")
    priced = {d: cost_arrays(cm, PRECISIONS) for d, cm in cms.items()}
    fitted: dict[tuple[str, ...], QueePolicy] = {}  # one set of predictors per precision set, priced per device
    for d, cm in cms.items():
        if precisions[d] not in fitted:
            t0 = time.perf_counter()
            fitted[precisions[d]] = fit_policy(fit_traces, fit_labels, cm, precisions=precisions[d], groups=groups)
            log(f"{'/'.join(precisions[d])} predictors fitted in {time.perf_counter() - t0:.0f} s: "
                f"{fitted[precisions[d]].fit_report}")
    policies = {d: fitted[precisions[d]].for_device(cm) for d, cm in cms.items()}
    host = policies["host"]

    # λ sweep per device (vectorised), priced everywhere
    curves = {}
    for dev, pol in policies.items():
        curves[dev] = []
        for lam in pol.knob_grid():
            row = summarize(pol.with_lam(float(lam)).simulate(tr_ev), y_ev, priced)
            curves[dev].append({"lam": float(lam), **row})
    # baselines (vectorised accuracy; priced)
    thresholds = [{"precision": p, "threshold": None if math.isinf(t) else t,
                   **summarize(threshold_decisions(tr_ev, p, t), y_ev, priced)} for p in PRECISIONS for t in THRESHOLDS]
    whole = {p: {"accuracy": float((WholeModelRunner(bundle, p).logits(x_ev).argmax(1) == y_ev).mean()),
                 "priced_ms": {d: cm.whole(p).latency_ms for d, cm in cms.items()}} for p in bundle.manifest.whole_model}
    oracles = {d: dict(zip(("accuracy", "mean_ms"), oracle(tr_ev, y_ev, priced[d][0]))) for d in cms}

    # measured in the runtime loop on this machine
    lat = slice(0, args.latency_samples)
    pick = sweep_points([summarize(host.with_lam(float(lam)).simulate(tr_cal), y_cal, {"host": priced["host"]})
                         for lam in host.knob_grid()], args.points, args.span)
    points: dict[str, Any] = {}
    for i in pick:
        p = host.with_lam(curves["host"][i]["lam"])
        d = p.simulate(tr_ev.subset(np.arange(args.latency_samples)))
        points[f"quee {i}"] = (p, np.stack([d.exit, d.logits.argmax(1)], 1))
    for row in thresholds:
        t = math.inf if row["threshold"] is None else row["threshold"]
        d = threshold_decisions(tr_ev.subset(np.arange(args.latency_samples)), row["precision"], t)
        points[f"threshold {row['precision']} {t}"] = (ThresholdPolicy(row["precision"], t),
                                                       np.stack([d.exit, d.logits.argmax(1)], 1))
    for p in whole:
        points[f"whole {p}"] = (p, None)
    log(f"timing {len(points)} points × {args.latency_samples} images × {args.rounds} rounds")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # uncertified policies, on purpose
        measured = measure_interleaved(bundle, points, x_ev[lat], rounds=args.rounds,
                                       progress=lambda what: what.startswith("whole") and log(what))
    quee_rows = [{**curves["host"][i], "measured_ms": measured[f"quee {i}"]} for i in pick]
    for row in thresholds:
        t = math.inf if row["threshold"] is None else row["threshold"]
        row["measured_ms"] = measured[f"threshold {row['precision']} {t}"]
    for p in whole:
        whole[p]["measured_ms"] = measured[f"whole {p}"]

    q_pts = [(r["accuracy"], r["measured_ms"]) for r in quee_rows]
    full_acc = whole["fp32"]["accuracy"]
    best = best_whole({p: {"accuracy": w["accuracy"], "latency_ms": w["measured_ms"]} for p, w in whole.items()})
    half = [r for r in quee_rows if r["accuracy"] >= full_acc - 0.005]
    at_half = min(half, key=lambda r: r["measured_ms"])
    # the same ratio priced on the Pis: each device's own policy (λ sweep on the evaluation images), its cheapest
    # point within 0.5 pt of the fp32 whole model, against that device's best whole model, both priced there
    priced_ratio, priced_best = {}, {}
    for d in ("rpi4", "rpi5"):
        priced_best[d] = best_whole({p: {"accuracy": w["accuracy"], "latency_ms": w["priced_ms"][d]}
                                     for p, w in whole.items()})
        ok = [r for r in curves[d] if r["accuracy"] >= full_acc - 0.005]
        priced_ratio[d] = min(r["priced_ms"][d] for r in ok) / priced_best[d]["latency_ms"]
    per_precision = {p: dominance(q_pts, [(r["accuracy"], r["measured_ms"]) for r in thresholds
                                          if r["precision"] == p]) for p in PRECISIONS}
    # oracle saving captured at equal accuracy (host-priced, the oracle cannot be run): QuEE's cheapest λ of the sweep
    # with accuracy ≥ the fp32 whole model's
    equal = [r for r in curves["host"] if r["accuracy"] >= full_acc]
    c_full = cms["host"].path(["fp32"] * bundle.manifest.num_exits).latency_ms
    c_quee = min(r["priced_ms"]["host"] for r in equal)
    captured = (c_full - c_quee) / (c_full - oracles["host"]["mean_ms"])
    # decision time: the host's policy at every measured λ > 0, and the Pi 4's (fp32/int8: more options per state)
    # at the same normalised λ
    host_full, rpi4_full = host.block_cost[0].sum(), policies["rpi4"].block_cost[0].sum()
    gate = [gate_us(host.with_lam(r["lam"]), tr_ev) for r in quee_rows if r["lam"] > 0]
    gate_rpi4 = [gate_us(policies["rpi4"].with_lam(r["lam"] * host_full / rpi4_full), tr_ev)
                 for r in quee_rows if r["lam"] > 0]
    # the same λ on every device: the host policy's λ at ≤ 0.5 pt loss
    lam = at_half["lam"] or min(r["lam"] for r in quee_rows if r["lam"] > 0)  # λ > 0: the safe end is device-blind
    same_lam = {d: {"start": pol.with_lam(lam).start(),
                    **summarize(pol.with_lam(lam).simulate(tr_ev), y_ev, {d: priced[d]})}
                for d, pol in policies.items()}
    g = lam * policies["host"].block_cost[0].sum()  # λ × the host's fp32 full cost: error traded per full network
    same_g = {d: {"lam": g / pol.block_cost[0].sum(), "start": pol.with_lam(g / pol.block_cost[0].sum()).start(),
                  **summarize(pol.with_lam(g / pol.block_cost[0].sum()).simulate(tr_ev), y_ev, {d: priced[d]})}
              for d, pol in policies.items()}
    # the runtime's own cost, on the same bundle and machine: the profile's per-block gap, and the no-exit loop ÷ the
    # whole model at 1 and 2 threads (fresh runners each of 11 alternating rounds)
    profile = json.loads((bundle.profiles_dir / "host.json").read_text())
    gap_us = {p: 1e3 * g["value"] for p, g in profile["runtime_overhead_ms"].items()}
    split = {p: {f"threads_{t}": measure_split_overhead(bundle, x_ev[lat], p, t, rounds=11)["ratio"] for t in (1, 2)}
             for p in PRECISIONS}
    log(f"runtime gap µs/block {gap_us}; split overhead {split}")
    return {
        "model": bundle.manifest.model,
        "machine": {**machine_info(), "torch_imported": "torch" in sys.modules},
        "runtime_gap_us_per_block": gap_us,
        "split_overhead": split,
        "best_whole": best,
        "latency_ratio_vs_best_whole_at_half_point_loss": at_half["measured_ms"] / best["latency_ms"],
        "priced_ratio_vs_best_whole": priced_ratio,
        "priced_best_whole": priced_best,
        "data": {"calibration": f"test[0:{args.n_cal}]", "augmented_copies": args.augment,
                 "evaluation": f"test[5000:{5000 + args.n_eval}]",
                 "latency_samples": args.latency_samples, "rounds": args.rounds},
        "precisions_per_device": precisions,
        "predictors": {"/".join(k): p.fit_report for k, p in fitted.items()},
        "pareto_dominance": {
            "vs_early_exit": dominance(q_pts, [(r["accuracy"], r["measured_ms"]) for r in thresholds]),
            "vs_quant_only": dominance(q_pts, [(w["accuracy"], w["measured_ms"]) for w in whole.values()]),
            "vs_early_exit_per_precision": per_precision,
            "definition": "share of the baseline's measured (accuracy, latency) points where a measured QuEE point "
                          "is at least as accurate for no more latency",
        },
        "latency_ratio_vs_int8_whole_at_half_point_loss": at_half["measured_ms"] / whole["int8"]["measured_ms"],
        "half_point_loss_point": at_half,
        "oracle_saving_captured": captured,
        "oracle": oracles,
        "oracle_definition": "cheapest correct (constant precision, exit) per sample, priced; captured = (full − QuEE) "
                             "/ (full − oracle) latency on the host's cost model, QuEE at its cheapest λ with "
                             "accuracy ≥ the fp32 whole model's",
        "gate_us": float(np.mean(gate + gate_rpi4)),
        "gate_us_detail": {"host_policy": gate, "rpi4_policy": gate_rpi4,
                           "definition": "mean µs per decide() on real states, best of 5 passes"},
        "whole_model": whole,
        "quee_measured": quee_rows,
        "threshold": thresholds,
        "quee_sweep": curves,
        "same_lambda": {"lam": lam, "per_device": same_lam},
        "same_normalised_lambda": {"g": g, "per_device": same_g},
    }


def plot(report: dict, out: Path) -> None:  # type: ignore[type-arg]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.8))
    colors = {"fp32": "tab:blue", "int8": "tab:orange"}
    for ax, dev in zip(axes, DEVICES):
        measured = dev == "host"
        key = (lambda r: r["measured_ms"]) if measured else (lambda r: r["priced_ms"][dev])  # noqa: E731
        sweep = report["quee_sweep"][dev]
        ax.plot([r["priced_ms"][dev] for r in sweep], [100 * r["accuracy"] for r in sweep], "-", color="tab:green",
                lw=1, alpha=0.6, label="QuEE λ sweep (priced; each device's own policy)")
        if measured:
            rows = report["quee_measured"]
            ax.plot([key(r) for r in rows], [100 * r["accuracy"] for r in rows], "o-", color="tab:green",
                    label="QuEE (measured)")
        for p in PRECISIONS:
            rows = [r for r in report["threshold"] if r["precision"] == p]
            ax.plot([key(r) for r in rows], [100 * r["accuracy"] for r in rows], "s--", ms=4, color=colors[p],
                    label=f"max-softmax early exit, {p}")
        for p, w in report["whole_model"].items():
            ax.plot(w["measured_ms"] if measured else w["priced_ms"][dev], 100 * w["accuracy"], "*", ms=14,
                    color=colors.get(p, "k"), label=f"whole model {p}")
        o = report["oracle"][dev]
        ax.plot(o["mean_ms"], 100 * o["accuracy"], "kx", ms=10, label="oracle (priced)")
        full = 100 * report["whole_model"]["fp32"]["accuracy"]
        ax.set_ylim(full - 8, max(full, 100 * o["accuracy"]) + 1)
        ax.set_xlabel(f"mean latency per image (ms), {'measured on this machine' if measured else 'priced: ' + dev}")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{report['model']} — {dev}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default=str(ROOT / "runs" / "resnet56.bundle"))
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10.npz"))
    ap.add_argument("--models", default=str(ROOT.parent / "shared" / "models" / "akamaster_resnet_cifar10"),
                    help="The pretrained checkpoints folder (resnet56-*.th), used when the bundle must be made.")
    ap.add_argument("--cache-dir", default=str(ROOT / "runs" / "quee_traces"))
    ap.add_argument("--n-cal", type=int, default=5000, help="Calibration images: test[0:N] (≤ 5000).")
    ap.add_argument("--n-eval", type=int, default=5000, help="Evaluation images: test[5000:5000+N] (≤ 5000).")
    ap.add_argument("--latency-samples", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=7, help="Interleaved timing rounds (the median round is kept).")
    ap.add_argument("--augment", type=int, default=3, help="Augmented copies of each calibration image the "
                    "predictors are also fitted on (0: none).")
    ap.add_argument("--points", type=int, default=30, help="QuEE λ points measured in the runtime loop.")
    ap.add_argument("--span", type=float, default=0.16, help="Measured QuEE points reach this far below the full "
                    "model's accuracy (the early-exit baseline's lowest threshold is ~0.15 below it).")
    ap.add_argument("--traces-only", action="store_true", help="Compute the cached path traces and stop.")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "quee.json"))
    ap.add_argument("--plot", default=str(ROOT / "benchmarks" / "results" / "quee.png"))
    args = ap.parse_args()
    if not (0 < args.n_cal <= 5000 and 0 < args.n_eval <= 5000 and args.latency_samples <= args.n_eval):
        sys.exit("--n-cal and --n-eval must lie in 1..5000, --latency-samples ≤ --n-eval")
    if args.traces_only:
        resnet56_bundle(args.data, Path(args.models), Path(args.bundle))
        ds = load_dataset(args.data)
        idx = np.concatenate([np.arange(args.n_cal), np.arange(5000, 5000 + args.n_eval)])
        path_traces(Path(args.bundle), ds.x_test[idx], Path(args.cache_dir))
        if args.augment:
            path_traces(Path(args.bundle), augmented_copies(ds.x_test[:args.n_cal], args.augment),
                        Path(args.cache_dir))
        return
    report = run(args)
    write_json_atomic(Path(args.json), report)
    plot(report, Path(args.plot))
    log(f"wrote {args.json} and {args.plot}")
    print(json.dumps({k: report[k] for k in ("machine", "best_whole", "latency_ratio_vs_best_whole_at_half_point_loss",
                                             "priced_ratio_vs_best_whole", "pareto_dominance",
                                             "oracle_saving_captured", "gate_us", "runtime_gap_us_per_block",
                                             "split_overhead")}, indent=1, default=json_default))


if __name__ == "__main__":
    main()
