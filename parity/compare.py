"""Compare two traces: per-point error metrics, first divergence, error added per layer, first
token flip (with rank and logit margin), and free-running token agreement.

Points are ordered as they execute: talker step s (embed, layers, logits), then the predictor
sub-steps of frame s (as many as the trace layout declares: 15 on Qwen3-TTS), then talker step
s+1. A side recorded without layers (an engine that cannot hook them) is compared on its logits. "Relative L2" is ||cand - ref|| / ||ref||.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch

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


@dataclass
class Flip:
    """The first place where the candidate, fed the reference's tokens, would have chosen differently."""

    component: str
    step: int
    substep: int
    ref_token: int
    cand_token: int
    ref_rank_in_cand: int  # 0 = the candidate's top choice
    cand_margin: float  # candidate logit of its choice minus its logit of the reference token
    ref_margin: float  # reference top-1 minus top-2 logit
    logit_error: float  # max |cand - ref| over the logits at that point
    logit_noise: float  # RMS of (cand - ref) over the logits at that point
    near_tie: bool  # the reference's own margin is within 3x the logit noise: rounding explains it


def _allowed_mask(trace: Trace, vocab: int) -> torch.Tensor:
    """Tokens the talker may choose (generate suppresses the top block except EOS)."""
    allowed = torch.ones(vocab, dtype=torch.bool)
    start = trace.meta.get("suppress_from")
    if start is not None:
        allowed[start:] = False
        allowed[trace.meta["eos_token_id"]] = True
    return allowed


def _flip_at(component, step, sub, cand_logits, ref_logits, ref_token, cand_token, allowed) -> Flip:
    c = cand_logits.double().masked_fill(~allowed, -math.inf)
    r = ref_logits.double().masked_fill(~allowed, -math.inf)
    rank = int((c > c[ref_token]).sum())
    top2 = torch.topk(r, 2).values
    diff = cand_logits.double() - ref_logits.double()
    noise = float(diff.pow(2).mean().sqrt())
    ref_margin = float(top2[0] - top2[1])
    margin = float(c[cand_token] - c[ref_token])
    return Flip(component, step, sub, ref_token, cand_token, rank, margin, ref_margin,
                float(diff.abs().max()), noise, ref_margin <= 3 * noise)


def first_flip(cand: Trace, ref: Trace) -> Flip | None:
    """Scan points in execution order for the first token the forced candidate would have flipped."""
    s_max = min(cand.n_steps, ref.n_steps)
    f_max = min(cand.n_frames, ref.n_frames)
    talker_allowed = _allowed_mask(ref, ref.talker_logits.shape[-1])
    pred_allowed = torch.ones(ref.pred_logits.shape[-1], dtype=torch.bool)
    for s in range(s_max):
        ref_tok, cand_tok = int(ref.talker_tokens[s]), int(cand.talker_choice[s])
        if ref_tok != cand_tok:
            return _flip_at("talker", s, -1, cand.talker_logits[s], ref.talker_logits[s], ref_tok, cand_tok, talker_allowed)
        if s < f_max:
            for j in range(ref.codes.shape[1] - 1):  # the predictor's sub-steps: codebooks 1..
                ref_tok, cand_tok = int(ref.codes[s, j + 1]), int(cand.pred_choice[s, j])
                if ref_tok != cand_tok:
                    return _flip_at("predictor", s, j, cand.pred_logits[s, j], ref.pred_logits[s, j], ref_tok, cand_tok, pred_allowed)
    return None


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


def summarize(points: pd.DataFrame, forced: Trace, ref: Trace, free: Trace | None, tol: float) -> dict:
    """Per-prompt verdict material: first divergence, per-layer added error, flips, agreement."""
    over = points[points["over"]]
    first = None
    if len(over):
        row = over.iloc[0]
        first = {k: _py(row[k]) for k in ["component", "step", "substep", "layer", "point", "rel_l2", "max_abs", "cosine", "sqnr_db"]}
        first["tolerance"] = tol
    nonfinite = points[~points["finite"]]
    first_nonfinite = None
    if len(nonfinite):
        row = nonfinite.iloc[0]
        first_nonfinite = {k: _py(row[k]) for k in ["component", "step", "substep", "layer", "point"]}
    hidden = points[points["point"] != "logits"]
    per_layer = (
        hidden.groupby(["component", "layer"])["added"].mean().reset_index()
        .rename(columns={"added": "mean_added_rel_l2"}).to_dict(orient="records")
    )
    flip = first_flip(forced, ref)
    result = {
        "first_divergence": first,
        "first_nonfinite": first_nonfinite,
        "max_rel_l2": _py(points["rel_l2"].replace([np.inf], np.nan).max()) if len(points) else None,
        "points_compared": int(len(points)),
        "points_over": int(len(over)),
        "bit_identical": bool(len(points) and (points["max_abs"] == 0).all()),
        "added_per_layer": [{k: _py(v) for k, v in r.items()} for r in per_layer],
        "first_flip": asdict(flip) if flip else None,
        "ref_frames": ref.n_frames,
        "hints": signature_hints(points, first_nonfinite, tol),
    }
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


# -- signature hints ------------------------------------------------------------------------
# Where and how the error enters says something about its source (DESIGN section 5). These are
# guesses from the shape of the error, labelled "hint"; `parity bisect` is what proves a cause.

def _where(row) -> str:
    if row["component"] == "talker":
        return f"talker step {row['step']} {row['point']}"
    return f"predictor frame {row['step']} sub-step {row['substep']} {row['point']}"


def _hint(signature: str, text: str, evidence: str) -> dict:
    return {"label": "hint", "signature": signature, "text": f"hint: {text}", "evidence": evidence}


def signature_hints(points: pd.DataFrame, first_nonfinite: dict | None, tol: float) -> list[dict]:
    """Likely sources of a divergence, read from where and how the error enters. Each entry is
    a hint (``label: "hint"``, text starting with "hint:"), never a verdict."""
    if not len(points):
        return []
    hints = []
    hidden = points[points["point"] != "logits"]
    if first_nonfinite is not None:
        at = points[~points["finite"]].index[0]
        before = points.loc[: at - 1]
        drift = float(before["rel_l2"].max()) if len(before) else 0.0
        where = _where(points.loc[at])
        if drift <= tol:
            hints.append(_hint(
                "nonfinite_sudden",
                f"NaN/inf appears at {where} without drift before it (max rel L2 before {drift:.2g}): a fully "
                "masked attention row (softmax over all -inf, FastDeploy #7028) or a division by zero, not rounding",
                f"first non-finite at {where}",
            ))
        else:
            hints.append(_hint(
                "nonfinite_after_drift",
                f"values drift (rel L2 up to {drift:.2g}) before the first NaN/inf at {where}: overflow of a "
                "growing error (fp16 range?) rather than a masked row",
                f"first non-finite at {where}",
            ))
    differs = hidden[hidden["max_abs"] > 0]
    if not len(differs):
        return hints
    first = differs.iloc[0]
    where = _where(first)
    talker = hidden[hidden["component"] == "talker"]
    if first["point"] == "embed" and first["component"] == "talker" and first["step"] == 0:
        hints.append(_hint("enters_at_input", "the prefill's input embeddings already differ: prompt "
                           "construction or embedding precision, before any decoder layer", f"first difference at {where}"))
    elif first["component"] == "talker" and first["step"] == 0 and first["layer"] == 0:
        prefill = talker[(talker["step"] == 0) & (talker["layer"] >= 0)]
        every = bool((prefill["added"] > 0).all())
        hints.append(_hint(
            "enters_at_first_layer",
            "error enters in the first decoder layer of the prefill" + (" and every layer adds to it" if every else "")
            + ": a per-layer op computes differently everywhere (RMSNorm variance in bf16 -> error at every "
            "norm, vllm-omni #2277; RoPE precision; a quantised KV cache; another attention kernel)",
            f"first difference at {where}; embed identical",
        ))
    elif first["component"] == "talker" and first["step"] == 1 and first["layer"] == 0:
        hints.append(_hint(
            "enters_at_first_decode",
            "the prefill matches exactly but the first decode step differs from layer 0: the single-token "
            "decode path differs (static/padded KV cache with an explicit mask, SDPA backend, CUDA-graph "
            "capture; faster-qwen3-tts #48, FINDINGS 4)",
            f"talker step 0 bit-identical; first difference at {where}",
        ))
    if first["layer"] > 0:
        hints.append(_hint(
            "enters_mid_stack",
            f"layers before {first['point']} are bit-identical and the error enters there: a setting "
            "restricted to later layers, or a kernel choice that depends on that layer",
            f"first difference at {where}",
        ))
    if first["component"] == "predictor" and (talker["max_abs"] == 0).all():
        hints.append(_hint(
            "predictor_only",
            "every talker point is bit-identical; only the code predictor differs: a predictor-specific path "
            "(its CUDA graph, its cache, a setting restricted to it)",
            f"first difference at {where}",
        ))
    # Growth with position: the talker's last-layer error over decode steps.
    last = talker[(talker["layer"] == talker["layer"].max()) & (talker["step"] >= 1)].sort_values("step")
    errors = last["rel_l2"].replace([np.inf], np.nan).dropna().to_numpy()
    if len(errors) >= 4 and errors[0] > 0:
        rho = pd.Series(errors).corr(pd.Series(np.arange(len(errors))), method="spearman")
        head, tail = errors[: len(errors) // 3].mean(), errors[-(len(errors) // 3):].mean()
        if rho >= 0.8 and tail >= 3 * head:
            hints.append(_hint(
                "grows_with_position",
                "the error grows with position (decode step): RoPE in low precision, or attention over a padded "
                "static cache (faster-qwen3-tts #48)",
                f"talker last-layer rel L2 {errors[0]:.2g} -> {errors[-1]:.2g} over {len(errors)} steps (Spearman {rho:.2f})",
            ))
    return hints


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
