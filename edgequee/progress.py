"""Progress reporting for long library calls: ``progress(done, total, what)``, drawn by the CLI as a bar."""

from __future__ import annotations

from typing import Callable

__all__ = ["Progress", "Ticker"]

Progress = Callable[[int, int, str], None]


class Ticker:
    """Counts steps of known ``total`` and reports each to an optional ``progress`` callback."""

    def __init__(self, total: int, progress: Progress | None):
        self.total, self.done, self.progress = total, 0, progress

    def __call__(self, what: str) -> None:
        self.done += 1
        if self.progress:
            self.progress(self.done, self.total, what)
