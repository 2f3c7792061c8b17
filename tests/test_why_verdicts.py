"""Verdict plumbing for issue 12: strict JSON, NaN reported as NaN (summary and bisect), the
independent noise floor of flip labels, the new gates and recipe keys, the console hint line and
the report's hints, through the real CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from parity import compare, gates, strictjson
from parity.errors import BadInput
from parity.recipe import Gates, parse_recipe_text

REPO = Path(__file__).resolve().parents[1]


def _strict_load(text: str):
    def refuse(name):
        raise ValueError(f"bare {name} in JSON")

    return json.loads(text, parse_constant=refuse)


def test_strict_json_never_writes_bare_nan(tmp_path):
    from parity.run import write_json

    data = {"a": math.nan, "b": [math.inf, -math.inf, 1.5], "c": np.float32("nan"), "d": (np.int64(3),)}
    write_json(tmp_path / "x.json", data)
    loaded = _strict_load((tmp_path / "x.json").read_text())
    assert loaded == {"a": "nan", "b": ["inf", "-inf", 1.5], "c": "nan", "d": [3]}
    assert [strictjson.to_float(v) for v in loaded["b"]] == [math.inf, -math.inf, 1.5]
    with pytest.raises(ValueError):  # anything that slips past encode is an error, not a bare NaN
        json.dumps(math.nan, allow_nan=False)


def _points(rel: list[float], finite: list[bool]) -> pd.DataFrame:
    n = len(rel)
    return pd.DataFrame({"component": "talker", "step": list(range(n)), "substep": -1, "layer": 0, "point": "layer0",
                         "max_abs": [0.0 if r == 0 else 1.0 for r in rel], "rel_l2": rel, "cosine": 1.0, "sqnr_db": math.inf,
                         "added": 0.0, "over": [r > 1e-5 or not f for r, f in zip(rel, finite)], "finite": finite})


def test_a_nan_only_divergence_is_nan_not_zero():
    pts = _points([0.0, math.inf, 0.0], [True, False, True])
    assert compare.max_rel_l2(pts) == "nan"
    assert compare.max_rel_l2(_points([0.0, 2e-3], [True, True])) == pytest.approx(2e-3)
    assert compare.max_rel_l2(pts.iloc[:0]) is None
    from parity.results import Comparison

    record = Comparison.from_json({"max_rel_l2": "nan", "points_compared": 3})  # a NaN-only divergence
    assert record.max_rel_l2 is None and record.nonfinite_points == 1
    result = gates.evaluate(Gates(max_rel_l2=0.1), record)
    assert [(g.name, g.passed) for g in result if g.name == "max_rel_l2"] == [("max_rel_l2", False)]


def test_bisect_reports_a_nan_only_divergence_as_nan(tiny_dir, prompt):
    from parity.bisect import Runner
    from parity.recipe import Recipe, Side

    recipe = Recipe(reference=Side(device="cpu"), candidate=Side(device="cpu", variants=("mask_row=2@talker:1",)))
    runner = Runner(recipe, [prompt], steps=3, model_dir=tiny_dir)
    try:
        runner.run_reference()
        out = runner.execute(recipe.candidate, "candidate", ["mask_row=2@talker:1"])
    finally:
        runner.close()
    assert out.diverges and out.nonfinite and out.max_rel_l2 is None
    assert out.first_divergence.nonfinite and out.first_divergence.rel_l2 is None
    assert "NaN/inf" in out.text() and "max rel L2 0" not in out.text()
    assert any("masked row" in h for h in out.hints)


def test_noise_floor_does_not_come_from_the_divergence_judged():
    ref = torch.tensor([2.0, 1.9, -1.0, 0.5])
    # A large error (a real bug) no longer widens the floor: it depends on the reference and tolerance only.
    floor, source = compare.noise_floor(ref, tol=1e-2)
    assert source == "tolerance" and floor == pytest.approx(1e-2 * float(ref.pow(2).mean().sqrt()))
    # The truth side's measured distance widens it only when larger.
    truth = ref + torch.tensor([0.3, -0.3, 0.3, -0.3])
    assert compare.noise_floor(ref, 1e-2, truth) == (pytest.approx(0.3), "truth")
    assert compare.flip_label(0.1, floor, 0.5, 1e-2, False) == "real"  # margin 0.1 >> 3 x floor (0.04)
    assert compare.flip_label(0.01, floor, 0.5, 1e-2, False) == "tie"
    assert compare.flip_label(5.0, floor, 0.0, 1e-2, True) == "sampler"


def test_drift_that_crosses_tolerance_is_not_called_an_entry_point():
    from parity import hints

    # Error grows smoothly along the layers of the prefill and crosses 1e-3 at layer 3: no jump of 4x.
    rel = [2e-4, 3e-4, 5e-4, 8e-4, 1.2e-3, 1.6e-3]
    pts = pd.DataFrame({"component": "talker", "step": 0, "substep": -1, "layer": list(range(-1, 5)),
                        "point": ["embed"] + [f"layer{i}" for i in range(4)] + ["logits"],
                        "max_abs": 1.0, "rel_l2": rel, "cosine": 1.0, "sqnr_db": 60.0, "added": 0.0,
                        "over": [r > 1e-3 for r in rel], "finite": True})
    out = hints.diagnose(pts, 1e-3)
    assert [h["class"] for h in out] == ["accumulates"]
    assert "1.2e-03" in out[0]["text"] or "0.0012" in out[0]["text"]


def test_stop_prob_ratio_is_a_checked_recipe_key():
    r = parse_recipe_text("[gates]\nstop_prob_ratio = 20\nsampler_agrees = false\nno_runaway = false\n")
    assert (r.gates.stop_prob_ratio, r.gates.sampler_agrees, r.gates.no_runaway) == (20.0, False, False)
    with pytest.raises(BadInput, match="stop_prob_ratio"):
        parse_recipe_text("[gates]\nstop_prob_ratio = 0.5\n")
    off = parse_recipe_text("[gates]\nstop_prob_ratio = 0\n")
    from parity.results import Comparison

    comparison = Comparison.from_json({"stop": {"collapse": {"step": 1, "candidate_prob": 1e-9, "reference_prob": 0.5}}})
    assert "stop_probability" not in [g.name for g in gates.evaluate(off.gates, comparison)]
    assert [g.passed for g in gates.evaluate(r.gates, comparison) if g.name == "stop_probability"] == [False]


def test_run_prints_a_hint_line_and_writes_strict_json(tmp_path, tiny_dir):
    out = tmp_path / "run"
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello world, this is a test.\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "parity.cli", "run", str(prompts), "--out", str(out), "--max-frames", "4", "--mos", "none",
         "--set", "candidate.dtype=float32", "--set", "candidate.cache=dynamic", "--set", "candidate.attention=sdpa",
         "--set", "candidate.variants=mask_row=2@talker:1"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 1, proc.stderr
    assert "p000: hint: NaN from a fully masked row" in proc.stdout.replace("\n", " ") or \
        "hint: NaN from a fully masked row" in proc.stdout, proc.stdout
    summary = _strict_load((out / "summary.json").read_text())
    c = summary["prompts"][0]["comparison"]
    assert c["max_rel_l2"] is None or c["max_rel_l2"] < 1e-3  # the finite part; the NaN is counted apart
    assert c["nonfinite_points"] > 0 and c["first_divergence"]["nonfinite"]
    assert c["hints"][0]["class"] == "nan_masked_row"
    for path in list((out / "results").glob("*.json")) + list((out / "traces").glob("*.json")):
        _strict_load(path.read_text())
    html = (out / "report.html").read_text()
    assert "nan_masked_row" in html and "fully masked row" in html
