"""One engine lifecycle for every command that loads models (``run``, its truth side, ``bisect``).

:class:`EngineHost` owns what happens around an engine, so no command repeats it:

- preflight: the checks that need the checkpoint's files but not its weights, before any load
  (and once more after the first load of a hub id, whose files exist only then);
- instantiation through the registry (an unknown or uninstallable engine is exit 2);
- load, with errors mapped to exit codes: a checkpoint that does not load is bad input (exit 2),
  running out of memory is an engine failure (exit 3), a half-done load is always closed;
- CPU threads for small models (see :func:`cpu_threads`);
- release: close, garbage-collect, and note the side's peak memory.
"""

from __future__ import annotations

import gc
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from parity.engines.base import Engine, make_engine
from parity.errors import BadInput, EngineFailure
from parity.preflight import check_loaded_checkpoint, local_checkpoint, preflight
from parity.prompts import Prompt
from parity.recipe import Recipe, Side

THREADS_ENV = "PARITY_CPU_THREADS"
# Below this hidden size a decode step's matmuls take microseconds and splitting them over
# threads costs more than it saves (measured on random:tiny, hidden 64: see the README's
# benchmarks); the real 0.6B model (hidden 1024) keeps torch's default.
SMALL_HIDDEN = 512


def one_line(e: BaseException) -> str:
    """'Type: first line of the message', for one-line errors."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def is_checkpoint_error(e: BaseException) -> bool:
    """Exceptions from ``from_pretrained`` that mean a bad or unreachable checkpoint, not an engine bug."""
    if isinstance(e, (OSError, ValueError, KeyError)) or type(e).__name__ == "SafetensorError":
        return True
    return isinstance(e, RuntimeError) and any(m in str(e) for m in ("size mismatch", "ignore_mismatched_sizes", "Error(s) in loading"))


def is_out_of_memory(e: BaseException) -> bool:
    return isinstance(e, (torch.OutOfMemoryError, MemoryError))


def peak_memory(device: str) -> dict:
    """Peak memory so far: CUDA max_memory_allocated on a GPU (reset per side), else the process's
    peak resident set size (cumulative over the process: the later side includes the earlier)."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return {"device": device, "kind": "cuda_max_memory_allocated", "bytes": int(torch.cuda.max_memory_allocated())}
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    scale = 1 if os.uname().sysname == "Darwin" else 1024
    return {"device": "cpu", "kind": "process_peak_rss", "bytes": int(rss * scale)}


def cpu_threads(model_dir: Path | str) -> int | None:
    """Torch intra-op threads for CPU engine passes: ``$PARITY_CPU_THREADS`` when set, 1 for a
    small model (talker hidden size < 512, e.g. random:tiny), else None (torch's default)."""
    value = os.environ.get(THREADS_ENV)
    if value:
        if not value.isdigit() or int(value) < 1:
            raise BadInput(f"{THREADS_ENV}={value!r} must be a positive whole number of threads; unset it for the default")
        return int(value)
    directory = local_checkpoint(model_dir)
    if directory is None:
        return None
    try:
        import json

        hidden = json.loads((directory / "config.json").read_text(encoding="utf-8"))["talker_config"]["hidden_size"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return 1 if isinstance(hidden, int) and hidden < SMALL_HIDDEN else None


class EngineHost:
    """Makes, loads and releases the engines of one command; keeps each side's peak memory."""

    def __init__(self, recipe: Recipe, model_dir: Path | str, prompts: list[Prompt], prompts_path: Path | None = None,
                 freeze_heap: bool = False):
        self.recipe = recipe
        self.model_dir = model_dir
        self.prompts = prompts
        self.prompts_path = prompts_path
        self.peak: dict[str, dict] = {}
        self.checked = False  # preflight ran on local files
        self.threads: int | None = None
        self._frozen = not freeze_heap  # only a one-command process (the CLI) freezes its heap
        self.load_seconds: dict[str, float] = {}

    def preflight(self, recipe: Recipe | None = None) -> bool:
        """Every check that needs the checkpoint's files but not its weights (exit 2 on failure).
        Returns False for a hub id not downloaded yet: it is checked after its first load."""
        self.checked = preflight(self.prompts, recipe or self.recipe, self.model_dir, self.prompts_path)
        return self.checked

    def make(self, side: Side, role: str) -> Engine:
        """Instantiate (not load) a side's engine, so an unusable side is refused before any work."""
        try:
            return make_engine(side, self.model_dir)
        except BadInput as e:
            raise BadInput(f"[{role}] {e}") from None
        except ImportError as e:
            raise BadInput(f"[{role}] engine '{side.engine}' is not available ({one_line(e)}); install it or pick another engine") from None

    def load(self, engine: Engine, role: str) -> Engine:
        """Load one side. A checkpoint that does not load is BadInput (exit 2); out of memory is
        EngineFailure (exit 3); any other error propagates (the caller decides: ``run`` keeps the
        finished prompts). A half-done load is closed in every case."""
        device = str(getattr(engine, "device", engine.side.device))
        if device.startswith("cuda") and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        if not device.startswith("cuda"):
            self.set_cpu_threads()
        if not self._frozen:
            # In a one-command process everything imported so far lives as long as the process:
            # keep it out of the collections that release() runs (a full collection walked the
            # whole transformers import graph each time, ~1 s on a 2-core CPU).
            gc.freeze()
            self._frozen = True
        t0 = time.perf_counter()
        try:
            engine.load()
        except BaseException as e:
            engine.close()  # free whatever a half-done load allocated
            if isinstance(e, (BadInput, KeyboardInterrupt)):
                raise
            if is_out_of_memory(e):
                raise EngineFailure(f"[{role}] out of memory while loading model '{self.recipe.model}' "
                                    f"({one_line(e)}); free memory, use a smaller dtype or another device") from e
            if is_checkpoint_error(e):
                raise BadInput(f"[{role}] model '{self.recipe.model}' does not load ({one_line(e)}); "
                               "check the checkpoint (parity run --model DIR|HUB_ID|random:tiny)") from None
            raise
        self.load_seconds[role] = round(self.load_seconds.get(role, 0.0) + time.perf_counter() - t0, 3)
        if not self.checked:  # a hub id: its files exist only now
            self.checked = True
            check_loaded_checkpoint(self.model_dir, self.prompts, self.recipe, self.prompts_path)
        return engine

    def release(self, engine: Engine, role: str) -> None:
        """Free a side's model before the next loads, and note its peak memory."""
        device = str(getattr(engine, "device", engine.side.device))
        engine.close()
        gc.collect()
        self.peak[role] = peak_memory(device)

    @contextmanager
    def loaded(self, side: Side, role: str) -> Iterator[Engine]:
        """``with host.loaded(side, "truth") as engine:`` make, load, and always release."""
        engine = self.load(self.make(side, role), role)
        try:
            yield engine
        finally:
            self.release(engine, role)

    def set_cpu_threads(self) -> None:
        """Apply :func:`cpu_threads` once for this command (torch's thread count is per process)."""
        if self.threads is None:
            self.threads = cpu_threads(self.model_dir) or torch.get_num_threads()
            torch.set_num_threads(self.threads)


def engine_failure(e: BaseException, what: str) -> EngineFailure:
    """An engine exception during ``what`` as a one-line exit-3 error."""
    kind = "ran out of memory" if is_out_of_memory(e) else "crashed"
    return EngineFailure(f"engine {kind} during {what}: {one_line(e)}")
