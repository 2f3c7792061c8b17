"""Comparison: metrics, localisation of a planted perturbation, identical sides, flips."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from parity import compare
from parity.engines.reference import ReferenceEngine
from parity.recipe import Decoding, Side


@pytest.fixture(scope="module")
def fp32_pair(tiny_dir, prompt):
    engine = ReferenceEngine(Side(dtype="float32", attention="sdpa"), tiny_dir)
    engine.load()
    ref = engine.run(prompt, Decoding(max_frames=8))
    return engine, ref


def test_identical_sides_are_bit_identical(fp32_pair, prompt):
    engine, ref = fp32_pair
    again = engine.run(prompt, Decoding(max_frames=8), force=ref)
    points = compare.point_frame(again, ref, tol=1e-5)
    summary = compare.summarize(points, again, ref, None, 1e-5)
    assert summary["bit_identical"]
    assert summary["points_over"] == 0 and summary["first_divergence"] is None
    assert summary["first_flip"] is None
    assert (points["sqnr_db"] == math.inf).all()


@pytest.mark.parametrize("component,step,sub,layer", [("talker", 3, -1, 1), ("predictor", 2, 5, 0)])
def test_localises_a_planted_perturbation(fp32_pair, prompt, component, step, sub, layer):
    engine, ref = fp32_pair
    stack = engine.talker.model.layers if component == "talker" else engine.talker.code_predictor.model.layers
    generator = torch.Generator().manual_seed(0)

    def perturb(module, args, output):
        ctx = engine.recorder.context
        if ctx != (component, step, sub):
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        noise = torch.randn(hidden.shape, generator=generator).to(hidden)
        noise = noise * (1e-2 * hidden.norm() / noise.norm())
        hidden = hidden + noise
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

    handle = stack[layer].register_forward_hook(perturb)
    try:
        cand = engine.run(prompt, Decoding(max_frames=8), force=ref)
    finally:
        handle.remove()
    points = compare.point_frame(cand, ref, tol=1e-5)
    first = compare.summarize(points, cand, ref, None, 1e-5)["first_divergence"]
    assert (first["component"], first["step"], first["substep"], first["layer"]) == (component, step, sub, layer)
    assert first["rel_l2"] == pytest.approx(1e-2, rel=0.2)
    # Nothing before it differs at all.
    before = points.iloc[: points.index[points["over"]][0]]
    assert (before["max_abs"] == 0).all()


def test_metrics_on_known_vectors():
    ref = torch.tensor([[3.0, 4.0]])
    cand = torch.tensor([[3.0, 4.5]])
    m = compare._metrics(cand, ref)
    assert m["rel_l2"].item() == pytest.approx(0.1)
    assert m["max_abs"].item() == pytest.approx(0.5)
    assert m["sqnr_db"].item() == pytest.approx(20.0)
    nan = compare._metrics(torch.tensor([[float("nan"), 1.0]]), ref)
    assert nan["rel_l2"].item() == math.inf and not nan["finite"].item()
    # A NaN in the reference is a divergence too (not a NaN error a tolerance check would skip).
    ref_nan = compare._metrics(cand, torch.tensor([[float("inf"), 4.0]]))
    assert ref_nan["rel_l2"].item() == math.inf and ref_nan["finite"].item()


def test_token_agreement_and_first_difference():
    ref = torch.zeros(5, 16, dtype=torch.long)
    cand = ref.clone()
    cand[3, 7] = 1
    stats = compare.token_agreement(cand[:4], ref)
    assert stats["first_diff_frame"] == 3
    assert stats["frames_compared"] == 4
    assert stats["agreement"] == pytest.approx(1 - 1 / 64)


def test_first_flip_reports_rank_and_margin(fp32_pair, prompt):
    engine, ref = fp32_pair
    cand = engine.run(prompt, Decoding(max_frames=8), force=ref)
    # Plant a flip: the candidate's logits favour another token at talker step 2 by 0.5.
    cand.talker_logits = cand.talker_logits.clone()
    ref_tok = int(ref.talker_tokens[2])
    other = (ref_tok + 1) % 200
    cand.talker_logits[2, other] = cand.talker_logits[2, ref_tok] + 0.5
    cand.talker_choice = cand.talker_choice.clone()
    cand.talker_choice[2] = other
    flip = compare.first_flip(cand, ref)
    assert (flip.component, flip.step, flip.ref_token, flip.cand_token) == ("talker", 2, ref_tok, other)
    assert flip.ref_rank_in_cand == 1
    assert flip.cand_margin == pytest.approx(0.5, abs=1e-5)
    # One logit moved far beyond the noise of the rest: a real flip, not a near tie.
    assert flip.logit_noise < flip.ref_margin / 3 and not flip.near_tie

    # Now make the reference itself nearly tied between the two tokens: the same flip is a near tie.
    ref_tied = copy.copy(ref)
    ref_tied.talker_logits = ref.talker_logits.clone()
    ref_tied.talker_logits[2, other] = ref.talker_logits[2, ref_tok] - 1e-6
    cand.talker_logits[2] = ref_tied.talker_logits[2] + 1e-3 * torch.randn(cand.talker_logits.shape[1])
    cand.talker_logits[2, other] = ref_tied.talker_logits[2, ref_tok] + 1e-4
    flip = compare.first_flip(cand, ref_tied)
    assert flip.step == 2 and flip.near_tie
