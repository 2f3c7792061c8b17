"""Stop token and runaway: generation that never ends is the failure Qwen3-TTS users report most.

At every talker step both sides' end-of-speech (codec EOS) logit and probability are read from
the recorded logits (teacher-forced, so both sides are at the same step with the same history).
The probability is the softmax at temperature 1 over the tokens the talker may choose (the
codec's special block is suppressed except the stop token, as ``generate`` does).

- **stop collapse**: the first step where the candidate's stop probability is below the
  reference's by more than the recipe's factor (``[gates] stop_prob_ratio``), among the steps
  where the reference's own stop probability is at least ``STOP_PROB_FLOOR`` (below that neither
  side would stop, and a ratio of two negligible numbers says nothing).
- **runaway**: the free-running candidate reaches ``max_frames`` although the reference stopped
  (chose the stop token) before it.

Pure functions over traces.
"""

from __future__ import annotations

import math

import torch

from parity.trace import Trace

STOP_PROB_FLOOR = 1e-3


def stop_curve(trace: Trace) -> tuple[list[float], list[float]]:
    """(EOS logit, EOS probability) at every talker step of a recorded trace."""
    eos = trace.meta.get("eos_token_id")
    if eos is None or trace.talker_logits.numel() == 0:
        return [], []
    logits = trace.talker_logits.double()
    allowed = torch.ones(logits.shape[-1], dtype=torch.bool)
    start = trace.meta.get("suppress_from")
    if start is not None:
        allowed[start:] = False
        allowed[eos] = True
    probs = torch.softmax(logits.masked_fill(~allowed, -math.inf), dim=-1)[:, eos]
    return [float(v) for v in logits[:, eos]], [float(v) for v in probs]


def reference_stopped(ref: Trace) -> int | None:
    """The talker step at which the reference chose the stop token, or None if it never did."""
    eos = ref.meta.get("eos_token_id")
    if eos is None or ref.n_steps == 0 or ref.meta.get("hit_max_frames"):
        return None
    return ref.n_steps - 1 if int(ref.talker_tokens[-1]) == eos else None


def analyse(ref: Trace, forced: Trace, free: Trace | None, ratio: float | None) -> dict:
    """Both sides' stop curves, the first stop collapse and the runaway verdict for one prompt."""
    ref_logit, ref_prob = stop_curve(ref)
    cand_logit, cand_prob = stop_curve(forced)
    n = min(len(ref_prob), len(cand_prob))
    collapse = None
    if ratio is not None:
        for s in range(n):
            r, c = ref_prob[s], cand_prob[s]
            if r >= STOP_PROB_FLOOR and math.isfinite(c) and c * ratio < r:
                collapse = {"step": s, "reference_prob": r, "candidate_prob": c,
                            "factor": (r / c) if c > 0 else math.inf,
                            "reference_logit": ref_logit[s], "candidate_logit": cand_logit[s]}
                break
    stop_step = reference_stopped(ref)
    runaway = None
    if free is not None and stop_step is not None:
        max_frames = free.meta.get("max_frames")
        hit = bool(free.meta.get("hit_max_frames")) or (max_frames is not None and free.n_frames >= max_frames)
        if hit:
            runaway = {"reference_frames": ref.n_frames, "candidate_frames": free.n_frames, "max_frames": max_frames,
                       "reference_stop_step": stop_step}
    judged = [s for s in range(n) if ref_prob[s] >= STOP_PROB_FLOOR]
    return {
        "eos_token_id": ref.meta.get("eos_token_id"),
        "ratio": ratio, "prob_floor": STOP_PROB_FLOOR, "steps_judged": len(judged),
        "reference_stop_step": stop_step,
        "reference_prob": ref_prob, "candidate_prob": cand_prob[:n] if n else cand_prob,
        "reference_logit": ref_logit, "candidate_logit": cand_logit[:n] if n else cand_logit,
        "at_reference_stop": None if stop_step is None or stop_step >= n else {
            "reference_prob": ref_prob[stop_step], "candidate_prob": cand_prob[stop_step]},
        "collapse": collapse,
        "runaway": runaway,
    }


def hints(stop: dict) -> list[dict]:
    """Hints (and the wording of the verdicts) from :func:`analyse`'s result."""
    from parity.hints import g, hint

    out = []
    c = stop.get("collapse")
    if c:
        text = (f"stop probability collapses: at talker step {c['step']} the candidate's end-of-speech probability is "
                f"{g(c['candidate_prob'])} where the reference's is {g(c['reference_prob'])} ({g(c['factor'])}x lower, "
                f"limit {g(stop['ratio'])}x; EOS logit {g(c['candidate_logit'])} vs {g(c['reference_logit'])})")
        at = stop.get("at_reference_stop")
        if at:
            text += (f"; where the reference stops (step {stop['reference_stop_step']}) it is {g(at['candidate_prob'])} vs "
                     f"{g(at['reference_prob'])}")
        out.append(hint("stop_collapse", text + ": the candidate is less likely to end speech",
                        {k: c[k] for k in ("step", "reference_prob", "candidate_prob", "factor")}, where={"step": c["step"]}))
    r = stop.get("runaway")
    if r:
        out.append(hint("runaway", f"runaway: the free-running candidate ran to max_frames ({r['candidate_frames']} frames) "
                         f"where the reference stopped after {r['reference_frames']} frames (stop token at step "
                         f"{r['reference_stop_step']})", dict(r)))
    return out
