"""parity bisect: the search on a fake oracle (run counts, interactions, proof, layer bisect),
then for real on the tiny model (a planted culprit among harmless decoys) and through the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from parity.bisect import Outcome, Runner, Search, bisect, exit_code, find_factors
from parity.results import Divergence
from parity.errors import BadInput
from parity.recipe import Decoding, Recipe, Side
from parity.variants import parse

REPO = Path(__file__).resolve().parents[1]

REF = Side()
CAND8 = Side(dtype="bfloat16", attention="eager", cache="static:64", tf32=True,
             variants=("rmsnorm_lowp@talker", "fused_qkv", "fused_gate_up", "kv_quant=int8"))


def fake_search(diverges, ref: Side = REF, cand: Side = CAND8, counts=None, flaky_proof: bool = False):
    """A Search whose runs are answered by ``diverges(names, layers)`` instead of an engine."""
    factors, _ = find_factors(ref, cand)

    def execute(side, purpose, names, layers=None):
        d = diverges(set(names), layers)
        if flaky_proof and purpose == "proof" and len(names) == 1:
            d = False
        search_runs.append((purpose, tuple(names), layers))
        return Outcome(len(search_runs), purpose, list(names), side.label(), d,
                       first_divergence=Divergence("talker", 0, -1, 0, "layer0", rel_l2=0.1) if d else None,
                       max_rel_l2=0.1 if d else 0.0)

    search_runs: list = []
    return Search(ref, factors, execute, lambda: counts or {"talker": 28, "predictor": 5}), search_runs


def matters_from(component: str, layer: int):
    """A layer predicate: the culprit matters once it covers ``component`` layer ``layer``."""

    def covers(layers: str | None) -> bool:
        if layers in (None, "all"):
            return True
        for text in layers.split(", "):
            spec = parse(text)
            if spec.scope.component == component and (spec.scope.layers is None or spec.scope.layers[0] <= layer < spec.scope.layers[1]):
                return True
        return False

    return covers


def test_factors_are_the_differing_settings_in_order():
    factors, held = find_factors(REF, CAND8)
    assert [f.name for f in factors] == ["dtype", "attention", "cache", "tf32", "rmsnorm_lowp@talker", "fused_qkv",
                                         "fused_gate_up", "kv_quant=int8"]
    assert [f.load_time for f in factors] == [True] + [False] * 7
    assert held == []
    chosen, held = find_factors(REF, CAND8, ["kv_quant=int8", "dtype", "sdpa_backend"])
    assert [f.name for f in chosen] == ["kv_quant=int8", "dtype", "sdpa_backend=math"]  # a new variant is added
    assert len(held) == 6
    with pytest.raises(BadInput, match="'device' is the same on both sides"):
        find_factors(REF, CAND8, ["device"])
    with pytest.raises(BadInput, match="unknown variant 'bogus'"):
        find_factors(REF, CAND8, ["bogus"])


def test_one_culprit_among_eight_settings_in_18_runs():
    search, runs = fake_search(lambda names, layers: "kv_quant=int8" in names and matters_from("talker", 12)(layers))
    result = search.run()
    assert result["culprits"] == ["kv_quant=int8"]
    assert result["proof"]["holds"]
    assert result["counts"]["settings_runs"] == 18
    assert result["proof"]["culprits_alone"]["run"] > result["alone"]["kv_quant=int8"]["run"]  # re-run, not recalled
    assert result["proof"]["candidate_without"]["purpose"] == "proof"
    # Every alone/removed entry is an actual run of exactly that configuration.
    for name, out in result["alone"].items():
        assert out["factors"] == [name] and out["diverges"] == (name == "kv_quant=int8")
    for name, out in result["removed"].items():
        assert name not in out["factors"] and len(out["factors"]) == 7 and out["diverges"] == (name != "kv_quant=int8")
    (layers,) = result["layers"]
    assert layers["first_layer"] == {"component": "talker", "layer": 12}
    assert len(layers["runs"]) <= math.ceil(math.log2(28 + 1 + 5 + 1))
    assert result["counts"]["runs"] == 18 + len(layers["runs"])
    assert exit_code(result) == 0


def test_an_interaction_is_found_by_ddmin():
    search, _ = fake_search(lambda names, layers: {"attention", "fused_gate_up"} <= names)
    result = search.run()
    assert result["culprits"] == ["attention", "fused_gate_up"]
    assert result["proof"]["holds"]
    assert all(not o["diverges"] for o in result["alone"].values())


def test_independent_culprits_are_all_found():
    search, _ = fake_search(lambda names, layers: "dtype" in names or "fused_qkv" in names)
    result = search.run()
    assert result["culprits"] == ["dtype", "fused_qkv"]
    assert result["proof"]["holds"] and not result["proof"]["candidate_without"]["diverges"]


def test_no_divergence_is_one_run():
    search, runs = fake_search(lambda names, layers: False)
    result = search.run()
    assert result["verdict"].startswith("no divergence") and len(runs) == 1 and exit_code(result) == 0


def test_a_proof_that_does_not_reproduce_fails():
    search, _ = fake_search(lambda names, layers: "tf32" in names, flaky_proof=True)
    result = search.run()
    assert not result["proof"]["holds"] and result["verdict"].startswith("proof failed")
    assert exit_code(result) == 1


def test_layer_bisect_can_point_outside_the_layers():
    search, _ = fake_search(lambda names, layers: "rmsnorm_lowp@talker" in names and layers in (None, "all")
                            or (layers is not None and "rmsnorm_lowp@talker" in layers.split(", ")),
                            counts={"talker": 4, "predictor": 2})
    result = search.run()
    (layers,) = result["layers"]
    assert layers["first_layer"] == {"component": "talker", "layer": None}
    assert "final norm" in layers["note"]


# -- for real, on the tiny model ---------------------------------------------------------------

def plant_recipe(culprit: str = "rmsnorm_lowp@talker") -> Recipe:
    """bf16 both sides; the candidate adds the culprit and 3 decoys that are harmless on CPU
    (fused projections and forcing the flash SDPA kernel torch already picks: measured bit-identical)."""
    ref = Side(dtype="bfloat16")
    cand = replace(ref, variants=(culprit, "fused_qkv", "fused_gate_up", "sdpa_backend=flash"))
    return Recipe(name="plant", reference=ref, candidate=cand, tolerances={"float32": 1e-5, "float16": 2e-3, "bfloat16": 2e-3})


@pytest.fixture
def one_prompt(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("Hello world, this is a test.\n")
    return path


def test_bisect_finds_a_planted_culprit_among_decoys(tiny_dir, one_prompt, tmp_path):
    result = bisect(one_prompt, plant_recipe(), None, 2, tmp_path / "out")
    assert result["culprits"] == ["rmsnorm_lowp@talker"]
    proof = result["proof"]
    assert proof["holds"]
    assert proof["culprits_alone"]["diverges"] and proof["culprits_alone"]["purpose"] == "proof"
    assert not proof["candidate_without"]["diverges"] and proof["candidate_without"]["purpose"] == "proof"
    assert proof["candidate_without"]["factors"] == ["fused_qkv", "fused_gate_up", "sdpa_backend=flash"]
    assert result["counts"]["settings_runs"] == 2 * 4 + 2 and result["counts"]["loads"] == 1
    (layers,) = result["layers"]
    assert layers["first_layer"] == {"component": "talker", "layer": 0}  # error enters at the first norm
    saved = json.loads((tmp_path / "out" / "bisect.json").read_text())["bisect"]
    assert saved["culprits"] == ["rmsnorm_lowp@talker"] and len(saved["runs"]) == saved["counts"]["runs"]


def test_runner_loads_once_per_load_time_setting(tiny_dir, prompt):
    recipe = Recipe(reference=Side(dtype="bfloat16"), candidate=Side(dtype="float32"), decoding=Decoding(max_frames=1))
    runner = Runner(recipe, [prompt], 1, tiny_dir)
    try:
        runner.run_reference()
        for side in (Side(dtype="float32"), Side(dtype="bfloat16", variants=("fused_qkv",)),
                     Side(dtype="float32", attention="eager", variants=("fused_qkv",)), Side(dtype="bfloat16")):
            out = runner.execute(side, "test", [])
        assert runner.loads == 2 and runner.runs == 4
        assert not out.diverges and out.max_rel_l2 == 0.0  # back to the reference's settings: bit-identical
    finally:
        runner.close()


def parity_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "parity.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=600)


def test_cli_identical_sides_is_nothing_to_bisect(one_prompt, tmp_path):
    proc = parity_cli("bisect", str(one_prompt), "--set", "candidate.dtype=float32", "--set", "candidate.attention=sdpa",
                      "--set", "candidate.cache=dynamic", "--out", str(tmp_path / "b"))
    assert proc.returncode == 0, proc.stderr
    assert "nothing to bisect" in proc.stdout
    saved = json.loads((tmp_path / "b" / "bisect.json").read_text())["bisect"]
    assert saved["counts"]["runs"] == 0 and saved["counts"]["loads"] == 0


def test_cli_bad_factor_is_exit_2(one_prompt, tmp_path):
    proc = parity_cli("bisect", str(one_prompt), "--factors", "nope", "--out", str(tmp_path / "b"))
    assert proc.returncode == 2
    assert proc.stderr.startswith("parity: error:") and "unknown variant 'nope'; available:" in proc.stderr


def test_render_every_kind_of_result():
    """The console output for a proven culprit (with its layer), no divergence, and nothing to bisect."""
    from rich.console import Console

    from parity.bisect import render

    def rendered(result: dict) -> str:
        console = Console(record=True, width=200)
        render(result, console)
        return console.export_text()

    frame = {"prompts": ["p0"], "steps": 2, "tolerance": 1e-2, "reference": dataclasses.asdict(REF),
             "candidate": dataclasses.asdict(CAND8), "held_at_reference": []}
    search, _ = fake_search(lambda names, layers: "kv_quant=int8" in names and matters_from("talker", 3)(layers))
    result = {**frame, **search.run()}
    result["counts"].update(reference_runs=1, loads=2, seconds=1.0)
    text = rendered(result)
    assert "verdict: culprit: kv_quant=int8 (proof holds)" in text and "first matters at talker layer 3" in text
    assert "18 runs" not in text and f"{result['counts']['runs']} runs" in text

    search, _ = fake_search(lambda names, layers: False)
    result = {**frame, **search.run()}
    result["counts"].update(reference_runs=1, loads=2, seconds=1.0)
    assert "no divergence" in rendered(result)
    assert "nothing to bisect" in rendered({**frame, "factors": [], "verdict": "nothing to bisect: same settings",
                                            "counts": {"runs": 0}})


def trait_search(diverges, recipe: str = "faster-qwen3-tts"):
    """A Search over the faster engine's traits between a GPU recipe's sides, answered by
    ``diverges(names)`` (no engine runs); returns it and the log of (purpose, names)."""
    from parity.bisect import trait_space
    from parity.recipe import load_recipe

    r = load_recipe(REPO / "recipes" / f"{recipe}.toml")
    factors, _ = find_factors(r.reference, r.candidate)
    space = trait_space(r.reference, r.candidate, factors)
    runs: list = []

    def execute(side, purpose, names, layers=None):
        d = diverges(set(names))
        runs.append((purpose, tuple(names)))
        if len(runs) > 200:
            raise AssertionError("the search does not end")
        return Outcome(len(runs), purpose, list(names), side.label(), d,
                       first_divergence=Divergence("talker", 0, -1, 0, "layer0", rel_l2=0.1) if d else None,
                       max_rel_l2=0.1 if d else 0.0)

    return Search(r.reference, factors, execute, lambda: {"talker": 28, "predictor": 5}, space), runs


def test_a_second_source_beside_a_trait_that_others_need_is_found_and_the_search_ends():
    # The shape met on the H200 (faster-qwen3-tts.toml): the static cache alone diverges, the
    # talker graph needs it, and the candidate without them still diverges through another
    # trait. The search once re-ran the same proof forever here.
    search, runs = trait_search(lambda names: "faster.static_cache" in names or "faster.predictor_graph" in names)
    result = search.run()
    assert {"faster.static_cache", "faster.predictor_graph"} <= set(result["culprits"])
    assert "faster.talker_graph" not in result["culprits"] and "faster.decode_mask" not in result["culprits"]
    assert result["proof"]["holds"] and not result["proof"]["candidate_without"]["diverges"]
    assert sum(purpose == "proof" for purpose, _ in runs) <= 4
    assert result["explained_by_traits"] and result["unexplained"] is None


def test_a_single_trait_that_others_need_is_the_whole_answer():
    search, runs = trait_search(lambda names: "faster.static_cache" in names)
    result = search.run()
    assert result["culprits"] == ["faster.static_cache"]
    assert result["proof"]["holds"]
    assert result["proof"].get("also_without") == ["faster.talker_graph"]


def test_a_proof_that_diverges_elsewhere_than_the_candidate_says_so():
    # The culprit alone diverges in the prefill (step 0), the whole candidate only at step 2: the
    # verdict must not pass that off as the candidate's divergence.
    factors, _ = find_factors(REF, CAND8)

    def execute(side, purpose, names, layers=None):
        d = "cache" in names
        step, layer = (2, 17) if len(names) > 1 else (0, 5)
        return Outcome(0, purpose, list(names), side.label(), d, prompt="p1",
                       first_divergence=Divergence("talker", step, -1, layer, f"layer{layer}", rel_l2=0.002) if d else None,
                       max_rel_l2=0.002 if d else 0.0)

    result = Search(REF, factors, execute, lambda: {"talker": 28, "predictor": 5}).run()
    assert result["culprits"] == ["cache"] and result["proof"]["holds"]
    assert "talker step 0 layer5, earlier than the candidate (talker step 2 layer17)" in result["proof"]["elsewhere"]
    assert result["verdict"].startswith("culprit: cache (proof holds); the culprits alone first diverge at")
    # Where the culprits alone diverge where the candidate does, nothing is added.
    same, _ = fake_search(lambda names, layers: "cache" in names)
    assert "elsewhere" not in same.run()["proof"]
