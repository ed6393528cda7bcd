"""A one-line progress bar with ETA on stderr (no tqdm dependency).

On a terminal the line is redrawn in place at most 10 times a second;
otherwise (a log file, CI) one line is printed per 10% so logs stay short.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import Optional, TextIO


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    def __init__(
        self, total: float, enabled: bool = True, stream: Optional[TextIO] = None, unit: str = "GB",
        per_unit: float = 1e9, initial: float = 0,
    ) -> None:
        """`initial`: work done before this bar started (a resumed run): shown as done, not counted in the
        rate that the time left is estimated from."""
        self.total = max(total, 1)
        self.unit, self.per_unit = unit, per_unit
        self.done = self._initial = min(initial, self.total)
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.monotonic()
        self._last_draw = 0.0
        self._last_decile = -1

    def advance(self, n: float, note: str = "") -> None:
        self.done = min(self.done + n, self.total)
        if not self.enabled:
            return
        now = time.monotonic()
        frac = self.done / self.total
        if self.tty:
            if now - self._last_draw < 0.1 and self.done < self.total:
                return
            self._last_draw = now
            self.stream.write("\r" + self._line(frac, now, note) + "\x1b[K")
        else:
            decile = int(frac * 10)
            if decile == self._last_decile:
                return
            self._last_decile = decile
            self.stream.write(self._line(frac, now, note) + "\n")
        self.stream.flush()

    def _line(self, frac: float, now: float, note: str) -> str:
        elapsed = now - self.start
        rate_done = self.done - self._initial
        eta = elapsed * (self.total - self.done) / rate_done if rate_done > 0 else 0.0
        width = 30
        bar = "#" * int(frac * width) + "." * (width - int(frac * width))
        line = (
            f"[{bar}] {100 * frac:5.1f}%  {self.done / self.per_unit:.2f}/{self.total / self.per_unit:.2f} "
            f"{self.unit}  "
            f"{_duration(elapsed)} elapsed, {_duration(eta)} left  {note}"
        )
        cols = shutil.get_terminal_size((120, 20)).columns
        return line[: cols - 1]

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
