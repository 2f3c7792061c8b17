"""What the report reads from a run directory beyond summary.json: the compared points and the
chosen tokens of each side. Everything here is optional: a missing or unreadable file gives
``None`` and the report shows "not available" instead of failing.
"""

from __future__ import annotations

import json

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd


def load_points(run_dir: Path, prompt_id: str) -> pd.DataFrame | None:
    """``points/<id>.csv.gz`` (one row per compared point, in execution order), or None."""
    from parity import limits
    from parity.errors import BadInput

    path = Path(run_dir) / "points" / f"{prompt_id}.csv.gz"
    if not path.is_file():
        return None
    limits.check_readable(path, "points file", limits.POINTS_LIMIT)
    fix = "delete it (the report then shows no heatmaps) or re-run parity run"
    try:
        df = pd.read_csv(path)
    except (OSError, ValueError, EOFError, UnicodeDecodeError, pd.errors.ParserError) as e:
        raise BadInput(f"'{path}' is not a readable points CSV ({type(e).__name__}); {fix}") from None
    needed = {"component", "step", "substep", "layer", "point", "rel_l2", "added"}
    if not needed <= set(df.columns):
        raise BadInput(f"'{path}' lacks column(s) {', '.join(sorted(needed - set(df.columns)))}; {fix}")
    for col in ("step", "substep", "layer"):  # indices: whole numbers in range, nothing else
        values = pd.to_numeric(df[col], errors="coerce")
        if values.isna().any() or (values != values.round()).any() or (values.abs() > 1 << 31).any():
            raise BadInput(f"'{path}': column {col} holds values that are not small whole numbers; {fix}")
        df[col] = values.astype("int64")
    if not df["component"].isin(["talker", "predictor"]).all():
        raise BadInput(f"'{path}': column component holds values other than talker/predictor; {fix}")
    df["point"] = df["point"].astype(str)
    df["rel_l2"] = pd.to_numeric(df["rel_l2"], errors="coerce")  # "inf" strings included
    df["added"] = pd.to_numeric(df["added"], errors="coerce")
    return df


def _tensors(path: Path, names: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    """Read only ``names`` from a safetensors file (lazily: the hidden states are never loaded)."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            keys = set(f.keys())
            return {n: f.get_tensor(n) for n in names if n in keys}
    except Exception:  # a truncated or foreign file: the report goes on without it
        return None


@dataclass
class Tokens:
    """Chosen tokens of one prompt, per codec frame."""

    ref_cb0: np.ndarray  # [F_ref] free-running (= recorded) reference codebook 0
    cand_cb0: np.ndarray | None  # [F_cand] free-running candidate codebook 0
    forced_cb0_flip: np.ndarray | None  # [F] bool: teacher-forced candidate would pick another codebook-0 token
    forced_pred_flips: np.ndarray | None  # [F] int: teacher-forced predictor flips (codebooks 1-15) per frame
    pred_substeps: int = 15  # predictor sub-steps per frame (codebooks - 1), read from the trace


def load_tokens(run_dir: Path, prompt_id: str) -> Tokens | None:
    """Codebook-0 sequences of both sides and the teacher-forced flips, from ``traces/``."""
    traces = Path(run_dir) / "traces"
    ref = _tensors(traces / f"{prompt_id}.reference.safetensors", ("codes", "talker_tokens"))
    if not ref or "codes" not in ref or ref["codes"].ndim != 2:
        return None
    ref_codes = ref["codes"]
    if ref_codes.shape[1] < 1:
        return None
    free = _tensors(traces / f"{prompt_id}.candidate.free.safetensors", ("codes",))
    cand_cb0 = free["codes"][:, 0] if free and "codes" in free and free["codes"].ndim == 2 and free["codes"].shape[1] else None
    forced = _tensors(traces / f"{prompt_id}.candidate.forced.safetensors", ("talker_choice", "pred_choice"))
    if forced and not _consistent(forced, ref_codes):
        from parity.errors import BadInput

        raise BadInput(f"'{traces / prompt_id}.candidate.forced.safetensors' does not fit the reference trace's shape "
                       f"(codes {list(ref_codes.shape)}); re-run parity run")
    cb0_flip = pred_flips = None
    n = len(ref_codes)
    if forced and "talker_choice" in forced:
        # Talker step s chooses codebook 0 of frame s (step 0 is the prefill).
        m = min(n, len(forced["talker_choice"]))
        cb0_flip = np.zeros(n, dtype=bool)
        cb0_flip[:m] = forced["talker_choice"][:m] != ref_codes[:m, 0]
    if forced and "pred_choice" in forced and forced["pred_choice"].ndim == 2:
        m = min(n, len(forced["pred_choice"]))
        pred_flips = np.zeros(n, dtype=int)
        pred_flips[:m] = (forced["pred_choice"][:m] != ref_codes[:m, 1:1 + forced["pred_choice"].shape[1]]).sum(axis=1)
    return Tokens(ref_codes[:, 0], cand_cb0, cb0_flip, pred_flips, max(1, ref_codes.shape[1] - 1))


def _consistent(forced: dict[str, np.ndarray], ref_codes: np.ndarray) -> bool:
    """The forced trace's chosen tokens have the layout the reference's codes imply."""
    tc, pc = forced.get("talker_choice"), forced.get("pred_choice")
    if tc is not None and tc.ndim != 1:
        return False
    return pc is None or (pc.ndim == 2 and pc.shape[1] <= max(ref_codes.shape[1] - 1, 0))


def audio_info(path: Path) -> tuple[float, int] | None:
    """(duration in seconds, size in bytes) of a WAV, or None when it cannot be read."""
    if not path.is_file():
        return None
    try:
        import soundfile as sf

        info = sf.info(str(path))
        return info.frames / info.samplerate, path.stat().st_size
    except Exception:  # not a readable audio file
        return None


def load_bisect(run_dir: Path) -> dict | None:
    """The result of a ``parity bisect --out RUN_DIR`` next to the run, if there is one."""
    try:
        data = json.loads((Path(run_dir) / "bisect.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get("bisect") if isinstance(data, dict) else None
