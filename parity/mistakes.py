"""Costly mistakes on the command line, caught before anything is built or loaded.

Each check is cheap (a file's first bytes, a directory listing, whether CUDA is visible) and
raises ``BadInput`` (one line, exit 2) naming what is wrong and how to fix it.
"""

from __future__ import annotations

import re
from pathlib import Path

from parity.errors import BadInput

_TOML_TABLE = re.compile(r"^\s*\[\[?[A-Za-z_][\w.-]*\]\]?\s*(#.*)?$")
_TOML_KEY = re.compile(r"^\s*[A-Za-z_][\w-]*\s*=\s*\S")


def check_prompts_not_recipe(path: Path) -> None:
    """A recipe (TOML) passed where the prompt file goes would run its lines as prompts."""
    path = Path(path)
    if path.suffix.lower() == ".toml":
        raise BadInput(f"'{path}' is a recipe (TOML), not a prompt file; pass it as --recipe {path} and give a prompt "
                       "file first, e.g. parity run recipes/prompts/smoke.txt --recipe " + str(path))
    try:
        with open(path, "rb") as f:
            head = f.read(4096).decode("utf-8", errors="replace")
    except OSError:
        return  # missing or unreadable: the prompt loader says so, with its own wording
    lines = [ln for ln in head.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    tables = sum(bool(_TOML_TABLE.match(ln)) for ln in lines)
    keys = sum(bool(_TOML_KEY.match(ln)) for ln in lines)
    if tables >= 1 and tables + keys >= max(2, len(lines) * 0.8):
        raise BadInput(f"'{path}' looks like a recipe (TOML tables and key = value lines), not a prompt file; pass it "
                       "as --recipe and give a prompt file (one prompt per line, or JSONL) first")


def check_resume_target(out: Path | None, resume: bool) -> None:
    """``--resume`` needs the directory of an earlier run; on a new or empty one it would start over silently."""
    if not resume:
        return
    if out is None:
        raise BadInput("--resume needs --out: the directory of the interrupted run to continue")
    out = Path(out)
    try:
        empty = not out.is_dir() or not any(out.iterdir())
    except OSError as e:
        raise BadInput(f"--out '{out}' cannot be read ({e.strerror}); choose another directory") from None
    if empty:
        raise BadInput(f"--resume: '{out}' holds no parity run to continue ({'it does not exist' if not out.exists() else 'it is empty'}); "
                       "drop --resume to start a new run there")


def needs_cuda(sides: dict) -> list[str]:
    """The roles of the sides that cannot run without a CUDA GPU: a cuda device, or an engine that
    needs CUDA (the faster engines) on any device but "cpu"."""
    from parity.engines.registry import CUDA_BUILTINS

    return [role for role, side in sides.items()
            if side is not None and (str(side.device).startswith("cuda")
                                     or (side.engine in CUDA_BUILTINS and str(side.device) != "cpu"))]


def check_cuda(sides: dict) -> None:
    """A side that needs CUDA on a machine without it: refused before any checkpoint is built."""
    roles = needs_cuda(sides)
    if not roles:
        return
    import torch

    if torch.cuda.is_available():
        return
    side = sides[roles[0]]
    what = f"device '{side.device}'" if str(side.device).startswith("cuda") else f"engine '{side.engine}'"
    raise BadInput(f"[{roles[0]}] {what} needs a CUDA GPU and none is visible on this machine; run on a GPU machine, "
                   "or pick a CPU recipe (e.g. --recipe recipes/smoke.toml or recipes/faster-qwen3-tts-cpu.toml) or --device cpu")
