"""The engines' own prints ("CUDA graph captured!") kept out of parity's output.

While a run or a bisect executes, file descriptor 1 (Python's ``print`` and C libraries alike)
points at a temporary file; afterwards stdout is restored and the text goes to ``engine.log`` in
the run directory, so stdout holds only parity's own output (the table, or ``--json``). Warnings
the engines log through Python's ``logging`` without a handler of their own (faster-qwen3-tts's
"Could not infer sample rate from base model") would otherwise reach stderr, between parity's
progress lines: a root handler catches them into the same log for the block.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def engine_output_to(out_dir_of: "callable", name: str = "engine.log") -> Iterator[None]:
    """Capture fd 1 for the block; then append what was captured to ``out_dir_of() / name``
    when that directory exists (a run refused before it made its directory leaves no log)."""
    sys.stdout.flush()
    saved = os.dup(1)
    tmp = tempfile.NamedTemporaryFile(prefix="parity-engine-", suffix=".log", delete=False)
    handler = logging.StreamHandler(sys.stdout)  # fd 1, i.e. the temporary file, while the block runs
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    try:
        os.dup2(tmp.fileno(), 1)
        logging.getLogger().addHandler(handler)
        try:
            yield
        finally:
            logging.getLogger().removeHandler(handler)
            sys.stdout.flush()
            os.dup2(saved, 1)
            tmp.close()
            out_dir = Path(out_dir_of()) if out_dir_of() is not None else None
            if out_dir is not None and out_dir.is_dir() and os.path.getsize(tmp.name):
                new = not (out_dir / name).exists()
                with open(tmp.name, "rb") as src, open(out_dir / name, "ab") as dst:
                    shutil.copyfileobj(src, dst)
                if new:  # parity wrote it, so --force may delete it (and only it, of what is not ours)
                    from parity.outdir import write_marker

                    with contextlib.suppress(OSError):
                        write_marker(out_dir, [name])
    finally:
        os.close(saved)
        with contextlib.suppress(OSError):
            os.unlink(tmp.name)
