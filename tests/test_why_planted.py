"""The planted "why" suite: each case is a hook on the candidate side of an otherwise identical
fp32 pair on the tiny model (tests/planted.py); each must produce its localisation, hint class,
flip label and failing gates. benchmarks/planted_why.py prints the same cases as a table."""

from __future__ import annotations

import json

import pytest

import planted
from parity.engines.reference import ReferenceEngine
from parity.recipe import Side


@pytest.fixture(scope="module")
def engine(tiny_dir):
    e = ReferenceEngine(Side(dtype="float32", attention="sdpa", device="cpu"), tiny_dir)
    e.load()
    yield e
    e.close()


@pytest.fixture(scope="module")
def ref_cache():
    return {}


@pytest.mark.parametrize("case", planted.CASES, ids=[c.name for c in planted.CASES])
def test_planted_case(engine, prompt, ref_cache, case):
    out = planted.run_case(engine, prompt, case, ref_cache)
    verdict = planted.judge(case, out)
    detail = json.dumps({"got": verdict["got"], "expected": verdict["expected"],
                         "hints": [h["text"] for h in out["comparison"]["hints"]]}, indent=1, default=str)
    assert verdict["localisation"], detail
    assert verdict["hint"], detail
    assert verdict["flip"], detail
    assert verdict["gates"], detail
    for h in out["comparison"]["hints"]:  # every hint states its evidence
        assert h["text"] and isinstance(h["evidence"], dict) and h["evidence"], h


def test_the_suite_covers_what_the_issue_asks():
    names = {c.name for c in planted.CASES}
    assert len(names) >= 12
    classes = {c.hint for c in planted.CASES} | {a for c in planted.CASES for a in c.also}
    for needed in ("from_step", "grows_with_position", "logits_only", "predictor_only", "input_embedding",
                   "nan_masked_row", "nan_overflow", "sampler", "multiple_sources", "enters_at_layer", "runaway",
                   "stop_collapse"):
        assert needed in classes
    assert {"tie", "real", "sampler"} <= {c.flip for c in planted.CASES}
    assert any(c.hint is None for c in planted.CASES)  # clean pairs: no hint
