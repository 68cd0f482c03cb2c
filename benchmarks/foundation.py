"""Foundation benchmark: pretrained ResNet-56 with an exit after every 3 residual blocks → bundle → measured here.

Reproduces the foundation issue's acceptance numbers end to end:
- convert_seconds: `convert_model` at fp32, fp16, int8 (+ whole model fp32/int8), parity on 1000 test images,
  exactly what `edgequee convert` does;
- parity / parity_chained / exit_accuracy_chained: on the full test split (10,000 images);
- split_overhead: runtime loop with every block and no early exit ÷ whole model, at 1 and 2 threads
  (split_overhead_gated: the same with the exit heads and a max-softmax gate evaluated after every block);
- whole_model accuracy and latency, best_whole (the cheapest whole model within 0.5 pt of fp32), per-exit accuracy,
  and the bench table (threshold sweep per precision, every latency also as a ratio to best_whole).

Caveat: this script converts and checks parity with torch in the process that then times, and importing torch
slows LiteRT by 20-30 % here (converters/quickstart.py); its absolute latencies are pessimistic. benchmarks/quee.py
measures ResNet-56's split overhead in a process without torch.

    python benchmarks/foundation.py --data ../shared/data/cifar10.npz \
        --models ../shared/models/akamaster_resnet_cifar10 --json runs/foundation.json

Exit heads: from --checkpoint (a multi-exit checkpoint made by `edgequee train`) or, without it, trained here on
the frozen pretrained backbone (cached features, --head-epochs), then saved beside the JSON for reuse.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from converters._registry import create_model  # noqa: E402
from converters.convert import convert_model  # noqa: E402
from converters.multiexit import load_checkpoint, save_checkpoint  # noqa: E402
from converters.parity import chained_parity, isolated_parity, torch_exit_logits  # noqa: E402
from converters.train import evaluate, train_heads  # noqa: E402
from edgequee.bench import bench_bundle, measure_split_overhead  # noqa: E402
from edgequee.bundle import PRECISIONS  # noqa: E402
from edgequee.data import load_dataset  # noqa: E402
from edgequee.profiler import profile_bundle  # noqa: E402
from edgequee.report import bench_table, inspect_text, plot_bench, profile_table  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def get_model(args: argparse.Namespace, data, out_dir: Path):  # type: ignore[no-untyped-def]
    if args.checkpoint:
        return load_checkpoint(args.checkpoint)
    cached = out_dir / f"resnet56_every3_{args.head}.pt"
    if cached.is_file():
        log(f"reusing exit heads from {cached}")
        return load_checkpoint(cached)
    weights = next(Path(args.models).glob("resnet56-*.th"))
    model = create_model("resnet56", exits="every:3", head=args.head, pretrained=weights)
    log(f"training {args.head} exit heads on the frozen backbone ({len(data.x_train)} images)")
    t0 = time.perf_counter()
    train_heads(model, data.x_train, data.y_train, epochs=args.head_epochs)
    save_checkpoint(model, cached, extra={"train_seconds": time.perf_counter() - t0})
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10.npz"))
    ap.add_argument("--models", default=str(ROOT.parent / "shared/models/akamaster_resnet_cifar10"))
    ap.add_argument("--checkpoint", help="multi-exit ResNet-56 checkpoint (else heads are trained here)")
    ap.add_argument("--head", default="pool")
    ap.add_argument("--head-epochs", type=int, default=30)
    ap.add_argument("--json", default="runs/foundation.json")
    ap.add_argument("--n-test", type=int, default=None, help="use only the first N test images")
    ap.add_argument("--latency-samples", type=int, default=1000)
    args = ap.parse_args()

    out_json = Path(args.json)
    out_dir = out_json.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    data = load_dataset(args.data).subset(n_test=args.n_test)
    x, y = data.x_test, data.y_test
    model = get_model(args, data, out_dir)
    torch_acc = evaluate(model, x, y)
    log("torch exit accuracy: " + " ".join(f"{a:.3f}" for a in torch_acc))

    bundle_dir = out_dir / "resnet56.bundle"
    t0 = time.perf_counter()
    bundle = convert_model(model, bundle_dir, data.x_train[:500], parity_images=x[:1000], parity_labels=y[:1000],
                           overwrite=True)
    convert_seconds = time.perf_counter() - t0
    log(f"converted in {convert_seconds:.1f} s")

    log(f"parity on {len(x)} test images")
    t0 = time.perf_counter()
    iso = isolated_parity(model, bundle, x, PRECISIONS)
    ref = torch_exit_logits(model, x)
    chained = chained_parity(bundle, ref, x, y, PRECISIONS)
    parity_seconds = time.perf_counter() - t0

    log("profiling")
    profiles = {f"threads_{t}": profile_bundle(bundle, "host" if t == 1 else f"host-{t}t", num_threads=t)
                for t in (1, 2)}
    log("split overhead")
    lat_x = x[: args.latency_samples]
    split, gated = ({p: {f"threads_{t}": measure_split_overhead(bundle, lat_x, p, t, rounds=11, gated=g)
                         for t in (1, 2)}
                     for p in ("fp32", "int8")} for g in (False, True))
    log("bench (1 thread)")
    bench = bench_bundle(bundle, x, y, num_threads=1, latency_samples=min(500, len(x)))
    plot_bench(bench, out_dir / "foundation_bench.png")

    report = {
        "model": "resnet56, exit after every 3 residual blocks (9 blocks), akamaster weights",
        "head": model.config.get("head"),
        "n_test": int(len(x)),
        "convert_seconds": convert_seconds,
        "convert_breakdown": bundle.manifest.conversion["seconds"],
        "parity_seconds_full_test": parity_seconds,
        "parity": {p: min(b.exit_agreement for b in iso if b.precision == p) for p in PRECISIONS},
        "parity_isolated": {p: [b.exit_agreement for b in iso if b.precision == p] for p in PRECISIONS},
        "hidden_max_abs_err": {p: [b.hidden_max_abs_err for b in iso if b.precision == p] for p in PRECISIONS},
        "parity_chained": {c.precision: min(c.exit_agreement) for c in chained},
        "parity_chained_per_exit": {c.precision: list(c.exit_agreement) for c in chained},
        "exit_accuracy_chained": {"torch": list(torch_acc), **{c.precision: list(c.exit_accuracy) for c in chained}},
        "exit_accuracy": list(next(c for c in chained if c.precision == "fp32").exit_accuracy),
        "int8_accuracy_drop_pt": [100 * (t - a) for t, a in zip(torch_acc, next(c for c in chained if c.precision == "int8").exit_accuracy)],
        "split_overhead": {p: {k: v["ratio"] for k, v in d.items()} for p, d in split.items()},
        "split_overhead_detail": split,
        "split_overhead_gated": {p: {k: v["ratio"] for k, v in d.items()} for p, d in gated.items()},
        "split_overhead_gated_detail": gated,
        "whole_model": bench["whole_model"],
        "best_whole": bench["best_whole"],
        "machine": bench["machine"],
        "profiles": profiles,
        "bench": bench,
    }
    out_json.write_text(json.dumps(report, indent=1))
    print(inspect_text(bundle))
    for t, prof in profiles.items():
        print(f"\n{t}:\n" + profile_table(prof))
    print("\n" + bench_table(bench))
    print("\nsplit overhead:", json.dumps(report["split_overhead"]))
    print("split overhead with a never-firing max-softmax gate:", json.dumps(report["split_overhead_gated"]))
    print(f"convert_seconds {convert_seconds:.1f}; parity (min isolated agreement) {report['parity']}")
    print(f"wrote {out_json}")


if __name__ == "__main__":
    main()
