"""Device descriptors: what a target device is and what its figures are, each marked measured or estimated.

A descriptor (``device_profiles/<name>.json``, format ``edgequee-device/1``) holds the figures the cost model
needs when a bundle has no measured profile for that device: effective throughput per precision (GMAC/s, as
XNNPACK or the Edge TPU reaches it on small CNN blocks, not the peak), the per-invoke overhead (one block's
invoke plus edgequee's head/gate/transfer work between two blocks), the cost of a precision change at a block
boundary (per element of the hidden state), bytes/s to an accelerator, and idle/active power. Every figure is a
``Figure``: ``{"value": ..., "status": "measured" | "estimated", "source": "..."}`` — the source says what it
was measured with, or what published number and what inference it was estimated from.

An accelerator descriptor (coral-usb-rpi4, …) names its ``host`` descriptor: precisions the accelerator cannot
run (fp32, fp16 on an Edge TPU) are costed on the host CPU, and so are precision transitions.

``calibrate_descriptor`` fits throughput and overhead to a measured bundle profile (least squares on
latency = overhead + MACs / throughput) and returns a descriptor whose fitted figures are marked measured.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from .bundle import PRECISIONS, Manifest
from .errors import DeviceError

__all__ = [
    "DEVICE_FORMAT", "Figure", "DeviceDescriptor", "descriptor_dirs", "list_devices", "load_device",
    "read_descriptor", "calibrate_descriptor",
]

DEVICE_FORMAT = "edgequee-device/1"
STATUSES = ("measured", "estimated")
_ENV_DIRS = "EDGEQUEE_DEVICE_PROFILES"


@dataclass(frozen=True)
class Figure:
    """A number with its provenance."""

    value: float
    status: str
    source: str

    @classmethod
    def from_json(cls, d: Any, where: str) -> "Figure":
        if not isinstance(d, Mapping) or set(d) - {"value", "status", "source"} or "value" not in d:
            raise DeviceError(f"{where}: expected {{\"value\": number, \"status\": ..., \"source\": ...}}, got {d!r}")
        value, status, source = d["value"], d.get("status"), d.get("source")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
            raise DeviceError(f"{where}.value: expected a finite number >= 0, got {value!r}")
        if status not in STATUSES:
            raise DeviceError(f"{where}.status: expected 'measured' or 'estimated', got {status!r}")
        if not isinstance(source, str) or not source.strip():
            raise DeviceError(f"{where}.source: say where the figure comes from (a meter, a paper, a fit)")
        return cls(float(value), status, source)

    def describe(self) -> str:
        return f"{self.status}: {self.source}"


@dataclass(frozen=True)
class DeviceDescriptor:
    name: str
    title: str
    cpu: Mapping[str, Any]
    threads: int
    runtime: str
    delegate: str
    throughput_gmacs: Mapping[str, Figure]  # precisions this device's own engine runs
    invoke_overhead_ms: Figure
    transition_ns_per_element: Figure
    idle_w: Figure
    active_w: Figure
    io_mb_per_s: Figure | None = None  # accelerators: activations in and out per invoke
    host: str | None = None  # accelerators: the CPU descriptor that runs the other precisions
    notes: str = ""
    path: Path | None = field(default=None, compare=False)

    @property
    def precisions(self) -> tuple[str, ...]:
        return tuple(p for p in PRECISIONS if p in self.throughput_gmacs)

    def figures(self) -> dict[str, Figure]:
        """Every figure by dotted name (for listing and for checking provenance)."""
        out = {f"throughput_gmacs.{p}": f for p, f in self.throughput_gmacs.items()}
        out.update(invoke_overhead_ms=self.invoke_overhead_ms, transition_ns_per_element=self.transition_ns_per_element,
                   **{"power_w.idle": self.idle_w, "power_w.active": self.active_w})
        if self.io_mb_per_s is not None:
            out["io_mb_per_s"] = self.io_mb_per_s
        return out

    def to_json(self) -> dict[str, Any]:
        def fig(f: Figure) -> dict[str, Any]:
            return {"value": f.value, "status": f.status, "source": f.source}

        d: dict[str, Any] = {
            "format": DEVICE_FORMAT, "name": self.name, "title": self.title, "cpu": dict(self.cpu),
            "threads": self.threads, "runtime": self.runtime, "delegate": self.delegate,
            "throughput_gmacs": {p: fig(f) for p, f in self.throughput_gmacs.items()},
            "invoke_overhead_ms": fig(self.invoke_overhead_ms),
            "transition_ns_per_element": fig(self.transition_ns_per_element),
            "power_w": {"idle": fig(self.idle_w), "active": fig(self.active_w)},
        }
        if self.io_mb_per_s is not None:
            d["io_mb_per_s"] = fig(self.io_mb_per_s)
        if self.host:
            d["host"] = self.host
        if self.notes:
            d["notes"] = self.notes
        return d

    @classmethod
    def from_json(cls, d: Any, where: str = "descriptor") -> "DeviceDescriptor":
        if not isinstance(d, Mapping):
            raise DeviceError(f"{where}: expected a JSON object, got {type(d).__name__}")
        if d.get("format") != DEVICE_FORMAT:
            raise DeviceError(f"{where}: format {d.get('format')!r}, expected {DEVICE_FORMAT!r}")
        missing = [k for k in ("name", "title", "cpu", "threads", "runtime", "delegate", "throughput_gmacs",
                               "invoke_overhead_ms", "transition_ns_per_element", "power_w") if k not in d]
        if missing:
            raise DeviceError(f"{where}: missing {', '.join(missing)} (see device_profiles/README.md)")
        known = {"format", "name", "title", "cpu", "threads", "runtime", "delegate", "throughput_gmacs",
                 "invoke_overhead_ms", "transition_ns_per_element", "power_w", "io_mb_per_s", "host", "notes"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise DeviceError(f"{where}: unknown field(s) {', '.join(unknown)} (typo? see device_profiles/README.md)")
        tp = d["throughput_gmacs"]
        if not isinstance(tp, Mapping) or not tp:
            raise DeviceError(f"{where}.throughput_gmacs: give at least one precision ({', '.join(PRECISIONS)})")
        bad = [p for p in tp if p not in PRECISIONS]
        if bad:
            raise DeviceError(f"{where}.throughput_gmacs: unknown precision(s) {', '.join(bad)}; use {PRECISIONS}")
        threads = d["threads"]
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise DeviceError(f"{where}.threads: expected an integer >= 1, got {threads!r}")
        power = d["power_w"]
        if not isinstance(power, Mapping) or {"idle", "active"} - set(power):
            raise DeviceError(f"{where}.power_w: expected {{\"idle\": figure, \"active\": figure}}")
        throughput = {p: Figure.from_json(f, f"{where}.throughput_gmacs.{p}") for p, f in tp.items()}
        if any(f.value <= 0 for f in throughput.values()):
            raise DeviceError(f"{where}.throughput_gmacs: every throughput must be > 0")
        return cls(
            name=str(d["name"]), title=str(d["title"]), cpu=dict(d["cpu"]), threads=threads,
            runtime=str(d["runtime"]), delegate=str(d["delegate"]), throughput_gmacs=throughput,
            invoke_overhead_ms=Figure.from_json(d["invoke_overhead_ms"], f"{where}.invoke_overhead_ms"),
            transition_ns_per_element=Figure.from_json(d["transition_ns_per_element"],
                                                       f"{where}.transition_ns_per_element"),
            idle_w=Figure.from_json(power["idle"], f"{where}.power_w.idle"),
            active_w=Figure.from_json(power["active"], f"{where}.power_w.active"),
            io_mb_per_s=Figure.from_json(d["io_mb_per_s"], f"{where}.io_mb_per_s") if "io_mb_per_s" in d else None,
            host=d.get("host"), notes=str(d.get("notes", "")),
        )


def descriptor_dirs() -> list[Path]:
    """Where descriptors are looked up, first match wins: $EDGEQUEE_DEVICE_PROFILES (os.pathsep-separated),
    then the shipped ones (the repo's device_profiles/, installed as edgequee/device_profiles)."""
    dirs = [Path(p) for p in os.environ.get(_ENV_DIRS, "").split(os.pathsep) if p]
    here = Path(__file__).resolve().parent
    dirs += [here / "device_profiles", here.parent / "device_profiles"]
    return [d for d in dirs if d.is_dir()]


def read_descriptor(path: str | os.PathLike[str]) -> DeviceDescriptor:
    """Read and validate one descriptor file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DeviceError(f"{path}: no such descriptor file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DeviceError(f"{path}: not valid JSON ({e}); fix the file (see device_profiles/README.md)") from e
    return replace(DeviceDescriptor.from_json(data, str(path)), path=path)


def list_devices() -> dict[str, DeviceDescriptor]:
    """Every descriptor found, by name (earlier directories shadow later ones)."""
    found: dict[str, DeviceDescriptor] = {}
    for d in descriptor_dirs():
        for f in sorted(d.glob("*.json")):
            desc = read_descriptor(f)
            if desc.name != f.stem:
                raise DeviceError(f"{f}: name {desc.name!r} does not match the file name; rename one of them")
            found.setdefault(desc.name, desc)
    return found


# "x86-host" means this x86 machine, and whether int8 pays on it depends on its ISA class (``sysinfo.int8_class``):
# with AVX-512 VNNI or AVX-VNNI int8 ran 3.5-4x faster than fp32 on this project's VMs, with AVX2 alone slower.
# So the name resolves to the descriptor of this machine's class, unless a descriptor of that very name exists.
HOST_CLASSES = {"x86-vnni": "x86-host-vnni", "x86-avx2": "x86-host-avx2"}
HOST_ALIAS = "x86-host"


def load_device(name_or_path: str | os.PathLike[str]) -> DeviceDescriptor:
    """A descriptor by name (see ``descriptor_dirs``) or by path to a .json file. ``x86-host`` is this machine's
    x86 class (``HOST_CLASSES``; AVX2 where the CPU is not x86)."""
    s = str(name_or_path)
    if s.endswith(".json") or os.sep in s:
        return read_descriptor(s)
    devices = list_devices()
    if s == HOST_ALIAS and s not in devices:
        from .sysinfo import int8_class

        s = HOST_CLASSES.get(int8_class(), HOST_CLASSES["x86-avx2"])
    try:
        return devices[s]
    except KeyError:
        raise DeviceError(
            f"no device descriptor {s!r}; known: {', '.join(sorted(devices)) or 'none'} "
            f"(or pass a path to a descriptor .json, or add a directory to ${_ENV_DIRS})"
        ) from None


def _profile_points(manifest: Manifest, profile: Mapping[str, Any]) -> dict[str, list[tuple[float, float]]]:
    """(MACs, invoke p50 ms) per precision from a bundle profile's blocks."""
    pts: dict[str, list[tuple[float, float]]] = {}
    for b in profile.get("blocks", []):
        pts.setdefault(b["precision"], []).append((float(manifest.blocks[b["block"]].macs), b["latency_ms"]["p50_ms"]))
    return pts


def _fit(macs: np.ndarray, ms: np.ndarray) -> tuple[float, float]:
    """(ms per MAC, intercept ms) of invoke latency.

    A line is fitted only where block sizes span at least 2x (otherwise a few points of timing noise swing the
    slope wildly); else the ratio estimator sum(ms) / sum(MACs) through the origin, which is robust.
    """
    if len(macs) >= 4 and macs.max() >= 2 * macs.min():
        slope, a = np.polyfit(macs, ms, 1)
        if slope > 0 and a >= 0:
            return float(slope), float(a)
    return float(ms.sum() / macs.sum()), 0.0


def calibrate_descriptor(
    base: DeviceDescriptor,
    measurements: Iterable[tuple[Manifest, Mapping[str, Any]]],
    *,
    name: str | None = None,
) -> DeviceDescriptor:
    """Fit ``base``'s throughput per precision and its overhead to measured bundle profiles.

    Per precision, invoke latency = a + MACs / throughput over every measured block of every bundle given (see
    ``_fit``). The invoke intercepts ``a`` are averaged; the runtime's per-block work between invokes, which
    profiles record as ``runtime_overhead_ms``, is added when present; the transition cost
    per element is the median of the profile's measured boundary transitions. Figures that cannot be fitted
    keep their base value and status.
    """
    pts: dict[str, list[tuple[float, float]]] = {}
    sources, gaps, per_element = [], [], []
    threads = set()
    for manifest, profile in measurements:
        for p, xs in _profile_points(manifest, profile).items():
            pts.setdefault(p, []).extend(xs)
        sources.append(f"{manifest.model} profile {profile.get('device', '?')} ({profile.get('created', '?')})")
        threads.add(profile.get("threads"))
        gap = profile.get("runtime_overhead_ms", {})
        gaps += [v["value"] for v in gap.values()] if isinstance(gap, Mapping) else []
        per_element += [t["latency_ms"]["p50_ms"] * 1e6 / t["elements"] for t in profile.get("transitions", [])]
    if not pts:
        raise DeviceError("no measured blocks to fit; run edgequee profile BUNDLE --device NAME first")
    if len(threads) > 1:
        raise DeviceError(f"profiles were measured at different thread counts {sorted(threads, key=str)}; fit one")
    src = "fit of block invoke p50 = overhead + MACs/throughput to " + "; ".join(sources)
    throughput = dict(base.throughput_gmacs)
    intercepts = []
    for p, xs in pts.items():
        macs, ms = np.array(xs).T
        slope, a = _fit(macs, ms)
        throughput[p] = Figure(round(1e-6 / slope, 3), "measured", f"{src} ({len(xs)} blocks)")
        intercepts.append(a)
    overhead = float(np.mean(intercepts)) + (float(np.median(gaps)) if gaps else 0.0)
    how = " + median runtime gap between invokes" if gaps else ""
    transition = base.transition_ns_per_element
    if per_element:
        transition = Figure(round(float(np.median(per_element)), 4), "measured",
                            f"median of {len(per_element)} measured boundary transitions in " + "; ".join(sources))
    return replace(
        base,
        transition_ns_per_element=transition,
        name=name or base.name,
        threads=int(threads.pop() or base.threads),
        throughput_gmacs=throughput,
        invoke_overhead_ms=Figure(round(overhead, 4), "measured", f"{src}: mean intercept{how}"),
        notes=(f"calibrated {datetime.now(timezone.utc).date()} from {base.name}. " + base.notes).strip(),
        path=None,
    )
