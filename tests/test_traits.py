"""Engine traits of faster-qwen3-tts on the CPU path CI runs (its graph functions driven eagerly):
each trait applied to the reference and removed from the engine, and undone; all of them
together turn one engine into the other bit for bit; bisect over traits finds a planted trait
among innocent ones, and says "engine" only when no trait explains the divergence.

A trait is made numerically visible by planting a change in the engine's own function that the
trait covers (its mask builder, its K/V copy, its predictor masks, its sampler): the real
engines run, nothing stands in for them. The change must then show on the reference with the
trait applied, vanish from the engine with the trait removed, and both must undo exactly.
CUDA graphs act only on a GPU (``gpu`` tests)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from parity import compare
from parity.engines.faster import FasterEngine
from parity.engines.reference import ReferenceEngine
from parity.errors import BadInput
from parity.recipe import Decoding, Recipe, Side
from parity.results import BisectTrait

FRAMES = 4
TOL = 1e-5
REF = Side(dtype="float32", attention="sdpa", cache="dynamic", device="cpu")
CAND = Side(engine="faster", dtype="float32", attention="sdpa", cache="static:256", device="cpu")
DEC = Decoding(max_frames=FRAMES)


# -- plants: a change inside the engine's own code that one trait covers ------------------------

def plant_decode_mask(monkeypatch):
    """The engine's talker mask table gets +1 on key position 0: a mask that no longer only masks."""
    from faster_qwen3_tts.talker_graph import TalkerGraph

    original = TalkerGraph._build_attention_masks

    def planted(self, attention_mask=None):
        original(self, attention_mask)
        for row in self.attn_mask_table:
            row[..., 0] += 1.0
        if self.attn_mask is not None:
            self.attn_mask.copy_(self.attn_mask_table[0])

    monkeypatch.setattr(TalkerGraph, "_build_attention_masks", planted)


def plant_prefill(monkeypatch):
    """The engine's K/V copy after the prefill scales layer 0's keys."""
    from faster_qwen3_tts.talker_graph import TalkerGraph

    original = TalkerGraph.prefill_kv

    def planted(self, past_key_values):
        n = original(self, past_key_values)
        self.static_cache.layers[0].keys.mul_(1.5)
        return n

    monkeypatch.setattr(TalkerGraph, "prefill_kv", planted)


def plant_predictor_cache(monkeypatch):
    """The engine's predictor masks get +1 on key position 0."""
    from faster_qwen3_tts.predictor_graph import PredictorGraph

    original = PredictorGraph._make_attn_mask

    def planted(self, input_embeds, cache_position):
        masks = original(self, input_embeds, cache_position)
        for m in masks.values():
            m[..., 0] += 1.0
        return masks

    monkeypatch.setattr(PredictorGraph, "_make_attn_mask", planted)


def plant_sampler(monkeypatch):
    """The engine's sample_logits picks the token after its choice."""
    import faster_qwen3_tts.generate as gen_mod
    import faster_qwen3_tts.predictor_graph as pg_mod
    import faster_qwen3_tts.sampling as sampling

    original = sampling.sample_logits

    def planted(logits, **kwargs):
        return (original(logits, **kwargs) + 1) % logits.shape[-1]

    for module in (sampling, gen_mod, pg_mod):
        monkeypatch.setattr(module, "sample_logits", planted)


PLANTS = {"decode_mask": plant_decode_mask, "prefill": plant_prefill, "predictor_cache": plant_predictor_cache,
          "sampler": plant_sampler}


# -- helpers ----------------------------------------------------------------------------------

def rel(a, b) -> float:
    """Largest relative L2 over the hidden states of two traces of the same prompt."""
    points = compare.point_frame(a, b, tol=TOL)
    return float(points["rel_l2"].max())


def choices(trace) -> torch.Tensor:
    return torch.cat([trace.talker_choice, trace.pred_choice.flatten()])


def same(a, b) -> bool:
    """Bit-identical hidden states, logits and choices."""
    return (torch.equal(a.talker_hidden, b.talker_hidden) and torch.equal(a.pred_hidden, b.pred_hidden)
            and torch.equal(a.talker_logits, b.talker_logits) and torch.equal(choices(a), choices(b)))


def instance_attrs(*objs) -> list[set[str]]:
    return [set(vars(o)) for o in objs]


@pytest.fixture(scope="module")
def reference(tiny_dir):
    engine = ReferenceEngine(REF, tiny_dir)
    engine.load()
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def reference_trace(reference, prompt):
    return reference.run(prompt, DEC)


def load_faster(tiny_dir, side=CAND) -> FasterEngine:
    engine = FasterEngine(side, tiny_dir)
    engine.load()
    return engine


# -- all traits together ----------------------------------------------------------------------

@pytest.mark.parametrize("dec", [DEC, Decoding(max_frames=FRAMES, do_sample=True, seed=3)], ids=["greedy", "seeded"])
def test_every_trait_turns_one_engine_into_the_other_bit_for_bit(dec, tiny_dir, prompt, reference, reference_trace):
    """The reference with every faster trait applied (and its static cache) computes exactly what
    the engine computes, its own token choices included (also drawn under seeded sampling); the
    engine with every trait removed (and a dynamic cache) exactly what the reference computes.
    Plain, the two differ: the traits are what differs."""
    engine = load_faster(tiny_dir)
    fast = engine.run(prompt, dec, force=reference_trace)
    assert not torch.equal(fast.talker_hidden, reference_trace.talker_hidden)
    assert not torch.equal(fast.pred_hidden, reference_trace.pred_hidden)

    every = ("faster.prefill", "faster.decode_mask", "faster.predictor_cache", "faster.sampler")
    reference.reconfigure(replace(REF, cache=CAND.cache, traits=every))
    try:
        assert same(reference.run(prompt, dec, force=reference_trace), fast)
    finally:
        reference.reconfigure(REF)
    engine.reconfigure(replace(CAND, cache="dynamic", traits=tuple("-" + t for t in every)))
    assert same(engine.run(prompt, dec, force=reference_trace), reference.run(prompt, dec, force=reference_trace))
    if dec.do_sample:  # the draws are real: some own choice differs from the forced greedy tokens
        assert not torch.equal(choices(fast), torch.cat([reference_trace.talker_tokens, reference_trace.codes[:, 1:].flatten()]))
    engine.close()


# -- each trait, applied and undone -----------------------------------------------------------

@pytest.mark.parametrize("trait", sorted(PLANTS))
def test_trait_applied_to_the_reference_and_undone(trait, tiny_dir, prompt, monkeypatch):
    """reference + trait runs the engine's own code for it: a change planted there shows; undone,
    the reference computes bit for bit what it did before and keeps no patched attribute."""
    side = replace(REF, cache=CAND.cache)  # with a static cache: the prefill trait acts on it
    engine = ReferenceEngine(side, tiny_dir)
    engine.load()
    talker = engine.talker
    watched = (engine, talker, talker.model, talker.code_predictor)
    before_attrs = instance_attrs(*watched)
    before = engine.run(prompt, DEC)
    PLANTS[trait](monkeypatch)
    engine.reconfigure(replace(side, traits=(f"faster.{trait}",)))
    assert engine.traits_applied is not None and instance_attrs(*watched) != before_attrs
    with_trait = engine.run(prompt, DEC, force=before)
    if trait == "sampler":
        assert not torch.equal(choices(with_trait), choices(before))  # the planted sampler chose
    else:
        assert rel(with_trait, before) > 1e-3  # the planted mask / copy acted
    engine.reconfigure(side)
    assert instance_attrs(*watched) == before_attrs
    assert same(engine.run(prompt, DEC, force=before), before)
    engine.close()


@pytest.mark.parametrize("trait", sorted(PLANTS))
def test_trait_removed_from_the_engine_and_undone(trait, tiny_dir, prompt, reference_trace, monkeypatch):
    """candidate - trait computes that part the reference's way: a change planted in the engine's
    code for it is gone; undone, the engine computes bit for bit what it did with the plant."""
    PLANTS[trait](monkeypatch)
    engine = load_faster(tiny_dir)
    tts = engine.tts
    planted = engine.run(prompt, DEC, force=reference_trace)
    watched = (engine, tts.talker_graph, tts.predictor_graph, tts.model.model.talker, engine.pred_sampler)
    before_attrs = instance_attrs(*watched)
    if trait == "sampler":
        assert not torch.equal(choices(planted), choices(reference_trace))
    else:
        assert rel(planted, reference_trace) > 1e-3
    engine.reconfigure(replace(CAND, traits=(f"-faster.{trait}",)))
    assert engine.describe()["traits_removed"] == [trait]
    without = engine.run(prompt, DEC, force=reference_trace)
    if trait == "sampler":
        assert torch.equal(choices(without), choices(reference_trace))  # the reference's sampler: its choices
    else:
        assert rel(without, reference_trace) < TOL  # the plant no longer acts
    engine.reconfigure(CAND)
    assert instance_attrs(*watched) == before_attrs
    assert same(engine.run(prompt, DEC, force=reference_trace), planted)
    engine.close()


def test_static_cache_is_the_cache_setting_both_ways(tiny_dir, prompt, reference, reference_trace):
    """static_cache is realised by ``cache``: the engine with a dynamic cache decodes its talker
    bit for bit like the reference; back on the static cache, as before. The reference with the
    static cache moves its talker off its own dynamic-cache result."""
    engine = load_faster(tiny_dir)
    fast = engine.run(prompt, DEC, force=reference_trace)
    engine.reconfigure(replace(CAND, cache="dynamic"))
    assert engine.describe()["traits_removed"] == ["static_cache"]
    dynamic = engine.run(prompt, DEC, force=reference_trace)
    assert torch.equal(dynamic.talker_hidden, reference_trace.talker_hidden)
    assert not torch.equal(fast.talker_hidden, reference_trace.talker_hidden)
    engine.reconfigure(CAND)
    assert same(engine.run(prompt, DEC, force=reference_trace), fast)
    engine.close()
    reference.reconfigure(replace(REF, cache=CAND.cache))
    try:
        static = reference.run(prompt, DEC, force=reference_trace)
    finally:
        reference.reconfigure(REF)
    assert torch.equal(static.talker_hidden, fast.talker_hidden)


def test_graph_traits_on_the_cpu_run_the_same_functions_eagerly_and_undo(tiny_dir, prompt, reference_trace):
    """On the CPU there is no graph to remove (the traits are inactive there), but removing them
    takes the same path as on a GPU: the replay object is swapped for an eager one, nothing
    changes numerically, and undoing puts the original object back."""
    engine = load_faster(tiny_dir)
    base = engine.run(prompt, DEC, force=reference_trace)
    tg, pg = engine.tts.talker_graph, engine.tts.predictor_graph
    replays = (tg.graph, pg.graph)
    engine.reconfigure(replace(CAND, traits=("-faster.talker_graph", "-faster.predictor_graph")))
    assert tg.graph is not replays[0] and pg.graph is not replays[1]
    assert same(engine.run(prompt, DEC, force=reference_trace), base)
    engine.reconfigure(CAND)
    assert (tg.graph, pg.graph) == replays
    engine.close()


# -- sides naming traits ----------------------------------------------------------------------

@pytest.mark.parametrize("field, value, message", [
    ("reference.traits", "faster.talker_graph", "cannot be applied to another engine"),
    ("reference.traits", "-faster.decode_mask", "removes a trait of the faster engine"),
    ("candidate.traits", "faster.decode_mask", "already part of the faster engine"),
    ("reference.traits", "faster.static_cache", "is the 'cache' setting"),
    ("reference.traits", "faster.nope", "declares no trait 'nope'"),
    ("reference.traits", "decode_mask", "is not ENGINE.NAME"),
    ("reference.traits", "faster.sampler,faster.sampler", "given twice"),
])
def test_a_side_names_only_traits_it_can_take(field, value, message):
    from parity.recipe import apply_overrides

    base = Recipe(reference=REF, candidate=CAND)
    with pytest.raises(BadInput, match=message):
        apply_overrides(base, [(field, value)])


def test_parity_traits_lists_both_directions_and_what_bisect_searches():
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "parity.cli", "traits", "recipes/faster-qwen3-tts.toml",
                           "--set", "candidate.device=cpu", "--set", "reference.device=cpu"],
                          capture_output=True, text=True, cwd=repo, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = " ".join(proc.stdout.split())
    assert "faster.decode_mask [reference + trait, candidate - trait] searched by parity bisect" in out
    assert "faster.talker_graph [candidate - trait] inactive: no CUDA graphs on the CPU" in out
    assert "realised by the 'cache' setting" in out


# -- bisect over traits -----------------------------------------------------------------------

def trait_recipe() -> Recipe:
    return Recipe(name="traits", reference=REF, candidate=CAND, decoding=DEC)


@pytest.fixture
def one_prompt(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("Hello world, this is a test.\n")
    return path


def test_bisect_finds_a_planted_trait_among_innocent_ones(tiny_dir, one_prompt, tmp_path, monkeypatch):
    from rich.console import Console

    from parity.bisect import bisect, render

    plant_decode_mask(monkeypatch)
    result = bisect(one_prompt, trait_recipe(), None, 3, tmp_path / "out")
    names = [f["name"] for f in result["factors"]]
    assert names == ["engine", "faster.static_cache", "faster.prefill", "faster.decode_mask",
                     "faster.predictor_cache", "faster.sampler"]  # the engine split; cache is the static_cache trait
    assert result["culprits"] == ["faster.decode_mask"]
    assert result["proof"]["holds"] and result["unexplained"] is None
    assert result["explained_by_traits"] == ["faster.decode_mask"]
    alone = result["proof"]["culprits_alone"]
    assert alone["diverges"] and alone["side"].startswith("reference") and "+faster.decode_mask" in alone["side"]
    without = result["proof"]["candidate_without"]
    assert not without["diverges"] and without["side"].startswith("faster") and "-faster.decode_mask" in without["side"]
    innocent = [n for n in names if n != "faster.decode_mask"]
    assert not any(result["alone"][n]["diverges"] for n in innocent)
    assert all(result["removed"][n]["diverges"] for n in innocent)
    assert result["counts"]["loads"] == 2  # one reference, one engine: traits change in place
    document = json.loads((tmp_path / "out" / "bisect.json").read_text())
    schema = json.loads((Path(__file__).resolve().parents[1] / "parity" / "schema" / "bisect.schema.json").read_text())
    import jsonschema

    assert not list(jsonschema.Draft202012Validator(schema).iter_errors(document))
    saved = document["bisect"]
    records = {r["trait"]: BisectTrait.from_json(r) for r in saved["traits"]}
    assert records["faster.decode_mask"].state == "active"
    assert records["faster.talker_graph"].state.startswith("inactive") and records["faster.talker_graph"].directions == ["candidate - trait"]
    console = Console(record=True, width=200)
    render(result, console)
    text = console.export_text()
    assert "verdict: culprit: faster.decode_mask (proof holds)" in text
    assert "faster.predictor_graph: not searched, inactive" in text


def test_bisect_says_engine_when_no_trait_explains_it(tiny_dir, one_prompt, monkeypatch):
    """A change no trait covers (the engine's prompt embedding): engine stays the verdict, and the
    engine with every trait removed shows where the unexplained part enters."""
    from faster_qwen3_tts import FasterQwen3TTS

    from parity.bisect import bisect

    original = FasterQwen3TTS._prepare_generation_custom

    def planted(self, *args, **kwargs):
        out = list(original(self, *args, **kwargs))
        out[3] = out[3] * 1.01  # the talker's prompt embedding
        return tuple(out)

    monkeypatch.setattr(FasterQwen3TTS, "_prepare_generation_custom", planted)
    result = bisect(one_prompt, trait_recipe(), None, 2, None)
    assert result["culprits"] == ["engine"] and result["proof"]["holds"]
    unexplained = result["unexplained"]
    rest = unexplained["engine_without_traits"]
    assert rest["diverges"] and rest["first_divergence"]["point"] == "embed"
    assert "-faster.decode_mask" in rest["side"] and "faster float32/sdpa/dynamic" in rest["side"]
    assert "no combination of the faster engine's traits reproduces the divergence" in result["verdict"]
    assert result["explained_by_traits"] == []


# -- CUDA graphs (GPU) ------------------------------------------------------------------------

@pytest.mark.gpu
def test_graph_traits_removed_and_undone_on_a_gpu(tiny_dir, prompt, reference_trace):
    side = replace(CAND, device="cuda")
    engine = load_faster(tiny_dir, side)
    graphs = engine.run(prompt, DEC, force=reference_trace)
    tg, pg = engine.tts.talker_graph, engine.tts.predictor_graph
    captured = (tg.graph, pg.graph)
    assert all(isinstance(g, torch.cuda.CUDAGraph) for g in captured)
    engine.reconfigure(replace(side, traits=("-faster.talker_graph", "-faster.predictor_graph")))
    assert not isinstance(tg.graph, torch.cuda.CUDAGraph) and not isinstance(pg.graph, torch.cuda.CUDAGraph)
    eager = engine.run(prompt, DEC, force=reference_trace)
    assert torch.allclose(eager.talker_hidden, graphs.talker_hidden, rtol=0, atol=1e-5)
    engine.reconfigure(side)
    assert (tg.graph, pg.graph) == captured
    assert same(engine.run(prompt, DEC, force=reference_trace), graphs)
    engine.close()


# -- any engine can declare traits --------------------------------------------------------------

def test_the_worked_example_engine_declares_its_trait_and_bisect_names_it(tiny_dir, one_prompt):
    """example-perturbed (docs/engines.md) declares its planted noise as a trait: bisect names the
    trait, not the engine, with no code in parity that knows this engine."""
    from parity.bisect import bisect

    side = Side(dtype="float32", attention="sdpa", cache="dynamic", device="cpu")
    recipe = Recipe(name="example", reference=side, candidate=replace(side, engine="example-perturbed"), decoding=DEC)
    result = bisect(one_prompt, recipe, None, 3, None)
    assert [f["name"] for f in result["factors"]] == ["engine", "example-perturbed.layer_noise"]
    assert result["culprits"] == ["example-perturbed.layer_noise"] and result["proof"]["holds"]
    first = result["proof"]["culprits_alone"]["first_divergence"]
    assert (first["component"], first["step"], first["point"]) == ("talker", 2, "layer1")  # where it is planted
    assert not result["alone"]["engine"]["diverges"]  # the engine without its trait is the reference
    assert result["unexplained"] is None
