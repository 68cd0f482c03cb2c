"""Raspberry Pi 5 power from its PMIC's ADC, read through ``vcgencmd pmic_read_adc``."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable

import numpy as np

from .base import MeterError, PowerTrace, SampledMeter

__all__ = ["PmicMeter", "parse_pmic_adc"]

# "   3V7_WL_SW_A current(0)=0.00390372A" and "   3V7_WL_SW_V volt(8)=3.69545400V"
_LINE = re.compile(r"^\s*(?P<rail>\S+)_(?P<unit>[AV])\s+(?:current|volt)\(\d+\)=(?P<value>[-+0-9.eE]+)(?P=unit)\s*$")


def parse_pmic_adc(text: str) -> dict[str, float]:
    """Watts per rail (V·I) from ``vcgencmd pmic_read_adc`` output; rails are paired by name (``X_A`` with ``X_V``).

    Rails with only a voltage (EXT5V, BATT) or only a current are left out. Raises MeterError when no rail pairs.
    """
    readings: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            readings.setdefault(m["rail"], {})[m["unit"]] = float(m["value"])
    watts = {rail: r["V"] * r["A"] for rail, r in readings.items() if r.keys() == {"V", "A"}}
    if not watts:
        first = text.strip().splitlines()[0] if text.strip() else "no output"
        raise MeterError(
            f"vcgencmd pmic_read_adc gave no rail with both a current and a voltage ({first!r}): "
            "the pi5-pmic meter works on a Raspberry Pi 5 only; use ina260, ina219 or csv:FILE elsewhere"
        )
    return watts


def _vcgencmd() -> str:
    exe = shutil.which("vcgencmd")
    if exe is None:
        raise MeterError("vcgencmd not found: pi5-pmic needs a Raspberry Pi 5 running Raspberry Pi OS (raspi-utils)")
    proc = subprocess.run([exe, "pmic_read_adc"], check=False, capture_output=True, text=True, timeout=5)
    return proc.stdout or proc.stderr  # an error (not a Pi 5, no access to /dev/vcio) ends up in the message


class PmicMeter(SampledMeter):
    """Σ V·I over the Raspberry Pi 5 PMIC's output rails, polled every ``interval`` seconds.

    A secondary signal, not a wall-power measurement: it sees only the rails the PMIC makes (core, DDR, 3V3, 1V8,
    …), so it misses the 5 V input rail itself and everything fed from it directly — USB devices such as a USB
    Coral accelerator, the fan, HATs — and the PMIC's own conversion losses. Each poll runs a vcgencmd process.
    ``read`` returns the command's text (tests pass recorded output).
    """

    def __init__(self, interval: float = 0.1, *, read: Callable[[], str] = _vcgencmd) -> None:
        self.name = f"pi5-pmic(interval={interval}s)"
        self.interval_s = interval
        self._read_text = read
        parse_pmic_adc(read())

    def _sample(self) -> tuple[float]:
        return (sum(parse_pmic_adc(self._read_text()).values()),)

    def _trace(self, t: np.ndarray, rows: np.ndarray) -> PowerTrace:
        return PowerTrace(self.name, self.kind, t, watts=rows[:, 0])
