"""A small progress line for long work: shown on a terminal only, quiet in logs and pipes."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Redraws one stderr line at most ``hz`` times a second: done/total bytes, items/s, MB/s.

    Args:
        total_bytes: expected input bytes (for the percentage), or None.
        label: what is counted ("pairs").
        enabled: None = only when stderr is a terminal.
    """

    def __init__(self, total_bytes: int | None, *, label: str = "pairs", enabled: bool | None = None,
                 stream: TextIO | None = None, hz: float = 8.0) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total = total_bytes
        self.label = label
        self.t0 = time.perf_counter()
        self.last = 0.0
        self.period = 1.0 / hz
        self.items = 0
        self.bytes = 0

    def update(self, items: int, nbytes: int) -> None:
        """Record progress so far (absolute counts) and redraw if due."""
        self.items, self.bytes = items, nbytes
        if self.enabled:
            now = time.perf_counter()
            if now - self.last >= self.period:
                self.last = now
                self._draw(now)

    def _draw(self, now: float) -> None:
        dt = max(now - self.t0, 1e-9)
        pct = ""
        width = 24
        if self.total:
            frac = min(self.bytes / self.total, 1.0)
            fill = int(frac * width)
            pct = f"[{'#' * fill}{'.' * (width - fill)}] {frac * 100:5.1f}% "
        line = (f"\r{pct}{self.items:,} {self.label} | {self.items / dt:,.0f} {self.label}/s | "
                f"{self.bytes / dt / 1e6:,.1f} MB/s | {dt:,.1f} s")
        self.stream.write(line)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()
