"""``parity run`` end to end through the real CLI process, and its bad-input behaviour."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def parity(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "parity.cli", *args], capture_output=True, text=True, cwd=cwd or REPO, env=env, timeout=600
    )


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, tiny_dir):
    out = tmp_path_factory.mktemp("smoke") / "run"
    proc = parity("run", "recipes/prompts/smoke.txt", "--recipe", "recipes/smoke.toml", "--out", str(out))
    return proc, out


def test_smoke_run_writes_the_contract_files(smoke_run):
    proc, out = smoke_run
    summary = json.loads((out / "summary.json").read_text())
    # Exit status follows the gates: 0 when every prompt passes, 1 otherwise.
    assert proc.returncode == (0 if summary["passed"] else 1), proc.stderr
    assert summary["counts"]["prompts"] == 3 and summary["counts"]["ran"] == 3
    for p in summary["prompts"]:
        assert (out / p["audio"]["reference"]).stat().st_size > 1000
        assert (out / p["audio"]["candidate"]).stat().st_size > 1000
        assert (out / "traces" / f"{p['id']}.reference.safetensors").is_file()
        assert (out / "traces" / f"{p['id']}.candidate.forced.safetensors").is_file()
        assert (out / "points" / f"{p['id']}.csv.gz").is_file()
    assert "<html" in (out / "report.html").read_text()
    suite = ET.parse(out / "junit.xml").getroot().find("testsuite")
    n_gates = sum(len(p["gates"]) for p in summary["prompts"])
    assert int(suite.get("tests")) == n_gates
    assert int(suite.get("failures")) == sum(not g["passed"] for p in summary["prompts"] for g in p["gates"])
    # The console table names every prompt.
    for p in summary["prompts"]:
        assert p["id"] in proc.stdout


def test_smoke_candidate_really_diverges(smoke_run):
    """bf16/eager/static vs fp32/sdpa/dynamic is not bit-identical: the tool must see that."""
    _, out = smoke_run
    summary = json.loads((out / "summary.json").read_text())
    for p in summary["prompts"]:
        c = p["comparison"]
        assert not c["bit_identical"]
        assert 1e-4 < c["max_rel_l2"] < 0.1


def test_traces_reload(smoke_run):
    from parity.trace import Trace

    _, out = smoke_run
    trace = Trace.load(out / "traces", "p000.reference")
    assert trace.talker_hidden.shape[0] == trace.n_steps == trace.n_frames + 1


def test_gate_failure_exits_1(tmp_path, tiny_dir):
    out = tmp_path / "strict"
    proc = parity(
        "run", "recipes/prompts/smoke.txt", "--out", str(out), "--max-frames", "4",
        "--set", "gates.hidden_within_tolerance=true", "--set", "tolerances.bfloat16=1e-6",
    )
    assert proc.returncode == 1, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert not summary["passed"]
    assert all(not g["passed"] for p in summary["prompts"] for g in p["gates"] if g["name"] == "hidden_within_tolerance")


@pytest.mark.parametrize("args,needle", [
    (["run", "does/not/exist.txt"], "exist.txt"),
    (["run", "recipes/prompts/smoke.txt", "--recipe", "nope.toml"], "nope.toml"),
    (["run", "recipes/prompts/smoke.txt", "--set", "candidate.dtype=float8"], "float8"),
    (["run", "recipes/prompts/smoke.txt", "--model", "random:huge"], "random:huge"),
    (["report", "does/not/exist"], "summary.json"),
])
def test_bad_input_is_one_line_and_exit_2(args, needle):
    proc = parity(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0] and "Traceback" not in proc.stderr


def test_report_rerenders(smoke_run):
    _, out = smoke_run
    (out / "report.html").unlink()
    proc = parity("report", str(out))
    assert proc.returncode == 0 and (out / "report.html").is_file()


def test_smoke_scores_both_sides_audio(smoke_run):
    _, out = smoke_run
    summary = json.loads((out / "summary.json").read_text())
    for p in summary["prompts"]:
        mos = p["mos"]
        assert mos["scorer"] == "dnsmos" and mos["seeds"] == 1
        assert 1.0 <= mos["reference"] <= 5.0 and 1.0 <= mos["candidate"] <= 5.0
        assert mos["delta"] == pytest.approx(mos["candidate"] - mos["reference"])
        assert "audible_from_s" in p and "first_divergence_s" in p


def test_mos_gate_fails_the_run(tmp_path, tiny_dir):
    out = tmp_path / "mosgate"
    # No candidate can beat its reference by a full MOS point on identical settings.
    proc = parity("run", "recipes/prompts/smoke.txt", "--out", str(out), "--max-frames", "12",
                  "--set", "candidate.dtype=float32", "--set", "mos.min_mean_delta=1.0")
    assert proc.returncode == 1, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    gates = [g for p in summary["prompts"] for g in p["gates"] if g["name"] == "mos_delta"]
    assert len(gates) == 3 and not any(g["passed"] for g in gates)


def test_utmos_without_checkpoint_is_refused_before_running(tmp_path):
    env_free = {k: v for k, v in os.environ.items() if k != "PARITY_UTMOS_CHECKPOINT"}
    proc = subprocess.run([sys.executable, "-m", "parity.cli", "run", "recipes/prompts/smoke.txt", "--out", str(tmp_path / "u"),
                           "--mos", "utmos"], capture_output=True, text=True, cwd=REPO, env=env_free, timeout=300)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "PARITY_UTMOS_CHECKPOINT" in proc.stderr
    assert not (tmp_path / "u" / "traces").exists()  # refused before any engine ran


def test_bisect_into_a_run_dir_shows_in_its_report(smoke_run):
    """`parity bisect --out RUN_DIR` then `parity report RUN_DIR`: the bisect table is in the report."""
    _, out = smoke_run
    proc = parity("bisect", "recipes/prompts/smoke.txt", "--recipe", "recipes/bisect-smoke.toml", "--steps", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "kv_quant=int8@talker" in json.loads((out / "bisect.json").read_text())["bisect"]["verdict"]
    proc = parity("report", str(out))
    assert proc.returncode == 0
    html = (out / "report.html").read_text()
    assert "kv_quant=int8@talker" in html and "proof" in html.lower()
