"""Seals that tie a prompt's result file to the traces and the recipe it was computed from.

``results/<id>.json`` carries ``digest``: SHA-256 over the recipe digest (recipe + prompts), the
result's own content (without the digest) and the bytes of every trace file of that prompt. On
``--resume`` a result whose seal does not match is refused (exit 2): a hand-edited verdict, a
result copied from another run, or traces swapped under it cannot make a failing run pass.

This is an integrity check against edits and mix-ups, not a signature: anyone who can run parity
can recompute it (by re-running, which is the point).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

TRACE_SUFFIXES = ("reference", "candidate.forced", "candidate.free", "truth")
KEY = "digest"


def recipe_digest(recipe: dict, prompts_digest: str) -> str:
    """Identity of what a run was asked to do: its recipe (model included) and its prompts."""
    text = json.dumps({"recipe": recipe, "prompts": prompts_digest}, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _trace_files(out: Path, prompt_id: str) -> list[Path]:
    traces = Path(out) / "traces"
    return [traces / f"{prompt_id}.{side}.{ext}" for side in TRACE_SUFFIXES for ext in ("safetensors", "json")
            if (traces / f"{prompt_id}.{side}.{ext}").is_file()]


def seal(result: dict, out: Path, recipe_id: str) -> str:
    """The digest of ``result`` (its ``digest`` key ignored) with its prompt's traces and the recipe."""
    h = hashlib.sha256()
    h.update(recipe_id.encode())
    body = {k: v for k, v in result.items() if k != KEY}
    from parity import strictjson

    body = json.loads(strictjson.dumps(body))  # the form it has once written (strict JSON) and read back
    h.update(json.dumps(body, sort_keys=True, ensure_ascii=False).encode())
    for path in _trace_files(out, str(result.get("id"))):
        h.update(path.name.encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def verify(result: dict, out: Path, recipe_id: str) -> bool:
    """True when ``result`` carries a digest that matches its traces and the recipe."""
    return isinstance(result.get(KEY), str) and result[KEY] == seal(result, out, recipe_id)
