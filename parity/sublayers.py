"""Split the first diverging decoder layer into the op that adds the error.

With ``probes = "sublayers"`` both traces hold, for every decoder layer at every step, each op's
output at the last position (:data:`parity.probes.SUBLAYER_POINTS`). :func:`split` takes the first
layer over tolerance in execution order and measures every op there against the reference,
walking the layer's data flow:

    layer input -> input_norm -> q, k, v -> attn (also reads the cached k/v of earlier positions)
    -> o_proj -> (+ layer input) -> post_norm -> mlp -> (+ residual) -> layer output

An op *adds* the error when its error is at least :data:`SOURCE_FACTOR` times the largest error
of what it reads, and at least :data:`MATERIAL` of the layer output's error (so rounding noise
far below the divergence is not named). The first such op is named, with the numbers of what it
reads. A pure function of the saved traces: ``parity compare`` re-judges it.
"""

from __future__ import annotations

import math

import pandas as pd
import torch

from parity.probes import SUBLAYER_MEANING, SUBLAYER_POINTS

SOURCE_FACTOR = 4.0  # the same factor the hints use for a point that is a source
MATERIAL = 0.1  # an op must carry at least this share of the layer output's error to be named

# What each op reads, inside the layer ("input": the layer's input; "output": the layer's output).
READS = {
    "input_norm": ("input",), "q": ("input_norm",), "k": ("input_norm",), "v": ("input_norm",),
    "attn": ("q", "k", "v"), "o_proj": ("attn",), "post_norm": ("input", "o_proj"), "mlp": ("post_norm",),
    "output": ("input", "o_proj", "mlp"),
}
CAUSE = {
    "input_norm": "the input RMSNorm",
    "attn": "the attention kernel or its mask (or how the KV cache stores k/v)",
    "o_proj": "the o_proj matmul",
    "post_norm": "the residual add or the post-attention RMSNorm",
    "mlp": "the MLP (gate/up/down projections or the activation)",
    "output": "the residual add after the MLP",
}
LABEL = {**SUBLAYER_MEANING, "input": "layer input", "output": "layer output"}


def _err(cand: torch.Tensor, ref: torch.Tensor) -> dict:
    c, r = cand.double(), ref.double()
    diff = c - r
    finite = bool(torch.isfinite(c).all() and torch.isfinite(r).all())
    rel = float(diff.norm() / r.norm().clamp_min(1e-30)) if finite else math.inf
    return {"rel_l2": rel, "max_abs": float(diff.abs().max()) if finite else math.inf, "identical": bool(torch.equal(c, r))}


def _offsets(widths: list[int]) -> list[int]:
    out = [0]
    for w in widths:
        out.append(out[-1] + w)
    return out


def _sub(trace, component: str, step: int, substep: int, layer: int) -> torch.Tensor | None:
    if component == "talker":
        t = trace.talker_sub
        return t[step, layer] if t.dim() == 3 and step < t.shape[0] and layer < t.shape[1] else None
    t = trace.pred_sub
    return t[step, substep, layer] if t.dim() == 4 and step < t.shape[0] and layer < t.shape[2] else None


def _hidden(trace, component: str, step: int, substep: int, index: int) -> torch.Tensor:
    return trace.talker_hidden[step, index] if component == "talker" else trace.pred_hidden[step, substep, index]


def first_layer_over(points: pd.DataFrame) -> dict | None:
    """The first decoder-layer point over tolerance, in execution order (points are sorted so)."""
    rows = points[points["over"] & points["point"].astype(str).str.startswith("layer")]
    if not len(rows):
        return None
    row = rows.iloc[0]
    return {"component": str(row["component"]), "step": int(row["step"]), "substep": int(row["substep"]), "layer": int(row["layer"])}


def _cache_error(cand, ref, at: dict, sl: dict) -> dict | None:
    """The largest k and v error at this layer over the earlier recorded positions the attention
    reads from its cache: earlier talker steps, or earlier sub-steps of the same predictor frame.
    Only the last position of each step is recorded (a prefill's other positions are not)."""
    comp, step, sub, layer = at["component"], at["step"], at["substep"], at["layer"]
    earlier = [(s, -1) for s in range(step)] if comp == "talker" else [(step, j) for j in range(sub)]
    if not earlier:
        return None
    worst = {"k": 0.0, "v": 0.0}
    for s, j in earlier:
        c, r = _sub(cand, comp, s, j, layer), _sub(ref, comp, s, j, layer)
        if c is None or r is None:
            return None
        for name in worst:
            a, b = sl[name]
            worst[name] = max(worst[name], _err(c[a:b], r[a:b])["rel_l2"])
    return {"k_rel_l2": worst["k"], "v_rel_l2": worst["v"], "positions": len(earlier)}


def _fmt(x: float) -> str:
    return "inf" if not math.isfinite(x) else f"{x:.2g}"


def _reads_text(ops: dict, names: tuple[str, ...]) -> str:
    """'q/k/v bit-identical' or 'q 2e-07, k 2e-07, v 0 (bit-identical)'."""
    if all(ops[n]["identical"] for n in names):
        return "/".join(names if names != ("input",) else ("layer input",)) + " bit-identical"
    return ", ".join(f"{LABEL[n] if n in ('input', 'output') else n} {'bit-identical' if ops[n]['identical'] else _fmt(ops[n]['rel_l2'])}"
                     for n in names)


def split(points: pd.DataFrame, cand, ref, tol: float) -> dict | None:
    """The op-by-op split of the first diverging layer, or None when there is no layer over
    tolerance or either trace lacks sub-layer probes (``probes = "layers"``)."""
    if not (getattr(cand, "has_sublayers", False) and getattr(ref, "has_sublayers", False)):
        return None
    at = first_layer_over(points)
    if at is None:
        return None
    comp, step, sub, layer = at["component"], at["step"], at["substep"], at["layer"]
    widths = ref.meta["sublayers"]["widths"].get(comp)
    if widths != cand.meta["sublayers"]["widths"].get(comp):
        return None
    c, r = _sub(cand, comp, step, sub, layer), _sub(ref, comp, step, sub, layer)
    if c is None or r is None:
        return None
    off = _offsets(widths)
    sl = {name: (off[i], off[i + 1]) for i, name in enumerate(SUBLAYER_POINTS)}
    ops = {"input": _err(_hidden(cand, comp, step, sub, layer), _hidden(ref, comp, step, sub, layer))}
    for name in SUBLAYER_POINTS:
        a, b = sl[name]
        ops[name] = _err(c[a:b], r[a:b])
    ops["output"] = _err(_hidden(cand, comp, step, sub, layer + 1), _hidden(ref, comp, step, sub, layer + 1))
    out_err = ops["output"]["rel_l2"]
    for name in (*SUBLAYER_POINTS, "output"):
        upstream = max(ops[n]["rel_l2"] for n in READS[name])
        ops[name]["reads_rel_l2"] = upstream
        ops[name]["adds"] = bool(ops[name]["rel_l2"] > 0 and ops[name]["rel_l2"] >= SOURCE_FACTOR * upstream
                                 and ops[name]["rel_l2"] >= MATERIAL * out_err)
    cache = _cache_error(cand, ref, at, sl)
    source = next((n for n in (*SUBLAYER_POINTS, "output") if ops[n]["adds"]), None)
    where = f"{comp} step {step}" if comp == "talker" else f"predictor frame {step} sub-step {sub}"
    head = f"{where} layer {layer}"
    if source is None:
        if ops["input"]["rel_l2"] > tol:
            text = (f"{head}: no op inside the layer adds the error; its input already differs "
                    f"(layer input {_fmt(ops['input']['rel_l2'])} -> output {_fmt(out_err)})")
        else:
            chain = ", ".join(f"{n} {_fmt(ops[n]['rel_l2'])}" for n in SUBLAYER_POINTS)
            text = f"{head}: no single op adds the error; it grows through the layer ({chain}; output {_fmt(out_err)})"
        cause = None
    else:
        if source in ("q", "k", "v"):
            adding = [n for n in ("q", "k", "v") if ops[n]["adds"]]
            others = [n for n in ("q", "k", "v") if n not in adding]
            if adding == ["v"]:
                cause = "the v projection"
            elif "v" in adding:
                cause = "the q/k/v projections"
            else:
                cause = f"the {'/'.join(f'{n}_norm' for n in adding)} or RoPE, or the {'/'.join(adding)} projection"
            label = ", ".join(f"{n} {_fmt(ops[n]['rel_l2'])}" for n in adding)
            reads = _reads_text(ops, ("input_norm",)) + ("; " + _reads_text(ops, tuple(others)) if others else "")
        else:
            cause = CAUSE[source]
            label = f"{LABEL[source]} {_fmt(ops[source]['rel_l2'])}"
            reads = _reads_text(ops, READS[source])
        text = f"{head}: {label}, {reads}: {cause}"
        if source == "attn" and cache is not None and max(cache["k_rel_l2"], cache["v_rel_l2"]) * SOURCE_FACTOR > ops["attn"]["rel_l2"]:
            text += (f" (or the cached keys/values of earlier positions: k up to {_fmt(cache['k_rel_l2'])}, "
                     f"v up to {_fmt(cache['v_rel_l2'])})")
        elif source == "attn" and cache is not None:
            text += f"; the cached k/v of {cache['positions']} earlier positions are within {_fmt(max(cache['k_rel_l2'], cache['v_rel_l2']))}"
    return {
        **at, "op": source, "cause": cause, "text": text, "tolerance": tol, "cache": cache,
        "ops": [{"op": n, "label": LABEL[n], **{k: (v if not isinstance(v, float) or math.isfinite(v) else None)
                                                 for k, v in ops[n].items()}} for n in ("input", *SUBLAYER_POINTS, "output")],
    }
