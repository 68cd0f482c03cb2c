"""Profile repeatability and cost-estimator accuracy on this machine.

1. Profiles a bundle twice (``edgequee profile``, each run its own process, 1 thread, XNNPACK) and compares the two
   runs graph by graph:
   ``median_repeat_max_rel_diff`` = the largest |p50_a - p50_b| / min(p50_a, p50_b) over every block × precision.
2. Calibrates the generic ``x86-host`` descriptor to this machine from the first profile and prices every block
   from the descriptor alone (``CostModel`` without the profile); compares with the measured block cost
   (invoke p50 + measured runtime gap, mean of both runs). The fit is **leave-one-block-out**: the estimate of
   block i comes from a descriptor fitted without block i's measurements.
   ``estimator_median_rel_error`` = median |estimated - measured| / measured over blocks × precisions.
   The uncalibrated (shipped, estimated) x86-host descriptor's error is reported too.
3. Prices the bundle with the rpi4, rpi5, coral-usb-rpi4 and coral-usb-rpi5 cost models (estimated).

    python benchmarks/profile_repeatability.py --json benchmarks/results/profile_repeatability.json

Without --bundle it uses runs/resnet56.bundle, made first when missing (benchmarks/_artifacts.py: ResNet-56,
akamaster weights from --models, an exit after every 3 residual blocks, trained pool exit heads). Timing wants a quiet machine: nothing else running.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _artifacts import resnet56_bundle  # noqa: E402
from edgequee.bundle import Bundle, json_default, load_bundle, write_json_atomic  # noqa: E402
from edgequee.cost import CostModel  # noqa: E402
from edgequee.devices import calibrate_descriptor, load_device  # noqa: E402
from edgequee.profiler import profile_bundle  # noqa: E402
from edgequee.report import cost_table, profile_table, table  # noqa: E402

PRICED = ("rpi4", "rpi5", "coral-usb-rpi4", "coral-usb-rpi5")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def default_bundle(models: Path) -> Bundle:
    """runs/resnet56.bundle, made (exit heads trained, converted) when missing: benchmarks/_artifacts.py."""
    return resnet56_bundle(models=models, profile=False)


def measured_block_costs(bundle: Bundle, profiles: list[dict[str, Any]]) -> dict[tuple[int, str], float]:
    """Block cost (invoke p50 + runtime gap) as the cost model prices it from a profile, averaged over runs."""
    costs: dict[tuple[int, str], list[float]] = {}
    for prof in profiles:
        cm = CostModel(bundle.manifest, None, prof)
        for r in cm.table():
            costs.setdefault((r["block"], r["precision"]), []).append(r["latency_ms"])
    return {k: float(np.mean(v)) for k, v in costs.items()}


def rel_errors(est: dict[tuple[int, str], float], meas: dict[tuple[int, str], float]) -> dict[tuple[int, str], float]:
    return {k: abs(est[k] - meas[k]) / meas[k] for k in meas}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, help="bundle to profile (default: runs/resnet56.bundle, made if missing)")
    ap.add_argument("--models", type=Path, default=ROOT.parent / "shared" / "models" / "akamaster_resnet_cifar10")
    ap.add_argument("--min-time", type=float, default=4.0, help="seconds of timing per graph and run")
    ap.add_argument("--passes", type=int, default=32, help="interleaved timing passes per run, each on fresh "
                    "interpreters (see profile_bundle): one instantiation of a graph can be ~8 %% slower than another, "
                    "and the pooled median of many averages that out (8 passes gave 4.4-13 %% repeat differences)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--in-process", action="store_true", help="profile both runs in this process instead of one "
                    "`edgequee profile` process each (what a user runs twice; the second profile of one process "
                    "sees the heap the first left behind)")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--plot", type=Path, help="PNG: measured (both runs) and estimated cost per block")
    args = ap.parse_args()

    bundle = load_bundle(args.bundle) if args.bundle else default_bundle(args.models)
    m = bundle.manifest
    runs = []
    for k in range(2):
        log(f"profile run {k + 1}/2 of {bundle.path} ({args.threads} thread(s), >= {args.min_time} s per graph"
            f"{', in this process' if args.in_process else ', own process'})")
        t0 = time.perf_counter()
        if args.in_process:
            runs.append(profile_bundle(bundle, f"repeat{k}", num_threads=args.threads, min_time_s=args.min_time,
                                       passes=args.passes, write=False))
        else:
            runs.append(profile_in_own_process(bundle, f"repeat{k}", args))
        log(f"  {time.perf_counter() - t0:.0f} s")
    write_json_atomic(bundle.profiles_dir / "host.json", {**runs[0], "device": "host"})  # keep it in the bundle

    p50 = [{(b["block"], b["precision"]): b["latency_ms"]["p50_ms"] for b in r["blocks"]} for r in runs]
    repeat = {k: abs(p50[0][k] - p50[1][k]) / min(p50[0][k], p50[1][k]) for k in p50[0]}
    worst = max(repeat, key=repeat.get)  # type: ignore[arg-type]

    gap_us = {p: [1e3 * r["runtime_overhead_ms"][p]["value"] for r in runs] for p in m.precisions}
    gap_rows = gap_us.items()
    measured = measured_block_costs(bundle, runs)
    base = load_device("x86-host")
    uncalibrated = rel_errors({k: CostModel(m, base).block(*k).latency_ms for k in measured}, measured)
    loo: dict[tuple[int, str], float] = {}
    for i in range(m.num_exits):
        held_out = [replace_blocks(r, exclude=i) for r in runs[:1]]
        desc = calibrate_descriptor(base, [(m, p) for p in held_out], name="host-loo")
        cm = CostModel(m, desc)
        for p in m.precisions:
            loo[i, p] = cm.block(i, p).latency_ms
    loo_err = rel_errors(loo, measured)
    fitted = calibrate_descriptor(base, [(m, runs[0])], name="host")
    insample_err = rel_errors({k: CostModel(m, fitted).block(*k).latency_ms for k in measured}, measured)

    rows = []
    for (i, p), meas in sorted(measured.items()):
        rows.append([i, p, p50[0][i, p], p50[1][i, p], f"{100 * repeat[i, p]:.1f}", meas, loo[i, p],
                     f"{100 * loo_err[i, p]:.1f}", f"{100 * uncalibrated[i, p]:.1f}"])
    text = [
        f"{m.model}: {m.num_exits} blocks x {', '.join(m.precisions)}; {args.threads} thread(s)",
        table(["block", "prec", "run1 p50", "run2 p50", "repeat %", "measured cost", "estimated (LOO)", "est err %",
               "uncal err %"], rows),
        f"median_repeat_max_rel_diff = {repeat[worst]:.4f} (block {worst[0]} {worst[1]}); "
        f"median of repeat diffs {np.median(list(repeat.values())):.4f}",
        f"estimator_median_rel_error = {np.median(list(loo_err.values())):.4f} (leave-one-block-out fit); "
        f"in-sample {np.median(list(insample_err.values())):.4f}; uncalibrated x86-host "
        f"{np.median(list(uncalibrated.values())):.4f}",
        "runtime gap per block (µs, run 1 / run 2): " + ", ".join(f"{p} {a:.1f} / {b:.1f}" for p, (a, b) in gap_rows),
        "",
        profile_table(runs[0]),
        "",
        cost_table([CostModel.for_bundle(bundle, d, use_profile=False) for d in PRICED]),
    ]
    print("\n".join(text))

    report = {
        "bundle": str(bundle.path),
        "model": m.model,
        "threads": args.threads,
        "min_time_s": args.min_time,
        "passes": args.passes,
        "median_repeat_max_rel_diff": repeat[worst],
        "repeat_worst": {"block": worst[0], "precision": worst[1]},
        "repeat_rel_diff_median": float(np.median(list(repeat.values()))),
        "estimator_median_rel_error": float(np.median(list(loo_err.values()))),
        "runtime_gap_us_per_block": gap_us,
        "estimator": {
            "method": "x86-host descriptor calibrated on this machine's first profile, leaving the block out",
            "median_rel_error_in_sample": float(np.median(list(insample_err.values()))),
            "median_rel_error_uncalibrated": float(np.median(list(uncalibrated.values()))),
            "calibrated_descriptor": fitted.to_json(),
        },
        "blocks": [{"block": i, "precision": p, "run_p50_ms": [p50[0][i, p], p50[1][i, p]],
                    "repeat_rel_diff": repeat[i, p], "measured_cost_ms": measured[i, p],
                    "estimated_cost_ms": loo[i, p], "estimated_rel_error": loo_err[i, p],
                    "uncalibrated_rel_error": uncalibrated[i, p]} for (i, p) in sorted(measured)],
        "profiles": runs,
        "priced": {d: CostModel.for_bundle(bundle, d, use_profile=False).table() for d in PRICED},
    }
    if args.json:
        write_json_atomic(args.json, json.loads(json.dumps(report, default=json_default)))
        log(f"wrote {args.json}")
    if args.plot:
        plot(report, args.plot)
        log(f"wrote {args.plot}")


def profile_in_own_process(bundle: Bundle, device: str, args: argparse.Namespace) -> dict[str, Any]:
    """``edgequee profile`` in a fresh Python process (as a user would run it); its profile, taken out of the
    bundle again so that the bundle keeps only the host profile this benchmark writes."""
    cmd = [sys.executable, "-c", "from edgequee.cli import main; main()", "profile", str(bundle.path), "--device",
           device, "--threads", str(args.threads), "--min-time", str(args.min_time), "--passes", str(args.passes)]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    path = bundle.profiles_dir / f"{device}.json"
    profile = json.loads(path.read_text())
    path.unlink()
    return profile


def replace_blocks(profile: dict[str, Any], exclude: int) -> dict[str, Any]:
    """A copy of ``profile`` without block ``exclude``'s measurements (for a leave-one-out fit)."""
    return {**profile, "blocks": [b for b in profile["blocks"] if b["block"] != exclude]}


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    precs = sorted({b["precision"] for b in report["blocks"]}, key=["fp32", "fp16", "int8"].index)
    fig, axes = plt.subplots(1, len(precs), figsize=(4.2 * len(precs), 3.4), sharey=True)
    for ax, p in zip(np.atleast_1d(axes), precs):
        bs = [b for b in report["blocks"] if b["precision"] == p]
        x = np.arange(len(bs))
        ax.bar(x - 0.27, [b["run_p50_ms"][0] for b in bs], 0.27, label="run 1 invoke p50")
        ax.bar(x, [b["run_p50_ms"][1] for b in bs], 0.27, label="run 2 invoke p50")
        ax.bar(x + 0.27, [b["estimated_cost_ms"] for b in bs], 0.27, label="estimated cost (LOO)")
        ax.plot(x, [b["measured_cost_ms"] for b in bs], "k.", label="measured cost (+gap)")
        ax.set_title(p)
        ax.set_xlabel("block")
    np.atleast_1d(axes)[0].set_ylabel("ms")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.suptitle(f"{report['model']}: repeat max diff {100 * report['median_repeat_max_rel_diff']:.1f} %, "
                 f"estimator median error {100 * report['estimator_median_rel_error']:.1f} %", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
