"""Layer replay: does the first diverging layer compute differently, or did its input already differ?

Both sides load the same checkpoint, so a layer's weights are the same; what differs is the
engine's path through it (kernels, attention implementation and mask, cache layout, dtype,
variants). Replay runs each engine's *own* layer on the *other* side's input:

- the candidate, teacher-forced again up to the diverging point, with the input of layer ``l``
  at that step's last position replaced by the reference's recorded input; its output there is
  compared with the reference's recorded output (the error the candidate's layer adds in
  isolation);
- the reference likewise on the candidate's recorded input, compared with the candidate's output;
- a control: the candidate on its own recorded input, which must give back its own recorded
  output (else the replay path itself differs from the run's and its numbers are not evidence).

What it captures: everything the engine does inside that layer at that position, with its own
kernels, mask and its own cache of earlier positions. What it cannot: it replaces only the
last position (a prefill's other positions, and the keys/values cached from earlier steps, stay
the engine's own), and on a GPU the fast engine's graphs run eagerly for the replay (the same
modules and kernels outside a graph capture; the control shows whether that reproduces the run).

:func:`measure` runs the engines (execute stage, saved with the prompt's measurements);
:func:`verdict` is the pure judgement ``parity compare`` re-applies under other tolerances.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import replace

import torch

from parity.trace import Trace


def _talker(engine):
    """The qwen_tts talker module an engine runs (the reference's, or faster-qwen3-tts's)."""
    inner = getattr(engine, "_engine", engine)  # a test fault injector wraps the engine
    if getattr(inner, "tts", None) is not None:
        return inner.tts.model.model.talker
    return inner.talker


def supported(engine) -> bool:
    """Whether ``engine`` runs ``qwen_tts`` decoder layers parity can hook (the reference, its
    subclasses and faster-qwen3-tts); an engine of its own kind is not replayed."""
    try:
        talker = _talker(engine)
        return hasattr(talker.model, "layers") and hasattr(talker.code_predictor.model, "layers")
    except AttributeError:
        return False


@contextlib.contextmanager
def _eager_graphs(engine):
    """Python hooks fire only while a CUDA graph is captured, not on replay: run the fast engine's
    captured functions eagerly for the duration (same modules, buffers and caches)."""
    inner = getattr(engine, "_engine", engine)
    tts = getattr(inner, "tts", None)
    if tts is None or not getattr(inner, "cuda_graphs", False):
        yield
        return
    from parity.engines.faster import EagerReplay

    pg, tg = tts.predictor_graph, tts.talker_graph
    saved = (pg.graph, tg.graph)
    pg.graph, tg.graph = EagerReplay(pg._full_loop), EagerReplay(tg._decode_step)
    try:
        yield
    finally:
        pg.graph, tg.graph = saved


def truncated(force: Trace, at: dict) -> Trace:
    """``force`` cut to the frames a teacher-forced run needs to reach ``at`` (and no more)."""
    n = int(at["step"]) + 1
    n = min(n, force.n_frames)
    return replace(
        force, talker_tokens=force.talker_tokens[: n + 1], talker_choice=force.talker_choice[: n + 1],
        codes=force.codes[:n], pred_choice=force.pred_choice[:n], meta={**force.meta, "hit_max_frames": True},
    )


def run_layer(engine, prompt, decoding, force: Trace, at: dict, hidden: torch.Tensor) -> torch.Tensor:
    """Teacher-force ``engine`` on ``force`` with the input of decoder layer ``at["layer"]`` of
    ``at["component"]``, at step ``at["step"]`` (and predictor sub-step ``at["substep"]``), last
    position, replaced by ``hidden``. Returns that layer's output there (float32, CPU).

    The layer's calls are counted from the start of the run: talker call k is talker step k (the
    prefill is step 0); predictor call k is frame k // sub-steps, sub-step k % sub-steps."""
    talker = _talker(engine)
    comp, layer = at["component"], int(at["layer"])
    stack = talker.model.layers if comp == "talker" else talker.code_predictor.model.layers
    substeps = int(talker.config.num_code_groups) - 1
    target = int(at["step"]) if comp == "talker" else int(at["step"]) * substeps + int(at["substep"])
    calls = {"n": 0}
    seen: dict = {}

    def swap_input(module, args, kwargs):
        if calls["n"] != target:
            return None
        h = args[0] if args else kwargs["hidden_states"]
        h = h.clone()
        h[:, -1] = hidden.to(device=h.device, dtype=h.dtype)
        if args:
            return (h, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h}

    def keep_output(module, args, output):
        if calls["n"] == target:
            out = output[0] if isinstance(output, (tuple, list)) else output
            seen["out"] = out[0, -1].detach().to("cpu", torch.float32, copy=True)
        calls["n"] += 1

    handles = [stack[layer].register_forward_pre_hook(swap_input, with_kwargs=True),
               stack[layer].register_forward_hook(keep_output)]
    try:
        with _eager_graphs(engine):
            engine.run(prompt, decoding, force=truncated(force, at), record=False)
    finally:
        for h in handles:
            h.remove()
    if "out" not in seen:
        raise RuntimeError(f"layer replay: {comp} layer {layer} was called {calls['n']} times, never at call {target}")
    return seen["out"]


def _hidden(trace: Trace, at: dict, index: int) -> torch.Tensor:
    if at["component"] == "talker":
        return trace.talker_hidden[at["step"], index]
    return trace.pred_hidden[at["step"], at["substep"], index]


def _err(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.double(), b.double()
    d = a - b
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return {"rel_l2": None, "max_abs": None, "nonfinite": True}
    return {"rel_l2": float(d.norm() / b.norm().clamp_min(1e-30)), "max_abs": float(d.abs().max()), "nonfinite": False}


def measure(candidate, reference, prompt, decoding, ref: Trace, forced: Trace, at: dict) -> dict:
    """Replay layer ``at`` both ways (and the candidate's control) and return the measurement
    saved with the prompt. ``reference`` may be None (then only the candidate's direction)."""
    layer = int(at["layer"])
    ref_in, ref_out = _hidden(ref, at, layer), _hidden(ref, at, layer + 1)
    cand_in, cand_out = _hidden(forced, at, layer), _hidden(forced, at, layer + 1)
    out = {"at": dict(at), "input": _err(cand_in, ref_in), "output": _err(cand_out, ref_out)}
    out["candidate_on_reference_input"] = _err(run_layer(candidate, prompt, decoding, ref, at, ref_in), ref_out)
    out["control"] = _err(run_layer(candidate, prompt, decoding, ref, at, cand_in), cand_out)
    if reference is not None:
        out["reference_on_candidate_input"] = _err(run_layer(reference, prompt, decoding, ref, at, cand_in), cand_out)
    return out


def _fmt(x) -> str:
    return "NaN/inf" if x is None else f"{x:.2g}"


def verdict(measured: dict | None, tol: float) -> dict | None:
    """Judge a replay measurement at tolerance ``tol``: ``layer`` (the candidate's layer computes
    differently: fed the reference's input it still leaves tolerance), ``input`` (fed the
    reference's input it agrees: the error came in with its input), ``within`` (the layer's
    output is within tolerance: nothing to explain at this tolerance), or ``unreliable`` (the
    control did not reproduce the candidate's own output, so the replay path differs from the
    run's). Returns the measurement with ``verdict`` and ``text`` added."""
    if not measured:
        return None
    at = measured["at"]
    where = (f"talker step {at['step']}" if at["component"] == "talker"
             else f"predictor frame {at['step']} sub-step {at['substep']}") + f" layer {at['layer']}"
    iso = measured["candidate_on_reference_input"]["rel_l2"]
    control = measured["control"]["rel_l2"]
    observed = measured["output"]["rel_l2"]
    inp = measured["input"]["rel_l2"]
    back = (measured.get("reference_on_candidate_input") or {}).get("rel_l2", math.nan)
    back_text = "" if "reference_on_candidate_input" not in measured else f"; the reference's layer on the candidate's input: {_fmt(back)}"
    if control is None or control > tol:
        kind = "unreliable"
        text = (f"{where}: replay inconclusive: the candidate's layer fed its own recorded input gives {_fmt(control)} "
                f"from its own recorded output (over tolerance {tol:g}), so the replay does not reproduce the run")
    elif iso is None or iso > tol:
        kind = "layer"
        text = (f"{where} computes differently: fed the reference's input, the candidate's layer is still {_fmt(iso)} "
                f"from the reference's output (observed {_fmt(observed)}, input {_fmt(inp)}){back_text}")
    elif observed is not None and observed <= tol:
        kind = "within"
        text = (f"{where} is within tolerance {tol:g} at this tolerance (observed {_fmt(observed)}; fed the reference's "
                f"input, {_fmt(iso)}){back_text}")
    else:
        kind = "input"
        text = (f"{where}: its input already differed: fed the reference's input, the candidate's layer matches within "
                f"{_fmt(iso)} (observed {_fmt(observed)} from an input {_fmt(inp)} off){back_text}")
    return {**measured, "verdict": kind, "text": text, "tolerance": tol,
            "added_in_isolation": iso}
