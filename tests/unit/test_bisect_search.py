"""The bisect search's delta-debugging core on synthetic oracles: for every small set of settings
and every way some of them can make the candidate diverge (one culprit, a pair that only diverges
together, independent culprits), the search finds a diverging set that is 1-minimal, never runs a
configuration twice, and the proof holds. No engine is loaded."""

from __future__ import annotations

import itertools

import pytest

from parity.bisect import Factor, Outcome, Search, exit_code
from parity.recipe import Side

NAMES = ["a", "b", "c", "d", "e", "f"]


def search_for(diverges, names=NAMES):
    """A Search over variant-like settings ``names`` whose runs are answered by ``diverges(set)``."""
    factors = [Factor(n, "variant", False, True, False) for n in names]
    runs: list[tuple[str, tuple[str, ...]]] = []

    def execute(side: Side, purpose, factor_names, layers=None):
        runs.append((purpose, tuple(factor_names)))
        assert set(side.variants) == set(factor_names)  # the configuration is what was asked for
        return Outcome(len(runs), purpose, list(factor_names), side.label(), diverges(set(factor_names)))

    return Search(Side(), factors, execute, lambda: {"talker": 4, "predictor": 2}), runs


def any_of(*culprit_sets):
    """Diverges when the configuration contains every setting of at least one culprit set."""
    return lambda names: any(set(c) <= names for c in culprit_sets)


def assert_one_minimal(found, diverges):
    assert diverges(set(found))
    for x in found:
        assert not diverges(set(found) - {x}), f"{found} is not 1-minimal: drop {x}"


@pytest.mark.parametrize("culprit", NAMES)
def test_one_culprit_is_found_from_the_single_runs(culprit):
    diverges = any_of({culprit})
    search, runs = search_for(diverges)
    assert search.minimal_diverging(NAMES) == [culprit]
    assert [r for r in runs if r[0] == "search"] == []  # answered by the one-setting runs
    assert len(runs) == len(NAMES)


@pytest.mark.parametrize("pair", list(itertools.combinations(NAMES, 2)))
def test_an_interacting_pair_is_found(pair):
    diverges = any_of(pair)
    search, runs = search_for(diverges)
    found = search.minimal_diverging(NAMES)
    assert sorted(found) == sorted(pair)
    assert len(set(runs)) == len(runs)  # no configuration is run twice


@pytest.mark.parametrize("triple", list(itertools.combinations(NAMES, 3)))
def test_an_interacting_triple_is_found(triple):
    search, runs = search_for(any_of(triple))
    assert sorted(search.minimal_diverging(NAMES)) == sorted(triple)
    assert len(set(runs)) == len(runs)


@pytest.mark.parametrize("sets", [({"a", "b"}, {"c", "d"}), ({"a", "f"}, {"b", "e"}, {"c", "d"}), ({"b", "c", "e"}, {"d", "f"})])
def test_overlapping_possibilities_give_a_one_minimal_set(sets):
    diverges = any_of(*sets)
    search, _ = search_for(diverges)
    found = search.minimal_diverging(NAMES)
    assert_one_minimal(found, diverges)
    assert any(set(found) == s for s in sets)


def test_the_whole_set_when_only_everything_diverges():
    search, _ = search_for(any_of(set(NAMES)))
    assert sorted(search.minimal_diverging(NAMES)) == NAMES


def test_two_settings_that_only_diverge_together():
    search, runs = search_for(any_of({"a", "b"}), names=["a", "b"])
    assert sorted(search.minimal_diverging(["a", "b"])) == ["a", "b"]
    assert [r[0] for r in runs] == ["alone", "alone"]


@pytest.mark.parametrize("culprits", [({"a"}, {"d"}), ({"b", "c"}, {"f"}), ({"a"}, {"c", "e"}, {"f"})])
def test_run_finds_every_independent_culprit_with_proof(culprits):
    diverges = any_of(*culprits)
    search, _ = search_for(diverges)
    result = search.run()
    expected = sorted(set().union(*culprits))
    assert result["culprits"] == expected
    assert result["proof"]["holds"] and exit_code(result) == 0
    assert result["proof"]["candidate_without"] is None or not result["proof"]["candidate_without"]["diverges"]


def test_run_with_no_divergence_is_one_run():
    search, runs = search_for(lambda names: False)
    result = search.run()
    assert runs == [("candidate", tuple(NAMES))]
    assert "culprits" not in result and exit_code(result) == 0


def test_run_proof_fails_when_the_culprits_do_not_reproduce():
    calls = {"n": 0}

    def flaky(names):
        # "c" diverges on its first run only: a flaky setting.
        if names == {"c"}:
            calls["n"] += 1
            return calls["n"] == 1
        return "c" in names

    search, _ = search_for(flaky)
    result = search.run()
    assert result["culprits"] == ["c"] and not result["proof"]["holds"] and exit_code(result) == 1
