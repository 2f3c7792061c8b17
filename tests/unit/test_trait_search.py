"""Bisect over engine traits on a synthetic oracle (no engine loaded): the configurations it builds
(the reference plus traits, or the candidate engine minus traits), the closure that keeps a CUDA
graph with the cache and mask it was captured around, and the verdicts, including a planted
graph-only trait, which can only be removed from the candidate."""

from __future__ import annotations

import pytest

from parity.bisect import Factor, Outcome, Search, TraitSpace
from parity.recipe import Side
from parity.traits import ENGINE_REST, Trait, TraitSet, closure, realize

REF = Side(dtype="bfloat16")
CAND = Side(engine="fast", dtype="bfloat16", cache="static:64")


def _apply(engine, applied):  # never called: the oracle reads the sides
    raise AssertionError


TRAITS = [
    Trait("fast", "static_cache", "padded cache", field="cache"),
    Trait("fast", "mask", "own mask", apply=_apply),
    Trait("fast", "graph", "captured step", requires=("static_cache", "mask")),
    Trait("fast", "sampler", "own sampler", apply=_apply),
]
NAMES = [ENGINE_REST] + [t.qualified for t in TRAITS]


def has(side: Side, trait: str) -> bool:
    """Whether the configuration ``side`` computes ``trait`` the fast engine's way."""
    if trait == "fast.static_cache":
        return side.cache == CAND.cache
    if side.engine == "fast":
        return f"-{trait}" not in side.traits
    return trait in side.traits


def search_for(culprit_sets, residue=False):
    """A Search whose runs diverge when the configuration has every trait of some culprit set
    (``residue``: the fast engine itself diverges, whatever its traits)."""
    space = TraitSpace(REF, CAND, TraitSet("fast", TRAITS, {}))
    factors = [Factor(ENGINE_REST, "engine", "reference", "fast", True)] + [Factor(t.qualified, "trait", False, True, False) for t in TRAITS]
    seen: list[Side] = []

    def execute(side, purpose, names, layers=None):
        seen.append(side)
        assert set(names) == closure(set(names), TRAITS)  # every configuration is closed
        state = {t.qualified: has(side, t.qualified) for t in TRAITS}
        assert {n for n, on in state.items() if on} == set(names) - {ENGINE_REST}  # it is what was asked for
        state[ENGINE_REST] = side.engine == "fast"
        diverges = any(all(state[t] for t in s) for s in culprit_sets) or (residue and side.engine == "fast")
        return Outcome(len(seen), purpose, list(names), side.label(), diverges)

    return Search(REF, factors, execute, lambda: {"talker": 2, "predictor": 1}, space), seen


def test_a_graph_trait_needs_the_engine_its_cache_and_its_mask():
    assert closure({"fast.graph"}, TRAITS) == {ENGINE_REST, "fast.graph", "fast.static_cache", "fast.mask"}
    assert closure({"fast.mask"}, TRAITS) == {"fast.mask"}
    side = realize(REF, CAND, closure({"fast.graph"}, TRAITS), TRAITS)
    assert side.engine == "fast" and side.cache == "static:64" and side.traits == ("-fast.sampler",)
    side = realize(REF, CAND, {"fast.mask"}, TRAITS)
    assert side.engine == "reference" and side.cache == "dynamic" and side.traits == ("fast.mask",)


@pytest.mark.parametrize("culprit", ["fast.mask", "fast.sampler", "fast.static_cache"])
def test_a_planted_trait_is_found_and_proven_from_both_sides(culprit):
    search, _ = search_for([{culprit}])
    result = search.run()
    assert result["culprits"] == [culprit] and result["proof"]["holds"]
    assert result["unexplained"] is None and result["explained_by_traits"] == [culprit]
    assert result["proof"]["culprits_alone"]["side"].startswith("reference")  # reference + trait
    assert result["proof"]["candidate_without"]["side"].startswith("fast")  # candidate - trait


def test_removing_a_mask_removes_the_graph_captured_around_it():
    search, _ = search_for([{"fast.mask"}])
    result = search.run()
    assert result["proof"]["also_without"] == ["fast.graph"]
    assert "-fast.graph" in result["proof"]["candidate_without"]["side"]


def test_a_planted_graph_trait_is_found_with_what_it_needs():
    search, _ = search_for([{"fast.graph"}])
    result = search.run()
    assert result["culprits"] == [ENGINE_REST, "fast.static_cache", "fast.mask", "fast.graph"]
    assert result["proof"]["holds"]
    # The engine is among the culprits only because a graph exists only there: the traits explain it.
    assert result["unexplained"] is None
    assert result["explained_by_traits"] == ["fast.static_cache", "fast.mask", "fast.graph"]
    assert "only because fast.graph can only be removed from the fast engine" in result["verdict"]


def test_engine_with_an_appliable_trait_is_an_unexplained_interaction():
    """The divergence needs the rest of the engine beside the mask: the mask applied to the
    reference does not reproduce it, the engine stripped of every trait does not diverge."""
    search, _ = search_for([{ENGINE_REST, "fast.mask"}])
    result = search.run()
    assert result["culprits"] == [ENGINE_REST, "fast.mask"] and result["proof"]["holds"]
    assert not result["alone"]["fast.mask"]["diverges"]  # the reference + mask: no divergence
    assert not result["unexplained"]["engine_without_traits"]["diverges"]
    assert "needs the rest of the fast engine together with fast.mask" in result["unexplained"]["text"]
    assert result["explained_by_traits"] == []


def test_engine_is_the_verdict_only_when_no_trait_reproduces_it():
    search, _ = search_for([], residue=True)
    result = search.run()
    assert result["culprits"] == [ENGINE_REST]
    assert result["unexplained"]["engine_without_traits"]["diverges"]
    assert "no combination of the fast engine's traits reproduces the divergence" in result["verdict"]
