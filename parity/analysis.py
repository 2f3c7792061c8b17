"""The analyse stage: pure functions from what the engines recorded to typed verdicts.

Two steps, so that a saved run can be judged again without any engine or model:

1. :func:`measure` (traces + WAVs -> :class:`Measured`): everything that needs the recorded
   tensors and does not depend on the recipe's tolerances or gates: every compared point's error
   metrics, the first teacher-forced token flip, the reference's first NaN/inf, free-running
   agreement, the third side's errors when there is one, and per-segment audio distances.
   Written next to the points as ``points/<id>.csv.gz`` (+ ``.truth.csv.gz``) and
   ``points/<id>.measured.json``.
2. :func:`judge` (:class:`Measured` + recipe -> :class:`parity.results.PromptResult`): the
   tolerance, the first divergence, the signature hints, the truth verdict, audible time and
   every gate. ``parity run`` and ``parity compare`` both judge what they read back from disk, so
   re-analysing a run with its own recipe gives exactly its own results.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd

from parity import compare
from parity import gates as gates_mod
from parity.errors import BadInput
from parity.results import (
    Agreement, Comparison, Divergence, Flip, LayerError, Point, PromptResult, Summary, finite_or_none,
)

# Columns of points/<id>.csv.gz: where, then tolerance-free metrics (``finite``: the candidate's
# values are all finite there; ``rel_l2`` is inf where either side is not).
POINT_COLUMNS = ["component", "step", "substep", "layer", "point", "max_abs", "rel_l2", "cosine", "sqnr_db", "added", "finite"]
TRUTH_COLUMNS = ["component", "step", "substep", "layer", "point", "cand_err", "ref_err"]
MEASURED_VERSION = 1


@dataclass
class Measured:
    """One prompt's tolerance-free measurements (everything :func:`judge` needs besides the points).

    ``prompt`` holds the prompt's id, text, line, speaker and language; ``timing``, ``mos`` and the
    audio paths come from the execute stage (scoring audio needs a scorer model, so it is measured
    once, at run time)."""

    prompt: dict
    ref_frames: int
    first_flip: dict | None
    first_nonfinite_reference: dict | None
    free_run: dict | None
    length_diff: int | None
    length_hit_limit: bool
    nonfinite_audio: dict
    codebook0: dict
    audio: dict
    timing: dict
    mos: dict | None
    truth_dtype: str | None = None  # the candidate's dtype, for the truth allowance; None: no truth side
    segments: dict | None = None  # {"start_s": [...], "logmel_db": [...]} of the two WAVs
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"version": MEASURED_VERSION, **{f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"},
                **self.extra}

    @classmethod
    def from_json(cls, d: dict) -> "Measured":
        names = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in d.items() if k in names},
                   extra={k: v for k, v in d.items() if k not in names and k != "version"})


# -- step 1: measure ---------------------------------------------------------------------------

def first_nonfinite_point(trace) -> dict | None:
    """The first NaN/inf point of a recorded trace in execution order (talker step s: embed,
    layers, logits; then the predictor sub-steps of frame s), named as compare.py names points."""
    import torch

    if trace.talker_hidden.numel() == 0:
        return None
    t_bad = ~torch.isfinite(trace.talker_hidden).all(-1)  # [S, L+1]
    tl_bad = ~torch.isfinite(trace.talker_logits).all(-1)  # [S]
    has_pred = trace.pred_hidden.numel() > 0
    p_bad = ~torch.isfinite(trace.pred_hidden).all(-1) if has_pred else None  # [F, 15, P+1]
    pl_bad = ~torch.isfinite(trace.pred_logits).all(-1) if has_pred else None  # [F, 15]

    def point(component: str, step: int, sub: int, bad_layers) -> dict:
        hits = bad_layers.nonzero()
        p = int(hits[0, 0]) if len(hits) else len(bad_layers)  # len() = the logits point
        name = "embed" if p == 0 else ("logits" if p == len(bad_layers) else f"layer{p - 1}")
        return {"component": component, "step": step, "substep": sub, "layer": p - 1, "point": name}

    for s in range(t_bad.shape[0]):
        if bool(t_bad[s].any() or tl_bad[s]):
            return point("talker", s, -1, t_bad[s])
        if has_pred and s < p_bad.shape[0]:
            for j in range(p_bad.shape[1]):
                if bool(p_bad[s, j].any() or pl_bad[s, j]):
                    return point("predictor", s, j, p_bad[s, j])
    return None


def _flip_json(flip) -> dict | None:
    return None if flip is None else Flip.from_json(asdict(flip)).to_json()


def measure(prompt: dict, ref, forced, free, truth=None, ref_wav: np.ndarray | None = None,
            cand_wav: np.ndarray | None = None, sr: int = 24000, timing: dict | None = None, mos: dict | None = None,
            audio: dict | None = None) -> tuple[pd.DataFrame, pd.DataFrame | None, Measured]:
    """Measure one prompt from its traces (reference, teacher-forced candidate, free-running
    candidate, optional truth) and both sides' audio. Returns (points, truth points, the rest)."""
    points = compare.point_frame(forced, ref, math.inf)[POINT_COLUMNS]
    truth_points = None
    truth_dtype = None
    if truth is not None:
        keys = TRUTH_COLUMNS[:5]
        c = compare.point_frame(forced, truth, math.inf)[keys + ["rel_l2"]].rename(columns={"rel_l2": "cand_err"})
        r = compare.point_frame(ref, truth, math.inf)[keys + ["rel_l2"]].rename(columns={"rel_l2": "ref_err"})
        truth_points = c.merge(r, on=keys, how="inner", sort=False)[TRUTH_COLUMNS]
        truth_dtype = str((forced.meta.get("side") or {}).get("dtype", "float32"))
    free_run = length_diff = None
    hit_limit = False
    if free is not None:
        free_run = compare.token_agreement(free.codes, ref.codes)
        length_diff = free.n_frames - ref.n_frames
        hit_limit = bool(ref.meta.get("hit_max_frames") or free.meta.get("hit_max_frames"))
    segments = None
    if ref_wav is not None and cand_wav is not None and len(ref_wav) and len(cand_wav):
        from parity import audio_align

        d = audio_align.segment_distances(ref_wav, cand_wav, sr)
        segments = {"start_s": d.start_s.tolist(), "logmel_db": d.logmel_db.tolist()}
    measured = Measured(
        prompt=prompt, ref_frames=ref.n_frames, first_flip=_flip_json(compare.first_flip(forced, ref)),
        first_nonfinite_reference=first_nonfinite_point(ref), free_run=free_run, length_diff=length_diff,
        length_hit_limit=hit_limit,
        nonfinite_audio={"reference": ref.meta.get("audio_nonfinite"), "candidate": (free.meta if free else {}).get("audio_nonfinite")},
        codebook0={"reference": ref.codes[:, 0].tolist(), "candidate": free.codes[:, 0].tolist() if free is not None else []},
        audio=audio or {}, timing=timing or {}, mos=mos, truth_dtype=truth_dtype, segments=segments,
    )
    return points, truth_points, measured


def _write_atomic(path: Path, write) -> None:
    import os

    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def save_measured(run_dir: Path, prompt_id: str, points: pd.DataFrame, truth_points: pd.DataFrame | None,
                  measured: Measured) -> None:
    """Write a prompt's measurements under ``run_dir/points`` (atomically, the JSON last)."""
    d = Path(run_dir) / "points"
    d.mkdir(parents=True, exist_ok=True)
    _write_atomic(d / f"{prompt_id}.csv.gz", lambda p: points.to_csv(p, index=False, compression="gzip"))
    if truth_points is not None:
        _write_atomic(d / f"{prompt_id}.truth.csv.gz", lambda p: truth_points.to_csv(p, index=False, compression="gzip"))
    text = json.dumps(measured.to_json(), indent=1, ensure_ascii=False, default=str)
    _write_atomic(d / f"{prompt_id}.measured.json", lambda p: p.write_text(text, encoding="utf-8"))


def has_measured(run_dir: Path, prompt_id: str) -> bool:
    """Whether a prompt's measurements are on disk."""
    d = Path(run_dir) / "points"
    return (d / f"{prompt_id}.measured.json").is_file() and (d / f"{prompt_id}.csv.gz").is_file()


def load_measured(run_dir: Path, prompt_id: str) -> tuple[pd.DataFrame, pd.DataFrame | None, Measured]:
    """Read what :func:`save_measured` wrote; BadInput (one line) when it is missing or damaged."""
    d = Path(run_dir) / "points"
    try:
        measured = Measured.from_json(json.loads((d / f"{prompt_id}.measured.json").read_text(encoding="utf-8")))
        points = pd.read_csv(d / f"{prompt_id}.csv.gz")
        truth_path = d / f"{prompt_id}.truth.csv.gz"
        truth = pd.read_csv(truth_path) if measured.truth_dtype is not None else None
    except FileNotFoundError as e:
        raise BadInput(f"'{e.filename}' is missing, so prompt {prompt_id} cannot be re-analysed; "
                       "re-run it with parity run --resume (or a new run)") from None
    except (OSError, ValueError, TypeError, EOFError) as e:
        raise BadInput(f"the measurements of prompt {prompt_id} under '{d}' are unreadable ({type(e).__name__}); "
                       "re-run the prompt with parity run") from None
    missing = [c for c in POINT_COLUMNS if c not in points.columns]
    if missing:
        raise BadInput(f"'{d / f'{prompt_id}.csv.gz'}' lacks column {missing[0]!r}; it was not written by this parity version; "
                       "re-run the prompt with parity run")
    points["rel_l2"] = pd.to_numeric(points["rel_l2"], errors="coerce").fillna(math.inf)
    points["finite"] = points["finite"].astype(bool)
    return points, truth, measured


# -- step 2: judge -----------------------------------------------------------------------------

def _point(row) -> dict:
    return {"component": str(row["component"]), "step": int(row["step"]), "substep": int(row["substep"]),
            "layer": int(row["layer"]), "point": str(row["point"])}


def judge_truth(truth_points: pd.DataFrame, tol: float, dtype: str) -> dict:
    """Both sides against the truth side, in the manner of ``torch._dynamo.utils.same``: a point
    is *worse* when the candidate's error from the truth exceeds the dtype's multiplier x the
    reference's error plus ``tol / 10`` (see :func:`parity.compare.compare_truth`)."""
    multiplier = compare.truth_multiplier(dtype)
    df = truth_points
    worse_mask = df["cand_err"] > multiplier * df["ref_err"] + tol / 10
    worse = df[worse_mask]
    first = None
    if len(worse):
        row = worse.iloc[0]
        first = {**_point(row), "cand_err": finite_or_none(row["cand_err"]), "ref_err": finite_or_none(row["ref_err"])}
    differs = bool((df["cand_err"] != df["ref_err"]).any())
    finite = lambda s: finite_or_none(s.replace([np.inf], np.nan).max())  # noqa: E731
    return {
        "multiplier": multiplier, "slack": tol / 10, "points": int(len(df)), "worse_points": int(len(worse)),
        "first_worse": first, "cand_err_max": finite(df["cand_err"]), "ref_err_max": finite(df["ref_err"]),
        "verdict": "worse" if len(worse) else ("different, not worse" if differs else "same distance"),
    }


def compare_points(points: pd.DataFrame, measured: Measured, tol: float, truth_points: pd.DataFrame | None = None) -> Comparison:
    """The comparison record of one prompt at tolerance ``tol``."""
    points = points.assign(over=(points["rel_l2"] > tol) | ~points["finite"])
    over = points[points["over"]]
    first = None
    if len(over):
        row = over.iloc[0]
        rel = float(row["rel_l2"])
        first = Divergence(**_point(row), rel_l2=finite_or_none(rel), max_abs=finite_or_none(row["max_abs"]),
                           cosine=finite_or_none(row["cosine"]), sqnr_db=finite_or_none(row["sqnr_db"]),
                           tolerance=tol, nonfinite=not math.isfinite(rel))
    bad = points[~points["finite"]]
    first_nonfinite = Point(**_point(bad.iloc[0])) if len(bad) else None
    finite_rel = points["rel_l2"][np.isfinite(points["rel_l2"])]
    hidden = points[points["point"] != "logits"]
    per_layer = hidden.groupby(["component", "layer"])["added"].mean().reset_index()
    free_run = Agreement.from_json(measured.free_run) if measured.free_run is not None else None
    return Comparison(
        first_divergence=first,
        first_nonfinite=first_nonfinite,
        max_rel_l2=finite_or_none(finite_rel.max()) if len(finite_rel) else None,
        nonfinite_points=int(len(points) - len(finite_rel)),
        points_compared=int(len(points)),
        points_over=int(len(over)),
        bit_identical=bool(len(points) and (points["max_abs"] == 0).all()),
        added_per_layer=[LayerError(str(r.component), int(r.layer), finite_or_none(r.added)) for r in per_layer.itertuples()],
        first_flip=Flip.from_json(measured.first_flip) if measured.first_flip else None,
        ref_frames=measured.ref_frames,
        hints=compare.signature_hints(points, first_nonfinite.to_json() if first_nonfinite else None, tol),
        free_run=free_run,
        length_diff=measured.length_diff if free_run is not None else None,
        # The reference drops the last frame when it hits max_new_tokens; a one-frame difference
        # at the length limit is bookkeeping, not a numeric divergence.
        length_diff_is_bookkeeping=(abs(measured.length_diff) <= 1 and measured.length_hit_limit) if free_run is not None else None,
        truth=judge_truth(truth_points, tol, measured.truth_dtype) if truth_points is not None and measured.truth_dtype else None,
        first_nonfinite_reference=_opt_point(measured.first_nonfinite_reference),
        nonfinite_audio=dict(measured.nonfinite_audio),
    )


def _opt_point(d: dict | None) -> Point | None:
    return None if d is None else Point.from_json(d)


def judge(points: pd.DataFrame, truth_points: pd.DataFrame | None, measured: Measured, recipe) -> PromptResult:
    """One prompt's verdict under ``recipe`` (its tolerances, gates and MOS gates)."""
    from parity.audio_align import audible_from, frame_to_seconds, SegmentDistances

    tol = recipe.tolerance()
    comparison = compare_points(points, measured, tol, truth_points)
    gates = gates_mod.evaluate(recipe.gates, comparison, recipe.mos, measured.mos)
    p = measured.prompt
    result = PromptResult(
        id=p["id"], text=p.get("text", ""), line=p.get("line"), status="ok", passed=all(g.passed for g in gates),
        gates=gates, speaker=p.get("speaker"), language=p.get("language"), comparison=comparison,
        timing=dict(measured.timing), audio=dict(measured.audio), codebook0=dict(measured.codebook0), mos=measured.mos,
    )
    if measured.audio:  # both sides' audio were written: map the divergence to seconds
        first, free = comparison.first_divergence, comparison.free_run
        result.first_divergence_s = frame_to_seconds(first.step) if first else None
        result.first_diff_frame_s = frame_to_seconds(free.first_diff_frame) if free and free.first_diff_frame is not None else None
        result.audible_threshold_db = recipe.mos.audible_db
        if measured.segments:
            seg = SegmentDistances(np.asarray(measured.segments["start_s"]), np.zeros(0),
                                   np.asarray(measured.segments["logmel_db"]), 0.0)
            result.audible_from_s = audible_from(seg, recipe.mos.audible_db)
    return result


def analyse_prompt(run_dir: Path, prompt_id: str, recipe) -> PromptResult:
    """Judge one prompt of a run directory from its saved measurements."""
    points, truth, measured = load_measured(run_dir, prompt_id)
    return judge(points, truth, measured, recipe)


# -- a whole run -------------------------------------------------------------------------------

def summarize(results: list[PromptResult], meta: dict, failure: str | None, peak_memory: dict | None = None,
              reanalysis_of: str | None = None) -> Summary:
    """The run's summary record: its metadata (run.json's keys), every prompt's result, the verdict.
    A run passes when nothing failed, every prompt ran and every prompt passed its gates."""
    own = {k: meta.get(k) for k in ("recipe", "tolerance", "sides", "command")}
    extra = {k: v for k, v in meta.items() if k not in own and k not in ("schema_version", "reanalysis_of")}
    ran = [r for r in results if r.ran]
    return Summary(
        prompts=results, passed=failure is None and len(ran) == len(results) and all(r.passed for r in ran),
        failure=failure, tolerance=own["tolerance"], recipe=own["recipe"] or {}, sides=own["sides"] or {},
        command=own["command"] or "", peak_memory=dict(peak_memory or {}), reanalysis_of=reanalysis_of, extra=extra,
    )


def analyse_run(run_dir: Path, recipe, saved: Summary, meta: dict) -> Summary:
    """Re-judge every prompt of a saved run under ``recipe`` from its measurements (no engine, no
    model). ``saved`` is the run's own summary: its prompt list, failure and peak memory are kept;
    prompts it did not run stay ``not_run``."""
    results = []
    for p in saved.prompts:
        results.append(analyse_prompt(run_dir, p.id, recipe) if p.ran else p)
    meta = {**meta, "recipe": json.loads(json.dumps(recipe.to_dict(), default=str)), "tolerance": recipe.tolerance()}
    for key in ("finished", "started"):
        if key in saved.extra:
            meta[key] = saved.extra[key]
    return summarize(results, meta, saved.failure, saved.peak_memory, reanalysis_of=str(run_dir))


def compare_traces(forced, ref, tol: float) -> Comparison:
    """A teacher-forced trace against its reference at tolerance ``tol`` (no free run, no audio):
    what ``parity bisect`` judges each configuration by."""
    points, _, measured = measure({"id": ""}, ref, forced, None)
    return compare_points(points, measured, tol)
