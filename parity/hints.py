"""Hints: what the shape of the error says about its source, read from the points table.

Pure functions over the points table of one prompt (``parity.compare.point_frame``) and a few
numbers computed from the traces; nothing here runs an engine.

The error of a compared point can come from three places: the point itself, its input at the
same step (the previous point: embed -> layer0 -> ... -> logits), or the attention cache, whose
keys and values at layer l were computed from the input of layer l at earlier steps (earlier
sub-steps of the same frame for the code predictor, whose first position is also the talker's
final hidden state). A point is a **source** when it is over tolerance and its error is at least
``JUMP`` times the largest error among all those upstream points: error that is carried (or
mildly amplified) along the data flow is not a source; error that appears from clean inputs is.
Sources are grouped into **sites** (component + point, e.g. talker layer1); two sites are
two independent causes. A point over tolerance whose upstream points are all within tolerance
but that grew less than ``JUMP`` times is a **crossing**: accumulated drift, not an entry.

Every hint says what was measured (``evidence``: numbers) and is a hint, not a proof
(``parity bisect`` proves which setting causes a divergence).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

JUMP = 4.0  # a point "enters" an error when it has >= 4x the error of everything upstream of it
GROWTH_RHO = 0.8  # Spearman correlation of error with step that counts as "grows with position"
GROWTH_FACTOR = 3.0  # ... together with the last error before crossing >= 3x the first non-zero one


def hint(cls: str, text: str, evidence: dict, **extra) -> dict:
    """One hint: ``class`` (stable key), ``text`` (one sentence with the evidence numbers),
    ``evidence`` (the numbers), ``label`` "hint" (never a verdict)."""
    return {"class": cls, "label": "hint", "text": text, "evidence": {k: _num(v) for k, v in evidence.items()}, **extra}


def _num(v):
    if isinstance(v, (np.floating, float)):
        v = float(v)
        return v if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))
    if isinstance(v, np.integer):
        return int(v)
    return v


def g(v: float) -> str:
    """Two significant digits; 'inf'/'nan' spelled out."""
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf"
    return f"{v:.2g}"


# -- grids ------------------------------------------------------------------------------------

@dataclass
class Grids:
    """Per-component arrays of relative L2 error, over-tolerance and finiteness, indexed
    [step, point] (talker) or [frame, sub-step, point] (predictor); point 0 = embed, 1..L = the
    decoder layers, L+1 = logits. ``up`` is the largest error upstream of each point."""

    t_rel: np.ndarray
    t_over: np.ndarray
    t_finite: np.ndarray
    t_up: np.ndarray
    t_up_finite: np.ndarray
    p_rel: np.ndarray
    p_over: np.ndarray
    p_finite: np.ndarray
    p_up: np.ndarray
    p_up_finite: np.ndarray

    @property
    def n_talker_layers(self) -> int:
        return self.t_rel.shape[1] - 2

    @property
    def n_pred_layers(self) -> int:
        return self.p_rel.shape[2] - 2 if self.p_rel.ndim == 3 else 0


def _grid(df: pd.DataFrame, column: str, shape: tuple, keys: list[str], fill) -> np.ndarray:
    out = np.full(shape, fill, dtype=type(fill) if not isinstance(fill, float) else np.float64)
    if len(df):
        idx = tuple(df[k].to_numpy().astype(int) for k in keys[:-1]) + ((df["layer"].to_numpy().astype(int) + 1),)
        out[idx] = df[column].to_numpy()
    return out


def _exclusive_cummax(a: np.ndarray, axis: int) -> np.ndarray:
    """max over the strictly earlier entries along ``axis`` (0 where there are none)."""
    c = np.maximum.accumulate(a, axis=axis)
    shifted = np.zeros_like(c)
    sl_dst = [slice(None)] * a.ndim
    sl_src = [slice(None)] * a.ndim
    sl_dst[axis] = slice(1, None)
    sl_src[axis] = slice(None, -1)
    shifted[tuple(sl_dst)] = c[tuple(sl_src)]
    return shifted


def grids(points: pd.DataFrame) -> Grids:
    """Arrays of the points table, and each point's upstream error (see module docstring)."""
    t = points[points["component"] == "talker"]
    p = points[points["component"] == "predictor"]
    n_t = int(t["layer"].max()) + 2 if len(t) else 2  # embed + layers + logits
    steps = int(t["step"].max()) + 1 if len(t) else 0
    rel = points["rel_l2"].astype(float)
    finite = points["finite"].astype(bool) if "finite" in points else np.isfinite(rel)
    pts = points.assign(rel_l2=rel.where(finite, np.inf), finite=finite)
    t, p = pts[pts["component"] == "talker"], pts[pts["component"] == "predictor"]
    t_rel = _grid(t, "rel_l2", (steps, n_t), ["step", "layer"], 0.0)
    t_over = _grid(t, "over", (steps, n_t), ["step", "layer"], False)
    t_fin = _grid(t, "finite", (steps, n_t), ["step", "layer"], True)
    t_up = np.zeros_like(t_rel)
    t_upf = np.ones_like(t_fin)
    if steps:
        prev = t_rel[:, :-1]
        kv = _exclusive_cummax(prev, axis=0)
        t_up[:, 1:-1] = np.maximum(prev[:, :-1], kv[:, :-1])  # layers: same-step input + cache
        t_up[:, -1] = t_rel[:, -2]  # logits: the last layer, through the final norm
        t_upf[:, 1:] = np.isfinite(t_up[:, 1:])
    n_p = int(p["layer"].max()) + 2 if len(p) else 2
    frames = int(p["step"].max()) + 1 if len(p) else 0
    subs = 15
    p_rel = _grid(p, "rel_l2", (frames, subs, n_p), ["step", "substep", "layer"], 0.0)
    p_over = _grid(p, "over", (frames, subs, n_p), ["step", "substep", "layer"], False)
    p_fin = _grid(p, "finite", (frames, subs, n_p), ["step", "substep", "layer"], True)
    p_up = np.zeros_like(p_rel)
    p_upf = np.ones_like(p_fin)
    if frames:
        prev = p_rel[:, :, :-1]
        kv = _exclusive_cummax(prev, axis=1)
        # The predictor's first position is the talker's final hidden state of that step: the
        # talker's last layer (and its logits, after the same final norm) feed every predictor layer.
        f = min(frames, steps)
        talker_in = np.zeros(frames)
        talker_in[:f] = np.maximum(t_rel[:f, -2], t_rel[:f, -1])
        p_up[:, :, 1:-1] = np.maximum(np.maximum(prev[:, :, :-1], kv[:, :, :-1]), talker_in[:, None, None])
        p_up[:, :, -1] = p_rel[:, :, -2]
        p_upf[:, :, 1:] = np.isfinite(p_up[:, :, 1:])
    return Grids(t_rel, t_over, t_fin, t_up, t_upf, p_rel, p_over, p_fin, p_up, p_upf)


# -- sources ----------------------------------------------------------------------------------

@dataclass
class Source:
    """One point where error enters (or, ``crossing``, where accumulated drift crosses tolerance)."""

    component: str
    step: int
    substep: int
    index: int  # 0 embed, 1..L layers, L+1 logits
    rel: float
    up: float
    finite: bool
    order: tuple

    def point(self, n_layers: int) -> str:
        return "embed" if self.index == 0 else ("logits" if self.index == n_layers + 1 else f"layer{self.index - 1}")


def find_sources(gr: Grids) -> tuple[list[Source], list[Source]]:
    """(sources, crossings) in execution order (see module docstring)."""
    sources, crossings = [], []

    def scan(component, rel, over, finite, up, up_finite, coords):
        for c in coords:
            if not over[c]:
                continue
            s = c[0]
            sub = c[1] if len(c) == 3 else -1
            i = c[-1]
            order = (s, 0 if component == "talker" else 1, sub, i)
            if not finite[c]:
                if up_finite[c]:  # non-finite from finite inputs: a NaN/inf source
                    sources.append(Source(component, s, sub, i, math.inf, float(up[c]), False, order))
                continue
            if not up_finite[c]:
                continue
            if rel[c] >= JUMP * up[c]:
                sources.append(Source(component, s, sub, i, float(rel[c]), float(up[c]), True, order))
            elif not _any_over_upstream(component, c, gr):
                crossings.append(Source(component, s, sub, i, float(rel[c]), float(up[c]), True, order))

    scan("talker", gr.t_rel, gr.t_over, gr.t_finite, gr.t_up, gr.t_up_finite, list(np.ndindex(gr.t_rel.shape)))
    scan("predictor", gr.p_rel, gr.p_over, gr.p_finite, gr.p_up, gr.p_up_finite, list(np.ndindex(gr.p_rel.shape)))
    sources.sort(key=lambda x: x.order)
    crossings.sort(key=lambda x: x.order)
    return sources, crossings


def _any_over_upstream(component: str, c: tuple, gr: Grids) -> bool:
    """Whether any point upstream of ``c`` is over tolerance (the error was carried, not crossed)."""
    if component == "talker":
        s, i = c
        if i == 0:
            return False
        if i == gr.t_rel.shape[1] - 1:
            return bool(gr.t_over[s, i - 1])
        return bool(gr.t_over[: s + 1, i - 1].any())
    f, j, i = c
    if i == 0:
        return False
    if i == gr.p_rel.shape[2] - 1:
        return bool(gr.p_over[f, j, i - 1])
    talker = f < gr.t_over.shape[0] and bool(gr.t_over[f, -2] or gr.t_over[f, -1])
    return talker or bool(gr.p_over[f, : j + 1, i - 1].any())


def sites(sources: list[Source]) -> list[list[Source]]:
    """Sources grouped by (component, point), in the order their first source executes."""
    groups: dict[tuple, list[Source]] = {}
    for s in sources:
        # Input embeddings are one site: the predictor's first sub-step embeds codebook 0 with the
        # talker's own codec embedding table.
        groups.setdefault(("embed",) if s.index == 0 else (s.component, s.index), []).append(s)
    return sorted(groups.values(), key=lambda grp: grp[0].order)


# -- wording ----------------------------------------------------------------------------------

def _at(src: Source, gr: Grids) -> str:
    n = gr.n_talker_layers if src.component == "talker" else gr.n_pred_layers
    point = src.point(n)
    if src.component == "talker":
        phase = "the prefill (talker step 0)" if src.step == 0 else f"talker decode step {src.step}"
        return f"{point} of {phase}"
    return f"{point} of predictor frame {src.step} sub-step {src.substep}"


def _before_in_step(src: Source, gr: Grids) -> tuple[float, str]:
    """The largest error of the points before ``src`` in its own step (its input chain)."""
    if src.component == "talker":
        before = gr.t_rel[src.step, : src.index]
    else:
        before = gr.p_rel[src.step, src.substep, : src.index]
    worst = float(before.max()) if before.size else 0.0
    return worst, ("bit-identical" if worst == 0 else f"within tolerance (max {g(worst)})")


def _site_hint(site: list[Source], gr: Grids, tol: float, prefill_len: int | None) -> dict:
    """Classify one site from its first source and the shape of the error around it."""
    src = site[0]
    n_t, n_p = gr.n_talker_layers, gr.n_pred_layers
    steps_with = sorted({s.step for s in site})
    where = {"component": src.component, "step": src.step, "substep": src.substep,
             "point": src.point(n_t if src.component == "talker" else n_p)}
    ev = {"rel_l2": src.rel, "upstream_rel_l2": src.up, "tolerance": tol, "steps_with_source": len(steps_with)}
    persists = f"; it enters afresh at {len(steps_with)} steps in all" if len(steps_with) > 1 else ""
    if src.index == 0:
        last = gr.t_rel[src.step, -2] if src.component == "talker" else gr.p_rel[src.step, src.substep, -2]
        ev["last_layer_rel_l2"] = float(last)
        text = (f"input embedding only: the error is already in the input embedding of "
                f"{_at(src, gr).split(' of ', 1)[1]} (rel L2 {g(src.rel)}) before any decoder layer, and the layers carry "
                f"it (last layer {g(float(last))}){persists}: prompt construction, embedding tables or their precision")
        return hint("input_embedding", text, ev, where=where)
    before, before_text = _before_in_step(src, gr)
    ev["before_rel_l2"] = before
    if src.index == (n_t if src.component == "talker" else n_p) + 1:
        if src.component == "talker":
            hidden_rel = gr.t_rel[:, :-1]
            hidden = float(hidden_rel[np.isfinite(hidden_rel)].max(initial=0.0))
            pred = float(gr.p_rel.max()) if gr.p_rel.size else 0.0
            ev.update(talker_hidden_max_rel_l2=hidden, predictor_max_rel_l2=pred)
            if hidden > tol:  # other sites diverge elsewhere: speak only of this step
                last = float(gr.t_rel[src.step, -2])
                text = (f"talker logits: at {_at(src, gr).split(' of ', 1)[1]} the last layer is within tolerance "
                        f"({g(last)}) but the logits differ (rel L2 {g(src.rel)}){persists}: the final norm or the codec head")
                return hint("logits_only", text, {**ev, "last_layer_rel_l2": last}, where=where)
            which = ("the codec head itself (the code predictor, which reads the final-normed hidden state, stays within "
                     f"tolerance: max {g(pred)})") if pred <= tol else (
                     f"the final norm (the code predictor, which reads the normed hidden state, differs too: max {g(pred)})")
            text = (f"talker logits or final norm only: every talker hidden state is within tolerance (max {g(hidden)}) "
                    f"but the logits differ from {_at(src, gr).split(' of ', 1)[1]} on (rel L2 {g(src.rel)}); likely {which}")
            return hint("logits_only", text, ev, where=where)
        text = (f"code predictor head only: predictor frame {src.step} sub-step {src.substep}: every layer {before_text}, "
                f"the logits differ (rel L2 {g(src.rel)}): the lm_head of that sub-step or its dtype")
        return hint("logits_only", text, ev, where=where)
    layer = src.index - 1
    if src.component == "predictor":
        t_max = float(gr.t_rel.max()) if gr.t_rel.size else 0.0
        ev["talker_max_rel_l2"] = t_max
        if t_max > tol:  # the talker diverges too (another site): this one is not "predictor only"
            f_max = float(gr.t_rel[src.step].max()) if src.step < gr.t_rel.shape[0] else 0.0
            text = (f"enters at layer {layer} of predictor frame {src.step} sub-step {src.substep} (rel L2 {g(src.rel)}), "
                    f"from inputs within tolerance (talker step {src.step} max {g(f_max)}, earlier layers {before_text})"
                    f"{persists}: a predictor-specific path, independent of the talker's divergence")
            return hint("enters_at_layer", text, {**ev, "layer": layer, "phase": "predictor"}, where=where)
        talker_text = "bit-identical" if t_max == 0 else f"within tolerance (max {g(t_max)})"
        frames = sorted({s.step for s in site})
        subs = sorted({s.substep for s in site})
        ev.update(frames_with_source=len(frames), substeps_with_source=len(subs))
        text = (f"predictor only: every talker point is {talker_text}; the code predictor's error enters at layer {layer} of "
                f"frame {src.step} sub-step {src.substep} (rel L2 {g(src.rel)}, layers before it {before_text}) in "
                f"{len(frames)} frame(s) and {len(subs)} sub-step(s): a predictor-specific path (its graph, cache, a setting "
                "restricted to it)")
        return hint("predictor_only", text, ev, where=where)
    # talker layer
    last = float(gr.t_rel[src.step, -2])
    ev["last_layer_rel_l2"] = last
    carried = f" and is carried after (last layer {g(last)})" if layer < n_t - 1 else ""
    if src.step == 0:
        text = (f"enters at layer {layer} of the prefill: {_layers(layer)} {before_text} at step 0; the error enters at "
                f"layer {layer} (rel L2 {g(src.rel)}){carried}{persists}") if layer > 0 else (
                f"enters at layer 0 of the prefill: its input embedding {before_text}; the error enters at layer 0 "
                f"(rel L2 {g(src.rel)}){carried}{persists}")
        return hint("enters_at_layer", text, {**ev, "layer": layer, "phase": "prefill"}, where=where)
    prior = gr.t_rel[: src.step, src.index]
    prior_max = float(prior.max()) if prior.size else 0.0
    ev["same_point_before_max_rel_l2"] = prior_max
    growth = _growth(gr.t_rel[:, src.index], src.step)
    position = f" (position {prefill_len + src.step - 1})" if prefill_len is not None else ""
    if growth is not None:
        ev.update(growth)
        text = (f"grows with position: talker layer {layer}'s error rises step by step below tolerance "
                f"({g(growth['first_rel_l2'])} at step {growth['first_step']} -> {g(growth['last_before_rel_l2'])} at step "
                f"{src.step - 1}, Spearman {growth['spearman']:.2f}) and crosses it at decode step {src.step}{position} "
                f"(rel L2 {g(src.rel)}): a position-dependent error (RoPE precision, attention over a padded or long cache)")
        return hint("grows_with_position", text, {**ev, "layer": layer}, where=where)
    steps_before = gr.t_rel[: src.step]
    before_all = float(steps_before.max()) if steps_before.size else 0.0
    ev["earlier_steps_max_rel_l2"] = before_all
    earlier = "bit-identical" if before_all == 0 else f"within tolerance (max {g(before_all)})"
    if src.step == 1:
        inputs = f"its input embedding is {before_text}" if layer == 0 else f"{_layers(layer)} {before_text}"
        text = (f"enters at layer {layer} of the first decode step: the prefill is {earlier}; at decode step 1 {inputs} "
                f"and the error enters at layer {layer} "
                f"(rel L2 {g(src.rel)}){carried}{persists}: the single-token decode path differs (static/padded cache "
                "and its mask, attention kernel, graph capture)")
        return hint("enters_at_layer", text, {**ev, "layer": layer, "phase": "decode"}, where=where)
    text = (f"appears only from decode step {src.step}{position} on: every point of steps 0-{src.step - 1} is {earlier}; "
            f"the error enters at layer {layer} of step {src.step} (rel L2 {g(src.rel)}){persists}: something that depends "
            "on position or cache length (RoPE table, cache size or wrap-around, a length-dependent kernel choice)")
    return hint("from_step", text, {**ev, "layer": layer, "position": None if prefill_len is None else prefill_len + src.step - 1},
                where=where)


def _layers(layer: int) -> str:
    """'layer 0' / 'layers 0-4': the layers before ``layer``."""
    return "layer 0" if layer == 1 else f"layers 0-{layer - 1}"


def _growth(series: np.ndarray, until: int) -> dict | None:
    """Evidence that ``series[:until]`` (one point over steps) grows steadily from non-zero."""
    prior = series[:until]
    nz = np.flatnonzero(prior > 0)
    if len(nz) < 3:
        return None
    vals = prior[nz[0]:]
    if len(vals) < 3 or not np.isfinite(vals).all():
        return None
    rho = pd.Series(vals).corr(pd.Series(np.arange(len(vals))), method="spearman")
    if not (rho >= GROWTH_RHO and vals[-1] >= GROWTH_FACTOR * vals[0]):
        return None
    return {"first_step": int(nz[0]), "first_rel_l2": float(vals[0]), "last_before_rel_l2": float(vals[-1]),
            "spearman": float(rho)}


# -- non-finite -------------------------------------------------------------------------------

def nonfinite_hint(detail: dict, where_text: str, drift_before: float) -> dict:
    """Masked row vs overflow, from the first non-finite point's contents (``detail``, see
    :func:`parity.compare.nonfinite_detail`): overflow makes inf (x * large -> inf, inf - inf ->
    NaN) after the values grow; a fully masked softmax row makes NaN from ordinary values."""
    ev = {**detail, "rel_l2_before": drift_before}
    grew = detail.get("growth_vs_reference")
    overflow = detail.get("inf_count", 0) > 0 or (grew is not None and grew >= 100)
    if overflow:
        text = (f"NaN/inf from overflow at {where_text}: {detail.get('inf_count', 0)} inf and {detail.get('nan_count', 0)} NaN "
                f"values there, and the candidate's values just before were {g(grew)}x the reference's in magnitude "
                f"(max |x| {g(detail.get('cand_max_abs_before'))}): a growing error overflowed the dtype's range "
                f"(max {g(detail.get('dtype_max'))})")
        return hint("nan_overflow", text, ev)
    text = (f"NaN from a fully masked row (or 0/0) at {where_text}: {detail.get('nan_count', 0)} NaN and no inf, from inputs "
            f"of ordinary size (max |x| {g(detail.get('cand_max_abs_before'))}, {g(grew)}x the reference's): softmax over a "
            "row that is all -inf (as fixed in FastDeploy pull request 7028), not overflow"
            + (f"; an unrelated error (rel L2 {g(drift_before)}) was already present before it" if drift_before > 0 else ""))
    return hint("nan_masked_row", text, ev)


# -- the whole picture ------------------------------------------------------------------------

def location_hints(points: pd.DataFrame, tol: float, prefill_len: int | None = None,
                   nonfinite: dict | None = None) -> list[dict]:
    """Hints about where and how the error enters, from the points table alone (plus, for a
    NaN/inf, the contents of the first non-finite point: ``nonfinite`` = {"where": text,
    "detail": dict}). Empty when nothing is over tolerance."""
    if not len(points) or not bool(points["over"].any()):
        return []
    gr = grids(points)
    sources, crossings = find_sources(gr)
    groups = sites(sources)
    out: list[dict] = []
    finite_groups = [grp for grp in groups if any(s.finite for s in grp)]
    if nonfinite is not None:
        before = points.loc[: nonfinite["index"] - 1] if nonfinite.get("index") else points.iloc[:0]
        drift = float(before["rel_l2"].replace([np.inf], np.nan).max()) if len(before) else 0.0
        out.append(nonfinite_hint(nonfinite["detail"], nonfinite["where"], 0.0 if math.isnan(drift) else drift))
    site_hints = [_site_hint(grp if grp[0].finite else [s for s in grp if s.finite] or grp, gr, tol, prefill_len)
                  for grp in finite_groups]
    n_sites = len(finite_groups) + (1 if nonfinite is not None and _nan_is_own_site(groups, finite_groups) else 0)
    if n_sites >= 2:
        parts = [f"error entering at {_at(first, gr)} (rel L2 {g(first.rel)})"
                 for first in ([s for s in grp if s.finite][0] for grp in finite_groups)]
        if nonfinite is not None and _nan_is_own_site(groups, finite_groups):
            parts.append(f"NaN/inf at {nonfinite['where']}")
        out.append(hint("multiple_sources",
                        f"{n_sites} independent sources: " + "; ".join(parts)
                        + ": error enters at each from inputs within tolerance, so one fix will not remove all of them",
                        {"sites": n_sites}))
    out += site_hints[:3]
    if not finite_groups and crossings and nonfinite is None:
        c = crossings[0]
        out.append(hint(
            "accumulates",
            f"no single entry point: the error grows below tolerance along the data flow (upstream max {g(c.up)}) and "
            f"crosses it at {_at(c, gr)} (rel L2 {g(c.rel)}, less than {JUMP:g}x its input's): rounding or a precision "
            "difference that applies everywhere (dtype, RMSNorm/RoPE precision, attention kernel)",
            {"rel_l2": c.rel, "upstream_rel_l2": c.up, "tolerance": tol},
        ))
    return out


def _nan_is_own_site(groups: list[list[Source]], finite_groups: list[list[Source]]) -> bool:
    """The NaN/inf enters at a (component, point) where no finite error entered: its own cause."""
    finite_keys = {_site_key(grp[0]) for grp in finite_groups}
    return any(not s.finite and _site_key(s) not in finite_keys for grp in groups for s in grp)


def _site_key(s: Source) -> tuple:
    return ("embed",) if s.index == 0 else (s.component, s.index)


def diagnose(points: pd.DataFrame, tol: float, prefill_len: int | None = None, nonfinite: dict | None = None,
             sampler: dict | None = None, stop: dict | None = None) -> list[dict]:
    """All hints for one prompt, most telling first: non-finite values, where the error enters
    (or several sources), the sampler, the stop token. Empty for a clean pair."""
    from parity import sampler_check, stop as stop_mod

    out = location_hints(points, tol, prefill_len, nonfinite)
    numeric_clean = not bool(points["over"].any()) if len(points) else True
    s = sampler_check.hint(sampler, numeric_clean)
    if s is not None:
        out.insert(0, s) if numeric_clean else out.append(s)
    out += stop_mod.hints(stop or {})
    return out
