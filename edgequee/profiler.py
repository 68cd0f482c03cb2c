"""Latency of every block × precision of a bundle on this machine → BUNDLE/profiles/<device>.json.

Each graph is timed alone (invoke only, inputs resident): warm-up, then rounds of back-to-back invokes until
a minimum time has passed and the median of the last rounds is stable. Energy is not measured here yet: every
profile says so explicitly ("energy": {"source": "not measured"}).
"""

from __future__ import annotations

import os
import platform
import resource
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Callable

import numpy as np

from .backend import InterpreterPool, runtime_name
from .bundle import Bundle, write_json_atomic

__all__ = ["LatencyStats", "measure_latency", "profile_bundle", "PROFILE_FORMAT"]

PROFILE_FORMAT = "edgequee-profile/1"
Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class LatencyStats:
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    n: int
    rounds: int
    stable: bool
    source: str = "measured"


def measure_latency(
    fn: Callable[[], object],
    warmup_s: float = 0.2,
    min_time_s: float = 1.0,
    max_time_s: float = 10.0,
    rel_tol: float = 0.02,
) -> LatencyStats:
    """Time ``fn`` until at least ``min_time_s`` has passed and the running median moves by < ``rel_tol``.

    Single calls are timed one by one (so p90/p99 are real per-call tails); the median is re-checked after
    each round of ~0.1 s, and the loop stops once the last three round medians agree within ``rel_tol``.
    """
    t_end = time.perf_counter() + warmup_s
    while time.perf_counter() < t_end:
        fn()
    samples: list[float] = []
    medians: list[float] = []
    t_start = time.perf_counter()
    stable = False
    while True:
        round_end = time.perf_counter() + 0.1
        while True:
            t0 = time.perf_counter()
            fn()
            t1 = time.perf_counter()
            samples.append(t1 - t0)
            if t1 >= round_end:
                break
        medians.append(float(np.median(samples)))
        elapsed = time.perf_counter() - t_start
        if len(medians) >= 3:
            last = medians[-3:]
            stable = (max(last) - min(last)) <= rel_tol * min(last)
        if (elapsed >= min_time_s and stable) or elapsed >= max_time_s:
            break
    a = np.asarray(samples) * 1e3
    return LatencyStats(
        p50_ms=float(np.percentile(a, 50)),
        p90_ms=float(np.percentile(a, 90)),
        p99_ms=float(np.percentile(a, 99)),
        mean_ms=float(a.mean()),
        n=len(a),
        rounds=len(medians),
        stable=stable,
    )


def _peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1 << 20) if platform.system() == "Darwin" else r / 1024


def profile_bundle(
    bundle: Bundle,
    device: str = "host",
    *,
    num_threads: int = 1,
    use_xnnpack: bool = True,
    min_time_s: float = 1.0,
    precisions: tuple[str, ...] | None = None,
    progress: Progress | None = None,
    write: bool = True,
) -> dict:  # type: ignore[type-arg]
    """Measure every block (and whole-model graph) at every precision; write profiles/<device>.json."""
    m = bundle.manifest
    precisions = precisions or m.precisions
    jobs = [(i, p) for i in range(m.num_exits) for p in precisions] + [(-1, p) for p in m.whole_model]
    blocks, whole = [], {}
    rng = np.random.default_rng(0)
    pool = InterpreterPool(num_threads, use_xnnpack)
    for k, (i, p) in enumerate(jobs):
        art = m.whole_model[p] if i < 0 else bundle.block_artifact(i, p)
        g = pool.graph(bundle.file(art), art)
        g.input[...] = rng.integers(-100, 100, g.input.shape) if g.input.dtype == np.int8 else rng.random(g.input.shape)
        stats = asdict(measure_latency(g.invoke, min_time_s=min_time_s))
        if i < 0:
            whole[p] = {"latency_ms": stats}
        else:
            blocks.append({"block": i, "precision": p, "macs": m.blocks[i].macs, "latency_ms": stats})
        del g
        if progress:
            progress(k + 1, len(jobs), f"{'whole' if i < 0 else f'block {i}'} {p}")
    profile = {
        "format": PROFILE_FORMAT,
        "device": device,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"arch": platform.machine(), "system": platform.system(), "cpu_count": os.cpu_count(),
                    "processor": _cpu_name()},
        "runtime": runtime_name(),
        "threads": num_threads,
        "delegate": "xnnpack" if use_xnnpack else "none (builtin kernels)",
        "method": "invoke-only loop per graph, inputs resident; warm-up 0.2 s; >= "
        f"{min_time_s} s and until the last 3 round medians agree within 2 %",
        "energy": {"source": "not measured", "why": "no energy meter configured (energy metering is a later issue)"},
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "blocks": blocks,
        "whole_model": whole,
    }
    if write:
        write_json_atomic(bundle.profiles_dir / f"{device}.json", profile)
    return profile


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith(("model name", "Model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
