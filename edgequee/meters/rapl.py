"""CPU package energy from Linux powercap RAPL counters (``/sys/class/powercap/intel-rapl:*``).

Intel CPUs and AMD Zen CPUs (the same ``intel-rapl`` naming, package and core domains only) expose it on bare
metal; most VMs do not (the machine edgequee is developed on, an AMD EPYC VM, has no /sys/class/powercap). The
older AMD-only ``amd_energy`` driver is a hwmon device, not powercap, and is not read here. ``energy_uj`` is
root-only since Linux 5.10 (CVE-2020-8694).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import MeterError, PowerTrace, SampledMeter

__all__ = ["RaplMeter"]


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text())
    except PermissionError:
        raise MeterError(
            f"{path} is not readable (root-only since Linux 5.10): run as root, or make it readable with "
            f"sudo chmod o+r {path.parent.parent}/intel-rapl:*/energy_uj (or a udev rule doing the same at boot)"
        ) from None


class RaplMeter(SampledMeter):
    """Sum of the package domains' counters (plus the DRAM domains with ``dram=True``), polled every ``interval``.

    ``root`` is the powercap directory (tests pass a directory laid out like sysfs). Each counter wraps at its
    ``max_energy_range_uj``; a decrease between two polls is taken as one wrap, so polls must come more often
    than one wrap (minutes or more at full load).
    """

    def __init__(self, root: str | Path = "/sys/class/powercap", dram: bool = False, interval: float = 0.05) -> None:
        root = Path(root)
        zones = sorted(p for p in root.glob("intel-rapl:*") if (p / "energy_uj").exists())
        names = {z: (z / "name").read_text().strip() for z in zones}
        # top-level zones are intel-rapl:N; sub-zones intel-rapl:N:M (core, uncore, and on servers dram)
        self._zones = [z for z in zones if names[z].startswith("package") and z.name.count(":") == 1]
        self._zones += [z for z in zones if dram and names[z] == "dram"]
        if not self._zones:
            raise MeterError(
                f"no RAPL package domain under {root} (this machine or VM exposes no powercap RAPL): "
                "use another meter, e.g. an INA260 or csv:FILE from a USB power meter"
            )
        self._wrap_j = np.array([_read_int(z / "max_energy_range_uj") * 1e-6 for z in self._zones])
        self.name = "rapl(" + "+".join(names[z] for z in self._zones) + ")"
        self.interval_s = interval
        self._sample()

    def _sample(self) -> tuple[float, ...]:
        return tuple(_read_int(z / "energy_uj") * 1e-6 for z in self._zones)

    def _trace(self, t: np.ndarray, rows: np.ndarray) -> PowerTrace:
        steps = np.diff(rows, axis=0)
        steps += (steps < 0) * self._wrap_j
        joules = np.concatenate([[0.0], np.cumsum(steps.sum(axis=1))])
        return PowerTrace(self.name, self.kind, t, joules=joules)
