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


class CountProgress:
    """A progress bar over a known number of items (steps, pairs): ``[####....] 40/100 | 12.3 it/s``.

    Drawn on one stderr line at most ``hz`` times a second; by default only on a terminal.
    ``postfix`` (set any time) is appended, e.g. the current loss.
    """

    def __init__(self, total: int, *, label: str = "steps", enabled: bool | None = None,
                 stream: TextIO | None = None, hz: float = 8.0) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total = max(int(total), 0)
        self.label = label
        self.done = 0
        self.postfix = ""
        self.t0 = time.perf_counter()
        self.last = 0.0
        self.period = 1.0 / hz
        self.closed = False

    def update(self, done: int) -> None:
        """Record ``done`` items finished so far (absolute) and redraw if due."""
        self.done = done
        if self.enabled:
            now = time.perf_counter()
            if now - self.last >= self.period or done >= self.total:
                self.last = now
                self._draw(now)

    def _draw(self, now: float) -> None:
        dt = max(now - self.t0, 1e-9)
        width = 24
        frac = min(self.done / self.total, 1.0) if self.total else 1.0
        fill = int(frac * width)
        line = (f"\r[{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} {self.label} | "
                f"{self.done / dt:,.1f} {self.label}/s | {dt:,.1f} s")
        if self.postfix:
            line += f" | {self.postfix}"
        self.stream.write(line + "\x1b[K" if self.stream.isatty() else line)
        self.stream.flush()

    def close(self) -> None:
        """Draw the final state and end the line (once; later calls do nothing)."""
        if self.enabled and not self.closed:
            self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()
        self.closed = True


def dataset_bytes(manifest: object) -> int:
    """Bytes of a dataset on disk: every file its manifest lists (shards, columns, tokenizer copy)
    plus the manifest itself. The one figure build, info and verify print (see :func:`size_text`)."""
    return sum(e.bytes for e in manifest.files()) + len(manifest.dumps())  # type: ignore[attr-defined]


def size_text(nbytes: int) -> str:
    """A byte count for people, in decimal megabytes with two decimals: ``12,345,678 -> '12.35 MB'``."""
    return f"{nbytes / 1e6:,.2f} MB"
