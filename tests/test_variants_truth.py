"""A third side as truth (recipe [truth]): "different" told apart from "worse", in the manner of
torch._dynamo.utils.same, on the tiny model; and through parity run."""

from __future__ import annotations

import dataclasses
import json

import pytest

from parity import compare
from parity.engines.reference import ReferenceEngine
from parity.recipe import Decoding, Gates, Recipe, Side, from_dict

FRAMES = 2


@pytest.fixture(scope="module")
def sides(tiny_dir, prompt):
    """truth: fp32; reference: bf16 forced on the truth's codes; a bf16 engine for candidates."""
    fp32 = ReferenceEngine(Side(dtype="float32"), tiny_dir)
    fp32.load()
    truth = fp32.run(prompt, Decoding(max_frames=FRAMES))
    fp32.close()
    engine = ReferenceEngine(Side(dtype="bfloat16"), tiny_dir)
    engine.load()
    ref = engine.run(prompt, Decoding(max_frames=FRAMES), force=truth)
    yield engine, ref, truth
    engine.close()


def judged(sides, prompt, *variants):
    engine, ref, truth = sides
    base = engine.side
    engine.reconfigure(dataclasses.replace(base, variants=variants))
    try:
        cand = engine.run(prompt, Decoding(max_frames=FRAMES), force=truth)
    finally:
        engine.reconfigure(base)
    return compare.compare_truth(cand, ref, truth, 1e-2)


def test_same_settings_are_the_same_distance(sides, prompt):
    result = judged(sides, prompt)
    assert result["verdict"] == "same distance" and result["worse_points"] == 0
    assert result["multiplier"] == 3.0  # bf16 result: same()'s allowance


def test_another_kernel_is_different_not_worse(sides, prompt):
    result = judged(sides, prompt, "sdpa_backend=math")
    assert result["verdict"] == "different, not worse"
    assert result["cand_err_max"] != result["ref_err_max"]


def test_fp8_kv_cache_is_worse(sides, prompt):
    result = judged(sides, prompt, "kv_quant=fp8")
    assert result["verdict"] == "worse"
    first = result["first_worse"]
    assert (first["component"], first["step"], first["layer"]) == ("talker", 0, 0)
    assert first["cand_err"] > 3 * first["ref_err"]


def test_truth_section_in_a_recipe():
    recipe = from_dict({"truth": {"dtype": "float32", "tf32": False}}, "r.toml")
    assert recipe.truth == Side(dtype="float32", tf32=False)
    assert from_dict({}, "r.toml").truth is None


def test_parity_run_with_variants_and_a_truth_side(tiny_dir, tmp_path):
    """The run pipeline applies the candidate's variants and judges both sides against the truth."""
    from parity.run import Run

    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello world, this is a test.\n")
    recipe = Recipe(
        reference=Side(dtype="bfloat16"), candidate=Side(dtype="bfloat16", variants=("kv_quant=fp8",)),
        truth=Side(dtype="float32"), decoding=Decoding(max_frames=FRAMES),
        gates=Gates(hidden_within_tolerance=False, no_nonfinite=True),
    )
    summary = Run(prompts, recipe, tmp_path / "out").execute()
    comparison = summary.prompts[0].comparison
    assert comparison.truth["verdict"] == "worse"
    assert comparison.first_divergence is not None  # the fp8 cache was really applied
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["sides"]["candidate"]["variants"] == ["kv_quant=fp8"]
