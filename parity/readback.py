"""Validation of what parity reads back from a run directory (``parity report``, ``--resume``).

A run directory is user-controlled data once written: it can be edited, truncated, copied between
machines or produced by something else. Everything read back is checked before use, and any
problem is one :class:`~parity.errors.BadInput` line (exit 2) naming the file and the field:

- the file itself: regular, bounded in size, UTF-8, JSON (no 5000-digit numbers, no deep nesting);
- every value: integers within +-2**53, strings under a length limit, nesting under a depth limit;
- the fields the report and the summary logic read: their types, and prompt ids that can only
  name files inside the run directory.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from parity import limits
from parity.errors import BadInput

MAX_INT = 1 << 53
MAX_STRING = 1 << 20
MAX_DEPTH = 48
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
FIX = "re-run parity run (or parity run --resume) to write it again"


def _walk(value: Any, where: str, depth: int = 0) -> None:
    if depth > MAX_DEPTH:
        raise BadInput(f"{where}: nested deeper than {MAX_DEPTH} levels; {FIX}")
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, int):
        if abs(value) > MAX_INT:
            raise BadInput(f"{where}: integer with {len(str(abs(value)))} digits is out of range; {FIX}")
        return
    if isinstance(value, str):
        if len(value) > MAX_STRING:
            raise BadInput(f"{where}: a string of {len(value)} characters is over the limit; {FIX}")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            _walk(v, f"{where}.{k}" if depth < 6 else where, depth + 1)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _walk(v, f"{where}[{i}]" if depth < 6 else where, depth + 1)


def _need(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise BadInput(f"{where}: {what}; {FIX}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _opt(d: dict, key: str, types: tuple, where: str, name: str) -> None:
    v = d.get(key)
    _need(v is None or (isinstance(v, types) and not (isinstance(v, bool) and bool not in types)), f"{where}.{key}",
          f"must be {name}, got {type(v).__name__}")


def _check_point(p: Any, where: str) -> None:
    """A located point (first divergence, first flip, first NaN): step/substep/layer integers."""
    if p is None:
        return
    _need(isinstance(p, dict), where, "must be an object or null")
    for key in ("step", "substep", "layer"):
        _need(p.get(key) is None or _is_int(p.get(key)), f"{where}.{key}", "must be an integer")
    for key in ("component", "point"):
        _opt(p, key, (str,), where, "a string")


def check_result(r: Any, where: str) -> None:
    """One prompt's entry (in summary.json or results/<id>.json)."""
    _need(isinstance(r, dict), where, "must be an object")
    _need(isinstance(r.get("id"), str) and bool(_ID_RE.fullmatch(r["id"])), f"{where}.id",
          f"prompt id {str(r.get('id'))[:40]!r} is not a valid id (A-Z a-z 0-9 . _ -)")
    _need(isinstance(r.get("status"), str), f"{where}.status", "must be a string")
    _opt(r, "text", (str,), where, "a string")
    _opt(r, "line", (int,), where, "an integer")
    _need(isinstance(r.get("passed", False), bool), f"{where}.passed", "must be true or false")
    gates = r.get("gates", [])
    _need(isinstance(gates, list), f"{where}.gates", "must be a list")
    for i, g in enumerate(gates):
        _need(isinstance(g, dict) and isinstance(g.get("name"), str) and isinstance(g.get("passed"), bool),
              f"{where}.gates[{i}]", "must be an object with a string name and a boolean passed")
        _opt(g, "detail", (str,), f"{where}.gates[{i}]", "a string")
    for key in ("audible_from_s", "first_divergence_s", "first_diff_frame_s"):
        _opt(r, key, (int, float), where, "a number")
    for key in ("mos", "timing", "audio", "codebook0"):
        _opt(r, key, (dict,), where, "an object")
    hints = r.get("hints")
    _need(hints is None or isinstance(hints, list), f"{where}.hints", "must be a list")
    c = r.get("comparison")
    if r["status"] == "ok":
        _need(isinstance(c, dict), f"{where}.comparison", "must be an object for a prompt that ran")
    if isinstance(c, dict):
        for key in ("first_divergence", "first_flip", "first_nonfinite", "first_nonfinite_reference"):
            _check_point(c.get(key), f"{where}.comparison.{key}")
        _opt(c, "free_run", (dict,), f"{where}.comparison", "an object")
        free = c.get("free_run") or {}
        _need(free.get("first_diff_frame") is None or _is_int(free.get("first_diff_frame")),
              f"{where}.comparison.free_run.first_diff_frame", "must be an integer or null")
        _need(c.get("ref_frames") is None or (_is_int(c["ref_frames"]) and c["ref_frames"] >= 0),
              f"{where}.comparison.ref_frames", "must be a non-negative integer")
        _check_sublayer(c, f"{where}.comparison")


def _check_sublayer(c: dict, where: str) -> None:
    """``sublayer`` and ``replay`` (probes = "sublayers"): what the console and the report read."""
    split = c.get("sublayer")
    if split is not None:
        _check_point({**split, "point": None} if isinstance(split, dict) else split, f"{where}.sublayer")
        for key in ("component", "text"):
            _need(isinstance(split.get(key), str), f"{where}.sublayer.{key}", "must be a string")
        _need(isinstance(split.get("ops", []), list) and all(isinstance(o, dict) for o in split.get("ops", [])),
              f"{where}.sublayer.ops", "must be a list of objects")
        for i, o in enumerate(split.get("ops", [])):
            for key in ("rel_l2", "max_abs", "reads_rel_l2"):
                _opt(o, key, (int, float), f"{where}.sublayer.ops[{i}]", "a number")
            _opt(o, "op", (str,), f"{where}.sublayer.ops[{i}]", "a string")
    rp = c.get("replay")
    if rp is not None:
        _need(isinstance(rp, dict), f"{where}.replay", "must be an object or null")
        _need(isinstance(rp.get("text"), str) and isinstance(rp.get("verdict"), str), f"{where}.replay",
              "must have a string text and verdict")
        _check_point(rp.get("at"), f"{where}.replay.at")
        for key in ("input", "output", "candidate_on_reference_input", "control"):
            _need(isinstance(rp.get(key), dict), f"{where}.replay.{key}", "must be an object")
            _opt(rp[key], "rel_l2", (int, float), f"{where}.replay.{key}", "a number")


def check_summary(summary: Any, path: Path) -> dict:
    """A summary.json's content, checked as described in the module docstring."""
    where = f"'{path}'"
    _walk(summary, where)
    _need(isinstance(summary, dict), where, "is not a parity summary (not a JSON object)")
    prompts = summary.get("prompts")
    _need(isinstance(prompts, list), where, "is not a parity summary (no prompt list)")
    for i, p in enumerate(prompts):
        check_result(p, f"{where} prompts[{i}]")
    ids = [p["id"] for p in prompts]
    _need(len(ids) == len(set(ids)), where, "lists a prompt id twice")
    _need(isinstance(summary.get("passed", False), bool), f"{where} passed", "must be true or false")
    _opt(summary, "failure", (str,), where, "a string or null")
    for key in ("recipe", "sides", "environment", "counts", "peak_memory"):
        _opt(summary, key, (dict,), where, "an object")
    counts = summary.get("counts") or {}
    for k, v in counts.items():
        _need(_is_int(v) and v >= 0, f"{where} counts.{k}", "must be a non-negative integer")
    tol = summary.get("tolerance")
    _need(tol is None or (limits.finite_number(tol) and 0 < tol < 10), f"{where} tolerance", "must be a number in (0, 10)")
    for key in ("command", "model", "started", "finished", "prompts_file"):
        _opt(summary, key, (str,), where, "a string")
    return summary


def read_summary(run_dir: Path) -> dict:
    """Read and check ``RUN_DIR/summary.json``."""
    path = Path(run_dir) / "summary.json"
    if not path.exists():
        raise BadInput(f"'{run_dir}' has no summary.json; pass a directory written by parity run")
    return check_summary(limits.read_json(path, "summary", limits.RUN_JSON_LIMIT, FIX), path)
