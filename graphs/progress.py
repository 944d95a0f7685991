"""Progress bars on stderr (tqdm), drawn on a terminal or when asked; a few log lines otherwise.

One process-wide mode, set by the `armt` command from its flags (set_mode): "auto" draws bars only
when stderr is a terminal, "on" (`armt --progress`) always, "off" (`armt -q`, `--no-progress`)
never. Without a terminal in "auto" a long job logs about every 10% at INFO (silent under -q). tqdm is a
base dependency; should it be missing, the same log lines are written instead of a bar.
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("armt.progress")

MODES = ("auto", "on", "off")
_mode = "auto"


def set_mode(mode: str) -> None:
    """auto | on | off (see the module docstring); the `armt` command calls this once."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"progress mode must be one of {', '.join(MODES)}, got {mode!r}")
    _mode = mode


def get_mode() -> str:
    return _mode


class Progress:
    """`with Progress(total, "diagonal steps") as bar: ... bar.update()`; silent when disabled."""

    def __init__(self, total: int, what: str, enabled: bool = True, stream=None):
        self.total, self.what = max(total, 0), what
        self.stream = stream or sys.stderr
        self.enabled = enabled and self.total > 0 and _mode != "off"
        tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.draw = self.enabled and (_mode == "on" or tty)
        self.log_lines = self.enabled and not self.draw and log.isEnabledFor(logging.INFO)
        self.done = 0
        self._bar = None
        self._start = time.perf_counter()
        self._next_log = 0.0

    def __enter__(self) -> "Progress":
        self._start = time.perf_counter()
        if self.draw:
            try:
                from tqdm import tqdm
            except ImportError:  # base dependency missing: log lines instead
                self.draw, self.log_lines = False, log.isEnabledFor(logging.INFO)
            else:
                self._bar = tqdm(total=self.total, desc=self.what, file=self.stream, leave=False,
                                 dynamic_ncols=True, unit="")
        return self

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.log_lines:
            frac = self.done / self.total
            if frac >= self._next_log or self.done == self.total:  # about every 10%
                log.info("%d/%d %s (%.1f s)", self.done, self.total, self.what, time.perf_counter() - self._start)
                self._next_log = frac + 0.1

    def describe(self, text: str) -> None:
        """The bar's label for the item now running (e.g. the graph being traced)."""
        if self._bar is not None:
            self._bar.set_description_str(f"{self.what}: {text}")

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
