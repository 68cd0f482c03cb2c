"""`edgequee quickstart`: the shipped multi-exit ResNet-20 converted, profiled and benchmarked in minutes.

The default model (zoo/resnet20_cifar10_exits.pt) was made by the project's own trainer; the exact command is in
zoo/README.md. The images (zoo/cifar10_sample.npz) are real CIFAR-10: 256 training images for int8 calibration
and the first 1000 test images.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from edgequee.bench import bench_bundle
from edgequee.data import load_dataset
from edgequee.profiler import profile_bundle

from .convert import convert_model
from .multiexit import load_checkpoint

__all__ = ["ZOO", "DEFAULT_MODEL", "SAMPLE_DATA", "run_quickstart"]

ZOO = Path(__file__).parent / "zoo"
DEFAULT_MODEL = ZOO / "resnet20_cifar10_exits.pt"
SAMPLE_DATA = ZOO / "cifar10_sample.npz"


def run_quickstart(out: Path, num_threads: int = 1, progress: Callable[..., None] | None = None) -> dict[str, Any]:
    """convert → profile (host) → bench; returns the combined report. ``out/bundle`` is replaced if present."""
    out = Path(out)
    data = load_dataset(SAMPLE_DATA)
    model = load_checkpoint(DEFAULT_MODEL)
    steps = ["convert", "profile", "bench"]

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
    bench = bench_bundle(bundle, data.x_test, data.y_test, num_threads=num_threads, latency_samples=300,
                         progress=phase(2))
    t3 = time.perf_counter()
    return {
        "bundle": str(bundle.path),
        "convert_seconds": t1 - t0,
        "profile_seconds": t2 - t1,
        "bench_seconds": t3 - t2,
        "total_seconds": t3 - t0,
        "parity": bundle.manifest.to_json()["parity"],
        "profile": profile,
        "bench": bench,
    }
