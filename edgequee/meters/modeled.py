"""An estimate, not a measurement: a device's idle and active power figures (from its descriptor) as a meter."""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Meter, MeterError, PowerTrace, now

__all__ = ["ModeledMeter"]


class ModeledMeter(Meter):
    """Constant ``active_w`` while recording, ``idle_w`` when idle; its traces are labelled "estimated".

    ``source`` says where the figures come from (e.g. ``device_profiles/rpi4.json``); it is part of the name.
    """

    kind = "estimated"

    def __init__(self, idle_w: float, active_w: float, source: str = "the --meter spec") -> None:
        if not 0 <= idle_w <= active_w:
            raise MeterError(
                f"modeled power idle={idle_w} W, active={active_w} W: need 0 <= idle <= active, "
                "e.g. modeled:idle=2.7,active=6.4"
            )
        self.idle_w, self.active_w = float(idle_w), float(active_w)
        self.name = f"modeled(idle={self.idle_w:g}W,active={self.active_w:g}W from {source})"

    def start(self) -> None:
        self._t_start = now()

    def stop(self) -> PowerTrace:
        return PowerTrace(self.name, self.kind, np.array([self._t_start, now()]), watts=np.full(2, self.active_w))

    def measure_idle(self, seconds: float = 10.0) -> dict[str, Any]:
        """The descriptor's idle figure, at once (nothing to wait for)."""
        return self._idle(self.idle_w, 0.0, 0)
