"""Divergence-source variants: spec syntax, registry errors, undo, and each variant's signature
on the tiny model (bf16 unless said otherwise; a few teacher-forced frames)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from parity import compare
from parity.engines.reference import ReferenceEngine
from parity.errors import BadInput
from parity.recipe import Decoding, Side
from parity.variants import VARIANTS, apply_variants, engine_settings, parse
from parity.variants.kv_quant import fake_quantize

FRAMES = 3
TOL = 1e-2  # the bf16 tolerance


@pytest.fixture(scope="module")
def bf16(tiny_dir, prompt):
    """A bf16 reference engine and its own trace: every variant is compared against it."""
    engine = ReferenceEngine(Side(dtype="bfloat16"), tiny_dir)
    engine.load()
    ref = engine.run(prompt, Decoding(max_frames=FRAMES))
    yield engine, ref
    engine.close()


def run_with(engine, ref, prompt, *variants: str, tol: float = TOL, **side_changes):
    """Reconfigure the loaded engine with ``variants``, run teacher-forced, compare, restore."""
    base = engine.side
    engine.reconfigure(dataclasses.replace(base, variants=tuple(variants), **side_changes))
    try:
        cand = engine.run(prompt, Decoding(max_frames=FRAMES), force=ref)
        notes = {k: dict(v) for k, v in engine.applied.notes.items()}
    finally:
        engine.reconfigure(base)
    points = compare.point_frame(cand, ref, tol)
    return points, compare.summarize(points, cand, ref, None, tol), notes


def first_difference(points):
    """(component, step, substep, point) of the first point that differs at all, in execution order."""
    differs = points[points["max_abs"] > 0]
    if not len(differs):
        return None
    row = differs.iloc[0]
    return row["component"], int(row["step"]), int(row["substep"]), row["point"]


# -- syntax and registry ------------------------------------------------------------------

def test_spec_syntax_round_trips():
    assert str(parse("rmsnorm_lowp@talker:0-4")) == "rmsnorm_lowp@talker:0-4"
    assert parse("rmsnorm_lowp@talker:0-4").scope.layers == (0, 5)  # inclusive in text, half-open inside
    assert str(parse("kv_quant")) == "kv_quant=fp8"  # default argument filled in
    assert str(parse("mask_row=2@predictor:1")) == "mask_row=2@predictor:1"
    assert parse("compile=no_epilogue+emulate").arg == "no_epilogue+emulate"


@pytest.mark.parametrize("text,message", [
    ("nope", "unknown variant 'nope'; available: compile, cuda_graphs,"),
    ("kv_quant=fp4", "not one of fp8, int8"),
    ("rmsnorm_lowp@decoder", "component 'decoder'"),
    ("rmsnorm_lowp@talker:3-1", "is empty"),
    ("mask_row@talker", "needs a component and one layer"),
    ("mask_row=0@talker:1", "S >= 1"),
    ("fused_qkv=1", "takes no argument"),
    ("compile=fast", "compile option 'fast'"),
    ("Rmsnorm lowp", "is not NAME[=ARG]"),
])
def test_bad_specs_are_one_line_errors(text, message):
    with pytest.raises(BadInput, match=message.replace("[", r"\[").replace("(", r"\(")):
        parse(text, "reference")


def test_cuda_graphs_is_a_faster_engine_setting():
    with pytest.raises(BadInput, match="faster engine only"):
        parse("cuda_graphs=off", "reference")
    assert engine_settings(["cuda_graphs=off"]) == {"cuda_graphs": False}


def test_layer_range_checked_against_the_model(bf16):
    engine, _ = bf16
    with pytest.raises(BadInput, match="talker has 2 layers"):
        apply_variants(engine.talker, ["rmsnorm_lowp@talker:1-2"])


def test_every_variant_undoes_to_bit_identity(bf16, prompt):
    """Apply every (reference-capable) variant at once, undo, and the run is bit-identical again."""
    engine, ref = bf16
    specs = [f"{name}@talker:1" if v.needs_layer else name for name, v in VARIANTS.items()
             if "reference" in v.engines and name != "compile"]
    applied = apply_variants(engine.talker, specs)
    assert len(applied.specs) == len(specs)
    applied.undo()
    again = engine.run(prompt, Decoding(max_frames=FRAMES), force=ref)
    assert compare.summarize(compare.point_frame(again, ref, TOL), again, ref, None, TOL)["bit_identical"]


def test_attention_switch_on_a_loaded_model_equals_loading_it(tiny_dir, prompt, bf16):
    """reconfigure(attention=eager) must give exactly what a model loaded eager gives (the
    bisect relies on it to avoid reloading)."""
    engine, ref = bf16
    eager = ReferenceEngine(Side(dtype="bfloat16", attention="eager"), tiny_dir)
    eager.load()
    try:
        loaded = eager.run(prompt, Decoding(max_frames=FRAMES), force=ref)
    finally:
        eager.close()
    engine.reconfigure(dataclasses.replace(engine.side, attention="eager"))
    try:
        switched = engine.run(prompt, Decoding(max_frames=FRAMES), force=ref)
    finally:
        engine.reconfigure(dataclasses.replace(engine.side, attention="sdpa"))
    assert torch.equal(loaded.talker_hidden, switched.talker_hidden)
    assert torch.equal(loaded.pred_hidden, switched.pred_hidden)
    assert not torch.equal(switched.talker_hidden, ref.talker_hidden)  # eager really differs from sdpa in bf16


# -- signatures ---------------------------------------------------------------------------

def test_rmsnorm_lowp_error_enters_at_the_first_norm_of_the_chosen_component(bf16, prompt):
    engine, ref = bf16
    # Hints are read from points over tolerance: judge at 1e-4 so this bf16 error counts.
    points, summary, _ = run_with(engine, ref, prompt, "rmsnorm_lowp@talker", tol=1e-4)
    assert first_difference(points) == ("talker", 0, -1, "layer0")  # embed identical, layer 0 differs
    assert summary["max_rel_l2"] > 1e-3
    first = summary["hints"][0]
    assert first["class"] == "enters_at_layer" and first["evidence"]["layer"] == 0 and first["evidence"]["phase"] == "prefill"
    assert all(h["label"] == "hint" and h["text"] and h["evidence"] for h in summary["hints"])

    points, summary, _ = run_with(engine, ref, prompt, "rmsnorm_lowp@predictor", tol=1e-4)
    assert (points[points["component"] == "talker"]["max_abs"] == 0).all()
    assert first_difference(points) == ("predictor", 0, 0, "layer0")
    assert summary["hints"][0]["class"] == "predictor_only"

    points, summary, _ = run_with(engine, ref, prompt, "rmsnorm_lowp@talker:1", tol=1e-4)
    assert first_difference(points) == ("talker", 0, -1, "layer1")
    assert summary["hints"][0]["class"] == "enters_at_layer" and summary["hints"][0]["evidence"]["layer"] == 1

    # At the bf16 tolerance the same error is within it: no hint is shown.
    _, summary, _ = run_with(engine, ref, prompt, "rmsnorm_lowp@talker:1")
    assert summary["first_divergence"] is None and summary["hints"] == []


def test_rmsnorm_lowp_is_a_no_op_in_fp32(tiny_dir, prompt):
    engine = ReferenceEngine(Side(dtype="float32"), tiny_dir)
    engine.load()
    try:
        ref = engine.run(prompt, Decoding(max_frames=2))
        points, summary, _ = run_with(engine, ref, prompt, "rmsnorm_lowp", "rope_lowp")
    finally:
        engine.close()
    assert summary["bit_identical"]


@pytest.mark.parametrize("variant", ["fused_qkv", "fused_gate_up"])
def test_fused_projections_stay_within_bf16_noise(bf16, prompt, variant):
    engine, ref = bf16
    points, summary, _ = run_with(engine, ref, prompt, variant)
    assert summary["max_rel_l2"] <= TOL / 4  # measured on CPU: bit-identical (0.0)
    assert summary["first_divergence"] is None


def test_fused_qkv_really_packs_the_weights(bf16, prompt):
    """The packed projection must be used: corrupting the packed weight must show up."""
    engine, ref = bf16
    applied = apply_variants(engine.talker, ["fused_qkv@talker:0"])
    try:
        packed = engine.talker.model.layers[0].self_attn.q_proj.forward.__defaults__[1]
        packed.weight.mul_(1.01)
        cand = engine.run(prompt, Decoding(max_frames=1), force=ref)
    finally:
        applied.undo()
    points = compare.point_frame(cand, ref, TOL)
    assert first_difference(points) == ("talker", 0, -1, "layer0")


def test_rope_lowp_error_starts_in_the_prefill(bf16, prompt):
    engine, ref = bf16
    points, summary, _ = run_with(engine, ref, prompt, "rope_lowp@talker")
    assert first_difference(points) == ("talker", 0, -1, "layer0")
    assert 1e-4 < summary["max_rel_l2"] < 0.1
    # Layer-restricted: layer 0 untouched.
    points, _, _ = run_with(engine, ref, prompt, "rope_lowp@talker:1")
    assert first_difference(points) == ("talker", 0, -1, "layer1")


def test_fake_quantize_per_head_scales():
    x = torch.randn(1, 2, 5, 16)
    x[:, 1] *= 1000  # a head with a much larger range must not starve the other's resolution
    for kind, lo, hi in (("fp8", 25, 40), ("int8", 35, 50)):
        q = fake_quantize(x, kind)
        for h in range(2):
            s = x[:, h].pow(2).sum() / (x[:, h] - q[:, h]).pow(2).sum()
            assert lo < 10 * math.log10(float(s)) < hi, (kind, h)


def test_kv_fp8_measured_sqnr_in_a_sane_range(bf16, prompt):
    engine, ref = bf16
    points, summary, notes = run_with(engine, ref, prompt, "kv_quant=fp8")
    note = notes["kv_quant=fp8"]
    # e4m3 keeps 3 mantissa bits: about 31 dB on Gaussian-like data (measured 32.4 dB).
    assert 25 < note["k_sqnr_db"] < 40 and 25 < note["v_sqnr_db"] < 40
    assert first_difference(points) == ("talker", 0, -1, "layer0")
    hidden = points[points["point"] != "logits"]
    assert hidden["sqnr_db"].min() > 10  # the ">10 dB vs bf16" claim of the FlexAttention PR
    _, _, notes8 = run_with(engine, ref, prompt, "kv_quant=int8")
    assert notes8["kv_quant=int8"]["k_sqnr_db"] > note["k_sqnr_db"] + 6  # int8 keeps more bits


@pytest.mark.parametrize("spec,where", [
    ("mask_row=2@talker:1", ("talker", 2, -1, 1)),
    ("mask_row=3@predictor:0", ("predictor", 0, 3, 0)),
])
def test_mask_row_makes_nan_and_the_detector_finds_its_first_appearance(bf16, prompt, spec, where):
    engine, ref = bf16
    points, summary, notes = run_with(engine, ref, prompt, spec)
    bad = summary["first_nonfinite"]
    assert (bad["component"], bad["step"], bad["substep"], bad["layer"]) == where
    first = summary["first_divergence"]
    assert (first["component"], first["step"], first["substep"], first["layer"]) == where  # nothing drifted before
    assert notes[spec]["masked_calls"] >= 1
    assert summary["hints"][0]["class"] == "nan_masked_row"
    assert "nan_overflow" not in [h["class"] for h in summary["hints"]]


def test_sdpa_backend_math_vs_flash_on_cpu(bf16, prompt):
    """On CPU torch picks its flash kernel for sdpa; forcing it is bit-identical, forcing math
    is a different reduction within bf16 noise."""
    engine, ref = bf16
    _, flash, _ = run_with(engine, ref, prompt, "sdpa_backend=flash")
    _, math_, _ = run_with(engine, ref, prompt, "sdpa_backend=math")
    assert flash["bit_identical"]
    assert 0 < math_["max_rel_l2"] < TOL


@pytest.mark.slow
def test_compile_one_layer_in_fp32_stays_within_fp32_tolerance(tiny_dir, prompt):
    """inductor on CPU (C++ codegen): one compiled talker layer, one frame. Slow (~1 min)."""
    from torch._dynamo.utils import counters

    engine = ReferenceEngine(Side(dtype="float32"), tiny_dir)
    engine.load()
    try:
        ref = engine.run(prompt, Decoding(max_frames=1))
        counters.clear()
        points, summary, _ = run_with(engine, ref, prompt, "compile=no_epilogue@talker:0")
    finally:
        engine.close()
    assert counters["stats"]["unique_graphs"] >= 1  # inductor really compiled something
    assert summary["max_rel_l2"] < 1e-5
