"""Gates: the per-prompt checks that decide the exit status (0 pass, 1 a parity gate failed)."""

from __future__ import annotations

from dataclasses import dataclass

from parity.recipe import Gates, Mos


@dataclass
class GateResult:
    """One gate on one prompt."""

    name: str
    passed: bool
    detail: str


def evaluate(gates: Gates, comparison: dict, mos: Mos | None = None, mos_result: dict | None = None) -> list[GateResult]:
    """Evaluate the recipe's gates on one prompt's comparison summary (and its MOS, if gated)."""
    results = []
    if mos is not None and (mos.min_mean_delta is not None or mos.min_worst_delta is not None):
        from parity.mos import check_gate

        stats = ((mos_result or {}).get("by_scorer", {}).get(mos.scorers[0]) or {}).get("stats", {})
        passed, detail = check_gate(stats, mos.min_mean_delta, mos.min_worst_delta)
        results.append(GateResult("mos_delta", passed, f"{mos.scorers[0]}: {detail}"))
    if gates.no_nonfinite:
        bad = comparison.get("first_nonfinite")
        results.append(GateResult(
            "no_nonfinite", bad is None,
            "no NaN/inf on the candidate side" if bad is None else
            f"first NaN/inf at {bad['component']} step {bad['step']} {bad['point']}",
        ))
    if gates.hidden_within_tolerance:
        first = comparison.get("first_divergence")
        results.append(GateResult(
            "hidden_within_tolerance", first is None,
            "every point within tolerance" if first is None else
            f"first divergence at {where(first)}: rel L2 {first['rel_l2']} > {first['tolerance']}",
        ))
    if gates.max_rel_l2 is not None:
        worst = comparison.get("max_rel_l2")  # a float, "inf", "nan" (a NaN/inf on the candidate) or None
        if isinstance(worst, str) or (worst is None and comparison.get("points_compared")):
            worst_f = float("nan")
        else:
            worst_f = float(worst or 0)
        results.append(GateResult(
            "max_rel_l2", worst_f <= gates.max_rel_l2, f"max rel L2 {worst} (limit {gates.max_rel_l2})"
        ))
    sampler = comparison.get("sampler")
    if gates.sampler_agrees and sampler is not None and not sampler.get("do_sample"):
        bad = sampler.get("mismatches", 0)
        first = sampler.get("first") or {}
        results.append(GateResult(
            "sampler_agrees", bad == 0,
            "the same logits give the same token at every teacher-forced point" if bad == 0 else
            f"{bad} point(s) where the candidate's token is not what the reference's sampler picks from the same logits "
            f"(first {where({**first, 'point': ''}).strip()}: {first.get('own')} instead of {first.get('expected')}; "
            f"stage: {first.get('stage')})",
        ))
    stop = comparison.get("stop") or {}
    if gates.stop_prob_ratio and stop:
        c = stop.get("collapse")
        results.append(GateResult(
            "stop_probability", c is None,
            f"the candidate's stop probability stays within {gates.stop_prob_ratio:g}x of the reference's "
            f"({stop.get('steps_judged', 0)} steps judged)" if c is None else
            f"talker step {c['step']}: stop probability {c['candidate_prob']:.3g} vs the reference's "
            f"{c['reference_prob']:.3g} (more than {gates.stop_prob_ratio:g}x lower)",
        ))
    if gates.no_runaway and stop and "free_run" in comparison:
        r = stop.get("runaway")
        results.append(GateResult(
            "no_runaway", r is None,
            "the candidate does not run to max_frames where the reference stops" if r is None else
            f"the candidate ran to max_frames ({r['candidate_frames']} frames) where the reference stopped after "
            f"{r['reference_frames']}",
        ))
    if gates.min_token_agreement is not None:
        agreement = (comparison.get("free_run") or {}).get("agreement")
        ok = agreement is not None and agreement >= gates.min_token_agreement
        results.append(GateResult(
            "min_token_agreement", ok, f"free-running code agreement {agreement} (minimum {gates.min_token_agreement})"
        ))
    return results


def where(point: dict) -> str:
    """Human wording of a point: 'talker step 3 layer7' or 'predictor frame 2 sub-step 4 embed'."""
    if point["component"] == "talker":
        return f"talker step {point['step']} {point['point']}"
    return f"predictor frame {point['step']} sub-step {point['substep']} {point['point']}"
