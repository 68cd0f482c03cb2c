"""Risk control on CIFAR-10 ResNet-56 exit traces: test risk and cost saving vs ε for naive, CRC, UCB-HB, UCB-WSR, LTT.

As in Fast yet Safe's figures: the threshold policy's knob is calibrated on a random half of the pool (the 10,000
test images) and evaluated on the other half, over many random splits. Per method and ε the JSON gives the mean
test risk, the violation rate (share of splits whose test risk exceeds ε) and the mean saving of the measured
latency (``profiles/host.json``) on the test half, relative to running every block. ``violation_rate`` counts
splits whose test-half risk exceeds ε; ``violation_rate_pool`` those whose risk on the whole pool (the distribution
the calibration half is drawn from, so the quantity the UCB guarantee is about) exceeds ε.

    python benchmarks/risk.py --bundle runs/resnet56.bundle --data ../shared/data/cifar10.npz \
        --json benchmarks/results/risk.json --plot benchmarks/results/risk.png

The exit traces (real TFLite logits of every exit at fp32, ~1 min) are cached in runs/risk_traces_<model>_<p>.npz.
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

from edgequee.bundle import json_default, load_bundle, sha256_file, write_json_atomic  # noqa: E402
from edgequee.calibrate import block_costs, compute_traces, fingerprint, knob_table  # noqa: E402
from edgequee.data import load_dataset  # noqa: E402
from edgequee.policies import ThresholdPolicy, Traces  # noqa: E402
from edgequee.risk import loss_bound, scan  # noqa: E402

METHODS = {"naive": "naive", "crc": "crc", "ucb_hb": "ucb-hb", "ucb_wsr": "ucb-wsr", "ltt": "ltt"}
EPSILONS = (0.01, 0.02, 0.05)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def traces(bundle_dir: Path, data: str, precision: str, cache_dir: Path) -> tuple[Traces, np.ndarray]:
    """Exit logits of every pool image (cached, keyed on the manifest's and the data's sha256)."""
    bundle = load_bundle(bundle_dir)
    ds = load_dataset(data)
    key = f"{sha256_file(bundle_dir / 'manifest.json')}/{fingerprint(ds.x_test, ds.y_test)}"
    cache = cache_dir / f"risk_traces_{bundle.manifest.model}_{precision}.npz"
    if cache.is_file():
        with np.load(cache) as z:
            if str(z["key"]) == key:
                log(f"traces from {cache}")
                return Traces({precision: z["logits"]}), z["labels"]
    log(f"computing {precision} exit traces of {len(ds.x_test)} images")
    t = compute_traces(bundle, ds.x_test, [precision])
    np.savez(cache, logits=t.logits[precision], labels=ds.y_test, key=key)
    return t, ds.y_test


def run(args: argparse.Namespace) -> dict:  # type: ignore[type-arg]
    bundle_dir = Path(args.bundle)
    if not (bundle_dir / "manifest.json").is_file():
        sys.exit(f"{bundle_dir} not found: make it with python benchmarks/foundation.py --data {args.data} "
                 "--models ../shared/models/akamaster_resnet_cifar10 --json runs/foundation.json")
    bundle = load_bundle(bundle_dir)
    tr, labels = traces(bundle_dir, args.data, args.precision, Path(args.cache_dir))
    cost_name, cost = block_costs(bundle, args.device)
    policy = ThresholdPolicy(args.precision)
    table = knob_table(policy, tr, cost, labels, args.risk, args.on)
    full_acc = float((tr.logits[args.precision][:, -1].argmax(1) == labels).mean())
    log(f"{len(table.knobs)} knobs × {len(labels)} images; full-model accuracy {full_acc:.4f}; cost: {cost_name}")
    rng = np.random.default_rng(args.seed)
    n = len(labels)
    n_cal = int(round(args.cal_fraction * n))
    pool_risk = table.losses.mean(1)
    results = {m: {f"{e:g}": {"test_risk": [], "pool_risk": [], "saving": [], "feasible": [], "knob": []}
                   for e in args.epsilons} for m in METHODS}
    t0 = time.perf_counter()
    for s in range(args.splits):
        perm = rng.permutation(n)
        cal, test = perm[:n_cal], perm[n_cal:]
        cal_losses, cal_costs = table.losses[:, cal], table.costs[:, cal]
        test_full_cost = table.costs[0, test].mean()
        for eps in args.epsilons:
            for key, method in METHODS.items():
                sel = scan(table.knobs, cal_losses, cal_costs, epsilon=eps, delta=args.delta, method=method,
                           bound=loss_bound(args.on))
                r = results[key][f"{eps:g}"]
                r["test_risk"].append(float(table.losses[sel.index, test].mean()))
                r["pool_risk"].append(float(pool_risk[sel.index]))
                r["saving"].append(float(1 - table.costs[sel.index, test].mean() / test_full_cost))
                r["feasible"].append(sel.feasible)
                r["knob"].append(sel.knob)
        if (s + 1) % 10 == 0:
            log(f"split {s + 1}/{args.splits} ({time.perf_counter() - t0:.0f} s)")
    report: dict = {  # type: ignore[type-arg]
        "model": bundle.manifest.model,
        "precision": args.precision,
        "risk": args.risk,
        "on": args.on,
        "delta": args.delta,
        "splits": args.splits,
        "n_pool": n,
        "n_cal": n_cal,
        "n_test": n - n_cal,
        "knob_grid_size": int(len(table.knobs)),
        "cost": cost_name,
        "full_model_accuracy": full_acc,
        "saving_definition": "1 − mean cost on the test half at the chosen knob ÷ mean cost with every block run",
        "seconds": round(time.perf_counter() - t0, 1),
    }
    for key, per_eps in results.items():
        report[key] = {}
        for e, r in per_eps.items():
            risk, saving, pool = np.asarray(r["test_risk"]), np.asarray(r["saving"]), np.asarray(r["pool_risk"])
            finite = np.asarray([k for k in r["knob"] if np.isfinite(k)])
            report[key][e] = {
                "mean_test_risk": float(risk.mean()),
                "std_test_risk": float(risk.std()),
                "violation_rate": float((risk > float(e)).mean()),
                "violation_rate_pool": float((pool > float(e)).mean()),
                "saving": float(saving.mean()),
                "std_saving": float(saving.std()),
                "infeasible_rate": float(1 - np.mean(r["feasible"])),
                "median_threshold": float(np.median(finite)) if len(finite) else None,
            }
    return report


def plot(report: dict, path: Path) -> None:  # type: ignore[type-arg]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps = sorted(report["crc"], key=float)
    x = [float(e) for e in eps]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for key in METHODS:
        rows = [report[key][e] for e in eps]
        a1.errorbar(x, [r["mean_test_risk"] for r in rows], yerr=[r["std_test_risk"] for r in rows], marker="o",
                    ms=4, capsize=3, label=f"{METHODS[key]} (violations " + "/".join(
                        f"{r['violation_rate']:.2f}" for r in rows) + ")")
        a2.plot(x, [100 * r["saving"] for r in rows], marker="o", ms=4, label=METHODS[key])
    a1.plot([0, max(x) * 1.05], [0, max(x) * 1.05], "k--", lw=1, label="risk = ε")
    a1.set_xlabel("ε")
    a1.set_ylabel(f"test risk ({report['risk']} on {report['on']}), mean ± sd")
    a1.set_title(f"test risk vs ε (δ={report['delta']}, {report['splits']} splits)")
    a1.legend(fontsize=7)
    a2.set_xlabel("ε")
    a2.set_ylabel("latency saving on the test half (%)")
    a2.set_title(f"{report['model']} {report['precision']}: saving vs ε")
    a2.legend(fontsize=7)
    for a in (a1, a2):
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", default=str(ROOT / "runs" / "resnet56.bundle"))
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10.npz"))
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--device", default="host", help="profile whose measured latency is the cost")
    ap.add_argument("--risk", default="gap")
    ap.add_argument("--on", default="predictions")
    ap.add_argument("--epsilons", type=float, nargs="+", default=list(EPSILONS))
    ap.add_argument("--delta", type=float, default=0.1)
    ap.add_argument("--splits", type=int, default=100)
    ap.add_argument("--cal-fraction", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default=str(ROOT / "runs"))
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "risk.json"))
    ap.add_argument("--plot", default=str(ROOT / "benchmarks" / "results" / "risk.png"))
    args = ap.parse_args()
    report = run(args)
    write_json_atomic(Path(args.json), report)
    plot(report, Path(args.plot))
    print(json.dumps({k: {e: {m: round(v, 4) if isinstance(v, float) else v for m, v in r.items()}
                          for e, r in report[k].items()} for k in METHODS}, indent=1, default=json_default))
    log(f"wrote {args.json} and {args.plot}")


if __name__ == "__main__":
    main()
