"""The sub-layer split and the replay verdict on synthetic traces (pure functions, no model).

Reference values are all 1.0, so a candidate slice of ``1 + e`` has a relative L2 of exactly |e|."""

from __future__ import annotations

import torch

from parity import compare, replay, sublayers
from parity.probes import SUBLAYER_POINTS

from _synthetic import copy_trace, make_trace

WIDTHS = [4, 4, 2, 2, 4, 4, 4, 4]  # input_norm q k v attn o_proj post_norm mlp
TOL = 1e-3
E = 2.0**-6  # 0.0156: over tolerance


def _with_sub(trace):
    steps, frames = trace.n_steps, trace.n_frames
    trace.talker_sub = torch.ones(steps, 2, sum(WIDTHS))
    trace.pred_sub = torch.ones(frames, 15, 1, sum(WIDTHS))
    trace.meta["sublayers"] = {"points": list(SUBLAYER_POINTS), "widths": {"talker": WIDTHS, "predictor": WIDTHS}}
    return trace


def _slice(op: str) -> slice:
    i = SUBLAYER_POINTS.index(op)
    return slice(sum(WIDTHS[:i]), sum(WIDTHS[: i + 1]))


def _pair(errors: dict[str, float], step: int = 1, layer: int = 1, input_err: float = 0.0, output_err: float = E):
    """Reference and candidate with ``errors`` planted in talker ``layer``'s ops at ``step``."""
    ref = _with_sub(make_trace(3))
    cand = _with_sub(copy_trace(ref))
    cand.talker_sub, cand.pred_sub = ref.talker_sub.clone(), ref.pred_sub.clone()
    for op, e in errors.items():
        cand.talker_sub[step, layer, _slice(op)] = 1 + e
    cand.talker_hidden[step, layer] = 1 + input_err  # the layer's input (embed or the previous layer)
    cand.talker_hidden[step, layer + 1] = 1 + output_err
    return ref, cand


def _split(ref, cand):
    return sublayers.split(compare.point_frame(cand, ref, TOL), cand, ref, TOL)


DOWNSTREAM = {"attn": E, "o_proj": E, "post_norm": E / 2, "mlp": E / 2}


def test_attention_only_is_named_with_bit_identical_qkv():
    ref, cand = _pair(DOWNSTREAM)
    s = _split(ref, cand)
    assert (s["component"], s["step"], s["layer"], s["op"]) == ("talker", 1, 1, "attn")
    assert s["text"].startswith("talker step 1 layer 1: attention output (before o_proj) 0.016, q/k/v bit-identical: "
                                "the attention kernel or its mask")
    assert s["cache"] == {"k_rel_l2": 0.0, "v_rel_l2": 0.0, "positions": 1}
    assert "the cached k/v of 1 earlier positions are within 0" in s["text"]
    assert [o["op"] for o in s["ops"] if o.get("adds")] == ["attn"]


def test_attention_reading_a_differing_cache_says_so():
    ref, cand = _pair(DOWNSTREAM)
    cand.talker_sub[0, 1, _slice("k")] = 1 + E  # step 0's key at this layer, cached for step 1
    s = _split(ref, cand)
    assert s["op"] == "attn" and "or the cached keys/values of earlier positions: k up to 0.016, v up to 0" in s["text"]


def test_q_and_k_without_v_point_at_norm_or_rope():
    ref, cand = _pair({"q": E, "k": E, **DOWNSTREAM})
    s = _split(ref, cand)
    assert s["op"] == "q"
    assert "q 0.016, k 0.016, input_norm bit-identical; v bit-identical: the q_norm/k_norm or RoPE" in s["text"]


def test_v_alone_is_the_v_projection_and_all_three_the_projections():
    s = _split(*_pair({"v": E, **DOWNSTREAM}))
    assert s["op"] == "v" and s["cause"] == "the v projection"
    s = _split(*_pair({"q": E, "k": E, "v": E, **DOWNSTREAM}))
    assert s["cause"] == "the q/k/v projections"


def test_mlp_and_residual_sources():
    s = _split(*_pair({"mlp": E}))
    assert s["op"] == "mlp" and s["text"].endswith("post_norm bit-identical: the MLP (gate/up/down projections or the activation)")
    s = _split(*_pair({}))  # every op identical, the layer output not: the residual add after the MLP
    assert s["op"] == "output" and "layer input 0, o_proj bit-identical, mlp bit-identical" not in s["text"]
    assert s["cause"] == "the residual add after the MLP"


def test_a_tiny_upstream_error_is_not_named_over_the_material_one():
    # input_norm off by 2^-20 (>= 4x its bit-identical input, but under 10% of the output's error).
    ref, cand = _pair({"input_norm": 2.0**-20, "q": 2.0**-20, "k": 2.0**-20, "v": 2.0**-20, **DOWNSTREAM})
    assert _split(ref, cand)["op"] == "attn"


def test_input_already_differing_and_gradual_growth():
    ops = {op: E for op in SUBLAYER_POINTS}
    s = _split(*_pair(ops, layer=0, input_err=E))  # layer 0's input is the embedding
    assert s["op"] is None and "its input already differs (layer input 0.016 -> output 0.016)" in s["text"]
    growth = {op: E * 1.5 ** (i - 8) for i, op in enumerate(SUBLAYER_POINTS)}  # never 4x a step
    s = _split(*_pair(growth, layer=0, input_err=E * 1.5**-9, output_err=E))
    assert s["op"] is None and "no single op adds the error; it grows through the layer" in s["text"]


def test_no_split_without_sublayers_or_divergence():
    ref, cand = _pair(DOWNSTREAM)
    del cand.meta["sublayers"]
    assert _split(ref, cand) is None
    ref, cand = _pair({}, output_err=0.0)
    assert _split(ref, cand) is None


def _measured(iso, control, observed, inp=0.0, back=None):
    m = {"at": {"component": "predictor", "step": 2, "substep": 3, "layer": 0},
         "input": {"rel_l2": inp, "max_abs": inp, "nonfinite": False},
         "output": {"rel_l2": observed, "max_abs": observed, "nonfinite": False},
         "candidate_on_reference_input": {"rel_l2": iso, "max_abs": iso, "nonfinite": False},
         "control": {"rel_l2": control, "max_abs": control, "nonfinite": False}}
    if back is not None:
        m["reference_on_candidate_input"] = {"rel_l2": back, "max_abs": back, "nonfinite": False}
    return m


def test_replay_verdicts():
    assert replay.verdict(None, TOL) is None
    v = replay.verdict(_measured(0.004, 0.0, 0.005, back=0.004), TOL)
    assert v["verdict"] == "layer" and v["added_in_isolation"] == 0.004
    assert v["text"] == ("predictor frame 2 sub-step 3 layer 0 computes differently: fed the reference's input, the "
                         "candidate's layer is still 0.004 from the reference's output (observed 0.005, input 0); "
                         "the reference's layer on the candidate's input: 0.004")
    v = replay.verdict(_measured(0.0, 0.0, 0.005, inp=0.006), TOL)
    assert v["verdict"] == "input" and "its input already differed" in v["text"]
    assert replay.verdict(_measured(0.0005, 0.0, 0.0008), TOL)["verdict"] == "within"
    assert replay.verdict(_measured(0.004, 0.002, 0.005), TOL)["verdict"] == "unreliable"
    assert replay.verdict(_measured(None, 0.0, 0.005), TOL)["verdict"] == "layer"  # NaN/inf in isolation


def test_truncated_force_keeps_what_reaching_the_point_needs():
    t = make_trace(5)
    cut = replay.truncated(t, {"component": "talker", "step": 1, "substep": -1, "layer": 0})
    assert (cut.n_frames, cut.n_steps, cut.meta["hit_max_frames"]) == (2, 3, True)
    assert torch.equal(cut.codes, t.codes[:2])
    assert replay.truncated(t, {"component": "predictor", "step": 9, "substep": 0, "layer": 0}).n_frames == t.n_frames


def test_predictor_split_reads_the_cache_of_earlier_substeps():
    ref = _with_sub(make_trace(3))
    cand = _with_sub(copy_trace(ref))
    cand.talker_sub, cand.pred_sub = ref.talker_sub.clone(), ref.pred_sub.clone()
    for op, e in DOWNSTREAM.items():
        cand.pred_sub[1, 4, 0, _slice(op)] = 1 + e
    cand.pred_sub[1, 2, 0, _slice("v")] = 1 + E  # sub-step 2's value, cached for sub-step 4
    cand.pred_sub[1, 2, 0, _slice("attn")] = 1 + E / 8  # under tolerance's 4x: sub-step 2 itself stays quiet
    cand.pred_hidden[1, 4, 1] = 1 + E
    s = _split(ref, cand)
    assert (s["component"], s["step"], s["substep"], s["layer"], s["op"]) == ("predictor", 1, 4, 0, "attn")
    assert s["cache"] == {"k_rel_l2": 0.0, "v_rel_l2": E, "positions": 4}
    assert s["text"].startswith("predictor frame 1 sub-step 4 layer 0: attention output (before o_proj) 0.016")
    assert "or the cached keys/values of earlier positions: k up to 0, v up to 0.016" in s["text"]



def test_replay_needs_qwen_tts_layers():
    class Own:  # an engine of its own kind: no qwen_tts talker to hook
        pass

    assert not replay.supported(Own())
