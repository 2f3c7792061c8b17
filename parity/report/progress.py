"""Progress of a run on stderr: a live line in a terminal, plain log lines anywhere else.

A terminal gets one line redrawn in place: the phase, prompts done, the current prompt, elapsed
time and an ETA from the mean time per prompt of the phase. Off a terminal (CI logs, pipes) each
event is one plain line, written as it happens:
``parity: [   12.3 s] reference 2/3 p001 done (ETA 6 s)``.
No background thread: on a 2-core machine a refresh thread starves torch's OpenMP workers.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Callable as ``progress(phase, done, total, prompt=None)`` by :class:`parity.run.Run`."""

    def __init__(self, stream: TextIO | None = None, live: bool | None = None, quiet: bool = False):
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.quiet = quiet
        self.t0 = time.perf_counter()
        self.phase_start: dict[str, float] = {}
        self.last_event = self.t0  # a phase starts when the one before it ended (or the run started)
        self._width = 0

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def __call__(self, phase: str, done: int, total: int, prompt: str | None = None) -> None:
        if self.quiet:
            return
        now = time.perf_counter()
        start = self.phase_start.setdefault(phase, self.last_event)
        self.last_event = now
        eta = ""
        if done and total > done:
            eta = f" (ETA {(now - start) / done * (total - done):.0f} s)"
        what = f"{prompt} done" if prompt else "done"
        text = f"{phase} {done}/{total} {what}{eta}"
        if self.live:
            line = f"parity: {self.elapsed():6.1f} s · {text}"
            self.stream.write("\r" + line.ljust(self._width))
            self._width = len(line)
            if done >= total:
                self.stream.write("\n")
                self._width = 0
        else:
            self.stream.write(f"parity: [{self.elapsed():7.1f} s] {text}\n")
        self.stream.flush()

    def _clear(self) -> None:
        if self.live and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self._width = 0

    def close(self) -> None:
        """End a live line so that what follows starts on a fresh one."""
        self._clear()
