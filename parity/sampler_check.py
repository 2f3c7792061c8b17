"""Sampler verdict: did the candidate choose what the reference's sampler chooses from the
candidate's *own* logits?

Teacher-forced, both sides see the same token history, and each side records the logits it chose
from and its own choice. Replaying the reference's sampler (:class:`parity.sampling.Chooser`: the
same Hugging Face processors ``generate`` uses) on the candidate's logits must give the
candidate's choice when the two samplers agree: under greedy decoding always; under seeded
sampling when the candidate draws from the same generator stream (the reference engine on the
CPU). A point where it does not is a sampler difference, whatever the logits did. Where the
replay is not exact (sampling on another engine or device), a choice that differs where the
logits agree within tolerance is attributed to the sampler instead.

For each mismatch, :func:`stage` tries the reference pipeline with one stage changed (no
repetition penalty, a shorter penalty window, no suppression, the stop token suppressed, the
kept set of top-k/top-p) to name the stage that reproduces the candidate's token, and
faster-qwen3-tts's own sampler (when installed) is run on the same logits
(:func:`parity.variants.sampler.compare_samplers_on`). Pure functions over traces.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from parity.sampling import Chooser, SamplingParams
from parity.trace import Trace

NUM_SUB_STEPS = 15
MAX_REPORTED = 20  # mismatches listed per prompt (all are counted)


@dataclass(frozen=True)
class Setup:
    """The reference's sampling pipeline for one prompt."""

    params: SamplingParams
    eos: int | None
    min_new_tokens: int
    suppress: tuple[int, ...]
    seed: int

    def talker(self) -> Chooser:
        return Chooser(self.params, torch.device("cpu"), self.eos, self.min_new_tokens, list(self.suppress))

    def predictor(self) -> Chooser:
        return Chooser(replace(self.params, repetition_penalty=1.0), torch.device("cpu"))


def setup(trace: Trace, decoding) -> Setup:
    """The pipeline ``generate`` runs for this trace: its stop token, the codec's special block
    suppressed except the stop token, min_new_tokens (2 in qwen_tts), and the recipe's decoding."""
    vocab = int(trace.talker_logits.shape[-1]) if trace.talker_logits.numel() else 0
    eos = trace.meta.get("eos_token_id")
    start = trace.meta.get("suppress_from")
    suppress = tuple(i for i in range(start, vocab) if i != eos) if start is not None else ()
    params = SamplingParams(do_sample=decoding.do_sample, temperature=decoding.temperature, top_k=decoding.top_k,
                            top_p=decoding.top_p, repetition_penalty=decoding.repetition_penalty)
    return Setup(params, eos, int(trace.meta.get("min_new_tokens", 2)), suppress, int(decoding.seed))


def replay_is_exact(trace: Trace, decoding) -> bool:
    """Greedy always; sampling only for the reference engine on the CPU (same generator stream)."""
    if not decoding.do_sample:
        return True
    side = trace.meta.get("side") or {}
    return trace.meta.get("engine") == "reference" and str(side.get("device", "cpu")) == "cpu"


def replay(trace: Trace, decoding) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference sampler's choices on ``trace``'s own logits, in the reference engine's call
    order (talker step s, then the 15 predictor sub-steps of frame s)."""
    st = setup(trace, decoding)
    talker, pred = st.talker(), st.predictor()
    gen = torch.Generator().manual_seed(st.seed) if decoding.do_sample else None
    t_out = torch.zeros(trace.n_steps, dtype=torch.long)
    p_out = torch.zeros(trace.n_frames, NUM_SUB_STEPS, dtype=torch.long)
    empty = torch.zeros(0, dtype=torch.long)
    for s in range(trace.n_steps):
        t_out[s] = talker.choose(trace.talker_logits[s], trace.talker_tokens[:s], gen)
        if s < trace.n_frames and trace.pred_logits.numel():
            for j in range(NUM_SUB_STEPS):
                p_out[s, j] = pred.choose(trace.pred_logits[s, j], empty, gen)
    return t_out, p_out


def _processed(logits: torch.Tensor, history: torch.Tensor, chooser: Chooser) -> torch.Tensor:
    scores = logits.to(torch.float32, copy=True).unsqueeze(0)
    return chooser.processors(history.unsqueeze(0), scores)[0]


def stage(component: str, step: int, logits: torch.Tensor, history: torch.Tensor, own: int, expected: int,
          st: Setup) -> dict:
    """Which stage of the reference pipeline, changed, reproduces the candidate's token ``own``
    (``expected`` is the reference pipeline's choice on the same logits)."""
    params = st.params if component == "talker" else replace(st.params, repetition_penalty=1.0)
    greedy = replace(params, do_sample=False)

    def argmax_with(p: SamplingParams, hist: torch.Tensor, suppress=None, eos_masked=False, min_new=None) -> int:
        sup = list(st.suppress if suppress is None else suppress) if component == "talker" else []
        if eos_masked and st.eos is not None:
            sup = sup + [st.eos]
        mn = st.min_new_tokens if min_new is None else min_new
        ch = Chooser(p, torch.device("cpu"), st.eos if component == "talker" else None, mn if component == "talker" else 0, sup)
        return int(_processed(logits, hist, ch).argmax())

    hist = history if component == "talker" else torch.zeros(0, dtype=torch.long)
    if component == "talker":
        if own in st.suppress:
            return {"stage": "suppression", "text": f"the candidate chose token {own}, which the reference suppresses "
                    f"(the codec's special ids from {min(st.suppress)} up)"}
        if st.eos is not None and expected == st.eos and own != st.eos and argmax_with(greedy, hist, eos_masked=True) == own:
            return {"stage": "stop_suppression", "text": f"the reference's sampler picks the stop token {st.eos} here; the "
                    f"candidate picked {own}, the best token with the stop token suppressed"}
        if st.eos is not None and own == st.eos and step < st.min_new_tokens:
            return {"stage": "min_length", "text": f"the candidate chose the stop token at step {step}, before min_new_tokens "
                    f"({st.min_new_tokens})"}
        if params.repetition_penalty != 1.0 and argmax_with(replace(greedy, repetition_penalty=1.0), hist) == own:
            seen = (hist == own).nonzero().flatten()
            back = f", last seen {len(hist) - int(seen[-1])} tokens back" if len(seen) else ""
            window = (f" or applied over a window shorter than {len(hist) - int(seen[-1])} tokens" if len(seen) else "")
            return {"stage": "repetition_penalty", "text": f"without the repetition penalty ({params.repetition_penalty:g}) on "
                    f"token {own}{back}, the same logits give the candidate's token: the penalty is not applied{window}"}
        if argmax_with(greedy, hist, suppress=()) == own:
            return {"stage": "suppression", "text": f"without suppressing the codec's special ids the candidate's token {own} "
                    "wins: suppression is not applied"}
    scores = _processed(logits, hist, Chooser(params, torch.device("cpu"), st.eos if component == "talker" else None,
                                              st.min_new_tokens if component == "talker" else 0,
                                              list(st.suppress) if component == "talker" else []))
    rank = int((scores > scores[own]).sum())
    if params.do_sample:
        if not torch.isfinite(scores[own]):
            return {"stage": "top_k_top_p", "text": f"the candidate's token {own} is outside the reference's kept set "
                    f"(top-k {params.top_k}, top-p {params.top_p:g}; its rank {rank}): the top-k/top-p boundary differs"}
        return {"stage": "rng", "text": f"the candidate's token {own} is inside the reference's kept set (rank {rank}): "
                "the random draw differs (another generator, seed or number of draws)"}
    return {"stage": "argmax", "text": f"the candidate picked rank-{rank} token {own} from its own logits where the argmax "
            f"is {expected}; not explained by the penalty, suppression or min length (tie-break or a different argmax)"}


def check(forced: Trace, ref: Trace, decoding, logits_within: dict | None = None) -> dict | None:
    """The sampler verdict for one prompt, or None when it cannot be judged (no decoding
    settings, no logits recorded). ``logits_within[(component, step, substep)]`` says whether
    the logits at that point agree within tolerance (used where the replay is not exact)."""
    if decoding is None or forced.talker_logits.numel() == 0:
        return None
    exact = replay_is_exact(forced, decoding)
    st = setup(forced, decoding)
    mismatches: list[dict] = []
    if exact:
        t_rep, p_rep = replay(forced, decoding)
        for s in range(forced.n_steps):
            if int(t_rep[s]) != int(forced.talker_choice[s]):
                mismatches.append({"component": "talker", "step": s, "substep": -1,
                                   "own": int(forced.talker_choice[s]), "expected": int(t_rep[s])})
            if s < forced.n_frames and forced.pred_logits.numel():
                for j in range(NUM_SUB_STEPS):
                    if int(p_rep[s, j]) != int(forced.pred_choice[s, j]):
                        mismatches.append({"component": "predictor", "step": s, "substep": j,
                                           "own": int(forced.pred_choice[s, j]), "expected": int(p_rep[s, j])})
    else:  # the choices of both sides where the logits agree within tolerance
        within = logits_within or {}
        for s in range(min(forced.n_steps, ref.n_steps)):
            if within.get(("talker", s, -1)) and int(forced.talker_choice[s]) != int(ref.talker_choice[s]):
                mismatches.append({"component": "talker", "step": s, "substep": -1,
                                   "own": int(forced.talker_choice[s]), "expected": int(ref.talker_choice[s])})
            if s < min(forced.n_frames, ref.n_frames):
                for j in range(NUM_SUB_STEPS):
                    if within.get(("predictor", s, j)) and int(forced.pred_choice[s, j]) != int(ref.pred_choice[s, j]):
                        mismatches.append({"component": "predictor", "step": s, "substep": j,
                                           "own": int(forced.pred_choice[s, j]), "expected": int(ref.pred_choice[s, j])})
    result = {"mode": "replay" if exact else "logits_within_tolerance", "do_sample": bool(decoding.do_sample),
              "mismatches": len(mismatches), "points": mismatches[:MAX_REPORTED], "stages": {}, "first": None,
              "faster_sampler": None, "all_points": mismatches}
    if not mismatches:
        return result
    for m in mismatches:
        logits = forced.talker_logits[m["step"]] if m["component"] == "talker" else forced.pred_logits[m["step"], m["substep"]]
        m.update(stage(m["component"], m["step"], logits, forced.talker_tokens[: m["step"]], m["own"], m["expected"], st))
        result["stages"][m["stage"]] = result["stages"].get(m["stage"], 0) + 1
    result["first"] = mismatches[0]
    result["faster_sampler"] = _faster_on(forced, mismatches, st)
    return result


def _faster_on(forced: Trace, mismatches: list[dict], st: Setup) -> dict | None:
    """faster-qwen3-tts's sampler on the mismatched talker points' logits (None if not installed)."""
    from parity.variants.sampler import compare_samplers_on

    rows = [(forced.talker_logits[m["step"]], forced.talker_tokens[: m["step"]]) for m in mismatches
            if m["component"] == "talker"][:MAX_REPORTED]
    if not rows:
        return None
    mask = None
    if st.suppress:
        mask = torch.zeros(forced.talker_logits.shape[-1], dtype=torch.bool)
        mask[list(st.suppress)] = True
    try:
        out = compare_samplers_on(rows, st.params, seed=st.seed, suppress_mask=mask)
    except ImportError:
        return None
    owns = [m["own"] for m in mismatches if m["component"] == "talker"][: len(rows)]
    out["reproduces_candidate"] = sum(int(f == o) for f, o in zip(out["faster"], owns))
    return out


def hint(sampler: dict | None, numeric_clean: bool) -> dict | None:
    """The sampler verdict as a hint (None when the sampler agrees). ``numeric_clean``: every
    hidden state and logit is within tolerance (the sampler is then the only difference)."""
    from parity.hints import hint as make_hint

    if not sampler or not sampler.get("mismatches"):
        return None
    m = sampler["first"]
    where = f"talker step {m['step']}" if m["component"] == "talker" else f"predictor frame {m['step']} sub-step {m['substep']}"
    how = ("the reference's sampler replayed on the candidate's own logits" if sampler["mode"] == "replay"
           else "the reference's choice where the logits agree within tolerance")
    stages = ", ".join(f"{k} {v}" for k, v in sorted(sampler["stages"].items(), key=lambda kv: -kv[1]))
    text = (f"sampler{' only' if numeric_clean else ''}: at {sampler['mismatches']} teacher-forced point(s) the candidate's "
            f"token differs from {how} (first at {where}: {m['own']} instead of {m['expected']})"
            + ("; every hidden state and logit is within tolerance" if numeric_clean else "")
            + f"; stage: {m['text']} (stages over all mismatches: {stages})")
    fs = sampler.get("faster_sampler")
    if fs:
        text += (f"; faster-qwen3-tts's sampler on the same logits reproduces the candidate's token at "
                 f"{fs['reproduces_candidate']}/{fs['rows']} talker points")
    ev = {"mismatches": sampler["mismatches"], "first_step": m["step"], "candidate_token": m["own"],
          "expected_token": m["expected"], "stage": m["stage"]}
    return make_hint("sampler", text, ev, where={"component": m["component"], "step": m["step"], "substep": m["substep"]})
