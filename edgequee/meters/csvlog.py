"""Power logged by an external meter (a USB power meter's CSV export), aligned to the run by wall-clock time."""

from __future__ import annotations

import csv
import re
from datetime import datetime
from pathlib import Path

import numpy as np

from .base import Meter, MeterError, PowerTrace

__all__ = ["CsvLogMeter", "read_power_csv"]

_COLUMNS = {
    "timestamp": ("timestamp", "time", "t", "datetime"),
    "watts": ("watts", "power", "w", "p"),
    "volts": ("volts", "voltage", "v", "u"),
    "amps": ("amps", "current", "a", "i"),
}


def _column(header: list[str], kind: str) -> int | None:
    # "Power (W)", "power_w", "Watts" → "power"/"watts"; the first header naming this kind wins
    names = [re.split(r"[\s(\[_]", h.strip().lower(), maxsplit=1)[0] for h in header]
    return next((i for i, n in enumerate(names) if n in _COLUMNS[kind]), None)


def _seconds(value: str) -> float:
    """Unix seconds, or ISO 8601 (a time without a UTC offset is taken as this machine's local time)."""
    try:
        return float(value)
    except ValueError:
        return datetime.fromisoformat(value.strip()).timestamp()


def read_power_csv(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(t, watts) from a CSV with a header: a timestamp column and watts, or volts and amps; sorted by time."""
    path = Path(path)
    with path.open(newline="") as f:
        text = f.read()
    try:
        dialect = csv.Sniffer().sniff(text.partition("\n")[0], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel  # type: ignore[assignment]
    rows = [r for r in csv.reader(text.splitlines(), dialect) if r]
    if not rows:
        raise MeterError(f"{path} is empty: point csv: at the power meter's log")
    header = rows[0]
    t_col, w_col, v_col, a_col = (_column(header, k) for k in ("timestamp", "watts", "volts", "amps"))
    if t_col is None or (w_col is None and (v_col is None or a_col is None)):
        raise MeterError(
            f"{path} has columns {header}: it needs a timestamp column and watts (or volts and amps), "
            "e.g. a header 'timestamp,watts'"
        )
    try:
        t = np.array([_seconds(r[t_col]) for r in rows[1:]])
        if w_col is not None:
            watts = np.array([float(r[w_col]) for r in rows[1:]])
        else:
            watts = np.array([float(r[v_col]) * float(r[a_col]) for r in rows[1:]])  # type: ignore[index]
    except (ValueError, IndexError) as e:
        raise MeterError(f"{path}: unreadable row ({e}): timestamps must be unix seconds or ISO 8601") from None
    order = np.argsort(t, kind="stable")
    return t[order], watts[order]


class CsvLogMeter(Meter):
    """An external meter that logs the whole time to ``path``; ``stop()`` reads the log.

    Its clock must agree with this machine's (NTP on both); ``energy_per_inference`` says so when the log does not
    cover a window.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise MeterError(f"{self.path} does not exist: start the power meter's CSV log first, then pass csv:FILE")
        self.name = f"csv({self.path.name})"

    def start(self) -> None:
        """Nothing to start: the external meter logs on its own."""

    def stop(self) -> PowerTrace:
        t, watts = read_power_csv(self.path)
        return PowerTrace(self.name, self.kind, t, watts=watts)
