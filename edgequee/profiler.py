"""Latency of every block × precision of a bundle on this machine → BUNDLE/profiles/<device>.json.

Each graph is timed alone (invoke only, inputs resident): warm-up, then rounds of back-to-back invokes until
a minimum time has passed and the median of the last rounds is stable. Around the invokes it measures what the
cost model (edgequee/cost.py) needs too: the runtime's per-block gap between invokes and the float <-> int8
hand-overs at block boundaries. Health (CPU temperature, Raspberry Pi throttling flags) is recorded before and
after, with a warning when the device throttled.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from .backend import InterpreterPool, edgetpu_delegate, runtime_name
from .bundle import Bundle, write_profile
from .schema import check_device_name
from .cost import per_inference_at
from .errors import DeviceError
from .meters import energy_per_inference, now
from .policies import NEVER_FIRES, ThresholdPolicy
from .progress import Progress, Ticker
from .runtime import EdgeRunner, WholeModelRunner
from .sysinfo import cpu_temperature_c, machine_info, peak_rss_mb, read_throttled

if TYPE_CHECKING:
    from .backend import Graph
    from .meters import Meter

__all__ = ["LatencyStats", "time_calls", "measure_latency", "undisturbed_passes", "profile_bundle", "throttle_warning",
           "PROFILE_FORMAT"]

PROFILE_FORMAT = "edgequee-profile/1"
DELEGATES = ("xnnpack", "none", "edgetpu")


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


    @classmethod
    def of(cls, seconds: list[float], rounds: int, stable: bool) -> "LatencyStats":
        a = np.asarray(seconds) * 1e3
        return cls(p50_ms=float(np.percentile(a, 50)), p90_ms=float(np.percentile(a, 90)),
                   p99_ms=float(np.percentile(a, 99)), mean_ms=float(a.mean()), n=len(a), rounds=rounds, stable=stable)


def time_calls(
    fn: Callable[[], object],
    warmup_s: float = 0.2,
    min_time_s: float = 1.0,
    max_time_s: float = 10.0,
    rel_tol: float = 0.02,
) -> tuple[list[float], int, bool]:
    """Time single calls of ``fn`` (seconds each) until at least ``min_time_s`` has passed and the running median
    is stable: re-checked after each round of ~0.1 s, stable once the last three round medians agree within
    ``rel_tol``. Returns (per-call seconds, rounds, stable)."""
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
    return samples, len(medians), stable


def measure_latency(fn: Callable[[], object], **kwargs: float) -> LatencyStats:
    """``time_calls`` summarised: p50/p90/p99 of single calls are real per-call figures."""
    return LatencyStats.of(*time_calls(fn, **kwargs))


UNDISTURBED = 0.05  # a pass whose median is within this of the graph's fastest pass is pooled


def undisturbed_passes(pass_p50: Sequence[float]) -> list[int]:
    """Which of one graph's passes its latency figures pool: those whose median lies within ``UNDISTURBED`` of
    the graph's fastest pass.

    Outside load only ever slows a graph down, and on this shared VM it comes in spells of seconds: in two
    32-pass profiles of ResNet-56 here, about half of every graph's passes ran 25-35 % slow, at times that
    differed from graph to graph. Pooling the quieter half of the passes (chosen by pass, by the median over
    graphs of each one's slowdown; what the profiler did before) then left 23 % between the two profiles on one
    graph, anchoring each graph on its own fastest pass 1.6 % (0.5 % vs 1.0 % on two profiles taken when the VM
    was quiet; both offline, on the recorded pass medians). The figure describes the block at its better memory
    placements (the same graph differs by up to ~8 % between two fresh interpreters), so it can be a few %
    faster than one randomly placed interpreter; on a quiet device every pass is kept.
    """
    a = np.asarray(pass_p50, dtype=float)
    return np.flatnonzero(a <= (1 + UNDISTURBED) * a.min()).tolist()


def _latency_entries(timed: list[list[tuple[list[float], int, bool]]]) -> list[dict[str, Any]]:
    """Each graph's ``latency_ms`` from its passes (``time_calls`` results): the per-call times of its
    undisturbed passes (``undisturbed_passes``) pooled."""
    entries = []
    for passes in timed:
        row = [float(np.median(s)) * 1e3 for s, _, _ in passes]
        pooled = undisturbed_passes(row)
        samples = [t for k in pooled for t in passes[k][0]]
        stats = LatencyStats.of(samples, sum(passes[k][1] for k in pooled), all(passes[k][2] for k in pooled))
        entries.append({"latency_ms": asdict(stats), "passes_pooled": pooled,
                        "pass_p50_ms": [round(v, 5) for v in row]})
    return entries


class _RuntimeLoops:
    """The runtime loops timed in every pass beside the graphs, end to end on real-sized random images:
    ``EdgeRunner.classify`` at each precision, every block, a max-softmax gate after each that never fires (the
    loop an early-exit policy runs), and ``WholeModelRunner.classify`` for each whole model. The whole-model loop
    minus its invoke is the per-inference work (preprocessing, output dequantization, softmax) that any model pays
    once; the block loop minus its invokes minus that is the per-block gap.

    One 1 s loop on one runner was not enough here: the same loop measured 3.26 and then 4.15 ms in two
    consecutive seconds (outside load on the VM), which put 0.15 ms per block into a profile's fp32 gap.
    Runners are made afresh each pass like the graphs' interpreters (kept under the Edge TPU delegate, which
    takes seconds to open on a Pi)."""

    def __init__(self, bundle: Bundle, precisions: tuple[str, ...], run_opts: dict[str, Any], images: np.ndarray):
        self.bundle, self.precisions, self.run_opts, self.images = bundle, precisions, run_opts, images
        self.whole_precisions = tuple(p for p in bundle.manifest.whole_model if p in precisions)
        self.runners: dict[str, EdgeRunner] = {}
        self.wholes: dict[str, WholeModelRunner] = {}
        self.renew()

    def renew(self) -> None:
        cpu = {"num_threads": self.run_opts["num_threads"], "use_xnnpack": self.run_opts["use_xnnpack"]}
        self.wholes = {}
        self.wholes = {p: WholeModelRunner(self.bundle, p, **cpu) for p in self.whole_precisions}
        if self.runners and self.run_opts["edgetpu"]:
            return
        self.runners = {}  # free the old interpreters before making new ones
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a gate that never fires needs no risk certificate
            for p in self.precisions:
                self.runners[p] = EdgeRunner(self.bundle, ThresholdPolicy(p, NEVER_FIRES), **self.run_opts)

    def __call__(self, kind: str, precision: str) -> Callable[[], object]:
        runner = self.runners[precision] if kind == "blocks" else self.wholes[precision]
        classify, images = runner.classify, self.images
        it = iter(range(1 << 62))
        return lambda: classify(images[next(it) % len(images)])


def _fill_random(g: "Graph", rng: np.random.Generator) -> None:
    g.input[...] = rng.integers(-100, 100, g.input.shape) if g.input.dtype == np.int8 else rng.random(g.input.shape)


class _Graphs:
    """Where each graph runs: the CPU pool, or for int8 blocks under ``--delegate edgetpu`` the Edge TPU."""

    def __init__(self, bundle: Bundle, num_threads: int, delegate: str):
        self.bundle = bundle
        self.cpu = InterpreterPool(num_threads, use_xnnpack=delegate != "none")
        self.tpu = None
        if delegate == "edgetpu":
            if any(b.edgetpu is None for b in bundle.manifest.blocks):
                raise DeviceError(f"{bundle.path} has no Edge TPU models; convert with edgequee convert --edgetpu")
            self.tpu = InterpreterPool(1, use_xnnpack=False, delegates=[edgetpu_delegate()])

    def renew_cpu(self) -> None:
        """Fresh CPU interpreters: a block's speed depends a few % on where its arena lands in memory (cache
        aliasing), so each pass measures another placement and the profile describes the block, not one
        allocation. (The Edge TPU pool is kept: creating its delegate takes seconds on a Pi.)"""
        self.cpu = InterpreterPool(self.cpu.num_threads, self.cpu.use_xnnpack)

    def __call__(self, i: int, precision: str) -> "Graph":
        """Block ``i`` (or the whole model for i < 0) at ``precision``, on shared interpreters."""
        m = self.bundle.manifest
        if i >= 0 and precision == "int8" and self.tpu is not None:
            art = m.blocks[i].edgetpu
            assert art is not None
            return self.tpu.graph(self.bundle.file(art), art)
        art = m.whole_model[precision] if i < 0 else self.bundle.block_artifact(i, precision)
        return self.cpu.graph(self.bundle.file(art), art)


def _measure_energy(meter: "Meter", graphs: list[tuple["Graph", dict[str, Any]]], energy_s: float, idle_s: float,
                    tick: Callable[[str], None]) -> dict[str, Any]:
    """Idle power, then each graph back to back for ``energy_s`` under one recording; fills entry["energy"]."""
    idle = meter.measure_idle(idle_s)
    tick("idle power")
    windows = []
    meter.start()
    try:
        for g, _ in graphs:
            windows.append(_run_for(g.invoke, energy_s))
            tick("energy")
    finally:
        trace = meter.stop()
    for (_, entry), (t0, t1, n) in zip(graphs, windows):
        entry["energy"] = _energy_mj(energy_per_inference(trace, t0, t1, n, idle["idle_w"]))
    return {"source": idle["source"], "meter": idle["meter"], "kind": idle["kind"], "idle": idle,
            "method": f"idle {idle_s:g} s (interpreters allocated), then each graph back to back for {energy_s:g} s "
                      "under one recording; net = (integral of P dt - P_idle * T) / N"}


def _run_for(fn: Callable[[], object], seconds: float) -> tuple[float, float, int]:
    """Call ``fn`` back to back for ``seconds``: (wall-clock start, end, calls) for an energy window."""
    n, t0 = 0, now()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        fn()
        n += 1
    return t0, now(), n


def _energy_mj(e: dict[str, Any]) -> dict[str, Any]:
    """energy_per_inference's result with the per-inference figures in millijoules."""
    out = {k: v for k, v in e.items() if not k.endswith("_j_per_inference")}
    out["gross_mj_per_inference"] = e["gross_j_per_inference"] * 1e3
    net = e["net_j_per_inference"]
    out["net_mj_per_inference"] = None if net is None else net * 1e3
    return out


def _health() -> dict[str, Any]:
    return {"cpu_temperature_c": cpu_temperature_c(), "throttled": read_throttled()}


def profile_bundle(
    bundle: Bundle,
    device: str = "host",
    *,
    num_threads: int = 1,
    delegate: str = "xnnpack",
    min_time_s: float = 1.0,
    passes: int = 3,
    precisions: tuple[str, ...] | None = None,
    transitions: bool = True,
    meter: "Meter | None" = None,
    energy_s: float = 5.0,
    idle_s: float = 10.0,
    progress: Progress | None = None,
    write: bool = True,
) -> dict[str, Any]:
    """Measure every block (and whole-model graph) at every precision; write profiles/<device>.json.

    Graphs are timed in ``passes`` interleaved passes of ``min_time_s / passes`` each, so that a burst of outside
    load spreads over all graphs instead of skewing one, each pass on freshly made interpreters (measured here:
    the same block differs by up to ~8 % between two instantiations, from memory placement); the figures pool the
    per-call times of each graph's undisturbed passes (``undisturbed_passes``). Besides invoke-only latency it measures
    what the cost model needs around the invokes: the per-inference work every model pays once
    (``inference_overhead_ms``: the whole model's runtime loop, end to end, minus its invoke), the runtime's
    per-block gap (``runtime_overhead_ms``: ``EdgeRunner`` with every block at one precision and a gate after each
    that never fires, end to end, minus the sum of the block invokes and the per-inference work, per block; all
    loops timed in every pass and pooled like the graphs) and, with ``transitions``, each float ↔ int8 hand-over at
    each boundary. Splitting the per-inference work out keeps the comparison with the whole model fair: before, it
    was spread over the blocks as "gap" while the whole model was priced by its invoke alone.

    With a ``meter`` (edgequee.meters.open_meter), after the latency passes, idle power is measured (``idle_s``,
    interpreters allocated, nothing running), then each graph runs back to back for ``energy_s`` while the meter
    records; energy per inference is reported gross and net of idle, in mJ, naming the meter.
    """
    check_device_name(device)  # before minutes of measuring: it names the file written
    m = bundle.manifest
    precisions = precisions or m.precisions
    graphs = [(i, p) for i in range(m.num_exits) for p in precisions] + [(-1, p) for p in m.whole_model]
    pairs = [(p, q) for p in precisions for q in precisions if (p == "int8") != (q == "int8")] if transitions else []
    boundaries = [(i, p, q) for i in range(1, m.num_exits) for p, q in pairs]
    steps = (passes * (len(graphs) + len(precisions) + sum(p in precisions for p in m.whole_model)) + len(boundaries)
             + (len(graphs) + 1 if meter else 0))
    tick = Ticker(steps, progress)

    before = _health()
    blocks, whole = [], {}
    rng = np.random.default_rng(0)
    if delegate not in DELEGATES:
        raise DeviceError(f"delegate {delegate!r}: choose one of {', '.join(DELEGATES)}")
    graph = _Graphs(bundle, num_threads, delegate)
    run_opts: dict[str, Any] = {"num_threads": num_threads, "use_xnnpack": delegate != "none",
                                "edgetpu": delegate == "edgetpu"}
    images = rng.integers(0, 256, (16, m.input.height, m.input.width, m.input.channels), dtype=np.uint8)
    loops = _RuntimeLoops(bundle, precisions, run_opts, images)
    loop_keys = [("blocks", p) for p in precisions] + [("whole", p) for p in loops.whole_precisions]
    timed: dict[tuple[int, str], list[tuple[list[float], int, bool]]] = {k: [] for k in graphs}
    looped: dict[tuple[str, str], list[tuple[list[float], int, bool]]] = {k: [] for k in loop_keys}
    for k in range(passes):  # interleaved passes: a burst of outside load hits every graph alike, not one
        if k:
            graph.renew_cpu()
            loops.renew()
        for i, p in graphs:
            g = graph(i, p)
            _fill_random(g, rng)
            timed[i, p].append(time_calls(g.invoke, warmup_s=0.2, min_time_s=min_time_s / passes))
            tick(f"{'whole' if i < 0 else f'block {i}'} {p}" + (f" (pass {k + 1}/{passes})" if passes > 1 else ""))
        for kind, p in loop_keys:
            looped[kind, p].append(time_calls(loops(kind, p), warmup_s=0.2, min_time_s=min_time_s / passes))
            tick(f"runtime loop {'' if kind == 'blocks' else 'whole '}{p}" + (f" (pass {k + 1}/{passes})" if passes > 1 else ""))
    del loops
    entries = []
    # the runtime loops are timed in the same passes and pooled by the same rule, so the gap compares like with like
    latency = _latency_entries([timed[k] for k in graphs] + [looped[k] for k in loop_keys])
    for (i, p), entry in zip(graphs, latency):
        if i < 0:
            whole[p] = entry
        else:
            entry = {"block": i, "precision": p, "macs": m.blocks[i].macs, **entry}
            blocks.append(entry)
        entries.append(entry)
    energy: dict[str, Any] = {"source": "not measured", "why": "no energy meter given (edgequee profile --meter ...)"}
    if meter is not None:  # after the latency passes: a sampling thread must not disturb the timings
        energy = _measure_energy(meter, [(graph(i, p), e) for (i, p), e in zip(graphs, entries)],
                                 energy_s, idle_s, tick)
    del graph

    loop_stats = dict(zip(loop_keys, latency[len(graphs):]))
    per_inference = {}
    for p in (p for kind, p in loop_keys if kind == "whole"):
        loop_p50 = loop_stats["whole", p]["latency_ms"]["p50_ms"]
        invoke = whole[p]["latency_ms"]["p50_ms"]
        per_inference[p] = {"value": max(0.0, loop_p50 - invoke), "loop_p50_ms": loop_p50, "invoke_p50_ms": invoke,
                            "source": "measured: (whole-model runtime loop p50: preprocessing, invoke, output "
                                      "dequantization, softmax) - (whole-model invoke p50), same passes and pooling"}
    gaps = {}
    for p in precisions:
        loop = loop_stats["blocks", p]
        loop_p50 = loop["latency_ms"]["p50_ms"]
        invokes = sum(b["latency_ms"]["p50_ms"] for b in blocks if b["precision"] == p)
        fixed = per_inference_at(per_inference, p)
        gaps[p] = {"value": max(0.0, (loop_p50 - invokes - fixed) / m.num_exits), "loop_p50_ms": loop_p50,
                   "invokes_p50_ms": invokes, "per_inference_ms": fixed, "passes_pooled": loop["passes_pooled"],
                   "loop_pass_p50_ms": loop["pass_p50_ms"],
                   "source": "measured: (runtime loop p50, every block, a max-softmax gate after each that never "
                             "fires) - (sum of block invoke p50s) - (per-inference work, inference_overhead_ms), "
                             "per block, all from the same passes and pooling rule; covers exit head, gate and "
                             "hand-over"}

    trans = []
    if boundaries:
        runner = EdgeRunner(bundle, ThresholdPolicy(precisions[0]), **run_opts)
        for p in precisions:  # real hidden states in every output buffer (garbage would overflow quantize)
            runner.all_exits(images[:1], [p] * m.num_exits)
        for i, p, q in boundaries:
            hand_over = runner.boundary(i, p, q)
            stats = asdict(measure_latency(hand_over, warmup_s=0.02, min_time_s=min(min_time_s, 0.2)))
            trans.append({"boundary": i, "from": p, "to": q, "elements": math.prod(m.blocks[i].input_shape),
                          "latency_ms": stats})
            tick(f"hand-over {p}>{q} into block {i}")

    after = _health()
    profile = {
        "format": PROFILE_FORMAT,
        "device": device,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "runtime": runtime_name(),
        "threads": num_threads,
        "delegate": {"xnnpack": "xnnpack", "none": "none (builtin kernels)",
                     "edgetpu": "edgetpu (int8 blocks; other graphs on the CPU with xnnpack)"}[delegate],
        "method": f"invoke-only loop per graph, inputs resident; {passes} interleaved pass(es) over all graphs, "
        f"each on fresh CPU interpreters, warm-up 0.2 s, then >= {min_time_s / passes:.3g} s and until the last "
        "3 round medians agree within 2 %; each pass also times the runtime loop per precision (fresh runners); "
        f"stats of the per-call times pooled over each graph's passes within {UNDISTURBED:.0%} of its fastest "
        "pass (passes_pooled; pass_p50_ms lists every pass)",
        "passes": passes,
        "energy": energy,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "health": {"before": before, "after": after},
        "blocks": blocks,
        "whole_model": whole,
        "runtime_overhead_ms": gaps,
        "inference_overhead_ms": per_inference,
        "transitions": trans,
    }
    warn = throttle_warning(profile)
    if warn:
        warnings.warn(warn, stacklevel=2)
    if write:
        write_profile(bundle, device, profile)
    return profile


def throttle_warning(profile: Mapping[str, Any]) -> str | None:
    """A warning when the device throttled (or ran hot) while it was profiled, else None."""
    msgs = []
    for when, h in profile.get("health", {}).items():
        t = h.get("throttled")
        if t and (t["throttled_now"] or t["since_boot"]):
            msgs.append(f"{when}: {', '.join(t['now'] + t['since_boot'])} ({t['raw']})")
        temp = h.get("cpu_temperature_c")
        if temp is not None and temp >= 80:
            msgs.append(f"{when}: CPU at {temp:.0f} °C")
    if not msgs:
        return None
    return ("the device was throttled or hot while profiling (" + "; ".join(msgs) + "): latencies are pessimistic; "
            "cool it (heatsink/fan), use a 5 V/5 A supply, and profile again")
