"""Planted divergences for the "why" suite (tests/test_why_planted.py and
benchmarks/planted_why.py): each case is a hook on the candidate side of an otherwise identical
pair on the tiny model (fp32, both sides the same reference engine), with what the analysis must
say about it: where it first diverges, the hint class, the flip label and the gates that fail.

A few cases also need something the random model does not do by itself: the reference must stop
(the runaway cases). For those a *shared* hook, applied to both sides alike, raises the stop
token's logit from talker step 5 on; the candidate's plant then works against it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

TOL = 1e-5  # fp32 pair
FRAMES = 8
STOP_STEP = 5  # the shared stop bias makes the reference end here


# -- hooks ------------------------------------------------------------------------------------

def _noise_like(hidden: torch.Tensor, rel: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(hidden.shape, generator=gen).to(hidden)
    return noise * (rel * hidden.norm() / noise.norm())


def _replace_out(output, fn):
    hidden = output[0] if isinstance(output, tuple) else output
    new = fn(hidden)
    if new is None:
        return None
    return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new


@contextlib.contextmanager
def layer_noise(engine, component: str, layer: int, rel: Callable[[tuple], float | None]):
    """Add noise of relative size ``rel(context)`` (None: leave alone) to one decoder layer's output;
    context = (component, step, substep) from the engine's recorder (teacher-forced runs)."""
    stack = engine.talker.model.layers if component == "talker" else engine.talker.code_predictor.model.layers

    def hook(module, args, output):
        ctx = engine.recorder.context
        if ctx is None or ctx[0] != component:
            return None
        r = rel(ctx)
        if r is None:
            return None
        return _replace_out(output, lambda h: h + _noise_like(h, r, (ctx[1] * 1009 + ctx[2] * 31 + layer * 7 + (component == 'talker')) % (2**31)))

    handle = stack[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def module_hook(module, fn):
    handle = module.register_forward_hook(lambda m, a, out: _replace_out(out, fn))
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def everywhere_noise(engine, rel: float):
    """A noise floor: relative noise ``rel`` on every decoder layer of both components."""
    with contextlib.ExitStack() as stack:
        for comp, layers in (("talker", engine.talker.model.layers), ("predictor", engine.talker.code_predictor.model.layers)):
            for i in range(len(layers)):
                stack.enter_context(layer_noise(engine, comp, i, lambda ctx: rel))
        yield


def _eos(engine) -> int:
    return int(engine.talker.config.codec_eos_token_id)


@contextlib.contextmanager
def eos_shift(engine, amount: float, from_step: int = 0):
    """Add ``amount`` to the stop token's logit at talker step >= from_step (counted per run:
    the prefill's codec head call has several positions, every decode step one)."""
    eos = _eos(engine)
    state = {"step": 0}

    def fn(hidden):
        if hidden.dim() == 3 and hidden.shape[1] > 1:
            state["step"] = 0
        step = state["step"]
        state["step"] += 1
        if step < from_step:
            return None
        out = hidden.clone()
        out[..., eos] += amount
        return out

    with module_hook(engine.talker.codec_head, fn):
        yield


@contextlib.contextmanager
def chooser(cls):
    """Swap the reference engine's token chooser class (the candidate's sampler)."""
    import parity.engines.reference as ref_mod

    old = ref_mod.Chooser
    ref_mod.Chooser = cls
    try:
        yield
    finally:
        ref_mod.Chooser = old


def penalty_window_chooser():
    from parity.sampling import Chooser

    class WindowChooser(Chooser):
        """Applies the repetition penalty over the last token only (a penalty-window bug)."""

        def choose(self, logits, history, generator):
            if self.params.repetition_penalty != 1.0:
                history = history[-1:]
            return super().choose(logits, history, generator)

    return WindowChooser


def eos_suppressing_chooser(eos: int):
    from parity.sampling import Chooser

    class NoStopChooser(Chooser):
        """Never picks the stop token (a suppression-list bug)."""

        def __init__(self, params, device, eos_token_id=None, min_new_tokens=0, suppress_tokens=None):
            if eos_token_id is not None:
                suppress_tokens = list(suppress_tokens or []) + [eos_token_id]
            super().__init__(params, device, eos_token_id, min_new_tokens, suppress_tokens)

    return NoStopChooser


@contextlib.contextmanager
def variant(engine, spec: str):
    from parity.variants import apply_variants

    applied = apply_variants(engine.talker, [spec], "reference")
    try:
        yield
    finally:
        applied.undo()


# -- cases ------------------------------------------------------------------------------------

@dataclass
class Case:
    """One planted divergence and what the analysis must report."""

    name: str
    what: str
    plant: Callable  # engine -> context manager, on the candidate side only
    first: tuple | None  # (component, step, substep, layer) of the first point over tolerance
    hint: str | None  # the first hint's class (None: no hint at all)
    also: tuple[str, ...] = ()  # other hint classes that must be present
    absent: tuple[str, ...] = ()  # hint classes that must not be present
    flip: str | None = None  # label of the first teacher-forced flip (None: no flip)
    failed_gates: frozenset = frozenset()
    shared: Callable | None = None  # engine -> context manager on both sides
    repetition_penalty: float = 1.0
    free: bool = False  # also run the candidate free-running (runaway)
    frames: int = FRAMES
    extra: dict = field(default_factory=dict)


def _none(engine):
    return contextlib.nullcontext()


def _stop_bias(engine):
    return eos_shift(engine, 40.0, from_step=STOP_STEP)


def _both(*makers):
    @contextlib.contextmanager
    def ctx(engine):
        with contextlib.ExitStack() as stack:
            for m in makers:
                stack.enter_context(m(engine))
            yield
    return ctx


DIVERGED = frozenset({"hidden_within_tolerance"})

CASES: list[Case] = [
    Case("clean", "identical sides", _none, None, None),
    Case("noise_floor_only", "relative noise 1e-7 on every layer (under the 1e-5 tolerance)",
         lambda e: everywhere_noise(e, 1e-7), None, None),
    Case("late_step", "talker layer 0 from decode step 4 on (1e-3)",
         lambda e: layer_noise(e, "talker", 0, lambda c: 1e-3 if c[1] >= 4 else None),
         ("talker", 4, -1, 0), "from_step", failed_gates=DIVERGED),
    Case("position_dependent", "talker layer 1, error 2e-9 x 10^step (crosses at step 4)",
         lambda e: layer_noise(e, "talker", 1, lambda c: 2e-9 * 10 ** c[1]),
         ("talker", 4, -1, 1), "grows_with_position", failed_gates=DIVERGED),
    Case("logits_only", "the talker's codec head output (1e-2), hidden states untouched",
         lambda e: module_hook(e.talker.codec_head, lambda h: h + _noise_like(h, 1e-2, 7)),
         ("talker", 0, -1, 2), "logits_only", absent=("predictor_only",), failed_gates=DIVERGED),
    Case("noise_plus_predictor_bug", "noise floor 1e-7 everywhere + predictor frame 2 sub-step 5 layer 0 (1e-3)",
         _both(lambda e: everywhere_noise(e, 1e-7),
               lambda e: layer_noise(e, "predictor", 0, lambda c: 1e-3 if c[1:] == (2, 5) else None)),
         ("predictor", 2, 5, 0), "predictor_only", absent=("enters_at_layer", "accumulates"), failed_gates=DIVERGED),
    Case("two_faults", "talker prefill layer 1 (1e-3) + predictor frame 4 sub-step 3 layer 1 (1e-3)",
         _both(lambda e: layer_noise(e, "talker", 1, lambda c: 1e-3 if c[1] == 0 else None),
               lambda e: layer_noise(e, "predictor", 1, lambda c: 1e-3 if c[1:] == (4, 3) else None)),
         ("talker", 0, -1, 1), "multiple_sources", also=("enters_at_layer",), absent=("predictor_only",),
         failed_gates=DIVERGED),
    Case("nan_masked_row", "a fully masked attention row at talker decode step 3, layer 1",
         lambda e: variant(e, "mask_row=3@talker:1"),
         ("talker", 3, -1, 1), "nan_masked_row", absent=("nan_overflow", "multiple_sources"), flip="real",
         failed_gates=DIVERGED | {"no_nonfinite", "max_rel_l2"}),
    Case("nan_masked_row_plus_drift", "talker layer 0 error from decode step 1 (1e-3) + a masked row at step 4 layer 1",
         _both(lambda e: layer_noise(e, "talker", 0, lambda c: 1e-3 if c[1] >= 1 else None),
               lambda e: variant(e, "mask_row=4@talker:1")),
         ("talker", 1, -1, 0), "nan_masked_row", also=("multiple_sources", "enters_at_layer"), absent=("nan_overflow",),
         flip="real",
         failed_gates=DIVERGED | {"no_nonfinite", "max_rel_l2"}),
    Case("nan_overflow", "talker layer 0 output x 10^(12 step) from step 1: grows until fp32 overflows at step 4",
         lambda e: layer_noise_scale(e, 0, lambda step: 10.0 ** (12 * step) if step >= 1 else None),
         ("talker", 1, -1, 0), "nan_overflow", absent=("nan_masked_row", "multiple_sources"), flip="real",
         failed_gates=DIVERGED | {"no_nonfinite", "max_rel_l2"}),
    Case("sampler_penalty_window", "repetition penalty 1.5 applied over the last token only (logits identical)",
         lambda e: chooser(penalty_window_chooser()), None, "sampler", flip="sampler",
         failed_gates=frozenset({"sampler_agrees"}), repetition_penalty=1.5, frames=16, extra={"stage": "repetition_penalty"}),
    Case("stop_logit_suppressed", "the stop token's logit lowered by 60 (reference stops at step 5): runaway",
         lambda e: eos_shift(e, -60.0), ("talker", 0, -1, 2), "logits_only", also=("stop_collapse", "runaway"),
         flip="real", failed_gates=DIVERGED | {"stop_probability", "no_runaway", "max_rel_l2"}, shared=_stop_bias, free=True),
    Case("stop_sampler_suppressed", "the sampler never picks the stop token (logits identical): runaway",
         lambda e: chooser(eos_suppressing_chooser(_eos(e))), None, "sampler", also=("runaway",),
         absent=("stop_collapse",), flip="sampler", failed_gates=frozenset({"sampler_agrees", "no_runaway"}),
         shared=_stop_bias, free=True, extra={"stage": "stop_suppression"}),
    Case("enters_prefill_layer1", "talker layer 1 in the prefill only (1e-3)",
         lambda e: layer_noise(e, "talker", 1, lambda c: 1e-3 if c[1] == 0 else None),
         ("talker", 0, -1, 1), "enters_at_layer", absent=("multiple_sources",), failed_gates=DIVERGED,
         extra={"phase": "prefill", "layer": 1}),
    Case("enters_decode_layer1", "talker layer 1 at every decode step, prefill untouched (1e-3)",
         lambda e: layer_noise(e, "talker", 1, lambda c: 1e-3 if c[1] >= 1 else None),
         ("talker", 1, -1, 1), "enters_at_layer", absent=("multiple_sources",), failed_gates=DIVERGED,
         extra={"phase": "decode", "layer": 1}),
    Case("predictor_only", "predictor layer 1 at sub-step 0 of every frame (1e-3)",
         lambda e: layer_noise(e, "predictor", 1, lambda c: 1e-3 if c[2] == 0 else None),
         ("predictor", 0, 0, 1), "predictor_only", absent=("multiple_sources",), failed_gates=DIVERGED),
    Case("input_embedding", "the talker's codec embedding table output (1e-3)",
         lambda e: module_hook(e.talker.get_input_embeddings(), lambda h: h + _noise_like(h, 1e-3, 3)),
         ("talker", 0, -1, -1), "input_embedding", absent=("multiple_sources",), failed_gates=DIVERGED),
]


@contextlib.contextmanager
def rope_shift(engine, shift: int = 1):
    """RoPE positions off by ``shift`` at the talker's decode steps (the prefill untouched)."""
    def pre(module, args, kwargs):
        if len(args) > 1:
            pos = args[1]
            if pos.shape[-1] == 1:
                return (args[0], pos + shift) + tuple(args[2:]), kwargs
        elif "position_ids" in kwargs and kwargs["position_ids"].shape[-1] == 1:
            return args, {**kwargs, "position_ids": kwargs["position_ids"] + shift}
        return None

    handle = engine.talker.model.rotary_emb.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


TIE_STEP = 3


@contextlib.contextmanager
def near_tie(engine, gap: float = 1e-7):
    """Shared by both sides: at talker step TIE_STEP the second-best ordinary token's logit is set
    ``gap`` below the best one's (a model that is nearly tied there)."""
    state = {"step": 0}

    def fn(hidden):
        if hidden.dim() == 3 and hidden.shape[1] > 1:
            state["step"] = 0
        step = state["step"]
        state["step"] += 1
        if step != TIE_STEP:
            return None
        out = hidden.clone()
        top = torch.topk(out[0, -1, :256], 2).indices
        out[0, -1, top[1]] = out[0, -1, top[0]] - gap
        return out

    with module_hook(engine.talker.codec_head, fn):
        yield


@contextlib.contextmanager
def tip_the_tie(engine, amount: float = 1e-6):
    """The candidate: at talker step TIE_STEP raise the runner-up by ``amount`` (a rounding-sized
    change, far within tolerance), which flips the near tie."""
    state = {"step": 0}

    def fn(hidden):
        if hidden.dim() == 3 and hidden.shape[1] > 1:
            state["step"] = 0
        step = state["step"]
        state["step"] += 1
        if step != TIE_STEP:
            return None
        out = hidden.clone()
        top = torch.topk(out[0, -1, :256], 2).indices
        out[0, -1, top[1]] += amount
        return out

    with module_hook(engine.talker.codec_head, fn):
        yield


CASES += [
    Case("kv_fp8", "an fp8 KV cache with per-head scales on the candidate (a real bug, not rounding)",
         lambda e: variant(e, "kv_quant=fp8"), ("talker", 0, -1, 0), "enters_at_layer", flip="real",
         failed_gates=DIVERGED, extra={"phase": "prefill", "layer": 0}),
    Case("rope_off_by_one", "RoPE positions off by one at every decode step (prefill untouched)",
         lambda e: rope_shift(e, 1), ("talker", 1, -1, 0), "enters_at_layer", flip="real", failed_gates=DIVERGED,
         extra={"phase": "decode", "layer": 0}),
    Case("near_tie_within_noise", "the model is nearly tied at step 3 (margin 1e-7, both sides); the candidate moves "
         "the runner-up by 1e-6 (rel L2 ~1e-8, within tolerance)",
         lambda e: tip_the_tie(e), None, None, flip="tie", shared=lambda e: near_tie(e)),
]


@contextlib.contextmanager
def layer_noise_scale(engine, layer: int, factor: Callable[[int], float | None]):
    """Multiply a talker layer's output by ``factor(step)`` (a growing error)."""
    def hook(module, args, output):
        ctx = engine.recorder.context
        if ctx is None or ctx[0] != "talker":
            return None
        f = factor(ctx[1])
        return None if f is None else _replace_out(output, lambda h: h * f)

    handle = engine.talker.model.layers[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# -- running ----------------------------------------------------------------------------------

def default_gates():
    from parity.recipe import Gates

    return Gates(max_rel_l2=1.0)


def run_case(engine, prompt, case: Case, cache: dict) -> dict:
    """Run one case: the reference (cached per shared plant and decoding), the candidate forced
    (and free-running when the case needs it), compared, hinted and gated."""
    from parity import compare, gates
    from parity.recipe import Decoding

    decoding = Decoding(max_frames=case.frames, repetition_penalty=case.repetition_penalty)
    shared = case.shared or _none
    key = (case.shared, case.repetition_penalty, case.frames)
    if key not in cache:
        with shared(engine):
            cache[key] = engine.run(prompt, decoding)
    ref = cache[key]
    with shared(engine), case.plant(engine):
        forced = engine.run(prompt, decoding, force=ref)
        free = engine.run(prompt, decoding, record=False) if case.free else None
    points = compare.point_frame(forced, ref, TOL)
    comparison = compare.summarize(points, forced, ref, free, TOL, decoding=decoding, stop_ratio=10.0)
    from parity.results import Comparison

    import numpy as np

    nonfinite = int((~np.isfinite(points["rel_l2"].to_numpy(dtype=float))).sum())
    results = gates.evaluate(default_gates(), Comparison.from_json({**comparison, "nonfinite_points": nonfinite}))
    return {"comparison": comparison, "gates": results, "ref": ref, "forced": forced, "free": free}


def judge(case: Case, out: dict) -> dict:
    """Whether localisation, hint and flip label are right for one case (and the gates)."""
    c = out["comparison"]
    first = c["first_divergence"]
    got_first = None if first is None else (first["component"], first["step"], first["substep"], first["layer"])
    classes = [h["class"] for h in c["hints"]]
    hint_ok = (classes[:1] == [case.hint]) if case.hint else not classes
    hint_ok = hint_ok and all(a in classes for a in case.also) and not any(a in classes for a in case.absent)
    for k, v in case.extra.items():
        h = next((h for h in c["hints"] if h["class"] == case.hint), None)
        if k == "stage":
            hint_ok = hint_ok and (c.get("sampler") or {}).get("first", {}).get("stage") == v
        elif h is not None:
            hint_ok = hint_ok and h["evidence"].get(k) == v
    flip = c["first_flip"]
    flip_ok = (flip is None) if case.flip is None else (flip is not None and flip["label"] == case.flip)
    failed = frozenset(g.name for g in out["gates"] if not g.passed)
    # The rule this replaced: a tie when the reference's margin is within 3x the divergence's own logit noise.
    old = None if flip is None else ("tie" if flip["ref_margin"] <= 3 * flip["logit_noise"] else "real")
    old_ok = (flip is None) if case.flip is None else old == case.flip
    return {"case": case.name, "localisation": got_first == case.first, "hint": hint_ok, "flip": flip_ok,
            "flip_old_rule": old_ok,
            "gates": failed == case.failed_gates, "got": {"first": got_first, "classes": classes,
            "flip": flip and flip["label"], "failed_gates": sorted(failed)},
            "expected": {"first": case.first, "hint": case.hint, "flip": case.flip, "failed_gates": sorted(case.failed_gates)}}
