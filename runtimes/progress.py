"""A dependency-free progress bar on stderr: a redrawn bar on a terminal, a few log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("armt.progress")


class Progress:
    """`with Progress(total, "diagonal steps") as bar: ... bar.update()`; silent when disabled."""

    def __init__(self, total: int, what: str, enabled: bool = True, stream=None, width: int = 30):
        self.total, self.what, self.width = max(total, 0), what, width
        self.stream = stream or sys.stderr
        self.enabled = enabled and self.total > 0 and log.isEnabledFor(logging.INFO)
        self.tty = self.enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.done = 0
        self._start = time.perf_counter()
        self._next_log = 0.0

    def __enter__(self) -> "Progress":
        self._start = time.perf_counter()
        return self

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self._start
        frac = self.done / self.total
        if self.tty:
            fill = int(frac * self.width)
            self.stream.write(f"\r[{'#' * fill}{'.' * (self.width - fill)}] {self.done}/{self.total} "
                              f"{self.what} {elapsed:6.1f} s")
            self.stream.flush()
        elif frac >= self._next_log or self.done == self.total:  # about every 10%
            log.info("%d/%d %s (%.1f s)", self.done, self.total, self.what, elapsed)
            self._next_log = frac + 0.1

    def __exit__(self, *exc) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
