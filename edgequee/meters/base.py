"""The meter interface, power traces, and energy over a window of a trace (net of idle, per inference)."""

from __future__ import annotations

import threading
import time
from array import array
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import DeviceError, InternalError

__all__ = ["Meter", "MeterError", "PowerTrace", "SampledMeter", "energy_per_inference", "now", "source_of"]


class MeterError(DeviceError):
    """An energy meter is missing, unreadable, misconfigured, or its record does not cover a run."""


def source_of(meter: str, kind: str) -> str:
    """How a number came about: "measured by ina260(...)" or "estimated by modeled(...)"."""
    return f"{kind} by {meter}"


def now() -> float:
    """Wall-clock seconds (``time.time()``): the clock of every trace, and of the windows given to them."""
    return time.time()


@dataclass(frozen=True)
class PowerTrace:
    """What a meter recorded: power samples (W) or, for counters such as RAPL, cumulative energy (J).

    ``t`` is wall-clock seconds, increasing. Exactly one of ``watts`` / ``joules`` is set. ``kind`` is
    "measured" or "estimated"; ``meter`` names the meter (and its options) so every number can cite it.
    """

    meter: str
    kind: str
    t: np.ndarray
    watts: np.ndarray | None = None
    joules: np.ndarray | None = None
    volts: np.ndarray | None = None
    amps: np.ndarray | None = None

    def __post_init__(self) -> None:
        if (self.watts is None) == (self.joules is None):
            raise InternalError(f"a PowerTrace holds watts or joules, not both or neither ({self.meter})")

    @property
    def source(self) -> str:
        return source_of(self.meter, self.kind)


def _energy_j(trace: PowerTrace, t0: float, t1: float) -> float:
    """∫P dt over [t0, t1]: trapezoid on the samples with the edges interpolated, or a counter difference."""
    t = trace.t
    if trace.joules is not None:
        e0, e1 = np.interp([t0, t1], t, trace.joules)
        return float(e1 - e0)
    watts = trace.watts
    assert watts is not None  # for the type checker: __post_init__ holds it
    inside = (t > t0) & (t < t1)
    tt = np.concatenate([[t0], t[inside], [t1]])
    pp = np.concatenate([[np.interp(t0, t, watts)], watts[inside], [np.interp(t1, t, watts)]])
    return float(np.sum((pp[1:] + pp[:-1]) * np.diff(tt)) / 2)


def energy_per_inference(
    trace: PowerTrace, t0: float, t1: float, n: int, idle_w: float | None = None
) -> dict[str, Any]:
    """Energy of ``n`` inferences run in the wall-clock window [t0, t1], gross and (given ``idle_w``) net of idle.

    gross = ∫P dt / n; net = (∫P dt − idle_w·T) / n. The result names the meter and whether it measured or
    estimated. Raises MeterError when the trace does not cover the window.
    """
    if not (t1 > t0 and n >= 1):
        raise ValueError(f"need t1 > t0 and n >= 1, got t0={t0}, t1={t1}, n={n}")
    if len(trace.t) == 0 or t0 < trace.t[0] or t1 > trace.t[-1]:
        span = f"[{trace.t[0]:.3f}, {trace.t[-1]:.3f}]" if len(trace.t) else "nothing"
        raise MeterError(
            f"{trace.meter} recorded {span} but the run window is [{t0:.3f}, {t1:.3f}] (wall-clock s): keep the "
            "meter recording from before the run until after it, on a clock that agrees with this machine's"
        )
    seconds = t1 - t0
    energy = _energy_j(trace, t0, t1)
    samples = int(np.count_nonzero((trace.t >= t0) & (trace.t <= t1)))
    return {
        "meter": trace.meter,
        "kind": trace.kind,
        "source": trace.source,
        "n": n,
        "window_s": seconds,
        "energy_j": energy,
        "mean_power_w": energy / seconds,
        "gross_j_per_inference": energy / n,
        "idle_w": idle_w,
        "net_j_per_inference": None if idle_w is None else (energy - idle_w * seconds) / n,
        "samples": samples,
        "sample_rate_hz": samples / seconds,
    }


class Meter:
    """An energy meter: ``start()``, run something, ``stop()`` → PowerTrace; or ``with meter: ...`` → ``meter.trace``."""

    name: str = "meter"
    kind: str = "measured"
    trace: PowerTrace | None = None

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> PowerTrace:
        raise NotImplementedError

    def __enter__(self) -> Meter:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.trace = self.stop()

    def measure_idle(self, seconds: float = 10.0) -> dict[str, Any]:
        """Mean power over a quiet interval of ``seconds`` (nothing else should run meanwhile), with its source."""
        self.start()
        t0 = now()
        time.sleep(seconds)
        t1 = now()
        e = energy_per_inference(self.stop(), t0, t1, 1)
        return self._idle(e["mean_power_w"], t1 - t0, e["samples"])

    def _idle(self, idle_w: float, seconds: float, samples: int) -> dict[str, Any]:
        return {
            "meter": self.name,
            "kind": self.kind,
            "source": source_of(self.name, self.kind),
            "idle_w": idle_w,
            "seconds": seconds,
            "samples": samples,
        }


class SampledMeter(Meter):
    """A meter read by a background thread every ``interval_s``: one reading at start, one at stop, more between.

    Subclasses give ``_sample()`` (one reading, a tuple of floats) and ``_trace(t, rows)`` (readings → trace).
    Readings are kept as packed doubles: 24 bytes a reading for an INA chip, about 120 MB an hour at its rate.
    """

    interval_s: float = 0.01
    _thread: threading.Thread | None = None
    _error: Exception | None = None
    _t: array
    _rows: array

    def _sample(self) -> tuple[float, ...]:
        raise NotImplementedError

    def _trace(self, t: np.ndarray, rows: np.ndarray) -> PowerTrace:
        raise NotImplementedError

    def _take(self) -> None:
        before = now()
        row = self._sample()
        self._t.append((before + now()) / 2)
        self._rows.extend(row)

    def _loop(self) -> None:
        try:
            while not self._halt.wait(max(0.0, self._t[-1] + self.interval_s - now())):
                self._take()
        except Exception as e:  # noqa: BLE001 - handed to stop(), which raises it in the caller's thread
            self._error = e

    def start(self) -> None:
        if self._thread is not None:
            raise MeterError(f"{self.name} is already recording: stop() it before starting again")
        self._t, self._rows, self._error = array("d"), array("d"), None
        self._halt = threading.Event()
        self._take()
        self._thread = threading.Thread(target=self._loop, name=f"edgequee-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> PowerTrace:
        if self._thread is None:
            raise MeterError(f"{self.name} is not recording: call start() first")
        self._halt.set()
        self._thread.join()
        self._thread = None
        if self._error is not None:
            raise MeterError(f"{self.name} failed while sampling: {self._error}") from self._error
        self._take()
        t = np.frombuffer(self._t, dtype=np.float64)
        return self._trace(t, np.frombuffer(self._rows, dtype=np.float64).reshape(len(t), -1))
