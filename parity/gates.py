"""Gates: the per-prompt checks that decide the exit status (0 pass, 1 a parity gate failed)."""

from __future__ import annotations

from parity.recipe import Gates, Mos
from parity.results import Comparison, Gate

GateResult = Gate  # the name before typed results


def evaluate(gates: Gates, comparison: Comparison, mos: Mos | None = None, mos_result: dict | None = None) -> list[Gate]:
    """Evaluate the recipe's gates on one prompt's comparison (and its MOS, if gated)."""
    results = []
    if mos is not None and (mos.min_mean_delta is not None or mos.min_worst_delta is not None):
        from parity.mos import check_gate

        stats = ((mos_result or {}).get("by_scorer", {}).get(mos.scorers[0]) or {}).get("stats", {})
        passed, detail = check_gate(stats, mos.min_mean_delta, mos.min_worst_delta)
        results.append(Gate("mos_delta", passed, f"{mos.scorers[0]}: {detail}"))
    if gates.no_nonfinite:
        results.append(_no_nonfinite(comparison))
    if gates.hidden_within_tolerance:
        first = comparison.first_divergence
        results.append(Gate(
            "hidden_within_tolerance", first is None,
            "every point within tolerance" if first is None else
            f"first divergence at {first.where()}: rel L2 {'inf (NaN/inf)' if first.nonfinite else first.rel_l2} > {first.tolerance}",
        ))
    if gates.max_rel_l2 is not None:
        worst, bad = comparison.max_rel_l2, comparison.nonfinite_points
        ok = bad == 0 and (worst is None or worst <= gates.max_rel_l2)
        shown = f"inf ({bad} point(s) with NaN/inf)" if bad else worst
        results.append(Gate("max_rel_l2", ok, f"max rel L2 {shown} (limit {gates.max_rel_l2})"))
    extra = comparison.extra
    sampler = extra.get("sampler")
    if gates.sampler_agrees and sampler is not None and not sampler.get("do_sample"):
        bad = sampler.get("mismatches", 0)
        first = sampler.get("first") or {}
        results.append(Gate(
            "sampler_agrees", bad == 0,
            "the same logits give the same token at every teacher-forced point" if bad == 0 else
            f"{bad} point(s) where the candidate's token is not what the reference's sampler picks from the same logits "
            f"(first {where({**first, 'point': ''}).strip()}: {first.get('own')} instead of {first.get('expected')}; "
            f"stage: {first.get('stage')})",
        ))
    stop = extra.get("stop") or {}
    if gates.stop_prob_ratio and stop:
        c = stop.get("collapse")
        results.append(Gate(
            "stop_probability", c is None,
            f"the candidate's stop probability stays within {gates.stop_prob_ratio:g}x of the reference's "
            f"({stop.get('steps_judged', 0)} steps judged)" if c is None else
            f"talker step {c['step']}: stop probability {c['candidate_prob']:.3g} vs the reference's "
            f"{c['reference_prob']:.3g} (more than {gates.stop_prob_ratio:g}x lower)",
        ))
    if gates.no_runaway and stop and comparison.free_run is not None:
        r = stop.get("runaway")
        results.append(Gate(
            "no_runaway", r is None,
            "the candidate does not run to max_frames where the reference stops" if r is None else
            f"the candidate ran to max_frames ({r['candidate_frames']} frames) where the reference stopped after "
            f"{r['reference_frames']}",
        ))
    if gates.min_token_agreement is not None:
        agreement = comparison.free_run.agreement if comparison.free_run else None
        ok = agreement is not None and agreement >= gates.min_token_agreement
        results.append(Gate(
            "min_token_agreement", ok, f"free-running code agreement {agreement} (minimum {gates.min_token_agreement})"
        ))
    return results


def _no_nonfinite(c: Comparison) -> Gate:
    """NaN/inf anywhere: the candidate's hidden states, the reference's, either side's audio."""
    found = []
    if c.first_nonfinite is not None:
        found.append(f"first NaN/inf at {c.first_nonfinite.component} step {c.first_nonfinite.step} {c.first_nonfinite.point}")
    extra = [f"reference {c.first_nonfinite_reference.where()}"] if c.first_nonfinite_reference else []
    extra += [f"{side} audio at {bad['seconds']} s" for side, bad in (c.nonfinite_audio or {}).items() if bad]
    if extra:
        found.append("NaN/inf in " + ", ".join(extra))
    return Gate("no_nonfinite", not found, "; ".join(found) if found else "no NaN/inf on the candidate side")


def where(point) -> str:
    """Human wording of a point (a record or its JSON): 'talker step 3 layer7' or
    'predictor frame 2 sub-step 4 embed'."""
    if hasattr(point, "where"):
        return point.where()
    if point["component"] == "talker":
        return f"talker step {point['step']} {point['point']}"
    return f"predictor frame {point['step']} sub-step {point['substep']} {point['point']}"
