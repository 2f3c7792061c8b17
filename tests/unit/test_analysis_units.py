"""The pure parts of the analyse stage (parity/analysis.py) and of the typed records it returns
(parity/results.py), on small synthetic traces and hand-written JSON. No model is loaded.

Covered: where the first NaN/inf of a trace is (execution order, each kind of point, with and
without a predictor), the comparison record built from two traces (the NaN/inf counts on each
side, the truth side), and the records' JSON reading: non-finite numbers, the schema-1 ``"inf"``
sentinel, defaults, unknown keys, and round trips."""

from __future__ import annotations

import math

import numpy as np
import pytest

import torch

from _synthetic import PRED_POINTS, TALKER_POINTS, V, VP, copy_trace, make_trace, truncate
from parity import analysis
from parity.trace import Trace
from parity.results import Agreement, Comparison, Divergence, Flip, LayerError, Point, finite_or_none

BAD = [math.nan, math.inf, -math.inf]


# -- first_nonfinite_point ----------------------------------------------------------------------

def test_a_finite_trace_has_no_nonfinite_point():
    # S talker steps and S - 1 frames: the last talker step has no predictor frame to look at.
    assert analysis.first_nonfinite_point(make_trace(4)) is None


def test_a_trace_without_steps_has_no_nonfinite_point():
    assert analysis.first_nonfinite_point(truncate(make_trace(3), 0)) is None


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("index,layer,name", [(0, -1, "embed"), (1, 0, "layer0"), (TALKER_POINTS - 1, 1, "layer1")])
def test_talker_hidden_point(bad, index, layer, name):
    t = make_trace(3)
    t.talker_hidden[2, index, 1] = bad
    assert analysis.first_nonfinite_point(t) == {"component": "talker", "step": 2, "substep": -1, "layer": layer, "point": name}


def test_talker_logits_point_comes_after_the_last_layer():
    t = make_trace(3)
    t.talker_logits[1, 5] = math.nan
    assert analysis.first_nonfinite_point(t) == {
        "component": "talker", "step": 1, "substep": -1, "layer": TALKER_POINTS - 1, "point": "logits"}


def test_the_first_bad_layer_of_a_step_is_named():
    t = make_trace(3)
    t.talker_hidden[1, 2] = math.inf
    t.talker_hidden[1, 1, 0] = math.nan
    t.talker_logits[1, 0] = math.nan
    assert analysis.first_nonfinite_point(t)["point"] == "layer0"


@pytest.mark.parametrize("index,layer,name", [(0, -1, "embed"), (PRED_POINTS - 1, 0, "layer0"), (PRED_POINTS, 1, "logits")])
def test_predictor_point(index, layer, name):
    t = make_trace(4)
    if index == PRED_POINTS:
        t.pred_logits[1, 4, 2] = math.inf
    else:
        t.pred_hidden[1, 4, index, 3] = math.nan
    assert analysis.first_nonfinite_point(t) == {"component": "predictor", "step": 1, "substep": 4, "layer": layer, "point": name}


def test_one_element_tensors_are_still_searched():
    # the smallest shapes a layout allows: one talker point of width 1, one predictor sub-step
    t = Trace(talker_hidden=torch.ones(1, 1, 1), talker_logits=torch.zeros(1, V), talker_tokens=torch.zeros(1, dtype=torch.long),
              talker_choice=torch.zeros(1, dtype=torch.long), codes=torch.zeros(0, 2, dtype=torch.long),
              pred_hidden=torch.ones(0, 1, 1, 1), pred_logits=torch.zeros(0, 1, VP), pred_choice=torch.zeros(0, 1, dtype=torch.long))
    assert analysis.first_nonfinite_point(t) is None
    t.talker_hidden[0, 0, 0] = math.nan
    assert analysis.first_nonfinite_point(t) == {"component": "talker", "step": 0, "substep": -1, "layer": -1, "point": "embed"}
    t = Trace(talker_hidden=torch.ones(2, 1, 1), talker_logits=torch.zeros(2, V), talker_tokens=torch.zeros(2, dtype=torch.long),
              talker_choice=torch.zeros(2, dtype=torch.long), codes=torch.zeros(1, 2, dtype=torch.long),
              pred_hidden=torch.full((1, 1, 1, 1), math.inf), pred_logits=torch.zeros(1, 1, VP),
              pred_choice=torch.zeros(1, 1, dtype=torch.long))
    assert analysis.first_nonfinite_point(t) == {"component": "predictor", "step": 0, "substep": 0, "layer": -1, "point": "embed"}


def test_execution_order_talker_step_then_its_frame_then_the_next_step():
    t = make_trace(4)
    t.talker_hidden[2, 0, 0] = math.nan
    t.pred_hidden[1, 14, 0, 0] = math.nan
    assert analysis.first_nonfinite_point(t)["component"] == "predictor"  # frame 1 runs before talker step 2
    t.talker_hidden[1, 2, 0] = math.nan
    assert analysis.first_nonfinite_point(t)["component"] == "talker"  # talker step 1 runs before frame 1
    t2 = make_trace(4)
    t2.pred_hidden[0, 9, 0, 0] = math.nan
    t2.pred_hidden[0, 3, 1, 0] = math.nan
    assert analysis.first_nonfinite_point(t2)["substep"] == 3  # the earlier sub-step of one frame


def test_a_trace_without_predictor_frames():
    t = truncate(make_trace(3), 1)  # one talker step, no frame
    assert analysis.first_nonfinite_point(t) is None
    t.talker_hidden[0, 1, 0] = math.nan
    assert analysis.first_nonfinite_point(t) == {"component": "talker", "step": 0, "substep": -1, "layer": 0, "point": "layer0"}


# -- the comparison record of two traces ---------------------------------------------------------

def test_compare_traces_of_identical_sides():
    ref = make_trace(3)
    c = analysis.compare_traces(copy_trace(ref), ref, 0.01)
    assert isinstance(c, Comparison)
    assert c.first_divergence is None and c.first_nonfinite is None and c.first_nonfinite_reference is None
    assert c.nonfinite_points == 0 and c.max_rel_l2 == 0.0 and c.bit_identical and c.free_run is None and c.truth is None


@pytest.mark.parametrize("bad", BAD)
def test_compare_traces_counts_nonfinite_points_apart_from_the_finite_maximum(bad):
    ref = make_trace(3)
    cand = copy_trace(ref)
    cand.talker_hidden[1, 1] = 1.125  # rel L2 0.125 at talker step 1 layer0
    cand.talker_hidden[2, 2, 0] = bad  # one non-finite point
    cand.pred_hidden[0, 3, 0, 0] = bad  # and another
    c = analysis.compare_traces(cand, ref, 0.5)
    assert c.nonfinite_points == 2
    assert c.max_rel_l2 == 0.125
    # predictor frame 0 runs right after talker step 0, before talker step 2
    assert c.first_nonfinite == Point("predictor", 0, 3, -1, "embed")
    assert c.first_divergence.nonfinite and c.first_divergence.rel_l2 is None
    assert c.first_nonfinite_reference is None


def test_compare_traces_names_the_reference_sides_first_nonfinite():
    ref = make_trace(3)
    cand = copy_trace(ref)
    ref.pred_hidden[1, 2, 0, 0] = math.nan
    c = analysis.compare_traces(cand, ref, 0.5)
    assert c.first_nonfinite_reference == Point("predictor", 1, 2, -1, "embed")
    assert c.first_nonfinite is None  # the candidate itself is finite
    assert c.nonfinite_points == 1


def test_comparison_with_a_truth_side():
    ref = make_trace(3)
    cand, truth = copy_trace(ref), copy_trace(ref)
    cand.talker_hidden[1, 1] = 1.5
    points, c = analysis.comparison(analysis.PromptTraces(ref, cand, None, truth), 0.01)
    assert c.first_divergence == Divergence("talker", 1, -1, 0, "layer0", 0.5, 0.5, 1.0, c.first_divergence.sqnr_db, 0.01)
    assert c.points_over == 1 and c.max_rel_l2 == 0.5
    assert c.truth["verdict"] == "worse" and c.truth["worse_points"] == 1
    assert c.truth["first_worse"]["point"] == "layer0" and c.truth["points"] == len(points) == c.points_compared
    _, without = analysis.comparison(analysis.PromptTraces(ref, cand, None), 0.01)
    assert without.truth is None


@pytest.mark.parametrize("steps", [0, 1])
def test_compare_traces_of_short_traces(steps):
    ref = truncate(make_trace(3), steps)
    c = analysis.compare_traces(copy_trace(ref), ref, 0.01)
    assert c.nonfinite_points == 0 and c.points_compared == steps * TALKER_POINTS + steps  # hidden points + logits


def test_comparison_with_a_free_run():
    ref = make_trace(4)
    free = truncate(ref, 3)
    _, c = analysis.comparison(analysis.PromptTraces(ref, copy_trace(ref), free), 0.01)
    assert c.free_run == Agreement(1.0, 1.0, None, 2) and c.length_diff == -1


# -- records read from JSON ---------------------------------------------------------------------

@pytest.mark.parametrize("value,expected", [
    (None, None), ("inf", None), (True, None), (False, None), (math.nan, None), (math.inf, None), (-math.inf, None),
    (1, 1.0), (0, 0.0), (-2.5, -2.5), (np.float32(0.5), 0.5), (np.int64(3), 3.0),
])
def test_finite_or_none(value, expected):
    got = finite_or_none(value)
    assert got == expected and (got is None or type(got) is float)


def test_point_where_and_defaults():
    assert Point("talker", 3, -1, 7, "layer7").where() == "talker step 3 layer7"
    assert Point("predictor", 2, 4, -1, "embed").where() == "predictor frame 2 sub-step 4 embed"
    assert Point.from_json({"component": "talker", "step": "1", "substep": -1}) == Point("talker", 1, -1, -1, "")


def test_divergence_round_trip():
    d = Divergence("predictor", 2, 4, 0, "layer0", 0.25, 0.5, 0.75, 12.0, 0.01, False)
    assert Divergence.from_json(d.to_json()) == d
    assert d.to_json()["nonfinite"] is False and d.to_json()["tolerance"] == 0.01


@pytest.mark.parametrize("rel,extra,nonfinite", [
    ("inf", {}, True),  # schema 1
    (None, {}, True),  # no number and no flag: it was unbounded
    (0.25, {}, False),
    (None, {"nonfinite": False}, False),  # the flag, when written, wins
    (0.25, {"nonfinite": True}, True),
])
def test_divergence_nonfinite_flag(rel, extra, nonfinite):
    d = Divergence.from_json({"component": "talker", "step": 0, "substep": -1, "rel_l2": rel, **extra})
    assert d.nonfinite is nonfinite
    assert d.rel_l2 == (rel if isinstance(rel, float) else None)
    assert d.tolerance == 0.0 and d.max_abs is None and d.cosine is None and d.sqnr_db is None


def test_divergence_nonfinite_metrics_become_none():
    d = Divergence.from_json({"component": "talker", "step": 0, "substep": -1, "rel_l2": 0.5, "max_abs": math.inf,
                              "cosine": math.nan, "sqnr_db": -math.inf, "tolerance": 0.125})
    assert (d.rel_l2, d.max_abs, d.cosine, d.sqnr_db, d.tolerance) == (0.5, None, None, None, 0.125)


def full_comparison() -> Comparison:
    return Comparison(
        first_divergence=Divergence("talker", 1, -1, 0, "layer0", 0.5, 0.5, 0.9, 6.0, 0.01, False),
        first_nonfinite=Point("talker", 2, -1, 1, "layer1"), max_rel_l2=0.5, nonfinite_points=3,
        points_compared=20, points_over=4, bit_identical=False,
        added_per_layer=[LayerError.from_json({"component": "talker", "layer": 0, "mean_added_rel_l2": 0.25})],
        first_flip=Flip("predictor", 1, 3, 2, 5, 1, 0.5, 2.0, 0.75, 0.25, False), ref_frames=5,
        hints=[{"text": "a hint", "signature": "s"}],
        free_run=Agreement(0.75, 1.0, 3, 4), length_diff=1, length_diff_is_bookkeeping=True,
        truth={"worse": False}, first_nonfinite_reference=Point("predictor", 0, 2, -1, "embed"),
        nonfinite_audio={"candidate": {"sample": 3, "seconds": 0.25, "count": 1}, "reference": None},
        extra={"newer_key": [1, 2]},
    )


def test_comparison_round_trip_keeps_unknown_keys():
    c = full_comparison()
    j = c.to_json()
    assert j["newer_key"] == [1, 2] and j["nonfinite_points"] == 3 and j["free_run"]["agreement"] == 0.75
    assert j["first_flip"]["cand_token"] == 5
    assert Comparison.from_json(j) == c


def test_a_key_named_extra_is_kept_like_any_unknown_key():
    assert Comparison.from_json({"extra": {"x": 1}}).to_json()["extra"] == {"x": 1}


def test_comparison_json_without_optional_parts():
    c = Comparison.from_json({})
    assert c == Comparison(None, None, None, 0, 0, 0, False, [], None, 0, [])
    j = c.to_json()
    assert "free_run" not in j and "length_diff" not in j and "truth" not in j
    assert j["first_nonfinite_reference"] is None and j["nonfinite_audio"] == {}


@pytest.mark.parametrize("max_rel,given,count", [("inf", None, 1), (0.5, None, 0), (None, None, 0), ("inf", 4, 4), (0.5, 2, 2)])
def test_comparison_nonfinite_points_from_schema_1(max_rel, given, count):
    d = {"max_rel_l2": max_rel} if given is None else {"max_rel_l2": max_rel, "nonfinite_points": given}
    c = Comparison.from_json(d)
    assert c.nonfinite_points == count and c.max_rel_l2 == (max_rel if isinstance(max_rel, float) else None)


def test_agreement_json_defaults():
    assert Agreement.from_json({}) == Agreement(None, None, None, 0)
    assert Agreement.from_json({"agreement": math.nan, "codebook0_agreement": 0.5, "first_diff_frame": 2,
                                "frames_compared": 6}) == Agreement(None, 0.5, 2, 6)


def test_an_empty_trace_file_is_one_bad_input_line(tmp_path):
    """Found by the read-back property test: an empty .safetensors made `parity compare` raise
    safetensors' own error (a traceback) instead of BadInput."""
    import json

    import pytest

    from parity import analysis
    from parity.errors import BadInput

    (tmp_path / "points").mkdir()
    (tmp_path / "traces").mkdir()
    (tmp_path / "points" / "p.measured.json").write_text(json.dumps(
        {"version": 1, "prompt": {"id": "p"}, "timing": {}, "mos": None, "audio": {}, "nonfinite_audio": {}}))
    (tmp_path / "traces" / "p.reference.safetensors").write_bytes(b"")
    (tmp_path / "traces" / "p.reference.json").write_text("{}")
    with pytest.raises(BadInput, match=r"p\.reference\.json' is unreadable \(SafetensorError\)"):
        analysis.load_prompt(tmp_path, "p")
