"""`edgequee quickstart`: the shipped multi-exit ResNet-20 converted, profiled, calibrated and benchmarked in minutes.

The default model (zoo/resnet20_cifar10_exits.pt) was made by the project's own trainer; the exact command is in
zoo/README.md. The images (zoo/cifar10_sample.npz) are real CIFAR-10: 256 training images for int8 calibration
and the first 1000 test images: all 1000 for the parity report, the first 500 to calibrate the exit threshold with
risk control (gap ≤ 2 points with probability ≥ 90 %, UCB-WSR), the other 500 for the benchmark.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from edgequee.bench import bench_bundle
from edgequee.bundle import load_bundle
from edgequee.calibrate import calibrate_bundle
from edgequee.data import load_dataset
from edgequee.policies import policy_from_bundle
from edgequee.profiler import profile_bundle

from .convert import convert_model
from .multiexit import load_checkpoint

__all__ = ["ZOO", "DEFAULT_MODEL", "SAMPLE_DATA", "run_quickstart"]

ZOO = Path(__file__).parent / "zoo"
DEFAULT_MODEL = ZOO / "resnet20_cifar10_exits.pt"
SAMPLE_DATA = ZOO / "cifar10_sample.npz"


def run_quickstart(out: Path, num_threads: int = 1, progress: Callable[..., None] | None = None) -> dict[str, Any]:
    """convert → profile (host) → calibrate → bench; returns the combined report. ``out/bundle`` is replaced."""
    out = Path(out)
    data = load_dataset(SAMPLE_DATA)
    model = load_checkpoint(DEFAULT_MODEL)
    steps = ["convert", "profile", "calibrate", "bench"]

    def phase(k: int) -> Callable[..., None]:
        def cb(done: int, total: int, label: str = "") -> None:
            if progress:
                progress(k * 100 + int(100 * done / max(total, 1)), 100 * len(steps), f"{steps[k]}: {label}")

        return cb

    t0 = time.perf_counter()
    bundle = convert_model(model, out / "bundle", data.x_train, parity_images=data.x_test, parity_labels=data.y_test,
                           overwrite=True, num_threads=num_threads, progress=phase(0))
    t1 = time.perf_counter()
    profile = profile_bundle(bundle, "host", num_threads=num_threads, min_time_s=0.3, progress=phase(1))
    t2 = time.perf_counter()
    half = len(data.x_test) // 2
    calibration = calibrate_bundle(bundle, data.x_test[:half], data.y_test[:half], policy="threshold",
                                   params={"precision": "fp32"}, risk="gap", epsilon=0.02, delta=0.1,
                                   method="ucb-wsr", device="host", num_threads=num_threads, progress=phase(2))
    bundle = load_bundle(bundle.path)
    t3 = time.perf_counter()
    bench = bench_bundle(bundle, data.x_test[half:], data.y_test[half:], num_threads=num_threads,
                         latency_samples=300, policy=policy_from_bundle(bundle), progress=phase(3))
    t4 = time.perf_counter()
    return {
        "bundle": str(bundle.path),
        "convert_seconds": t1 - t0,
        "profile_seconds": t2 - t1,
        "calibrate_seconds": t3 - t2,
        "bench_seconds": t4 - t3,
        "total_seconds": t4 - t0,
        "parity": bundle.manifest.to_json()["parity"],
        "profile": profile,
        "calibration": calibration,
        "bench": bench,
    }
