"""The per-device cost model: what running block i at precision q costs on one device, and where that number is from.

``CostModel.for_bundle(bundle, "rpi4")`` combines two sources:
- the bundle's measured profile ``BUNDLE/profiles/rpi4.json`` (``edgequee profile``), used whenever it has the
  figure: block invoke p50 plus the runtime's measured per-block gap, measured transitions, metered energy, and
  the per-inference work (preprocessing, softmax) once per inference: in block 0 and in the whole model;
- the device descriptor ``device_profiles/rpi4.json`` otherwise: latency = per-invoke overhead + MACs /
  throughput (+ activation bytes / link bandwidth on an accelerator); energy = latency × (active − idle) power.
Every ``Cost`` carries a source string for its latency and its energy ("measured: …" or "estimated: …").

Energy here is **net of idle** (what computing adds over the device sitting idle), in millijoules; the profiler
reports gross figures too. The ``weighted`` objective mixes latency and energy, each normalised by the
whole network's cost at the cheapest-latency precision, so that ``energy_weight`` is unit-free.

A precision change at a block boundary (float ↔ int8) costs quantizing or dequantizing the hidden state; a
float ↔ float change (fp32 ↔ fp16 graphs both take float32 input) and an int8 hand-over with shared parameters
cost nothing beyond the copy already inside the per-block gap.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .bundle import Bundle, Manifest
from .devices import DeviceDescriptor, load_device
from .schema import check_profile, is_device_name
from .errors import DeviceError

__all__ = ["OBJECTIVES", "Cost", "CostModel", "load_profile", "per_inference_at"]

OBJECTIVES = ("latency", "energy", "weighted")


@dataclass(frozen=True)
class Cost:
    latency_ms: float
    energy_mj: float | None  # None: neither a meter nor a descriptor's power figures are available
    latency_source: str
    energy_source: str

    def __add__(self, other: "Cost") -> "Cost":
        e = None if self.energy_mj is None or other.energy_mj is None else self.energy_mj + other.energy_mj
        return Cost(self.latency_ms + other.latency_ms, e, _join(self.latency_source, other.latency_source),
                    _join(self.energy_source, other.energy_source))


ZERO = Cost(0.0, 0.0, "", "")


def _join(a: str, b: str) -> str:
    """Sources of a sum: each distinct source once, in order."""
    parts = [s for s in a.split("; ") if s]
    parts += [s for s in b.split("; ") if s and s not in parts]
    return "; ".join(parts)


def load_profile(bundle: Bundle, device: str) -> dict[str, Any] | None:
    """``BUNDLE/profiles/<device>.json`` (validated: ``schema.check_profile``), or None when this device was never
    profiled."""
    if not is_device_name(device):  # a descriptor's path, say: never a file under profiles/
        return None
    path = bundle.profiles_dir / f"{device}.json"
    if not path.is_file() or path.is_symlink():
        return None
    try:
        profile = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DeviceError(f"{path}: not valid JSON ({e}); re-run edgequee profile") from e
    check_profile(profile, str(path), bundle.manifest.num_exits)
    return profile


def per_inference_at(per_inference: Mapping[str, Mapping[str, Any]], precision: str) -> float:
    """The per-inference work at ``precision``; without a whole model there, that of one with the same kind of
    input (float or int8), else of any; 0 without whole models."""
    if precision in per_inference:
        return float(per_inference[precision]["value"])
    same = [v["value"] for q, v in per_inference.items() if (q == "int8") == (precision == "int8")]
    values = same or [v["value"] for v in per_inference.values()]
    return float(np.median(values)) if values else 0.0


def _is_int8(precision: str) -> bool:
    return precision == "int8"


class CostModel:
    """Costs of one bundle's blocks on one device (see the module docstring for the rules)."""

    def __init__(
        self,
        manifest: Manifest,
        device: DeviceDescriptor | None,
        profile: Mapping[str, Any] | None = None,
        *,
        host: DeviceDescriptor | None = None,
        objective: str = "latency",
        energy_weight: float = 0.5,
        profile_name: str = "profile",
    ):
        if objective not in OBJECTIVES:
            raise DeviceError(f"objective {objective!r}: choose one of {', '.join(OBJECTIVES)}")
        if device is None and profile is None:
            raise DeviceError("a cost model needs a measured profile or a device descriptor (edgequee devices)")
        if not 0.0 <= energy_weight <= 1.0:
            raise DeviceError(f"energy_weight must lie in [0, 1], got {energy_weight}")
        if device is not None and device.host and host is None:
            host = load_device(device.host)
        self.manifest, self.device, self.host, self.profile = manifest, device, host, profile
        self.objective, self.energy_weight, self._profile_name = objective, energy_weight, profile_name
        self.name = (profile or {}).get("device") or (device.name if device else "?")
        self._measured_blocks = {(b["block"], b["precision"]): b for b in (profile or {}).get("blocks", [])}
        self._gap = (profile or {}).get("runtime_overhead_ms", {})
        self._per_inference = (profile or {}).get("inference_overhead_ms", {})
        self._transitions = {(t["boundary"], t["from"], t["to"]): t for t in (profile or {}).get("transitions", [])}
        self._norm: tuple[float, float] | None = None

    @classmethod
    def for_bundle(
        cls,
        bundle: Bundle,
        device: str,
        *,
        descriptor: str | None = None,
        objective: str = "latency",
        energy_weight: float = 0.5,
        use_profile: bool = True,
    ) -> "CostModel":
        """The cost model of ``bundle`` on ``device``: its measured profile when present, its descriptor
        (``descriptor`` or the descriptor of the same name) for everything else."""
        profile = load_profile(bundle, device) if use_profile else None
        desc = None
        try:
            desc = load_device(descriptor or device)
        except DeviceError:
            if descriptor is not None or profile is None:
                raise
        return cls(bundle.manifest, desc, profile, objective=objective, energy_weight=energy_weight,
                   profile_name=f"profiles/{device}.json")

    # ------------------------------------------------------------------------------------------- pieces

    def _engine(self, precision: str) -> DeviceDescriptor:
        """The descriptor whose engine runs ``precision`` (an accelerator's host runs what the accelerator can't)."""
        for d in (self.device, self.host):
            if d is not None and precision in d.throughput_gmacs:
                return d
        have = sorted({p for d in (self.device, self.host) if d for p in d.throughput_gmacs})
        raise DeviceError(f"device {self.name} cannot run {precision} (its descriptor covers {', '.join(have)})")

    def _energy(self, latency_ms: float, engine: DeviceDescriptor, latency_source: str) -> tuple[float, str]:
        watts = engine.active_w.value - engine.idle_w.value
        kind = latency_source.split(":", 1)[0]
        return latency_ms * watts, (f"estimated: ({kind} latency) x (active {engine.active_w.status} - idle "
                                    f"{engine.idle_w.status}) power of {engine.name}")

    def _measured(self, entry: Mapping[str, Any], ms: float, src: str, precision: str) -> Cost:
        """A measured latency with metered energy (scaled from the invoke to ``ms``) or estimated energy."""
        energy = entry.get("energy")
        if energy and energy.get("net_mj_per_inference") is not None:
            scale = ms / entry["latency_ms"]["p50_ms"]  # the metered loop ran invokes only; add the gap's share
            return Cost(ms, energy["net_mj_per_inference"] * scale, src, f"{energy['kind']}: {energy['source']}")
        if self.device is None:
            return Cost(ms, None, src, "unknown: no meter in the profile and no device descriptor")
        e, esrc = self._energy(ms, self._engine(precision), src)
        return Cost(ms, e, src, esrc)

    def _estimated(self, macs: int, nbytes: int, precision: str) -> Cost:
        """One invoke of ``macs`` on the engine that runs ``precision``, per the descriptor."""
        engine = self._engine(precision)
        tp = engine.throughput_gmacs[precision]
        ms = engine.invoke_overhead_ms.value + macs / (tp.value * 1e6)
        src = f"estimated: {engine.name} overhead + MACs / {precision} throughput ({tp.status})"
        if engine.io_mb_per_s is not None:
            ms += nbytes / (engine.io_mb_per_s.value * 1e3)
            src += " + activation bytes / link bandwidth"
        e, esrc = self._energy(ms, engine, src)
        return Cost(ms, e, src, esrc)

    def _once(self, precision: str) -> float | None:
        """The measured per-inference work (preprocessing, softmax) at ``precision`` (``per_inference_at``); None
        for profiles without it."""
        return per_inference_at(self._per_inference, precision) if self._per_inference else None

    def block(self, i: int, precision: str) -> Cost:
        """Running block ``i`` at ``precision``, including the per-block work between invokes (and, for block 0,
        which every inference runs, the measured per-inference work)."""
        m = self._measured_blocks.get((i, precision))
        if m is not None:
            ms = m["latency_ms"]["p50_ms"]
            gap = self._gap.get(precision)
            src = f"measured: {self._profile_name} invoke p50"
            if gap is not None:
                ms += gap["value"]
                src += " + measured runtime gap"
            once = self._once(precision) if i == 0 else None
            if once is not None:
                ms += once
                src += " + measured per-inference work"
            return self._measured(m, ms, src, precision)
        b = self.manifest.blocks[i]
        return self._estimated(b.macs, math.prod(b.input_shape) + math.prod(b.hidden_shape or ()) + b.num_features,
                               precision)

    def transition(self, i: int, src: str, dst: str) -> Cost:
        """Changing precision at the boundary into block ``i`` (block i-1 ran at ``src``, block i runs at ``dst``)."""
        if i == 0 or _is_int8(src) == _is_int8(dst):
            return ZERO
        t = self._transitions.get((i, src, dst))
        if t is not None:
            ms = t["latency_ms"]["p50_ms"]
            lsrc = f"measured: {self._profile_name} transition p50"
        else:
            engine = self.host or self._engine(src)
            elements = math.prod(self.manifest.blocks[i].input_shape)
            ms = elements * engine.transition_ns_per_element.value * 1e-6
            lsrc = f"estimated: elements x {engine.name} transition ns/element"
        if self.device is None:
            return Cost(ms, None, lsrc, "unknown: no device descriptor")
        e, esrc = self._energy(ms, self.host or self.device, lsrc)
        return Cost(ms, e, lsrc, esrc)

    def whole(self, precision: str) -> Cost:
        """The unsplit model at ``precision`` as one graph: measured when profiled, else one estimated invoke."""
        w = (self.profile or {}).get("whole_model", {}).get(precision)
        if w is not None:
            ms, src = w["latency_ms"]["p50_ms"], f"measured: {self._profile_name} whole-model invoke p50"
            once = self._once(precision)
            if once is not None:
                ms += once
                src += " + measured per-inference work"
            return self._measured(w, ms, src, precision)
        m = self.manifest
        if self.device is None:  # a profile alone: the measured blocks in a row are the best estimate
            return self.path([precision] * m.num_exits)
        return self._estimated(sum(b.macs for b in m.blocks), math.prod(m.blocks[0].input_shape) + len(m.classes),
                               precision)

    def path(self, precisions: Sequence[str]) -> Cost:
        """Blocks 0..len(precisions)-1 at those precisions, with the transitions between them."""
        total = ZERO
        for i, p in enumerate(precisions):
            total = total + self.block(i, p)
            if i:
                total = total + self.transition(i, precisions[i - 1], p)
        return total

    # ---------------------------------------------------------------------------------------- objective

    def value(self, cost: Cost) -> float:
        """The scalar the gate trades against error: ms, mJ, or the normalised weighted mix."""
        if self.objective == "latency":
            return cost.latency_ms
        if cost.energy_mj is None:
            raise DeviceError(f"no energy figures for {self.name}: profile with --meter, or give a device descriptor")
        if self.objective == "energy":
            return cost.energy_mj
        lat_ref, en_ref = self._normalisers()
        w = self.energy_weight
        return (1 - w) * cost.latency_ms / lat_ref + w * cost.energy_mj / en_ref

    def _normalisers(self) -> tuple[float, float]:
        if self._norm is None:
            best = min((self.path([p] * self.manifest.num_exits) for p in self.precisions()),
                       key=lambda c: c.latency_ms)
            self._norm = (best.latency_ms, best.energy_mj or 1.0)
        return self._norm

    def precisions(self) -> tuple[str, ...]:
        """The bundle's precisions this device can run."""
        return tuple(p for p in self.manifest.precisions if self._runs(p))

    def _runs(self, precision: str) -> bool:
        if any(b == precision for _, b in self._measured_blocks):
            return True
        return any(d is not None and precision in d.throughput_gmacs for d in (self.device, self.host))

    def step_table(self) -> dict[str, Any]:
        """Objective values as arrays for a gate: ``block[i][q]`` and ``transition[i][(p, q)]`` (JSON-friendly)."""
        ps = self.precisions()
        n = self.manifest.num_exits
        return {
            "objective": self.objective,
            "precisions": list(ps),
            "block": [{q: self.value(self.block(i, q)) for q in ps} for i in range(n)],
            "transition": [{f"{p}>{q}": self.value(self.transition(i, p, q)) for p in ps for q in ps if p != q}
                           for i in range(n)],
        }

    def table(self) -> list[dict[str, Any]]:
        """One row per block × precision: latency, energy and their sources (for reports and --json)."""
        rows = []
        for i in range(self.manifest.num_exits):
            for p in self.precisions():
                c = self.block(i, p)
                rows.append({"block": i, "precision": p, "macs": self.manifest.blocks[i].macs,
                             "latency_ms": c.latency_ms, "energy_mj": c.energy_mj,
                             "latency_source": c.latency_source, "energy_source": c.energy_source})
        return rows

    def describe(self) -> str:
        parts = []
        if self.profile is not None:
            parts.append(f"measured profile {self._profile_name}")
        if self.device is not None:
            parts.append(f"descriptor {self.device.name}" + (f" (host {self.host.name})" if self.host else ""))
        return f"cost model for {self.name} ({self.objective}): " + " + ".join(parts)
