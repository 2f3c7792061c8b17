"""Faults mid-run, Ctrl-C, --resume, NaN/inf, and what a run writes where (issue 7).

Faults are injected through the real ``parity`` process with the documented test hook
``PARITY_FAULT=SIDE:K:KIND`` (parity/run.py): the engine stays real and fails at prompt K.
Every run uses 3 short prompts and ``--max-frames 3`` to keep the suite fast.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
# The first prompt carries HTML so the end-to-end run also checks escaping in report.html.
PROMPTS = 'Say <b>bold</b> & "quoted" <script>alert(1)</script>.\nTwo words here.\nThree little words.\n'
IDS = ["p000", "p001", "p002"]
pytestmark = pytest.mark.slow  # real parity processes, about 1.5 minutes in all on 2 CPU cores


def start(prompts: Path, out: Path, *extra: str, fault: str | None = None, cwd: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PARITY_FAULT", None)
    if fault:
        env["PARITY_FAULT"] = fault
    return subprocess.Popen(
        [sys.executable, "-m", "parity.cli", "run", str(prompts), "--out", str(out), "--max-frames", "3", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd or REPO, env=env,
        # A shell that starts us in the background ignores SIGINT; the tests need the default.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def parity_run(prompts: Path, out: Path, *extra: str, fault: str | None = None, cwd: Path | None = None):
    proc = start(prompts, out, *extra, fault=fault, cwd=cwd)
    stdout, stderr = proc.communicate(timeout=600)
    return proc.returncode, stdout, stderr


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def comparable(s: dict) -> dict:
    """A summary without what legitimately differs between runs (timing, command, memory)."""
    return {
        "prompts": [{k: v for k, v in p.items() if k != "timing"} for p in s["prompts"]],
        "counts": s["counts"], "passed": s["passed"], "failure": s["failure"], "recipe": s["recipe"],
        "sides": s["sides"], "prompts_digest": s["prompts_digest"],
    }


def one_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    # Off a terminal, progress is logged to stderr as "parity: [  12.3 s] ..." lines; the error is one line.
    lines = [ln for ln in stderr.strip("\n").splitlines() if not ln.startswith("parity: [")]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "p.txt"
    path.write_text(PROMPTS)
    return path


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, prompts_file, tiny_dir):
    """An uninterrupted run, started in an empty working directory."""
    cwd = tmp_path_factory.mktemp("cwd")
    out = cwd / "out"
    code, stdout, stderr = parity_run(prompts_file, out, cwd=cwd)
    assert code in (0, 1), stderr
    return code, out, cwd


def test_baseline_writes_only_inside_out_and_only_safetensors(baseline):
    code, out, cwd = baseline
    assert sorted(os.listdir(cwd)) == ["out"]
    s = summary(out)
    assert s["counts"] == {"prompts": 3, "ran": 3, "passed": s["counts"]["passed"], "not_run": 0}
    assert code == (0 if s["passed"] else 1)
    for path in out.rglob("*"):
        assert path.resolve().is_relative_to(out.resolve())
        # The run marker is the one hidden file a run keeps (it tells --force what parity wrote).
        assert not path.name.startswith(".") or path.name == ".parity-run.json", f"temporary file left behind: {path}"
    traces = sorted(p.name for p in (out / "traces").iterdir())
    assert traces and all(n.endswith((".safetensors", ".json")) for n in traces), traces
    from safetensors.torch import load_file

    for name in traces:
        if name.endswith(".safetensors"):
            assert load_file(str(out / "traces" / name))  # plain tensors, no pickle
    memory = s["peak_memory"]
    assert set(memory) >= {"reference", "candidate"} and all(m["bytes"] > 10_000_000 for m in memory.values())


def test_report_escapes_user_text(baseline):
    _, out, _ = baseline
    html = (out / "report.html").read_text()
    assert "<script>alert(1)</script>" not in html and "<b>bold</b>" not in html
    assert "&lt;b&gt;bold&lt;/b&gt;" in html or "&lt;b&gt;bold" in html
    import xml.etree.ElementTree as ET

    ET.parse(out / "junit.xml")  # well-formed despite the markup in the prompt


@pytest.mark.parametrize("fault,k,kind,resume", [
    ("candidate:2:raise", 2, "RuntimeError", True),
    ("candidate:1:oom", 1, "OutOfMemoryError", True),
    ("reference:1:raise", 1, "RuntimeError", False),  # the candidate still finishes prompt 0
])
def test_engine_fault_keeps_finished_prompts_and_resume_completes(fault, k, kind, resume, baseline, prompts_file, tmp_path):
    base_code, base_out, _ = baseline
    out = tmp_path / "run"
    code, _, stderr = parity_run(prompts_file, out, fault=fault)
    line = one_line(stderr)
    assert code == 3 and kind in line and "--resume" in line, stderr
    s = summary(out)
    assert s["failure"].startswith(kind) and not s["passed"]
    assert [p["status"] for p in s["prompts"]] == ["ok"] * k + ["not_run"] * (3 - k)
    assert s["counts"]["ran"] == k and s["counts"]["not_run"] == 3 - k
    from parity.trace import Trace

    for pid in IDS[:k]:
        result = json.loads((out / "results" / f"{pid}.json").read_text())
        assert result["status"] == "ok"
        assert Trace.load(out / "traces", f"{pid}.candidate.forced").n_frames >= 1
        assert "digest" in result  # sealed to its traces and recipe; the summary does not repeat it
        result = {k: v for k, v in result.items() if k != "digest"}
        assert result == next(p for p in summary(base_out)["prompts"] if p["id"] == pid) | {"timing": result["timing"]}
    for pid in IDS[k:]:
        assert not (out / "results" / f"{pid}.json").exists()
    if not resume:
        return
    code, _, stderr = parity_run(prompts_file, out, "--resume")
    assert code == base_code, stderr
    assert comparable(summary(out)) == comparable(summary(base_out))


def test_nan_is_reported_where_it_first_appears(baseline, prompts_file, tmp_path):
    out = tmp_path / "run"
    code, _, stderr = parity_run(prompts_file, out, fault="candidate:1:nan")
    assert code == 1, stderr  # a gate failure, not a crash
    s = summary(out)
    bad = s["prompts"][1]
    assert bad["comparison"]["first_nonfinite"] == {"component": "talker", "step": 1, "substep": -1, "layer": 1, "point": "layer1"}
    assert bad["comparison"]["nonfinite_audio"]["candidate"]["sample"] > 0
    gate = next(g for g in bad["gates"] if g["name"] == "no_nonfinite")
    assert not gate["passed"] and "talker step 1 layer1" in gate["detail"] and "candidate audio" in gate["detail"]
    assert all(g["passed"] for g in s["prompts"][0]["gates"] if g["name"] == "no_nonfinite")


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_leaves_a_readable_partial_summary(sig, code, baseline, prompts_file, tmp_path):
    out = tmp_path / "run"
    proc = start(prompts_file, out, fault="candidate:1:hang")  # prompt 1 hangs until the signal
    deadline = time.time() + 300
    while not (out / "results" / "p000.json").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    time.sleep(0.5)  # well inside the hang
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert "interrupted" in one_line(stderr)
    s = summary(out)
    assert s["failure"] == f"interrupted by {sig.name}" and not s["passed"]
    assert [p["status"] for p in s["prompts"]] == ["ok", "not_run", "not_run"]
    assert "Run failed" in (out / "report.html").read_text()
    # --resume from here is the same code path as after an engine fault (tested above).


def test_resume_never_trusts_a_half_written_or_partial_prompt(baseline, prompts_file, tmp_path):
    """A truncated result or a missing trace file makes that prompt run again, from the reference."""
    base_code, base_out, _ = baseline
    out = tmp_path / "run"
    shutil.copytree(base_out, out)
    (out / "results" / "p001.json").write_text((out / "results" / "p001.json").read_text()[:100])
    (out / "traces" / "p002.reference.json").unlink()
    before = (out / "results" / "p000.json").stat().st_mtime_ns
    code, _, stderr = parity_run(prompts_file, out, "--resume")
    assert code == base_code, stderr
    assert comparable(summary(out)) == comparable(summary(base_out))
    assert (out / "results" / "p000.json").stat().st_mtime_ns == before  # finished prompt reused
    assert (out / "traces" / "p002.reference.json").is_file()


def test_resume_of_a_finished_run_changes_nothing(baseline, prompts_file, tmp_path):
    base_code, base_out, _ = baseline
    out = tmp_path / "run"
    shutil.copytree(base_out, out)
    code, _, stderr = parity_run(prompts_file, out, "--resume")
    assert code == base_code, stderr
    assert comparable(summary(out)) == comparable(summary(base_out))


def test_resume_refuses_another_recipe(baseline, prompts_file, tmp_path):
    _, base_out, _ = baseline
    out = tmp_path / "run"
    shutil.copytree(base_out, out)
    proc = start(prompts_file, out, "--resume", "--set", "candidate.attention=sdpa")
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "candidate.attention 'eager' -> 'sdpa'" in one_line(stderr)


# ----- NaN/inf detection helpers (no subprocess) ------------------------------------------------


def test_first_nonfinite_point_follows_execution_order(baseline):
    import torch

    from parity.run import first_nonfinite_point
    from parity.trace import Trace

    _, out, _ = baseline
    trace = Trace.load(out / "traces", "p000.reference")
    assert first_nonfinite_point(trace) is None
    trace.pred_hidden[1, 4, 2, 0] = float("inf")  # predictor frame 1, sub-step 4, layer1
    trace.talker_hidden[2, 0, 5] = float("nan")  # talker step 2 embed: later in execution order
    assert first_nonfinite_point(trace) == {"component": "predictor", "step": 1, "substep": 4, "layer": 1, "point": "layer1"}
    trace.talker_logits[1, 3] = float("nan")  # talker step 1 logits: before predictor frame 1
    n_layers = trace.talker_hidden.shape[1] - 1
    assert first_nonfinite_point(trace) == {"component": "talker", "step": 1, "substep": -1, "layer": n_layers, "point": "logits"}
    trace.talker_hidden = torch.zeros(0)
    assert first_nonfinite_point(trace) is None


def test_nonfinite_audio_is_found_and_written_as_silence(tmp_path):
    import soundfile as sf

    from parity.run import first_nonfinite_sample, write_wav

    wav = np.zeros(2400, dtype=np.float32)
    wav[1200] = np.inf
    wav[1300:] = np.nan
    assert first_nonfinite_sample(wav, 24000) == {"sample": 1200, "seconds": 0.05, "count": 1101}
    write_wav(tmp_path / "a.wav", wav, 24000)
    back, sr = sf.read(str(tmp_path / "a.wav"))
    assert sr == 24000 and np.isfinite(back).all()
