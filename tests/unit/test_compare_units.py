"""parity.compare on synthetic traces: metrics, execution order, tolerance boundaries, first
divergence, added error, first flip (where and its evidence; the tie/real label is left to the
flip-label tests), token agreement, summarize and the truth comparison. No model is loaded."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from _synthetic import PRED_POINTS, TALKER_POINTS, V, VP, copy_trace, make_trace, truncate
from parity import compare

E = 2.0 ** -6  # a planted relative error, exact in float32 and float64
TINY = 2.0 ** -16  # "just above / just below" E, still exact: 1 + E +- TINY fits a float32


def plant(t, component: str, step: int, point: int, value: float, sub: int = 0):
    """Set every element of one hidden point of ``t`` to ``value`` (reference values are 1.0)."""
    if component == "talker":
        t.talker_hidden[step, point] = value
    else:
        t.pred_hidden[step, sub, point] = value
    return t


def row(points: pd.DataFrame, component: str, step: int, substep: int, layer: int) -> pd.Series:
    sel = points[(points["component"] == component) & (points["step"] == step)
                 & (points["substep"] == substep) & (points["layer"] == layer)]
    assert len(sel) == 1
    return sel.iloc[0]


# -- metrics ----------------------------------------------------------------------------------

def test_metrics_on_known_vectors():
    ref = torch.tensor([[3.0, 4.0]])
    cand = torch.tensor([[3.0, 4.5]])
    m = compare._metrics(cand, ref)
    assert m["max_abs"].item() == 0.5
    assert m["rel_l2"].item() == pytest.approx(0.1, rel=1e-12)
    assert m["cosine"].item() == pytest.approx(27.0 / (5.0 * math.sqrt(29.25)), rel=1e-12)
    assert m["sqnr_db"].item() == pytest.approx(20.0, rel=1e-12)
    assert m["finite"].item()


def test_metrics_are_per_row_over_the_last_dimension():
    ref = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    cand = torch.tensor([[1.0, 0.5, 0.0], [0.0, 2.0, 0.0]])
    m = compare._metrics(cand, ref)
    assert m["rel_l2"].tolist() == [0.5, 0.0]
    assert m["max_abs"].tolist() == [0.5, 0.0]
    assert m["sqnr_db"][0].item() == pytest.approx(20 * math.log10(2.0), rel=1e-12)
    assert m["sqnr_db"][1].item() == math.inf
    assert m["cosine"][1].item() == pytest.approx(1.0, rel=1e-15)
    assert m["finite"].tolist() == [True, True]


def test_metrics_of_identical_vectors():
    x = torch.tensor([[0.25, -3.0, 7.5]])
    m = compare._metrics(x, x.clone())
    assert m["max_abs"].item() == 0.0 and m["rel_l2"].item() == 0.0
    assert m["sqnr_db"].item() == math.inf
    assert m["cosine"].item() == pytest.approx(1.0, rel=1e-15)


def test_metrics_keep_small_norms_exact():
    # Norms far below 1 must not be clamped: the relative error of a tiny vector is still relative.
    ref = torch.tensor([[3e-3, 4e-3]], dtype=torch.float64)
    cand = torch.tensor([[3e-3, 4.5e-3]], dtype=torch.float64)
    m = compare._metrics(cand, ref)
    assert m["rel_l2"].item() == pytest.approx(0.1, rel=1e-9)
    assert m["sqnr_db"].item() == pytest.approx(20.0, rel=1e-9)
    assert m["cosine"].item() == pytest.approx(27.0 / (5.0 * math.sqrt(29.25)), rel=1e-9)


def test_metrics_of_zero_reference():
    zero = torch.zeros(1, 3)
    both = compare._metrics(zero, zero.clone())
    assert both["rel_l2"].item() == 0.0 and both["sqnr_db"].item() == math.inf
    assert both["cosine"].item() == 0.0  # no direction to agree on; never a NaN
    m = compare._metrics(torch.tensor([[1e-3, 0.0, 0.0]]), zero)
    assert math.isfinite(m["rel_l2"].item()) and m["rel_l2"].item() > 1e20  # any tolerance is exceeded
    assert m["sqnr_db"].item() < -500


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_candidate_is_infinitely_wrong(bad):
    ref = torch.tensor([[1.0, 2.0], [1.0, 2.0]])
    cand = torch.tensor([[bad, 2.0], [1.0, 2.0]])
    m = compare._metrics(cand, ref)
    assert m["rel_l2"].tolist() == [math.inf, 0.0]
    assert m["finite"].tolist() == [False, True]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_reference_is_a_divergence_but_not_the_candidates_nonfinite(bad):
    ref = torch.tensor([[bad, 2.0], [1.0, 2.0]])
    cand = torch.tensor([[1.0, 2.0], [1.0, 2.0]])
    m = compare._metrics(cand, ref)
    assert m["rel_l2"].tolist() == [math.inf, 0.0]
    assert m["finite"].tolist() == [True, True]  # `finite` attributes NaN/inf to the candidate


# -- point frame: order, truncation, tolerance, added error -------------------------------------

def test_points_are_in_execution_order():
    ref = make_trace(steps=3)
    points = compare.point_frame(copy_trace(ref), ref, tol=1e-5)
    assert list(points.columns[:5]) == ["component", "step", "substep", "layer", "point"]
    got = list(points[["component", "step", "substep", "layer", "point"]].itertuples(index=False, name=None))
    expected = []
    talker_names = ["embed", "layer0", "layer1", "logits"]
    pred_names = ["embed", "layer0", "logits"]
    for s in range(3):
        expected += [("talker", s, -1, i - 1, n) for i, n in enumerate(talker_names)]
        if s < 2:
            for j in range(15):
                expected += [("predictor", s, j, i - 1, n) for i, n in enumerate(pred_names)]
    assert got == expected
    assert list(points.index) == list(range(len(points)))


def test_only_common_steps_are_compared():
    ref = make_trace(steps=4)
    short = truncate(ref, 2)
    for a, b in ((short, ref), (ref, short)):
        points = compare.point_frame(a, b, tol=1e-5)
        talker = points[points["component"] == "talker"]
        pred = points[points["component"] == "predictor"]
        assert sorted(set(talker["step"])) == [0, 1]
        assert sorted(set(pred["step"])) == [0]
        assert len(points) == 2 * (TALKER_POINTS + 1) + 15 * (PRED_POINTS + 1)


def test_empty_traces_give_an_empty_frame():
    ref = truncate(make_trace(steps=3), 0)
    points = compare.point_frame(ref, ref, tol=1e-5)
    assert len(points) == 0
    assert set(compare.COLUMNS) <= set(points.columns)


@pytest.mark.parametrize("error,tol,over", [
    (E, E, False),  # exactly at the tolerance: within it
    (E + TINY, E, True),  # just above
    (E - TINY, E, False),  # just below
    (E, E - TINY, True),  # the tolerance just below the error
    (E, E + TINY, False),
    (E, math.inf, False),  # an infinite tolerance admits any finite error
    (0.0, 0.0, False),  # identical at zero tolerance
    (TINY, 0.0, True),  # zero tolerance: any difference is over
])
def test_tolerance_boundary(error, tol, over):
    ref = make_trace()
    cand = plant(copy_trace(ref), "talker", 1, 1, 1.0 + error)
    points = compare.point_frame(cand, ref, tol)
    r = row(points, "talker", 1, -1, 0)
    assert r["rel_l2"] == error
    assert bool(r["over"]) is over
    assert int(points["over"].sum()) == int(over)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_candidate_is_over_any_tolerance(bad):
    ref = make_trace()
    cand = copy_trace(ref)
    cand.pred_hidden[0, 4, 1, 2] = bad
    for tol in (1e-5, 1.0, math.inf):
        points = compare.point_frame(cand, ref, tol)
        r = row(points, "predictor", 0, 4, 0)
        assert bool(r["over"]) and not bool(r["finite"])
        assert int(points["over"].sum()) == 1


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_reference_is_over_a_finite_tolerance(bad):
    ref = make_trace()
    cand = copy_trace(ref)
    ref.talker_logits[2, 3] = bad
    points = compare.point_frame(cand, ref, 1.0)
    r = row(points, "talker", 2, -1, 2)
    assert r["point"] == "logits" and bool(r["over"]) and bool(r["finite"])


def test_added_error_is_relative_to_the_previous_point_of_the_same_step():
    ref = make_trace()
    cand = copy_trace(ref)
    plant(cand, "talker", 1, 0, 1.0 + 2 * E)  # embed
    plant(cand, "talker", 1, 1, 1.0 + 3 * E)  # layer0
    plant(cand, "talker", 1, 2, 1.0 + E)  # layer1 (shrinks the error)
    plant(cand, "predictor", 0, 1, 1.0 + 4 * E, sub=2)  # layer0 of sub-step 2 (embed exact)
    points = compare.point_frame(cand, ref, tol=1e-5)
    added = {r: row(points, "talker", 1, -1, r)["added"] for r in (-1, 0, 1, 2)}
    assert added == {-1: 2 * E, 0: E, 1: -2 * E, 2: -E}  # logits exact again: -E
    assert row(points, "predictor", 0, 2, -1)["added"] == 0.0
    assert row(points, "predictor", 0, 2, 0)["added"] == 4 * E
    assert row(points, "predictor", 0, 2, 1)["added"] == -4 * E
    # Each step and sub-step starts afresh: its embed adds its own whole error.
    assert row(points, "talker", 2, -1, -1)["added"] == 0.0
    assert row(points, "predictor", 0, 3, -1)["added"] == 0.0


def test_added_error_of_a_first_point_is_its_error():
    ref = make_trace()
    cand = plant(copy_trace(ref), "predictor", 1, 0, 1.0 + E, sub=14)
    points = compare.point_frame(cand, ref, tol=1e-5)
    assert row(points, "predictor", 1, 14, -1)["added"] == E
    assert row(points, "predictor", 1, 14, 0)["added"] == -E


# -- first flip (where, rank, margins; the tie/real label is tested with the flip labels) --------

def test_no_flip_when_choices_match():
    ref = make_trace(steps=4)
    assert compare.first_flip(copy_trace(ref), ref) is None


def test_talker_flip_with_rank_margins_and_logit_error():
    ref = make_trace(steps=3)
    cand = copy_trace(ref)
    ref_tok = int(ref.talker_tokens[1])  # 1; its logit is 4.0, every other 0.0
    other = 5
    cand.talker_logits[1, other] = 4.5  # candidate prefers `other` by 0.5
    cand.talker_logits[1, 6] = 4.25  # and token 6 too: the reference token is third
    cand.talker_choice[1] = other
    flip = compare.first_flip(cand, ref)
    assert (flip.component, flip.step, flip.substep) == ("talker", 1, -1)
    assert (flip.ref_token, flip.cand_token) == (ref_tok, other)
    assert flip.ref_rank_in_cand == 2
    assert flip.cand_margin == 0.5
    assert flip.ref_margin == 4.0
    assert flip.logit_error == 4.5
    assert flip.logit_noise == pytest.approx(math.sqrt((4.5**2 + 4.25**2) / V), rel=1e-12)


def test_a_tied_candidate_logit_does_not_count_as_above():
    ref = make_trace(steps=3)
    cand = copy_trace(ref)
    cand.talker_logits[2, 0] = 4.0  # equal to the reference token's logit: not strictly above
    cand.talker_choice[2] = 0
    flip = compare.first_flip(cand, ref)
    assert flip.step == 2 and flip.ref_rank_in_cand == 0 and flip.cand_margin == 0.0


def test_suppressed_tokens_do_not_count_but_eos_does():
    meta = {"suppress_from": 6, "eos_token_id": 7}
    ref = make_trace(steps=3, meta=meta)
    ref.talker_logits[1, 6] = 3.0  # suppressed: not the reference's runner-up
    ref.talker_logits[1, 2] = 1.0
    cand = copy_trace(ref)
    cand.talker_logits[1, 6] = 9.0  # suppressed: cannot outrank
    cand.talker_logits[1, 7] = 5.0  # EOS stays allowed: outranks the reference token
    cand.talker_choice[1] = 7
    flip = compare.first_flip(cand, ref)
    assert flip.ref_rank_in_cand == 1
    assert flip.cand_margin == 1.0
    assert flip.ref_margin == 3.0  # 4.0 - 1.0, the suppressed 3.0 ignored
    assert flip.logit_error == 6.0  # the error is measured over every logit (token 6: 9 - 3)
    # Without the suppression meta the same logits count token 6.
    plain = compare.first_flip(copy_trace(cand, meta={}), copy_trace(ref, meta={}))
    assert plain.ref_rank_in_cand == 2 and plain.ref_margin == 1.0


def test_allowed_mask():
    assert compare._allowed_mask(make_trace(), V).all()
    mask = compare._allowed_mask(make_trace(meta={"suppress_from": 5, "eos_token_id": 6}), V)
    assert mask.tolist() == [True] * 5 + [False, True, False]


def test_predictor_flip_reads_codes_one_past_the_substep():
    ref = make_trace(steps=3)
    cand = copy_trace(ref)
    cand.pred_choice[1, 3] = (int(ref.codes[1, 4]) + 1) % VP
    cand.pred_logits[1, 3, cand.pred_choice[1, 3]] = 5.0
    flip = compare.first_flip(cand, ref)
    assert (flip.component, flip.step, flip.substep) == ("predictor", 1, 3)
    assert flip.ref_token == int(ref.codes[1, 4]) and flip.cand_token == int(cand.pred_choice[1, 3])
    assert flip.ref_rank_in_cand == 1 and flip.cand_margin == 1.0


def test_first_flip_is_first_in_execution_order():
    ref = make_trace(steps=3)
    cand = copy_trace(ref)
    cand.talker_choice[1] = 0  # talker step 1 runs after predictor frame 0
    cand.pred_choice[0, 14] = 0
    cand.pred_choice[1, 0] = 0  # after talker step 1
    flip = compare.first_flip(cand, ref)
    assert (flip.component, flip.step, flip.substep) == ("predictor", 0, 14)
    cand.pred_choice[0, 14] = ref.pred_choice[0, 14]
    flip = compare.first_flip(cand, ref)
    assert (flip.component, flip.step, flip.substep) == ("talker", 1, -1)
    cand.talker_choice[1] = ref.talker_choice[1]
    assert (compare.first_flip(cand, ref).component, compare.first_flip(cand, ref).step) == ("predictor", 1)


def test_flip_at_the_last_talker_step_without_a_frame():
    ref = make_trace(steps=3)  # step 2 has no predictor frame
    cand = copy_trace(ref)
    cand.talker_choice[2] = 0
    flip = compare.first_flip(cand, ref)
    assert (flip.component, flip.step) == ("talker", 2)
    assert compare.first_flip(truncate(cand, 2), ref) is None  # only common steps are scanned


# -- token agreement ---------------------------------------------------------------------------

def test_token_agreement_identical_and_first_difference():
    ref = torch.arange(5 * 16).reshape(5, 16) % 7
    same = compare.token_agreement(ref.clone(), ref)
    assert same == {"agreement": 1.0, "codebook0_agreement": 1.0, "first_diff_frame": None, "frames_compared": 5}
    cand = ref.clone()
    cand[2, 0] += 1
    cand[4, 9] += 1
    stats = compare.token_agreement(cand, ref)
    assert stats["first_diff_frame"] == 2
    assert stats["agreement"] == pytest.approx(1 - 2 / 80, rel=1e-6)
    assert stats["codebook0_agreement"] == pytest.approx(1 - 1 / 5, rel=1e-6)


def test_token_agreement_over_the_common_frames_only():
    ref = torch.zeros(6, 16, dtype=torch.long)
    cand = torch.ones(3, 16, dtype=torch.long)
    cand[:2] = 0
    for a, b in ((cand, ref), (ref, cand)):
        stats = compare.token_agreement(a, b)
        assert stats["frames_compared"] == 3 and stats["first_diff_frame"] == 2
        assert stats["agreement"] == pytest.approx(2 / 3, rel=1e-6)


def test_token_agreement_with_nothing_to_compare():
    stats = compare.token_agreement(torch.zeros(0, 16, dtype=torch.long), torch.zeros(4, 16, dtype=torch.long))
    assert stats == {"agreement": None, "first_diff_frame": None, "frames_compared": 0}


# -- summarize ---------------------------------------------------------------------------------

def summary(cand, ref, tol=1e-5, free=None):
    return compare.summarize(compare.point_frame(cand, ref, tol), cand, ref, free, tol)


def test_summary_of_identical_sides():
    ref = make_trace()
    s = summary(copy_trace(ref), ref)
    assert s["bit_identical"] is True
    assert s["first_divergence"] is None and s["first_nonfinite"] is None and s["first_flip"] is None
    assert s["points_over"] == 0 and s["points_compared"] == 3 * 4 + 2 * 15 * 3
    assert s["max_rel_l2"] == 0.0
    assert s["ref_frames"] == 2
    assert "free_run" not in s and "length_diff" not in s
    assert s["hints"] == []  # the shared key the report prints; nothing to explain here


def test_summary_first_divergence_is_first_over_in_execution_order():
    ref = make_trace()
    cand = copy_trace(ref)
    plant(cand, "talker", 0, 1, 1.0 + E / 2)  # under the tolerance: not a divergence
    plant(cand, "predictor", 0, 1, 1.0 + 2 * E, sub=7)  # first over
    plant(cand, "talker", 1, 0, 1.0 + 4 * E)  # later, larger
    s = summary(cand, ref, tol=E)
    first = s["first_divergence"]
    assert first["component"] == "predictor" and first["step"] == 0 and first["substep"] == 7
    assert first["layer"] == 0 and first["point"] == "layer0"
    assert first["rel_l2"] == 2 * E and first["max_abs"] == 2 * E and first["tolerance"] == E
    assert first["cosine"] == pytest.approx(1.0) and first["sqnr_db"] == pytest.approx(-20 * math.log10(2 * E))
    assert s["bit_identical"] is False
    assert s["max_rel_l2"] == 4 * E
    # Only the two planted points are over: each planted error is confined to its own point.
    assert s["points_over"] == 2
    assert s["first_nonfinite"] is None


def test_summary_at_the_tolerance_has_no_divergence():
    ref = make_trace()
    cand = plant(copy_trace(ref), "talker", 2, 2, 1.0 + E)
    s = summary(cand, ref, tol=E)
    assert s["first_divergence"] is None and s["points_over"] == 0
    assert s["max_rel_l2"] == E and not s["bit_identical"]
    s = summary(cand, ref, tol=E - TINY)
    assert s["first_divergence"]["step"] == 2 and s["points_over"] == 1


def test_summary_nonfinite_candidate():
    ref = make_trace()
    cand = copy_trace(ref)
    plant(cand, "talker", 1, 2, 1.0 + 2 * E)
    cand.pred_hidden[1, 5, 0, 0] = math.nan
    cand.talker_logits[2, 0] = math.inf
    s = summary(cand, ref, tol=E)
    assert s["first_nonfinite"] == {"component": "predictor", "step": 1, "substep": 5, "layer": -1, "point": "embed"}
    assert s["first_divergence"]["step"] == 1 and s["first_divergence"]["component"] == "talker"
    assert s["max_rel_l2"] == 2 * E  # the infinite errors are left out of the maximum
    assert s["points_over"] == 3


def test_summary_nonfinite_reference_only():
    ref = make_trace()
    ref.talker_hidden[0, 0, 1] = math.nan
    s = summary(copy_trace(make_trace()), ref)
    assert s["first_nonfinite"] is None  # the candidate is finite
    assert s["first_divergence"]["point"] == "embed" and s["first_divergence"]["rel_l2"] == "inf"


def test_summary_of_a_trace_without_frames():
    # The reference stopped at the first talker step: no predictor points at all.
    ref = make_trace(steps=1)
    points = compare.point_frame(copy_trace(ref), ref, 1e-5)
    assert points["finite"].dtype == bool and points["rel_l2"].dtype == float
    s = compare.summarize(points, copy_trace(ref), ref, None, 1e-5)
    assert s["points_compared"] == 4 and s["bit_identical"] is True and s["first_nonfinite"] is None


def test_summary_all_infinite_has_no_finite_maximum():
    ref = make_trace(steps=1)  # one talker step, no frames
    cand = copy_trace(ref)
    cand.talker_hidden[:] = math.inf
    cand.talker_logits[:] = math.inf
    s = summary(cand, ref)
    assert s["max_rel_l2"] is None and s["points_over"] == s["points_compared"] == 4


def test_summary_of_nothing_compared():
    ref = truncate(make_trace(), 0)
    s = summary(ref, ref)
    assert s["points_compared"] == 0 and s["max_rel_l2"] is None
    assert s["bit_identical"] is False  # nothing compared is not evidence of identity
    assert s["first_divergence"] is None and s["added_per_layer"] == []


def test_summary_added_error_per_layer_is_the_mean_over_steps():
    ref = make_trace()
    cand = copy_trace(ref)
    plant(cand, "talker", 0, 1, 1.0 + 2 * E)  # layer0 adds 2E at step 0
    plant(cand, "talker", 0, 2, 1.0 + 2 * E)  # layer1 adds 0
    plant(cand, "talker", 1, 1, 1.0 + 4 * E)  # layer0 adds 4E at step 1, layer1 gives back 4E
    s = summary(cand, ref)
    talker = {r["layer"]: r["mean_added_rel_l2"] for r in s["added_per_layer"] if r["component"] == "talker"}
    assert talker == {-1: 0.0, 0: 2 * E, 1: -4 * E / 3}  # logits (layer 2) excluded
    pred = [r for r in s["added_per_layer"] if r["component"] == "predictor"]
    assert sorted(r["layer"] for r in pred) == [-1, 0]
    assert all(isinstance(r["layer"], int) and isinstance(r["mean_added_rel_l2"], float) for r in s["added_per_layer"])


def test_summary_reports_the_first_flip():
    ref = make_trace()
    cand = copy_trace(ref)
    cand.pred_choice[1, 2] = 0
    s = summary(cand, ref)
    assert s["first_flip"]["component"] == "predictor"
    assert (s["first_flip"]["step"], s["first_flip"]["substep"]) == (1, 2)


@pytest.mark.parametrize("free_frames,hit_ref,hit_free,diff,bookkeeping", [
    (3, False, False, 1, False),  # one frame longer, no length limit: a real difference
    (3, True, False, 1, True),  # one frame longer at the reference's length limit
    (3, False, True, 1, True),
    (1, True, False, -1, True),  # one frame shorter at the limit
    (1, False, False, -1, False),
    (2, True, True, 0, True),
    (4, True, True, 2, False),  # two frames is never bookkeeping
    (0, True, True, -2, False),
])
def test_summary_length_difference(free_frames, hit_ref, hit_free, diff, bookkeeping):
    ref = make_trace(steps=3, meta={"hit_max_frames": hit_ref})  # 2 frames
    free = make_trace(steps=free_frames + 1, meta={"hit_max_frames": hit_free})
    s = summary(copy_trace(ref), ref, free=free)
    assert s["length_diff"] == diff
    assert s["length_diff_is_bookkeeping"] is bookkeeping
    assert s["free_run"]["frames_compared"] == min(free_frames, 2)


def test_summary_free_run_agreement():
    ref = make_trace(steps=4)
    free = copy_trace(ref)
    free.codes[1, 3] += 1
    s = summary(copy_trace(ref), ref, free=free)
    assert s["free_run"]["first_diff_frame"] == 1 and s["free_run"]["agreement"] == pytest.approx(1 - 1 / 48, rel=1e-6)
    assert s["length_diff"] == 0 and s["length_diff_is_bookkeeping"] is False


# -- truth -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,multiplier", [("bfloat16", 3.0), ("float16", 3.0), ("float32", 2.0), ("float64", 2.0)])
def test_truth_multiplier(dtype, multiplier):
    assert compare.truth_multiplier(dtype) == multiplier


TOL = 10 * E  # slack tol / 10 == E exactly


def truth_case(cand_error: float, ref_error: float, multiplier: float | None = 2.0, cand_meta=None):
    truth = make_trace()
    ref = plant(copy_trace(truth), "talker", 1, 1, 1.0 + ref_error)
    cand = plant(copy_trace(truth, meta=cand_meta or {}), "talker", 1, 1, 1.0 + cand_error)
    return compare.compare_truth(cand, ref, truth, TOL, multiplier)


@pytest.mark.parametrize("cand_error,worse", [
    (3 * E, False),  # exactly multiplier x ref error + slack (2 x E + E)
    (3 * E + TINY, True),
    (3 * E - TINY, False),
])
def test_truth_boundary_with_a_reference_error(cand_error, worse):
    r = truth_case(cand_error, E)
    assert r["worse_points"] == int(worse)
    assert r["verdict"] == ("worse" if worse else "different, not worse")


@pytest.mark.parametrize("cand_error,worse", [(E, False), (E + TINY, True), (E - TINY, False)])
def test_truth_boundary_at_the_slack_alone(cand_error, worse):
    r = truth_case(cand_error, 0.0)
    assert r["worse_points"] == int(worse)
    assert r["slack"] == E and r["multiplier"] == 2.0


def test_truth_result_fields():
    r = truth_case(4 * E, E)
    assert r["points"] == 3 * 4 + 2 * 15 * 3
    assert r["first_worse"] == {"component": "talker", "step": 1, "substep": -1, "layer": 0, "point": "layer0",
                                "cand_err": 4 * E, "ref_err": E}
    assert r["cand_err_max"] == 4 * E and r["ref_err_max"] == E


def test_truth_first_worse_in_execution_order():
    truth = make_trace()
    ref = copy_trace(truth)
    cand = copy_trace(truth)
    plant(cand, "talker", 1, 0, 1.0 + 8 * E)
    plant(cand, "predictor", 0, 1, 1.0 + 4 * E, sub=9)
    r = compare.compare_truth(cand, ref, truth, TOL, 2.0)
    assert (r["first_worse"]["component"], r["first_worse"]["substep"]) == ("predictor", 9)
    assert r["worse_points"] == 2
    # A talker point that executes first wins, though "predictor" sorts before "talker".
    plant(cand, "talker", 0, 2, 1.0 + 4 * E)
    r = compare.compare_truth(cand, ref, truth, TOL, 2.0)
    assert (r["first_worse"]["component"], r["first_worse"]["step"], r["first_worse"]["layer"]) == ("talker", 0, 1)


def test_truth_same_distance_and_different_not_worse():
    truth = make_trace()
    same = compare.compare_truth(copy_trace(truth), copy_trace(truth), truth, TOL, 2.0)
    assert same["verdict"] == "same distance" and same["first_worse"] is None and same["worse_points"] == 0
    # The candidate as far off as the reference, at another point: different, not worse.
    r = truth_case(E / 2, E)
    assert r["verdict"] == "different, not worse" and r["first_worse"] is None


@pytest.mark.parametrize("meta,multiplier", [
    ({"side": {"dtype": "bfloat16"}}, 3.0), ({"side": {"dtype": "float32"}}, 2.0), ({}, 2.0),
])
def test_truth_default_multiplier_from_the_candidate_dtype(meta, multiplier):
    # 3.5 E: worse under 2x (3 E), not worse under 3x (4 E).
    r = truth_case(3.5 * E, E, multiplier=None, cand_meta=meta)
    assert r["multiplier"] == multiplier
    assert r["verdict"] == ("worse" if multiplier == 2.0 else "different, not worse")


def test_truth_nonfinite_candidate_is_worse_and_nonfinite_reference_is_not():
    truth = make_trace()
    cand = copy_trace(truth)
    cand.talker_hidden[1, 1, 0] = math.nan
    r = compare.compare_truth(cand, copy_trace(truth), truth, TOL, 2.0)
    assert r["verdict"] == "worse" and r["first_worse"]["cand_err"] == "inf"
    assert r["cand_err_max"] == 0.0  # infinite errors are left out of the maximum
    ref = copy_trace(truth)
    ref.talker_hidden[1, 1, 0] = math.inf
    r = compare.compare_truth(copy_trace(truth), ref, truth, TOL, 2.0)
    assert r["worse_points"] == 0 and r["verdict"] == "different, not worse"


# -- JSON conversion ----------------------------------------------------------------------------

def test_py_converts_numpy_and_nonfinite():
    assert compare._py(np.float64(0.5)) == 0.5 and type(compare._py(np.float32(0.5))) is float
    assert compare._py(math.inf) == "inf" and compare._py(np.float64(-math.inf)) == "-inf"
    assert compare._py(math.nan) is None
    assert compare._py(np.int64(3)) == 3 and type(compare._py(np.int64(3))) is int
    assert compare._py(np.bool_(True)) is True
    assert compare._py("talker") == "talker" and compare._py(None) is None


# -- logits only: a side without hidden states -------------------------------------------------

def _without_hidden(t):
    t.talker_hidden = torch.zeros(0)
    t.pred_hidden = torch.zeros(0)
    return t


@pytest.mark.parametrize("side", ["candidate", "reference", "both", "mismatched"])
def test_logits_alone_are_compared_when_hidden_states_are_missing_or_differ(side):
    ref = make_trace(3)
    cand = copy_trace(ref)
    cand.talker_logits[1, 0] = 4.0  # a finite logits error at talker step 1
    if side in ("candidate", "both"):
        _without_hidden(cand)
    if side in ("reference", "both"):
        _without_hidden(ref)
    if side == "mismatched":  # a different number of recorded points: not comparable point by point
        cand.talker_hidden = cand.talker_hidden[:, :2]
        cand.pred_hidden = cand.pred_hidden[:, :, :1]
    p = compare.point_frame(cand, ref, 0.01)
    assert (p["point"] == "logits").all() and (p["layer"] == 0).all()
    assert len(p) == 3 + 2 * 15
    assert list(p[p["component"] == "talker"]["step"]) == [0, 1, 2]
    assert list(p[p["over"]]["step"]) == [1] and (p["added"] == p["rel_l2"]).all()


def test_rows_without_logits_on_one_side_are_empty():
    ref = make_trace(3)
    assert compare._rows("talker", ref.talker_hidden, ref.talker_hidden, torch.zeros(0), ref.talker_logits, 0.01).empty
    assert compare._rows("talker", ref.talker_hidden, ref.talker_hidden, ref.talker_logits, torch.zeros(0), 0.01).empty
