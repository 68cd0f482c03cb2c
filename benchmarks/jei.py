"""JEI-DNN vs the max-softmax threshold on CIFAR-10 ResNet-56 (9 exits): accuracy vs measured latency, ECE, conformal.

    python benchmarks/jei.py --data ../shared/data/cifar10.npz \\
        --json benchmarks/results/jei.json --plot benchmarks/results/jei.png

Inputs (git-ignored, under runs/): ``resnet56.bundle`` (the threshold baseline: pool heads trained by
``edgequee train``, fp32/fp16/int8, ``profiles/host.json`` measured here) and its checkpoint
``resnet56_every3_pool.pt`` (made by benchmarks/foundation.py).

1. Exit costs: ``CostModel.for_bundle(resnet56.bundle, "host")`` at fp32, cumulative, normalised (``exit_costs``).
2. JEI: from the baseline's trained pool heads (so both policies start from the same heads; warm-up done), the
   bi-level phases on cached exit-head inputs of the first ``--n-train`` training images (10 % of them held out for
   the gates' pos-weights), once with the P-weighted head loss and once with the unweighted one (same seed).
3. The weighted model is converted (fp32) to ``runs/jei_resnet56.bundle`` (convert writes the ``jei`` policy).
4. Curves: accuracy of every knob value from the real TFLite exit traces of each bundle on the full 10,000-image
   test split; mean latency measured in the ``EdgeRunner`` loop on ``--latency-samples`` test images per point,
   policies interleaved over ``--rounds`` rounds (median), the runtime's exits checked against the traces.
   The threshold curve is ``bench.DEFAULT_THRESHOLDS``; JEI's points are the knobs whose mean trace cost lies
   nearest to 0.15, 0.20, …, 0.95 of the full network's (placed by cost, not by accuracy), plus the safe end.
   ``dominance_vs_threshold``: share of the threshold curve's points for which some JEI point is at least as
   accurate at no more measured latency.
5. ECE (15 equal-mass bins, full test split) at matched cost: JEI at its trained threshold (0.5) against the
   threshold policy's knob whose mean measured-profile cost is closest; plus both ECE curves.
6. Conformal (α = 0.1): the test split cut at random into a calibration half and an evaluation half, q̂ (per exit
   and global) fitted on the first, coverage measured on the second, over ``--splits`` random cuts.

Feature caches and traces are stored in runs/ (keyed on checkpoint/bundle and data hashes), so reruns are cheap.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.risk import traces as exit_traces  # noqa: E402
from converters.jei import cache_exit_inputs, exit_costs, jei_policy, logits_from_cache, train_jei  # noqa: E402
from converters.jobs import convert_job  # noqa: E402
from converters.multiexit import load_checkpoint, read_checkpoint, save_checkpoint  # noqa: E402
from edgequee.bench import DEFAULT_THRESHOLDS, _mean_latency_ms  # noqa: E402
from edgequee.bundle import json_default, load_bundle, sha256_file, write_json_atomic, write_policy  # noqa: E402
from edgequee.calibrate import fingerprint  # noqa: E402
from edgequee.data import load_dataset  # noqa: E402
from edgequee.errors import InternalError  # noqa: E402
from edgequee.jei import JeiPolicy  # noqa: E402
from edgequee.policies import ThresholdPolicy, Traces, softmax, to_stored  # noqa: E402
from edgequee.runtime import EdgeRunner  # noqa: E402
from edgequee.uncertainty import ece, fit_conformal, prediction_sets, set_coverage  # noqa: E402

ALPHA = 0.1
COST_TARGETS = tuple(np.round(np.arange(0.15, 1.0, 0.05), 2))  # where the JEI curve's points are placed


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _key(*parts: str) -> str:
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:16]


def cached_features(ckpt: Path, x: np.ndarray, name: str, cache_dir: Path) -> list[torch.Tensor]:
    """``cache_exit_inputs`` of the checkpoint's frozen backbone on ``x``, stored in runs/ (keyed on both)."""
    key = _key(sha256_file(ckpt), fingerprint(x))
    path = cache_dir / f"jei_features_{name}_{key}.pt"
    if path.is_file():
        log(f"features from {path}")
        return torch.load(path, weights_only=True)  # a list of float16 tensors written below
    log(f"caching exit-head inputs of {len(x)} {name} images (one backbone pass)")
    t0 = time.perf_counter()
    feats = cache_exit_inputs(load_checkpoint(ckpt), x)
    torch.save(feats, path)
    log(f"cached in {time.perf_counter() - t0:.0f} s → {path}")
    return feats


def trained(loss: str, args: argparse.Namespace, data, feats, cost) -> Path:  # type: ignore[no-untyped-def]
    """The JEI checkpoint for ``loss`` (trained here unless runs/ has it for the same settings)."""
    key = _key(sha256_file(Path(args.checkpoint)), fingerprint(data.x_train, data.y_train), loss, str(args.lam),
               str(args.epochs), str(args.seed), str(cost.values))
    path = Path(args.cache_dir) / f"jei_resnet56_{loss}.pt"
    if path.is_file() and read_checkpoint(path)["extra"].get("bench_key") == key:
        log(f"JEI ({loss}) from {path}")
        return path
    log(f"training JEI gates + heads ({loss} loss, λ={args.lam}) on {len(data.x_train)} images")
    model = load_checkpoint(Path(args.checkpoint))
    report = train_jei(model, data.x_train, data.y_train, cost, lam=args.lam, loss=loss, epochs=args.epochs,
                       seed=args.seed, features=feats)
    save_checkpoint(model, path, extra={"train": {"jei": report}, "jei": report["policy"], "bench_key": key})
    log(f"trained in {report['seconds']:.0f} s; validation {report['val']['accuracy']:.4f} at "
        f"{report['val']['mean_cost']:.3f} of the full cost")
    return path


def points_by_cost(policy, traces: Traces, costs: dict, targets) -> list[float]:  # type: ignore[no-untyped-def]
    """Knob values (from the policy's own grid) whose mean trace cost is nearest to each target fraction."""
    grid = policy.knob_grid()
    mean = np.array([policy.exits_for_knob(traces, k, costs).cost.mean() for k in grid])
    full = mean[0]
    return sorted({float(grid[np.abs(mean / full - t).argmin()]) for t in targets} | {float(grid[0])}, reverse=True)


def evaluate(policy, traces: Traces, labels: np.ndarray, costs: dict) -> dict:  # type: ignore[no-untyped-def]
    """Accuracy, ECE (max prob at the exit taken), mean trace cost and exits of ``policy`` at its own knob."""
    knob = getattr(policy, policy.knob)
    d = policy.exits_for_knob(traces, knob, costs)
    probs = softmax(d.logits)
    correct = probs.argmax(1) == labels
    return {"knob": None if np.isinf(knob) else knob, "accuracy": float(correct.mean()),
            "ece": ece(probs.max(1), correct), "mean_profile_cost_ms": float(d.cost.mean()),
            "exit_histogram": np.bincount(d.exit, minlength=traces.logits["fp32"].shape[1]).tolist(), "exits": d.exit}


def measure(curves: dict, runners: dict, images: np.ndarray, idx: np.ndarray, rounds: int) -> None:
    """Mean latency of every curve point in the EdgeRunner loop: rounds over all points (policies interleaved),
    the median of each point's round means, on ``images[idx]``; the runtime's exits must equal the traces'."""
    lat_x = images[idx]
    order = [(name, i) for i in range(max(len(c) for c in curves.values())) for name in curves if i < len(curves[name])]
    for r in range(rounds):
        for name, i in order:
            pt = curves[name][i]
            runner = runners[name]
            runner.set_policy(pt["policy"])
            lat, results = _mean_latency_ms(runner.classify, lat_x)
            if r == 0 and [x.exit_index for x in results] != pt["exits"][idx].tolist():
                raise InternalError(f"{name} at {pt['knob']}: the runtime loop and the exit traces disagree")
            pt.setdefault("round_latency_ms", []).append(lat)
        log(f"latency round {r + 1}/{rounds}")
    for pts in curves.values():
        for pt in pts:
            pt["mean_latency_ms"] = float(np.median(pt["round_latency_ms"]))


def dominance(jei: list[dict], thr: list[dict]) -> float:
    """Share of threshold points with a JEI point at least as accurate at no more measured latency."""
    won = [any(j["mean_latency_ms"] <= t["mean_latency_ms"] and j["accuracy"] >= t["accuracy"] for j in jei)
           for t in thr]
    return float(np.mean(won))


def conformal_study(probs: np.ndarray, labels: np.ndarray, exits: np.ndarray, splits: int, seed: int) -> dict:
    """Random cal/eval halves of the test split: q̂ on one half, coverage and set size on the other."""
    rng = np.random.default_rng(seed)
    out: dict = {"per_exit": {"coverage": [], "size": []}, "global": {"coverage": [], "size": []}}
    n = len(labels)
    for _ in range(splits):
        perm = rng.permutation(n)
        cal, ev = perm[: n // 2], perm[n // 2:]
        c = fit_conformal(probs[cal], labels[cal], exits[cal], ALPHA)
        for mode, per_exit in (("per_exit", True), ("global", False)):
            cov, size = set_coverage(prediction_sets(probs[ev, exits[ev]], exits[ev], c, per_exit), labels[ev])
            out[mode]["coverage"].append(cov)
            out[mode]["size"].append(size)
    summary = {}
    for mode, r in out.items():
        cov = np.asarray(r["coverage"])
        summary[mode] = {"mean_coverage": float(cov.mean()), "coverage_gap": float(abs(cov.mean() - (1 - ALPHA))),
                         "mean_abs_gap_per_split": float(np.abs(cov - (1 - ALPHA)).mean()),
                         "std_coverage": float(cov.std()), "mean_set_size": float(np.mean(r["size"]))}
    return summary


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.3))
    for name, style in (("threshold", "o-"), ("jei", "s-")):
        pts = sorted(report["curves"][name], key=lambda p: p["mean_latency_ms"])
        lat = [p["mean_latency_ms"] for p in pts]
        ax.plot(lat, [100 * p["accuracy"] for p in pts], style, ms=4, label=report["labels"][name])
        bx.plot(lat, [100 * p["ece"] for p in pts], style, ms=4, label=report["labels"][name])
    op = report["ece"]
    ax.plot(op["jei_point"]["mean_latency_ms"], 100 * op["jei_point"]["accuracy"], "k*", ms=11,
            label="JEI at its trained threshold 0.5")
    ax.set_xlabel(f"mean latency per image (ms, measured in the EdgeRunner loop, {report['latency_samples']} images)")
    ax.set_ylabel("accuracy (%), full 10k test split")
    ax.set_title(f"ResNet-56, 9 exits: dominance_vs_threshold = {report['dominance_vs_threshold']:.2f}")
    bx.set_xlabel("mean latency per image (ms)")
    bx.set_ylabel("ECE (%), 15 equal-mass bins")
    bx.set_title(f"ECE at matched cost: JEI {100 * op['jei']:.2f} %, threshold {100 * op['threshold']:.2f} %")
    for a in (ax, bx):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10.npz"))
    ap.add_argument("--bundle", default="runs/resnet56.bundle", help="threshold baseline bundle (cost source)")
    ap.add_argument("--checkpoint", default="runs/resnet56_every3_pool.pt", help="the baseline's trained heads")
    ap.add_argument("--device", default="host", help="profile/descriptor the exit costs are priced on")
    ap.add_argument("--n-train", type=int, default=20000, help="training images for the JEI phases")
    ap.add_argument("--lam", type=float, default=0.5)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--latency-samples", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--splits", type=int, default=100, help="random cal/eval halves for conformal coverage")
    ap.add_argument("--cache-dir", default="runs")
    ap.add_argument("--json", default="benchmarks/results/jei.json")
    ap.add_argument("--plot", default="benchmarks/results/jei.png")
    ap.add_argument("--only-cache", action="store_true", help="just build the feature caches")
    args = ap.parse_args()
    t_start = time.perf_counter()
    cache_dir = Path(args.cache_dir)
    data = load_dataset(args.data).subset(n_train=args.n_train)
    ckpt = Path(args.checkpoint)
    f_train = cached_features(ckpt, data.x_train, "train", cache_dir)
    f_test = cached_features(ckpt, data.x_test, "test", cache_dir)
    if args.only_cache:
        return
    y = data.y_test
    base_model = load_checkpoint(ckpt)
    cost = exit_costs(base_model, args.bundle, args.device)
    log(f"exit costs (cumulative, normalised; {cost.source}): {np.round(cost.values, 3).tolist()}")
    block_cost = {"fp32": np.diff(cost.raw, prepend=0.0)}  # ms per block, measured profile

    # --- weighted vs unweighted (torch logits of the cached test features; same seed)
    variants, paths = {}, {}
    for loss in ("weighted", "unweighted"):
        paths[loss] = trained(loss, args, data, f_train, cost)
        policy = jei_policy(paths[loss])
        logits = logits_from_cache(load_checkpoint(paths[loss]), f_test)
        tr = Traces({"fp32": logits})
        variants[loss] = {k: v for k, v in evaluate(policy, tr, y, block_cost).items() if k != "exits"}
        variants[loss]["exit_accuracy"] = [float(a) for a in (logits.argmax(2) == y[:, None]).mean(0)]
        variants[loss]["validation"] = read_checkpoint(paths[loss])["extra"]["train"]["jei"]["val"]
    base_logits = logits_from_cache(base_model, f_test)
    variants["baseline_heads"] = {"exit_accuracy": [float(a) for a in (base_logits.argmax(2) == y[:, None]).mean(0)]}

    # --- the weighted model as a bundle (convert writes the jei policy)
    jei_dir = cache_dir / "jei_resnet56.bundle"
    want = jei_policy(paths["weighted"])
    have = load_bundle(jei_dir).policy() if (jei_dir / "manifest.json").is_file() else None
    if have is None or have.name != "jei" or not np.array_equal(have.arrays["gates"], want.gates):
        log(f"converting {paths['weighted']} → {jei_dir} (fp32)")
        convert_job(str(paths["weighted"]), jei_dir, args.data, precisions=("fp32",), overwrite=True)
    bundles = {"threshold": load_bundle(args.bundle), "jei": load_bundle(jei_dir)}

    # --- traces (real TFLite logits of every exit, full test split)
    (cache_dir / "jei_traces").mkdir(exist_ok=True)  # benchmarks/risk.py names its cache by model: keep them apart
    tr = {"threshold": exit_traces(Path(args.bundle), args.data, "fp32", cache_dir)[0],
          "jei": exit_traces(jei_dir, args.data, "fp32", cache_dir / "jei_traces")[0]}
    policies = {"threshold": ThresholdPolicy("fp32"), "jei": jei_policy(paths["weighted"])}
    knobs = {"threshold": list(DEFAULT_THRESHOLDS),
             "jei": points_by_cost(policies["jei"], tr["jei"], block_cost, COST_TARGETS)}
    curves = {}
    for name, pol in policies.items():
        curves[name] = []
        for k in knobs[name]:
            p = type(pol)(**{**pol.params(), "threshold": None if np.isinf(k) else k},
                          **({"arrays": pol.arrays()} if name == "jei" else {}))
            curves[name].append({**evaluate(p, tr[name], y, block_cost), "policy": p})

    # --- latency in the runtime loop
    rng = np.random.default_rng(args.seed)
    lat_idx = rng.permutation(len(y))[: args.latency_samples]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # uncertified policies: this is a benchmark
        runners = {name: EdgeRunner(b, ThresholdPolicy("fp32")) for name, b in bundles.items()}
        measure(curves, runners, data.x_test, lat_idx, args.rounds)
    dom = dominance(curves["jei"], curves["threshold"])
    log(f"dominance_vs_threshold = {dom:.3f}")

    # --- ECE at matched cost: JEI at its trained threshold vs the threshold knob of the nearest mean cost
    jei_op = JeiPolicy(**{**policies["jei"].params(), "threshold": 0.5}, arrays=policies["jei"].arrays())
    jei_eval = evaluate(jei_op, tr["jei"], y, block_cost)
    thr_grid = ThresholdPolicy("fp32").knob_grid()
    thr_costs = np.array([ThresholdPolicy("fp32", k).exits_for_knob(tr["threshold"], k, block_cost).cost.mean()
                          for k in thr_grid])
    thr_k = float(thr_grid[np.abs(thr_costs - jei_eval["mean_profile_cost_ms"]).argmin()])
    thr_eval = evaluate(ThresholdPolicy("fp32", thr_k), tr["threshold"], y, block_cost)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runners["jei"].set_policy(jei_op)
        jei_eval["mean_latency_ms"] = _mean_latency_ms(runners["jei"].classify, data.x_test[lat_idx])[0]

    # --- conformal at the exit taken (α = 0.1), held-out halves of the test split
    probs = {n: softmax(tr[n].logits["fp32"]) for n in tr}
    conformal = {"alpha": ALPHA, "jei": conformal_study(probs["jei"], y, jei_eval["exits"], args.splits, args.seed),
                 "threshold": conformal_study(probs["threshold"], y, thr_eval["exits"], args.splits, args.seed)}
    conformal["coverage_gap"] = conformal["jei"]["per_exit"]["coverage_gap"]
    # the runtime's prediction sets: q̂ from one calibration half stored in the JEI bundle, sets checked on the other
    perm = np.random.default_rng(args.seed).permutation(len(y))
    cal, ev = perm[: len(y) // 2], perm[len(y) // 2:]
    calibrated = jei_op.with_conformal(Traces({"fp32": tr["jei"].logits["fp32"][cal]}), y[cal], ALPHA)
    bundles["jei"] = write_policy(bundles["jei"], to_stored(calibrated))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runner = EdgeRunner(bundles["jei"])
    sets = prediction_sets(probs["jei"][ev, jei_eval["exits"][ev]], jei_eval["exits"][ev], calibrated.conformal)
    check = ev[: args.latency_samples]
    got = [runner.classify(data.x_test[i]).prediction_set for i in check]
    if got != [tuple(np.flatnonzero(s).tolist()) for s in sets[: len(check)]]:
        raise InternalError("Result.prediction_set differs from the vectorised conformal sets")
    conformal["runtime_check"] = {"images": len(check), "coverage": float(np.mean([y[i] in s for i, s in
                                                                                    zip(check, got)])),
                                  "stored_qhat_exit": list(calibrated.conformal.qhat_exit)}

    for pts in curves.values():
        for pt in pts:
            pt.pop("policy")
            pt.pop("exits")
    jei_eval.pop("exits")
    thr_eval.pop("exits")
    report = {
        "model": "resnet56 (akamaster), exits every 3 residual blocks (9 exits), pool heads, fp32, 1 thread",
        "data": f"{args.data}: JEI phases on the first {len(data.x_train)} training images (10 % held out); "
                f"curves, ECE on the full {len(y)}-image test split; conformal on random test halves",
        "exit_costs": dataclasses.asdict(cost),
        "jei": {"lam": args.lam, "epochs": args.epochs, "loss": "weighted", "rule": policies["jei"].rule,
                "start": "the threshold baseline's trained pool heads (warm-up done)", "seed": args.seed},
        "dominance_vs_threshold": dom,
        "ece": {"jei": jei_eval["ece"], "threshold": thr_eval["ece"],
                "matched_on": "mean cost per image from the measured profile (ms)",
                "jei_point": jei_eval, "threshold_point": thr_eval},
        "conformal": conformal,
        "loss_variants": variants,
        "labels": {"threshold": "max-softmax threshold (baseline heads)",
                   "jei": f"JEI gates + heads (λ={args.lam}, weighted), knob swept"},
        "latency_samples": int(len(lat_idx)),
        "rounds": args.rounds,
        "curves": curves,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(args.json), report)
    plot(report, Path(args.plot))
    print(json.dumps({k: report[k] for k in ("dominance_vs_threshold",)} | {
        "ece": {"jei": report["ece"]["jei"], "threshold": report["ece"]["threshold"]},
        "conformal.coverage_gap": conformal["coverage_gap"]}, indent=1, default=json_default))
    log(f"wrote {args.json} and {args.plot}")


if __name__ == "__main__":
    main()
