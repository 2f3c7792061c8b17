"""The analyse stage: pure functions from what the execute stage saved to typed verdicts.

The execute stage leaves, per prompt, the traces (``traces/``), the WAVs (``audio/``) and
``points/<id>.measured.json``: what was measured outside the traces (MOS scores, which need a
scorer model; engine timings; where each WAV holds NaN/inf; per-segment distances between the
two WAVs). :func:`judge` turns traces + that record + the recipe into a
:class:`parity.results.PromptResult`: every compared point's error, the first divergence at the
recipe's tolerance, flips, agreement, hints, the truth verdict, audible time and every gate.

``parity run`` judges each prompt as soon as it finishes; ``parity compare`` judges the same saved
traces again with the same function, loading no engine, model or scorer, so with the run's own
recipe it gives exactly the run's own results, and with other tolerances or gates what a run
with them would have given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from parity.errors import BadInput
from parity.results import Comparison, PromptResult, Summary

MEASURED_VERSION = 1
TRACE_ROLES = ("reference", "candidate.forced", "candidate.free", "truth")


@dataclass
class Measured:
    """What the execute stage measured of one prompt outside its traces.

    ``prompt``: id, text, line, speaker, language. ``segments``: per-segment log-mel distance of
    the two WAVs (``start_s``, ``logmel_db``), or None without audio."""

    prompt: dict
    timing: dict
    mos: dict | None
    audio: dict
    nonfinite_audio: dict
    segments: dict | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"version": MEASURED_VERSION, **{f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"},
                **self.extra}

    @classmethod
    def from_json(cls, d: dict) -> "Measured":
        names = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in d.items() if k in names},
                   extra={k: v for k, v in d.items() if k not in names and k != "version"})


@dataclass
class PromptTraces:
    """One prompt's traces: the reference, the candidate teacher-forced and free-running, and the
    optional truth side."""

    reference: object
    forced: object
    free: object | None
    truth: object | None = None


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


def measure_audio(prompt: dict, timing: dict, mos: dict | None, audio: dict, nonfinite_audio: dict,
                  ref_wav: np.ndarray | None, cand_wav: np.ndarray | None, sr: int) -> Measured:
    """The record of what execute measured outside the traces (see :class:`Measured`)."""
    segments = None
    if ref_wav is not None and cand_wav is not None and len(ref_wav) and len(cand_wav):
        from parity import audio_align

        d = audio_align.segment_distances(ref_wav, cand_wav, sr)
        segments = {"start_s": d.start_s.tolist(), "logmel_db": d.logmel_db.tolist()}
    return Measured(prompt, dict(timing), mos, dict(audio), dict(nonfinite_audio), segments)


def save_measured(run_dir: Path, prompt_id: str, measured: Measured) -> None:
    """Write ``points/<id>.measured.json`` atomically."""
    import os

    d = Path(run_dir) / "points"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{prompt_id}.measured.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(measured.to_json(), indent=1, ensure_ascii=False, default=str), encoding="utf-8")
    os.replace(tmp, path)


def load_prompt(run_dir: Path, prompt_id: str) -> tuple[PromptTraces, Measured]:
    """A finished prompt's saved traces and measurements; BadInput (one line) when they are
    missing, damaged, or hold only tokens (``traces = "tokens"`` drops what a re-analysis needs)."""
    from safetensors import SafetensorError

    from parity.trace import Trace

    run_dir = Path(run_dir)
    path = run_dir / "points" / f"{prompt_id}.measured.json"
    traces = {}
    try:
        measured = Measured.from_json(json.loads(path.read_text(encoding="utf-8")))
        for role in TRACE_ROLES:
            if role == "truth" and not (run_dir / "traces" / f"{prompt_id}.truth.json").is_file():
                continue
            path = run_dir / "traces" / f"{prompt_id}.{role}.json"
            traces[role] = Trace.load(run_dir / "traces", f"{prompt_id}.{role}")
    except FileNotFoundError:
        raise BadInput(f"'{path}' is missing, so prompt {prompt_id} cannot be re-analysed; it was written by an "
                       "older parity or the run was cut short; re-run it with parity run") from None
    except (OSError, ValueError, TypeError, KeyError, EOFError, SafetensorError) as e:  # an empty or cut .safetensors too
        raise BadInput(f"'{path}' is unreadable ({type(e).__name__}), so prompt {prompt_id} cannot be re-analysed; "
                       "re-run it with parity run") from None
    for role in ("reference", "candidate.forced"):
        if traces[role].meta.get("stored") == "tokens":
            raise BadInput(f"'{run_dir}' kept only tokens and codes (traces = \"tokens\"), and a re-analysis needs the "
                           "per-layer traces; re-run with traces = \"full\" to compare it again")
    return PromptTraces(traces["reference"], traces["candidate.forced"], traces["candidate.free"], traces.get("truth")), measured


def comparison(t: PromptTraces, tol: float, recipe=None):
    """The compared points and the comparison record of one prompt at tolerance ``tol``."""
    from parity import compare

    points = compare.point_frame(t.forced, t.reference, tol)
    c = compare.summarize(points, t.forced, t.reference, t.free, tol, truth=t.truth,
                          decoding=recipe.decoding if recipe is not None else None,
                          stop_ratio=(recipe.gates.stop_prob_ratio or None) if recipe is not None else None)
    if t.truth is not None:  # which side is further from the truth: "different" vs "worse"
        c["truth"] = compare.compare_truth(t.forced, t.reference, t.truth, tol)
    c["first_nonfinite_reference"] = first_nonfinite_point(t.reference)
    from parity import sublayers

    c["sublayer"] = sublayers.split(points, t.forced, t.reference, tol)  # None unless both sides probed sub-layers
    rel = points["rel_l2"].to_numpy(dtype=float)
    c["nonfinite_points"] = int((~np.isfinite(rel)).sum())
    # The record keeps the largest *finite* error; NaN/inf points are counted above, not folded in.
    c["max_rel_l2"] = float(rel[np.isfinite(rel)].max()) if np.isfinite(rel).any() else None
    return points, Comparison.from_json(c)


def judge(t: PromptTraces, measured: Measured, recipe) -> tuple[object, PromptResult]:
    """One prompt's verdict under ``recipe`` (its tolerances, gates and MOS gates). Returns the
    compared points (a DataFrame, for the report) and the result."""
    from parity import gates as gates_mod
    from parity.audio_align import SegmentDistances, audible_from, frame_to_seconds

    points, c = comparison(t, recipe.tolerance(), recipe)
    c.nonfinite_audio = dict(measured.nonfinite_audio)
    from parity import replay
    from parity.results import LayerReplay

    judged_replay = replay.verdict(measured.extra.get("replay"), recipe.tolerance())  # measured at execution
    c.replay = LayerReplay.from_json(judged_replay) if judged_replay else None
    gates = gates_mod.evaluate(recipe.gates, c, recipe.mos, measured.mos)
    p = measured.prompt
    result = PromptResult(
        id=p["id"], text=p.get("text", ""), line=p.get("line"), status="ok", passed=all(g.passed for g in gates),
        gates=gates, speaker=p.get("speaker"), language=p.get("language"), comparison=c,
        timing=dict(measured.timing), audio=dict(measured.audio), mos=measured.mos,
        # Codebook-0 sequences (free-running), small enough to keep for token timelines.
        codebook0={"reference": t.reference.codes[:, 0].tolist(),
                   "candidate": t.free.codes[:, 0].tolist() if t.free is not None else []},
    )
    from parity import refclip

    # Voice cloning: both sides' encodings of the reference clip, compared (pure, from the traces).
    result.extra["reference_clip"] = refclip.compare_encoding(t.forced, t.reference)
    clip_hint = refclip.encoding_hint(result.extra["reference_clip"], recipe.tolerance())
    if clip_hint is not None:
        result.extra["reference_clip_hint"] = clip_hint
    result.extra["batch"] = measured.extra.get("batch")  # measured at execution (see Run._finish_prompt)
    if measured.audio:  # both sides' audio were written: map the divergence to seconds
        first, free = c.first_divergence, c.free_run
        result.first_divergence_s = frame_to_seconds(first.step) if first else None
        result.first_diff_frame_s = frame_to_seconds(free.first_diff_frame) if free and free.first_diff_frame is not None else None
        result.audible_threshold_db = recipe.mos.audible_db
        if measured.segments:
            seg = SegmentDistances(np.asarray(measured.segments["start_s"]), np.zeros(0),
                                   np.asarray(measured.segments["logmel_db"]), 0.0)
            result.audible_from_s = audible_from(seg, recipe.mos.audible_db)
    return points, result


def analyse_prompt(run_dir: Path, prompt_id: str, recipe) -> PromptResult:
    """Judge one finished prompt of a run directory from its saved traces and measurements."""
    traces, measured = load_prompt(run_dir, prompt_id)
    return judge(traces, measured, recipe)[1]


def compare_traces(forced, ref, tol: float) -> Comparison:
    """A teacher-forced trace against its reference at tolerance ``tol`` (no free run, no audio):
    what ``parity bisect`` judges each configuration by."""
    return comparison(PromptTraces(ref, forced, None), tol)[1]


# -- a whole run -------------------------------------------------------------------------------

def summarize(results: list[PromptResult], meta: dict, failure: str | None, peak_memory: dict | None = None,
              reanalysis_of: str | None = None) -> Summary:
    """The run's summary record: its metadata (run.json's keys), every prompt's result, the verdict.
    A run passes when nothing failed, every prompt ran and every prompt passed its gates."""
    from parity.results import Merge, Shard

    own = {k: meta.get(k) for k in ("recipe", "tolerance", "sides", "command", "shard", "merge")}
    extra = {k: v for k, v in meta.items() if k not in own and k not in ("schema_version", "reanalysis_of")}
    ran = [r for r in results if r.ran]
    return Summary(
        prompts=results, passed=failure is None and len(ran) == len(results) and all(r.passed for r in ran),
        failure=failure, tolerance=own["tolerance"], recipe=own["recipe"] or {}, sides=own["sides"] or {},
        command=own["command"] or "", peak_memory=dict(peak_memory or {}), reanalysis_of=reanalysis_of, extra=extra,
        shard=Shard.from_json(own["shard"]) if isinstance(own["shard"], dict) else None,
        merge=Merge.from_json(own["merge"]) if isinstance(own["merge"], dict) else None,
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

