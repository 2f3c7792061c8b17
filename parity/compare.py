"""Compare two traces: per-point error metrics, first divergence, error added per layer, first
token flip (with rank and logit margin), and free-running token agreement.

Points are ordered as they execute: talker step s (embed, layers, logits), then the predictor
sub-steps of frame s (as many as the trace layout declares: 15 on Qwen3-TTS), then talker step
s+1. A side recorded without layers (an engine that cannot hook them) is compared on its logits. "Relative L2" is ||cand - ref|| / ||ref||.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from parity.results import Flip
from parity.trace import Trace

COLUMNS = ["component", "step", "substep", "layer", "point", "max_abs", "rel_l2", "cosine", "sqnr_db", "added", "over"]


def _metrics(cand: torch.Tensor, ref: torch.Tensor) -> dict[str, torch.Tensor]:
    """Metrics over the last dimension (float64 so tiny errors are not rounded away)."""
    c, r = cand.double(), ref.double()
    diff = c - r
    err = diff.norm(dim=-1)
    ref_norm = r.norm(dim=-1)
    cand_norm = c.norm(dim=-1)
    rel = err / ref_norm.clamp_min(1e-30)
    cosine = (c * r).sum(-1) / (cand_norm * ref_norm).clamp_min(1e-30)
    sqnr = 20 * torch.log10(ref_norm.clamp_min(1e-30) / err.clamp_min(1e-300))
    sqnr = torch.where(err == 0, torch.full_like(sqnr, math.inf), sqnr)
    finite = torch.isfinite(c).all(dim=-1)  # the candidate's (attributed by first_nonfinite)
    # A NaN/inf on either side is a divergence, never a NaN error that tolerance checks skip.
    both_finite = finite & torch.isfinite(r).all(dim=-1)
    rel = torch.where(both_finite, rel, torch.full_like(rel, math.inf))
    return {"max_abs": diff.abs().amax(dim=-1), "rel_l2": rel, "cosine": cosine, "sqnr_db": sqnr, "finite": finite}


def _rows(component: str, hidden_c, hidden_r, logits_c, logits_r, tol: float) -> pd.DataFrame:
    """Rows for one component. hidden: [..., P, H] with P = embed + layers; logits: [..., V]."""
    if logits_c.numel() == 0 or logits_r.numel() == 0:
        return pd.DataFrame(columns=COLUMNS + ["finite"])
    lead = logits_c.shape[:-1]
    # Hidden points only where both sides recorded them; otherwise the logits alone are compared.
    with_hidden = hidden_c.numel() > 0 and hidden_r.numel() > 0 and hidden_c.shape[-2] == hidden_r.shape[-2]
    n_points = hidden_c.shape[-2] if with_hidden else 0
    mh = _metrics(hidden_c, hidden_r) if with_hidden else {}  # [..., P]
    ml = _metrics(logits_c, logits_r)  # [...]
    frames = []
    for p in range(n_points + 1):
        m = {k: (mh[k][..., p] if p < n_points else v) for k, v in ml.items()}
        idx = np.indices(tuple(lead)).reshape(len(lead), -1)
        step = idx[0]
        sub = idx[1] if len(lead) == 2 else np.full_like(step, -1)
        name = "logits" if p == n_points else ("embed" if p == 0 else f"layer{p - 1}")
        layer = p - 1 if with_hidden else 0  # logits sit after the last layer; alone, they are the only point
        frames.append(pd.DataFrame({
            "component": component, "step": step, "substep": sub, "layer": layer, "point": name,
            **{k: v.reshape(-1).numpy() for k, v in m.items()},
        }))
    df = pd.concat(frames, ignore_index=True).sort_values(["step", "substep", "layer"], kind="stable")
    # Error a point adds on top of its input's error (the previous point at the same step).
    prev = df.groupby(["step", "substep"])["rel_l2"].shift(1).fillna(0.0)
    df["added"] = df["rel_l2"] - prev
    df["over"] = (df["rel_l2"] > tol) | ~df["finite"]
    return df


def point_frame(cand: Trace, ref: Trace, tol: float) -> pd.DataFrame:
    """All compared points of a teacher-forced candidate trace against its reference trace,
    in execution order."""
    s = min(cand.n_steps, ref.n_steps)
    f = min(cand.n_frames, ref.n_frames)
    talker = _rows("talker", cand.talker_hidden[:s], ref.talker_hidden[:s], cand.talker_logits[:s], ref.talker_logits[:s], tol)
    pred = _rows("predictor", cand.pred_hidden[:f], ref.pred_hidden[:f], cand.pred_logits[:f], ref.pred_logits[:f], tol)
    # An empty part (a trace with no frames) would turn every column to object dtype in concat.
    df = pd.concat([part for part in (talker, pred) if len(part)] or [talker], ignore_index=True)
    df["order"] = df["component"].map({"talker": 0, "predictor": 1})
    df = df.sort_values(["step", "order", "substep", "layer"], kind="stable").reset_index(drop=True)
    return df.drop(columns=["order"])


TIE_FACTOR = 3.0  # a flip is a tie when the reference's own margin is within 3x the noise floor


def noise_floor(ref_logits: torch.Tensor, tol: float, truth_logits: torch.Tensor | None = None) -> tuple[float, str]:
    """The noise of one logit, from evidence independent of the divergence being judged: the
    error the tolerance admits as rounding (tol x RMS of the reference's logits: a relative L2 of
    exactly ``tol``), or, with a truth side, the reference's own measured distance from the truth
    when that is larger."""
    r = ref_logits.double()
    r = r[torch.isfinite(r)]
    floor = float(tol * r.pow(2).mean().sqrt()) if r.numel() else 0.0
    if truth_logits is not None:
        d = (ref_logits.double() - truth_logits.double())
        d = d[torch.isfinite(d)]
        measured = float(d.pow(2).mean().sqrt()) if d.numel() else 0.0
        if measured > floor:
            return measured, "truth"
    return floor, "tolerance"


def flip_label(ref_margin: float, floor: float, logits_rel_l2: float, tol: float, sampler_mismatch: bool) -> str:
    """``sampler`` when the candidate's choice is not what the reference's sampler picks from the
    candidate's own logits (or, where that cannot be replayed, the logits agree within tolerance);
    ``tie`` when the reference's own top-1/top-2 margin is within TIE_FACTOR x the noise floor
    (rounding can explain it); ``real`` otherwise."""
    if sampler_mismatch:
        return "sampler"
    if ref_margin <= TIE_FACTOR * floor:
        return "tie"
    return "real"


def _allowed_mask(trace: Trace, vocab: int) -> torch.Tensor:
    """Tokens the talker may choose (generate suppresses the top block except EOS)."""
    allowed = torch.ones(vocab, dtype=torch.bool)
    start = trace.meta.get("suppress_from")
    if start is not None:
        allowed[start:] = False
        allowed[trace.meta["eos_token_id"]] = True
    return allowed


def _flip_at(component, step, sub, cand_logits, ref_logits, ref_token, cand_token, allowed, tol, truth_logits,
             sampler_mismatch) -> Flip:
    c = cand_logits.double().masked_fill(~allowed, -math.inf)
    r = ref_logits.double().masked_fill(~allowed, -math.inf)
    rank = int((c > c[ref_token]).sum())
    top2 = torch.topk(r, 2).values
    diff = cand_logits.double() - ref_logits.double()
    noise = float(diff.pow(2).mean().sqrt())
    ref_margin = float(top2[0] - top2[1])
    margin = float(c[cand_token] - c[ref_token])
    rel = float(diff.norm() / ref_logits.double().norm().clamp_min(1e-30))
    floor, source = noise_floor(ref_logits, tol, truth_logits)
    label = flip_label(ref_margin, floor, rel, tol, sampler_mismatch)
    return Flip(component, step, sub, ref_token, cand_token, rank, margin, ref_margin, float(diff.abs().max()), noise,
                label == "tie", floor, source, rel, label)


def flips(cand: Trace, ref: Trace, tol: float = 1e-5, truth: Trace | None = None,
          sampler_points: set | None = None) -> list[Flip]:
    """Every teacher-forced flip in execution order, labelled (see :func:`flip_label`).
    ``sampler_points``: the (component, step, substep) where the sampler check found the
    candidate's choice inconsistent with its own logits."""
    if cand.talker_logits.numel() == 0 or ref.talker_logits.numel() == 0:
        return []  # traces = "tokens": no logits to judge a flip by
    s_max = min(cand.n_steps, ref.n_steps)
    f_max = min(cand.n_frames, ref.n_frames)
    talker_allowed = _allowed_mask(ref, ref.talker_logits.shape[-1])
    pred_allowed = torch.ones(ref.pred_logits.shape[-1], dtype=torch.bool)
    sampler_points = sampler_points or set()
    has_truth = truth is not None and truth.talker_logits.numel() > 0
    out = []
    for s in range(s_max):
        ref_tok, cand_tok = int(ref.talker_tokens[s]), int(cand.talker_choice[s])
        if ref_tok != cand_tok:
            t = truth.talker_logits[s] if has_truth and s < truth.n_steps else None
            out.append(_flip_at("talker", s, -1, cand.talker_logits[s], ref.talker_logits[s], ref_tok, cand_tok,
                                talker_allowed, tol, t, ("talker", s, -1) in sampler_points))
        if s < f_max:
            for j in range(ref.codes.shape[1] - 1):  # the predictor's sub-steps: codebooks 1..
                ref_tok, cand_tok = int(ref.codes[s, j + 1]), int(cand.pred_choice[s, j])
                if ref_tok != cand_tok:
                    t = truth.pred_logits[s, j] if has_truth and s < truth.n_frames else None
                    out.append(_flip_at("predictor", s, j, cand.pred_logits[s, j], ref.pred_logits[s, j], ref_tok, cand_tok,
                                        pred_allowed, tol, t, ("predictor", s, j) in sampler_points))
    return out


def first_flip(cand: Trace, ref: Trace, tol: float = 1e-5, truth: Trace | None = None,
               sampler_points: set | None = None) -> Flip | None:
    """The first token the forced candidate would have flipped, in execution order."""
    found = flips(cand, ref, tol, truth, sampler_points)
    return found[0] if found else None


def token_agreement(cand_codes: torch.Tensor, ref_codes: torch.Tensor) -> dict:
    """Agreement of free-running codes over the common frames, and where they first differ."""
    n = min(len(cand_codes), len(ref_codes))
    if n == 0:
        return {"agreement": None, "first_diff_frame": None, "frames_compared": 0}
    equal = cand_codes[:n] == ref_codes[:n]
    frame_equal = equal.all(dim=1)
    first = int((~frame_equal).nonzero()[0, 0]) if not bool(frame_equal.all()) else None
    return {"agreement": float(equal.float().mean()), "codebook0_agreement": float(equal[:, 0].float().mean()),
            "first_diff_frame": first, "frames_compared": n}


def summarize(points: pd.DataFrame, forced: Trace, ref: Trace, free: Trace | None, tol: float,
              truth: Trace | None = None, decoding=None, stop_ratio: float | None = None) -> dict:
    """Per-prompt verdict material: first divergence, per-layer added error, flips (labelled
    tie/real/sampler), the sampler check, the stop-token analysis, agreement, and hints.
    ``decoding`` (the recipe's) enables the sampler check; ``stop_ratio`` the stop-collapse check."""
    from parity import hints as hints_mod, sampler_check, stop

    over = points[points["over"]]
    first = None
    if len(over):
        row = over.iloc[0]
        first = {k: _py(row[k]) for k in ["component", "step", "substep", "layer", "point", "rel_l2", "max_abs", "cosine", "sqnr_db"]}
        if not bool(row["finite"]):  # NaN/inf on the candidate: the error is NaN, not a number
            first.update(rel_l2="nan", max_abs="nan", cosine=None, sqnr_db=None)
        first["tolerance"] = tol
    nonfinite = points[~points["finite"]]
    first_nonfinite = None
    nonfinite_info = None
    if len(nonfinite):
        row = nonfinite.iloc[0]
        first_nonfinite = {k: _py(row[k]) for k in ["component", "step", "substep", "layer", "point"]}
        detail = nonfinite_detail(forced, ref, first_nonfinite)
        nonfinite_info = {"where": _where(row), "detail": detail, "index": int(nonfinite.index[0])}
    hidden = points[points["point"] != "logits"]
    per_layer = (
        hidden.groupby(["component", "layer"])["added"].mean().reset_index()
        .rename(columns={"added": "mean_added_rel_l2"}).to_dict(orient="records")
    )
    logits_rows = points[points["point"] == "logits"]
    within = {(c, int(st), int(sb)): bool(not o) for c, st, sb, o in
              zip(logits_rows["component"], logits_rows["step"], logits_rows["substep"], logits_rows["over"])}
    sampler = sampler_check.check(forced, ref, decoding, within)
    sampler_points = {(m["component"], m["step"], m["substep"]) for m in (sampler or {}).get("all_points", [])}
    all_flips = flips(forced, ref, tol, truth, sampler_points)
    labels = {"tie": 0, "real": 0, "sampler": 0}
    for f in all_flips:
        labels[f.label] += 1
    stop_result = stop.analyse(ref, forced, free, stop_ratio)
    result = {
        "first_divergence": first,
        "first_nonfinite": first_nonfinite,
        "first_nonfinite_detail": nonfinite_info and nonfinite_info["detail"],
        # The largest finite error; NaN/inf points are counted apart (Comparison.nonfinite_points),
        # so a NaN-only divergence is never reported as "max rel L2 0" (see max_rel_l2 below).
        "max_rel_l2": _py(points["rel_l2"].replace([np.inf], np.nan).max()) if len(points) else None,
        "points_compared": int(len(points)),
        "points_over": int(len(over)),
        "bit_identical": bool(len(points) and (points["max_abs"] == 0).all()),
        "added_per_layer": [{k: _py(v) for k, v in r.items()} for r in per_layer],
        "first_flip": all_flips[0].to_json() if all_flips else None,
        "flips": {"count": len(all_flips), "labels": labels},
        "sampler": sampler and {k: v for k, v in sampler.items() if k != "all_points"},
        "stop": stop_result,
        "ref_frames": ref.n_frames,
    }
    result["hints"] = hints_mod.diagnose(points, tol, prefill_len=ref.meta.get("prefill_len"), nonfinite=nonfinite_info,
                                         sampler=sampler, stop=stop_result)
    if free is not None:
        result["free_run"] = token_agreement(free.codes, ref.codes)
        diff = free.n_frames - ref.n_frames
        result["length_diff"] = diff
        # The reference drops the last frame when it hits max_new_tokens; a one-frame difference
        # at the length limit is bookkeeping, not a numeric divergence.
        result["length_diff_is_bookkeeping"] = abs(diff) <= 1 and bool(
            ref.meta.get("hit_max_frames") or free.meta.get("hit_max_frames")
        )
    return result


def max_rel_l2(points: pd.DataFrame):
    """The largest relative L2 error over all points: a float; "nan" when the candidate has a
    NaN/inf point (a NaN-only divergence is NaN, never 0); "inf" when only the reference side is
    non-finite; None when nothing was compared."""
    if not len(points):
        return None
    finite = points["finite"] if "finite" in points else np.isfinite(points["rel_l2"])
    if not bool(finite.all()):
        return "nan"
    rel = points["rel_l2"].astype(float)
    if bool(np.isinf(rel).any()):
        return "inf"
    return _py(rel.max())


def nonfinite_detail(cand: Trace, ref: Trace, point: dict) -> dict:
    """What the first non-finite point holds (NaN and inf counts) and how large the candidate's
    values were just before it (its input at the same step and the same point one step or
    sub-step earlier) against the reference's: the evidence that tells a masked row from overflow."""
    comp, step, sub, layer = point["component"], int(point["step"]), int(point["substep"]), int(point["layer"])
    if comp == "talker":
        hid_c, hid_r, log_c = cand.talker_hidden, ref.talker_hidden, cand.talker_logits
        key, prev_key = (step,), ((step - 1,) if step > 0 else None)
    else:
        hid_c, hid_r, log_c = cand.pred_hidden, ref.pred_hidden, cand.pred_logits
        key, prev_key = (step, sub), ((step, sub - 1) if sub > 0 else None)
    n_hidden = hid_c.shape[len(key)]
    idx = layer + 1  # 0 embed .. n_hidden-1 the last layer; n_hidden = the logits
    value = log_c[key] if idx >= n_hidden else hid_c[key + (idx,)]
    before_c, before_r = [], []
    if idx > 0:
        before_c.append(hid_c[key + (idx - 1,)])
        before_r.append(hid_r[key + (idx - 1,)])
    if prev_key is not None and idx < n_hidden:
        before_c.append(hid_c[prev_key + (idx,)])
        before_r.append(hid_r[prev_key + (idx,)])

    def max_abs(ts: list[torch.Tensor]) -> float | None:
        vals = [t.double().abs() for t in ts]
        vals = [float(v[torch.isfinite(v)].max()) for v in vals if bool(torch.isfinite(v).any())]
        return max(vals) if vals else None

    c_max, r_max = max_abs(before_c), max_abs(before_r)
    dtype = (cand.meta.get("side") or {}).get("dtype", "float32")
    finfo = torch.finfo({"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype, torch.float32))
    return {
        "nan_count": int(torch.isnan(value).sum()), "inf_count": int(torch.isinf(value).sum()),
        "cand_max_abs_before": c_max, "ref_max_abs_before": r_max,
        "growth_vs_reference": (c_max / r_max) if c_max is not None and r_max else None,
        "dtype": dtype, "dtype_max": float(finfo.max),
    }


def _where(row) -> str:
    if row["component"] == "talker":
        return f"talker step {row['step']} {row['point']}"
    return f"predictor frame {row['step']} sub-step {row['substep']} {row['point']}"


# -- a third side as truth --------------------------------------------------------------------

def truth_multiplier(dtype: str) -> float:
    """torch._dynamo.utils.same's allowance: 3x for a bf16/fp16 result, 2x otherwise."""
    return 3.0 if dtype in ("bfloat16", "float16") else 2.0


def compare_truth(cand: Trace, ref: Trace, truth: Trace, tol: float, multiplier: float | None = None) -> dict:
    """Judge both sides against a truth trace (e.g. the reference in fp32, TF32 off), in the
    manner of ``torch._dynamo.utils.same``: a point is *worse* when the candidate's error from the
    truth exceeds ``multiplier`` x the reference's error from it plus ``tol / 10`` (relative L2
    here, where ``same`` uses absolute RMSE). Tells "different" (as far from the truth as the
    reference, the other way) from "worse"."""
    if multiplier is None:
        multiplier = truth_multiplier(str(cand.meta.get("side", {}).get("dtype", "float32")))
    keys = ["component", "step", "substep", "layer", "point"]
    c = point_frame(cand, truth, tol)[keys + ["rel_l2"]].rename(columns={"rel_l2": "cand_err"})
    r = point_frame(ref, truth, tol)[keys + ["rel_l2"]].rename(columns={"rel_l2": "ref_err"})
    df = c.merge(r, on=keys, how="inner", sort=False)
    df["worse"] = df["cand_err"] > multiplier * df["ref_err"] + tol / 10
    worse = df[df["worse"]]
    first = None
    if len(worse):
        row = worse.iloc[0]
        first = {**{k: _py(row[k]) for k in keys}, "cand_err": _py(row["cand_err"]), "ref_err": _py(row["ref_err"])}
    differs = bool((df["cand_err"] != df["ref_err"]).any())
    return {
        "multiplier": multiplier, "slack": tol / 10, "points": int(len(df)), "worse_points": int(len(worse)),
        "first_worse": first,
        "cand_err_max": _py(df["cand_err"].replace([np.inf], np.nan).max()),
        "ref_err_max": _py(df["ref_err"].replace([np.inf], np.nan).max()),
        "verdict": "worse" if len(worse) else ("different, not worse" if differs else "same distance"),
    }


def _py(v):
    """numpy scalars -> plain Python for JSON; inf/nan -> None-safe floats as strings are avoided."""
    if isinstance(v, (np.floating, float)):
        v = float(v)
        return v if math.isfinite(v) else (None if math.isnan(v) else ("inf" if v > 0 else "-inf"))
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, np.bool_):
        return bool(v)
    return v
