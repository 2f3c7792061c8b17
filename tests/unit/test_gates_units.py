"""parity.gates.evaluate on hand-built comparison summaries: each gate at, just above and just
below its threshold, NaN/inf, missing evidence, and the MOS gate's plumbing. No model is loaded.

The comparison summary is built in one place (``comparison``) in the shape ``compare.summarize``
returns, so a change of that shape is a one-function change here."""

from __future__ import annotations

import math

import pytest

from parity import gates
from parity.recipe import Gates, Mos

OFF = Gates(hidden_within_tolerance=False, max_rel_l2=None, min_token_agreement=None, no_nonfinite=False)
TALKER = {"component": "talker", "step": 3, "substep": -1, "layer": 1, "point": "layer1"}
PREDICTOR = {"component": "predictor", "step": 2, "substep": 4, "layer": -1, "point": "embed"}


def comparison(first_divergence=None, first_nonfinite=None, max_rel_l2=0.0, points_compared=10, agreement=None,
               free_run=True) -> dict:
    """A per-prompt comparison summary with only the fields the gates read."""
    c = {"first_divergence": first_divergence, "first_nonfinite": first_nonfinite, "max_rel_l2": max_rel_l2,
         "points_compared": points_compared}
    if free_run:
        c["free_run"] = {"agreement": agreement, "first_diff_frame": None, "frames_compared": 4}
    return c


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


# -- hidden_within_tolerance --------------------------------------------------------------------

def test_within_tolerance_passes_without_a_divergence():
    r = one(gates.evaluate(only(hidden_within_tolerance=True), comparison()), "hidden_within_tolerance")
    assert r.passed and r.detail == "every point within tolerance"


@pytest.mark.parametrize("rel_l2", [0.0125, "inf"])
def test_within_tolerance_fails_on_the_first_divergence(rel_l2):
    first = {**PREDICTOR, "rel_l2": rel_l2, "tolerance": 0.01}
    r = one(gates.evaluate(only(hidden_within_tolerance=True), comparison(first_divergence=first)),
            "hidden_within_tolerance")
    assert not r.passed
    assert r.detail == f"first divergence at predictor frame 2 sub-step 4 embed: rel L2 {rel_l2} > 0.01"


# -- max_rel_l2 ---------------------------------------------------------------------------------

LIMIT = 0.25


@pytest.mark.parametrize("worst,passed", [
    (LIMIT, True),  # exactly at the limit
    (math.nextafter(LIMIT, 1.0), False),  # just above
    (math.nextafter(LIMIT, 0.0), True),  # just below
    (0.0, True),
    ("inf", False),  # an infinite error somewhere (summarize writes "inf")
])
def test_max_rel_l2_boundary(worst, passed):
    r = one(gates.evaluate(only(max_rel_l2=LIMIT), comparison(max_rel_l2=worst)), "max_rel_l2")
    assert r.passed is passed
    assert r.detail == f"max rel L2 {worst} (limit {LIMIT})"


def test_max_rel_l2_none_with_points_means_only_infinite_errors():
    # summarize leaves infinite errors out of the maximum; all of them infinite gives None.
    r = one(gates.evaluate(only(max_rel_l2=LIMIT), comparison(max_rel_l2=None, points_compared=4)), "max_rel_l2")
    assert not r.passed


def test_max_rel_l2_with_nothing_compared_passes():
    r = one(gates.evaluate(only(max_rel_l2=LIMIT), comparison(max_rel_l2=None, points_compared=0)), "max_rel_l2")
    assert r.passed


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

def test_where():
    assert gates.where(TALKER) == "talker step 3 layer1"
    assert gates.where(PREDICTOR) == "predictor frame 2 sub-step 4 embed"
