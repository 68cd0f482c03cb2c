"""Energy meters (device side: stdlib + numpy; smbus2 only for the I2C chips).

    meter = open_meter("ina260:bus=1,addr=0x40")      # None for "none"; see METER_SPECS for every spelling
    idle = meter.measure_idle(10.0)                    # {"idle_w", "seconds", "samples", "meter", "kind", "source"}
    meter.start(); t0 = now(); <n invokes>; t1 = now(); trace = meter.stop()   # or: with meter: ...; meter.trace
    e = energy_per_inference(trace, t0, t1, n, idle["idle_w"])
    # e: energy_j, mean_power_w, gross_j_per_inference, net_j_per_inference, samples, sample_rate_hz, window_s,
    #    and meter / kind ("measured" | "estimated") / source ("measured by ina260(bus=1,addr=0x40)")
One recording can serve many windows [t0, t1] (wall-clock ``now()`` seconds). For "modeled" without numbers, pass
the descriptor's figures: ``open_meter("modeled", descriptor_power=(idle_w, active_w, "device_profiles/rpi4.json"))``.
Errors are MeterError (a DeviceError), one line naming the fix.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .base import Meter, MeterError, PowerTrace, energy_per_inference, now
from .csvlog import CsvLogMeter
from .ina import Ina219Meter, Ina260Meter
from .modeled import ModeledMeter
from .pmic import PmicMeter
from .rapl import RaplMeter

__all__ = [
    "METER_SPECS",
    "CsvLogMeter",
    "Ina219Meter",
    "Ina260Meter",
    "Meter",
    "MeterError",
    "ModeledMeter",
    "PmicMeter",
    "PowerTrace",
    "RaplMeter",
    "energy_per_inference",
    "now",
    "open_meter",
]

METER_SPECS = (
    "none",
    "ina219[:bus=1,addr=0x40,shunt=0.1]",
    "ina260[:bus=1,addr=0x40]",
    "pi5-pmic[:interval=0.1]",
    "rapl[:dram=1,interval=0.05,root=/sys/class/powercap]",
    "csv:FILE",
    "modeled[:idle=2.7,active=6.4]",
)


def _flag(value: str) -> bool:
    if value.lower() not in ("1", "true", "yes", "0", "false", "no"):
        raise ValueError(value)
    return value.lower() in ("1", "true", "yes")


def _address(value: str) -> int:
    return int(value, 0)


# meter name → (class, {option, also its keyword argument: parser})
_REGISTRY: dict[str, tuple[Callable[..., Meter], dict[str, Callable[[str], Any]]]] = {
    "ina219": (Ina219Meter, {"bus": int, "addr": _address, "shunt": float}),
    "ina260": (Ina260Meter, {"bus": int, "addr": _address}),
    "pi5-pmic": (PmicMeter, {"interval": float}),
    "rapl": (RaplMeter, {"dram": _flag, "interval": float, "root": str}),
    "modeled": (ModeledMeter, {"idle": float, "active": float}),  # ModeledMeter(idle_w, active_w)
}


def open_meter(spec: str, *, descriptor_power: tuple[float, float, str] | None = None) -> Meter | None:
    """The meter a ``--meter`` spelling names (``name[:opt=value,...]``, or ``csv:FILE``); None for "none"."""
    name, _, rest = spec.strip().partition(":")
    name = name.lower()
    if name == "none" and not rest:
        return None
    if name == "csv":
        if not rest:
            raise MeterError("csv needs the log file: --meter csv:FILE")
        return CsvLogMeter(rest)
    if name not in _REGISTRY:
        raise MeterError(f"unknown meter {spec!r}: choose one of {', '.join(METER_SPECS)}")
    factory, options = _REGISTRY[name]
    kwargs: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if key not in options or not eq:
            raise MeterError(f"{name} takes options {', '.join(o + '=…' for o in options) or 'none'}, not {item!r}")
        try:
            kwargs[key] = options[key](value)
        except ValueError:
            raise MeterError(f"{name}: {item!r} is not a valid value; e.g. {_example(name)}") from None
    if name != "modeled":
        return factory(**kwargs)
    if not kwargs and descriptor_power is not None:
        return ModeledMeter(*descriptor_power)
    if set(kwargs) != {"idle", "active"}:
        raise MeterError(f"modeled needs both figures ({spec!r}): e.g. {_example(name)}, or a device descriptor")
    return ModeledMeter(kwargs["idle"], kwargs["active"])


def _example(name: str) -> str:
    return next(s for s in METER_SPECS if s.startswith(name)).replace("[:", ":").rstrip("]")
