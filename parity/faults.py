"""TEST HOOK: faults injected at a phase of ``parity run`` (tests only; unset, nothing happens).

``PARITY_FAULT_AT=PHASE:N:KIND`` makes the N-th (1-based) time the run reaches PHASE fail with KIND.

Phases: ``before_load`` (run.json written, no model loaded yet), ``load`` (inside a side's load),
``between`` (after a reference prompt finished, before the next), ``traces`` (a write under
``traces/``), ``write`` (any write into the run directory), ``report`` (while writing
report.html).

Kinds: ``raise`` (RuntimeError), ``oom`` (torch.OutOfMemoryError), ``memory`` (MemoryError),
``enospc`` (OSError ENOSPC, a full disk), ``sigterm``/``sigint`` (the signal sent to this
process), ``hang`` (sleeps, for signal tests).

The engine-level hook ``PARITY_FAULT=SIDE:K:KIND`` (parity/run.py) is separate and still works.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

from parity.errors import BadInput

ENV = "PARITY_FAULT_AT"
PHASES = ("before_load", "load", "between", "traces", "write", "report")
KINDS = ("raise", "oom", "memory", "enospc", "sigterm", "sigint", "hang")

_counts: dict[str, int] = {}


def parse(value: str | None) -> tuple[str, int, str] | None:
    """Parse ``PHASE:N:KIND`` (BadInput, exit 2, for a malformed value)."""
    if not value:
        return None
    parts = value.split(":")
    if len(parts) != 3 or parts[0] not in PHASES or not parts[1].isdigit() or int(parts[1]) < 1 or parts[2] not in KINDS:
        raise BadInput(f"{ENV}={value!r} must be PHASE:N:KIND with PHASE one of {', '.join(PHASES)}, N >= 1 and KIND one "
                       f"of {', '.join(KINDS)}; unset it for normal runs")
    return parts[0], int(parts[1]), parts[2]


def check() -> None:
    """Validate the hook's value up front (so a typo is exit 2 before anything runs)."""
    parse(os.environ.get(ENV))
    _counts.clear()


def point(phase: str) -> None:
    """Reach ``phase``: fail here if the hook says so."""
    spec = parse(os.environ.get(ENV))
    if spec is None:
        return
    want, n, kind = spec
    if want != phase:
        return
    _counts[phase] = _counts.get(phase, 0) + 1
    if _counts[phase] == n:
        _fail(kind, phase)


def on_write(path: Path) -> None:
    """Called before every write into a run directory (phases ``write`` and ``traces``)."""
    if not os.environ.get(ENV):
        return
    point("write")
    if Path(path).parent.name == "traces":
        point("traces")


def _fail(kind: str, phase: str) -> None:
    where = f"injected at {phase} by {ENV}"
    if kind == "raise":
        raise RuntimeError(f"fault {where}")
    if kind == "oom":
        import torch

        raise torch.OutOfMemoryError(f"CUDA out of memory ({where})")
    if kind == "memory":
        raise MemoryError(where)
    if kind == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + f" ({where})")
    if kind in ("sigterm", "sigint"):
        os.kill(os.getpid(), signal.SIGTERM if kind == "sigterm" else signal.SIGINT)
        time.sleep(5)  # the handler raises in this frame long before
        return
    if kind == "hang":
        time.sleep(3600)
