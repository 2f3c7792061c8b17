"""parity.gates.evaluate on hand-built ``Comparison`` records: each gate at, just above and just
below its threshold, NaN/inf, missing evidence, and the MOS gate's plumbing. No model is loaded.

The record is built in one place (``comparison``) with only the fields the gates read set, so a
change of the record is a one-function change here."""

from __future__ import annotations

import math

import pytest

from parity import gates
from parity.recipe import Gates, Mos
from parity.results import Agreement, Comparison, Divergence, Point

OFF = Gates(hidden_within_tolerance=False, max_rel_l2=None, min_token_agreement=None, no_nonfinite=False)
TALKER = {"component": "talker", "step": 3, "substep": -1, "layer": 1, "point": "layer1"}
PREDICTOR = {"component": "predictor", "step": 2, "substep": 4, "layer": -1, "point": "embed"}


def comparison(first_divergence=None, first_nonfinite=None, max_rel_l2=0.0, points_compared=10, agreement=None,
               free_run=True, nonfinite_points=0, first_nonfinite_reference=None, nonfinite_audio=None) -> Comparison:
    """A per-prompt comparison record; points are given as their JSON (``TALKER`` / ``PREDICTOR``)."""
    return Comparison(
        first_divergence=Divergence(**first_divergence) if first_divergence else None,
        first_nonfinite=Point(**first_nonfinite) if first_nonfinite else None,
        max_rel_l2=max_rel_l2, nonfinite_points=nonfinite_points, points_compared=points_compared, points_over=0,
        bit_identical=False, added_per_layer=[], first_flip=None, ref_frames=4, hints=[],
        free_run=Agreement(agreement, agreement, None, 4) if free_run else None,
        first_nonfinite_reference=Point(**first_nonfinite_reference) if first_nonfinite_reference else None,
        nonfinite_audio=nonfinite_audio or {},
    )


def only(**kwargs) -> Gates:
    """Only the given gates on."""
    return Gates(**{**OFF.__dict__, **kwargs})


def one(results, name):
    assert [r.name for r in results] == [name]
    return results[0]


def test_no_gates_no_results():
    assert gates.evaluate(OFF, comparison(first_divergence={**TALKER, "rel_l2": 1.0, "tolerance": 0.1})) == []


def test_default_gates_in_order():
    results = gates.evaluate(Gates(max_rel_l2=1.0, min_token_agreement=0.5), comparison(agreement=1.0))
    assert [r.name for r in results] == ["no_nonfinite", "hidden_within_tolerance", "max_rel_l2", "min_token_agreement"]
    assert all(r.passed for r in results)


# -- no_nonfinite ------------------------------------------------------------------------------

def test_no_nonfinite_passes_without_nonfinite():
    r = one(gates.evaluate(only(no_nonfinite=True), comparison()), "no_nonfinite")
    assert r.passed and r.detail == "no NaN/inf on the candidate side"


@pytest.mark.parametrize("where,text", [(TALKER, "talker step 3 layer1"), (PREDICTOR, "predictor step 2 embed")])
def test_no_nonfinite_fails_and_says_where(where, text):
    r = one(gates.evaluate(only(no_nonfinite=True), comparison(first_nonfinite=where)), "no_nonfinite")
    assert not r.passed and r.detail == f"first NaN/inf at {text}"


def test_no_nonfinite_fails_on_the_reference_side():
    r = one(gates.evaluate(only(no_nonfinite=True), comparison(first_nonfinite_reference=PREDICTOR)), "no_nonfinite")
    assert not r.passed and r.detail == "NaN/inf in reference predictor frame 2 sub-step 4 embed"


@pytest.mark.parametrize("audio,text", [
    ({"candidate": {"sample": 7, "seconds": 0.5, "count": 1}}, "candidate audio at 0.5 s"),
    ({"reference": {"sample": 0, "seconds": 0.0, "count": 3}, "candidate": None}, "reference audio at 0.0 s"),
])
def test_no_nonfinite_fails_on_nonfinite_audio(audio, text):
    r = one(gates.evaluate(only(no_nonfinite=True), comparison(nonfinite_audio=audio)), "no_nonfinite")
    assert not r.passed and r.detail == f"NaN/inf in {text}"


def test_no_nonfinite_passes_when_each_sides_audio_is_finite():
    r = one(gates.evaluate(only(no_nonfinite=True), comparison(nonfinite_audio={"reference": None, "candidate": None})),
            "no_nonfinite")
    assert r.passed


def test_no_nonfinite_lists_every_finding_in_order():
    c = comparison(first_nonfinite=TALKER, first_nonfinite_reference=TALKER,
                   nonfinite_audio={"reference": {"seconds": 1.0}, "candidate": {"seconds": 2.0}})
    r = one(gates.evaluate(only(no_nonfinite=True), c), "no_nonfinite")
    assert not r.passed
    assert r.detail == ("first NaN/inf at talker step 3 layer1; NaN/inf in reference talker step 3 layer1, "
                        "reference audio at 1.0 s, candidate audio at 2.0 s")


# -- hidden_within_tolerance --------------------------------------------------------------------

def test_within_tolerance_passes_without_a_divergence():
    r = one(gates.evaluate(only(hidden_within_tolerance=True), comparison()), "hidden_within_tolerance")
    assert r.passed and r.detail == "every point within tolerance"


@pytest.mark.parametrize("first,shown", [
    ({**PREDICTOR, "rel_l2": 0.0125, "tolerance": 0.01}, "0.0125"),
    ({**PREDICTOR, "rel_l2": None, "tolerance": 0.01, "nonfinite": True}, "inf (NaN/inf)"),
    # nonfinite wins over a (stale) finite number: the error there is unbounded
    ({**PREDICTOR, "rel_l2": 0.5, "tolerance": 0.01, "nonfinite": True}, "inf (NaN/inf)"),
])
def test_within_tolerance_fails_on_the_first_divergence(first, shown):
    r = one(gates.evaluate(only(hidden_within_tolerance=True), comparison(first_divergence=first)),
            "hidden_within_tolerance")
    assert not r.passed
    assert r.detail == f"first divergence at predictor frame 2 sub-step 4 embed: rel L2 {shown} > 0.01"


# -- max_rel_l2 ---------------------------------------------------------------------------------

LIMIT = 0.25


@pytest.mark.parametrize("worst,passed", [
    (LIMIT, True),  # exactly at the limit
    (math.nextafter(LIMIT, 1.0), False),  # just above
    (math.nextafter(LIMIT, 0.0), True),  # just below
    (0.0, True),
])
def test_max_rel_l2_boundary(worst, passed):
    r = one(gates.evaluate(only(max_rel_l2=LIMIT), comparison(max_rel_l2=worst)), "max_rel_l2")
    assert r.passed is passed
    assert r.detail == f"max rel L2 {worst} (limit {LIMIT})"


@pytest.mark.parametrize("worst", [0.0, math.nextafter(LIMIT, 0.0), LIMIT, None])
@pytest.mark.parametrize("bad", [1, 3])
def test_max_rel_l2_fails_on_any_nonfinite_point_whatever_the_finite_maximum(worst, bad):
    # max_rel_l2 is the largest *finite* error; a NaN/inf point is counted apart and unbounded.
    r = one(gates.evaluate(only(max_rel_l2=LIMIT), comparison(max_rel_l2=worst, nonfinite_points=bad)), "max_rel_l2")
    assert not r.passed
    assert r.detail == f"max rel L2 inf ({bad} point(s) with NaN/inf) (limit {LIMIT})"


def test_max_rel_l2_nonfinite_fails_even_under_an_infinite_limit():
    c = comparison(max_rel_l2=0.0, nonfinite_points=1)
    assert not one(gates.evaluate(only(max_rel_l2=math.inf), c), "max_rel_l2").passed


def test_max_rel_l2_with_nothing_compared_passes():
    r = one(gates.evaluate(only(max_rel_l2=LIMIT), comparison(max_rel_l2=None, points_compared=0)), "max_rel_l2")
    assert r.passed and r.detail == f"max rel L2 None (limit {LIMIT})"


@pytest.mark.parametrize("old,passed,shown", [
    ({"max_rel_l2": "inf", "points_compared": 4}, False, "inf (1 point(s) with NaN/inf)"),  # schema 1 sentinel
    ({"max_rel_l2": 0.125, "points_compared": 4}, True, "0.125"),
    ({"max_rel_l2": 0.125, "nonfinite_points": 2, "points_compared": 4}, False, "inf (2 point(s) with NaN/inf)"),
])
def test_max_rel_l2_on_a_comparison_read_from_json(old, passed, shown):
    r = one(gates.evaluate(only(max_rel_l2=LIMIT), Comparison.from_json(old)), "max_rel_l2")
    assert r.passed is passed and r.detail == f"max rel L2 {shown} (limit {LIMIT})"


def test_max_rel_l2_zero_limit():
    assert one(gates.evaluate(only(max_rel_l2=0.0), comparison(max_rel_l2=0.0)), "max_rel_l2").passed
    assert not one(gates.evaluate(only(max_rel_l2=0.0), comparison(max_rel_l2=5e-324)), "max_rel_l2").passed


def test_max_rel_l2_infinite_limit_admits_any_finite_error():
    assert one(gates.evaluate(only(max_rel_l2=math.inf), comparison(max_rel_l2=1e308)), "max_rel_l2").passed


# -- min_token_agreement ------------------------------------------------------------------------

MIN = 0.75


@pytest.mark.parametrize("agreement,passed", [
    (MIN, True),  # exactly at the minimum
    (math.nextafter(MIN, 0.0), False),  # just below
    (math.nextafter(MIN, 1.0), True),  # just above
    (1.0, True),
    (0.0, False),
    (None, False),  # nothing compared: no evidence of agreement
])
def test_min_token_agreement_boundary(agreement, passed):
    r = one(gates.evaluate(only(min_token_agreement=MIN), comparison(agreement=agreement)), "min_token_agreement")
    assert r.passed is passed
    assert r.detail == f"free-running code agreement {agreement} (minimum {MIN})"


def test_min_token_agreement_without_a_free_run_fails():
    r = one(gates.evaluate(only(min_token_agreement=0.0), comparison(free_run=False)), "min_token_agreement")
    assert not r.passed


def test_min_token_agreement_nan_fails():
    r = one(gates.evaluate(only(min_token_agreement=0.0), comparison(agreement=math.nan)), "min_token_agreement")
    assert not r.passed


def test_min_token_agreement_nan_read_from_json_fails():
    c = Comparison.from_json({"free_run": {"agreement": math.nan, "frames_compared": 4}})
    r = one(gates.evaluate(only(min_token_agreement=0.0), c), "min_token_agreement")
    assert not r.passed and r.detail == "free-running code agreement None (minimum 0.0)"


# -- MOS gate plumbing --------------------------------------------------------------------------

def mos_result(scorer: str, n: int, mean: float, worst: float) -> dict:
    return {"by_scorer": {scorer: {"stats": {"n": n, "mean_delta": mean, "worst_delta": worst}}}}


def test_mos_gate_absent_without_bounds():
    assert gates.evaluate(OFF, comparison(), Mos(), mos_result("dnsmos", 3, -1.0, -1.0)) == []
    assert gates.evaluate(OFF, comparison(), None, mos_result("dnsmos", 3, -1.0, -1.0)) == []


@pytest.mark.parametrize("mos,passed", [
    (Mos(min_mean_delta=-0.1), True),  # mean -0.1 exactly at the bound
    (Mos(min_mean_delta=math.nextafter(-0.1, 0.0)), False),
    (Mos(min_worst_delta=-0.3), True),  # worst -0.3 at the bound
    (Mos(min_worst_delta=-0.29), False),
    (Mos(min_mean_delta=-0.1, min_worst_delta=-0.29), False),
])
def test_mos_gate_first_and_on_the_first_scorer(mos, passed):
    results = gates.evaluate(Gates(), comparison(), mos, mos_result("dnsmos", 3, -0.1, -0.3))
    assert results[0].name == "mos_delta" and results[0].passed is passed
    assert results[0].detail.startswith("dnsmos: ")
    assert [r.name for r in results[1:]] == ["no_nonfinite", "hidden_within_tolerance"]


def test_mos_gate_reads_only_the_first_scorer():
    mos = Mos(scorers=("utmos", "dnsmos"), min_mean_delta=0.0)
    result = {"by_scorer": {**mos_result("utmos", 2, -0.5, -0.5)["by_scorer"],
                            **mos_result("dnsmos", 2, 0.5, 0.5)["by_scorer"]}}
    r = gates.evaluate(OFF, comparison(), mos, result)[0]
    assert not r.passed and r.detail.startswith("utmos: ")


@pytest.mark.parametrize("result", [None, {}, {"by_scorer": {}}, {"by_scorer": {"dnsmos": None}},
                                    {"by_scorer": {"dnsmos": {}}}])
def test_mos_gate_without_scores_fails(result):
    r = gates.evaluate(OFF, comparison(), Mos(min_mean_delta=-1.0), result)[0]
    assert r.name == "mos_delta" and not r.passed
    assert r.detail == "dnsmos: no paired scores to gate on (every pair failed or was missing)"


# -- wording ------------------------------------------------------------------------------------

@pytest.mark.parametrize("as_record", [False, True])
def test_where(as_record):
    wrap = Point.from_json if as_record else dict
    assert gates.where(wrap(TALKER)) == "talker step 3 layer1"
    assert gates.where(wrap(PREDICTOR)) == "predictor frame 2 sub-step 4 embed"
