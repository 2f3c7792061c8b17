"""``parity compare``: a saved run judged again without any model, and two runs against one
reference; typed results and the committed JSON Schema, checked on real run outputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FRAMES = "6"
STRICT = ["--set", "gates.hidden_within_tolerance=true", "--set", "tolerances.bfloat16=1e-3"]


def parity(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "parity.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=900)


def analysed(summary: dict) -> dict:
    """The parts of a summary the analyse stage decides (not when or where it was written)."""
    return {k: summary[k] for k in ("prompts", "counts", "passed", "tolerance", "failure")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_dir):
    """Run A (the smoke candidate), run B (the same with RMSNorm variance in bf16) and run S (A's
    settings with strict gates), two prompts each, all against the same fp32 reference."""
    root = tmp_path_factory.mktemp("runs")
    prompts = root / "p.txt"
    prompts.write_text("Hello world, this is a test.\nA second prompt, a little longer than the first one.\n")
    out = {}
    for name, extra in (("A", []), ("B", ["--set", "candidate.variants=rmsnorm_lowp"]), ("S", STRICT)):
        proc = parity("run", str(prompts), "--out", str(root / name), "--max-frames", FRAMES, *extra)
        assert proc.returncode in (0, 1), proc.stderr
        out[name] = root / name
    return out


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_compare_with_nothing_changed_gives_the_runs_own_summary(runs, tmp_path):
    out = tmp_path / "again"
    proc = parity("compare", str(runs["A"]), "--out", str(out))
    own = load(runs["A"] / "summary.json")
    assert proc.returncode == (0 if own["passed"] else 1), proc.stderr
    again = load(out / "summary.json")
    assert analysed(again) == analysed(own)
    assert again["reanalysis_of"] == str(runs["A"])
    assert (out / "report.html").is_file() and (out / "junit.xml").is_file()


def test_compare_with_other_gates_equals_a_run_made_with_them(runs, tmp_path):
    """Re-judging run A with run S's settings gives what run S (a real run with them) gave."""
    out = tmp_path / "strict"
    proc = parity("compare", str(runs["A"]), *STRICT, "--out", str(out))
    strict = load(runs["S"] / "summary.json")
    again = load(out / "summary.json")
    for p in strict["prompts"]:  # the engine timings differ between two runs, nothing else
        p.pop("timing")
    for p in again["prompts"]:
        p.pop("timing")
    assert analysed(again) == analysed(strict)
    assert proc.returncode == (0 if strict["passed"] else 1)
    assert not load(runs["A"] / "summary.json")["prompts"][0]["gates"] == again["prompts"][0]["gates"]


def test_compare_loads_no_engine_and_no_model(runs, tmp_path):
    """Through the real CLI entry point, in a fresh interpreter: no engine module, no qwen_tts."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['parity', 'compare', {str(runs['A'])!r}, '--out', {str(tmp_path / 'x')!r}]\n"
        "try:\n    runpy.run_module('parity.cli', run_name='__main__')\nexcept SystemExit as e:\n    code = e.code\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('parity.engines.reference', 'parity.engines.faster', "
        "'qwen_tts', 'faster_qwen3_tts', 'parity.models', 'speechmos', 'utmos')))\n"
        "print('CODE', code, 'LOADED', bad)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert "CODE 0 LOADED []" in proc.stdout or "CODE 1 LOADED []" in proc.stdout, proc.stdout + proc.stderr


def test_compare_refuses_a_setting_that_needs_a_new_run(runs):
    proc = parity("compare", str(runs["A"]), "--set", "candidate.dtype=float32")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "candidate.dtype" in proc.stderr and "new parity run" in proc.stderr


def test_compare_refuses_to_overwrite_a_run(runs):
    proc = parity("compare", str(runs["A"]), "--out", str(runs["B"]))
    assert proc.returncode == 2 and "holds a parity run" in proc.stderr
    assert load(runs["B"] / "summary.json")["prompts"][0]["id"] == "p000"


def test_two_runs_say_what_got_better_or_worse(runs, tmp_path):
    out = tmp_path / "ab"
    proc = parity("compare", str(runs["A"]), str(runs["B"]), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    changes = load(out / "compare.json")
    a, b = load(runs["A"] / "summary.json"), load(runs["B"] / "summary.json")
    assert [p["id"] for p in changes["prompts"]] == [p["id"] for p in a["prompts"]]
    for change, pa, pb in zip(changes["prompts"], a["prompts"], b["prompts"]):
        ma, mb = pa["comparison"]["max_rel_l2"], pb["comparison"]["max_rel_l2"]
        assert change["a"]["max_rel_l2"] == ma and change["b"]["max_rel_l2"] == mb
        assert change["changes"]["max_rel_l2"] == ("same" if ma == mb else ("worse" if mb > ma else "better"))
        ga, gb = pa["comparison"]["free_run"]["agreement"], pb["comparison"]["free_run"]["agreement"]
        assert change["changes"]["agreement"] == ("same" if ga == gb else ("better" if gb > ga else "worse"))
        assert set(change["changes"]) >= {"first_divergence", "layers", "mos_delta", "nonfinite_points"}
    for p in changes["prompts"]:
        assert p["id"] in proc.stdout


def test_a_regression_exits_1(runs, tmp_path):
    """A max rel L2 limit between the two runs' worst errors: the worse run fails where the
    better passed, so comparing better -> worse is a regression (exit 1) and the reverse is not."""
    a, b = load(runs["A"] / "summary.json"), load(runs["B"] / "summary.json")
    worst = {n: max(p["comparison"]["max_rel_l2"] for p in s["prompts"]) for n, s in (("A", a), ("B", b))}
    better, worse = sorted(worst, key=worst.get)
    assert worst[better] < worst[worse]
    limit = f"gates.max_rel_l2={(worst[better] + worst[worse]) / 2}"
    proc = parity("compare", str(runs[better]), str(runs[worse]), "--set", limit, "--out", str(tmp_path / "r"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert any("max_rel_l2" in p["regressions"] for p in load(tmp_path / "r" / "compare.json")["prompts"])
    proc = parity("compare", str(runs[worse]), str(runs[better]), "--set", limit, "--out", str(tmp_path / "f"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert any("max_rel_l2" in p["fixed"] for p in load(tmp_path / "f" / "compare.json")["prompts"])


def test_two_runs_of_different_references_are_refused(runs, tmp_path):
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other"
    shutil.copytree(runs["B"], other)
    path = other / "traces" / "p001.reference.safetensors"
    tensors = load_file(str(path))
    tensors["talker_hidden"][0, 0, 0] += 1.0
    save_file(tensors, str(path))
    proc = parity("compare", str(runs["A"]), str(other), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "same reference" in proc.stderr and "p001" in proc.stderr


def test_real_summaries_validate_against_the_committed_schema(runs, tmp_path):
    import jsonschema

    schema = load(REPO / "parity" / "schema" / "summary.schema.json")
    validator = jsonschema.Draft202012Validator(schema)
    parity("compare", str(runs["A"]), "--out", str(tmp_path / "c"))
    for path in (runs["A"] / "summary.json", runs["S"] / "summary.json", tmp_path / "c" / "summary.json"):
        data = load(path)
        assert data["schema_version"] == 2
        assert not list(validator.iter_errors(data)), path
    broken = load(runs["A"] / "summary.json")
    broken["prompts"][0]["comparison"]["max_rel_l2"] = "inf"  # the old string sentinel is no longer valid
    assert list(validator.iter_errors(broken))


def test_records_round_trip_and_read_schema_1(runs):
    """Every record reads back what it wrote; a schema-1 summary (the committed GPU evidence,
    with its "inf" strings) reads into records that validate as schema 2."""
    import jsonschema

    from parity.results import Summary

    data = load(runs["B"] / "summary.json")
    assert Summary.from_json(data).to_json() == data
    schema = load(REPO / "parity" / "schema" / "summary.schema.json")
    old = load(REPO / "reports" / "faster-qwen3-tts" / "faster-qwen3-tts" / "summary.json")
    assert "schema_version" not in old
    upgraded = Summary.from_json(old)
    assert upgraded.schema_version == 1
    assert not list(jsonschema.Draft202012Validator(schema).iter_errors(upgraded.to_json()))
    assert [p.id for p in upgraded.prompts] == [p["id"] for p in old["prompts"]]


def test_compare_refuses_a_tokens_only_run(tmp_path, tiny_dir):
    """traces = "tokens" keeps no per-layer tensors: nothing to judge again, said in one line."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello world.\n")
    out = tmp_path / "tokens"
    proc = parity("run", str(prompts), "--out", str(out), "--max-frames", "2", "--mos", "none", "--set", "traces=tokens")
    assert proc.returncode in (0, 1), proc.stderr
    proc = parity("compare", str(out))
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "tokens" in proc.stderr
