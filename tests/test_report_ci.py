"""CI outputs without engines: junit.xml counts and cases, the GitHub step summary, and
report.html rendered from a summary whose run directory holds nothing else."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from parity.report import html, junit, step_summary


def _gate(name: str, passed: bool, detail: str = "detail") -> dict:
    return {"name": name, "passed": passed, "detail": detail}


def _prompt(pid: str, gates: list[dict], status: str = "ok", text: str = "hello") -> dict:
    p = {"id": pid, "text": text, "line": 1, "status": status, "gates": gates,
         "passed": status == "ok" and all(g["passed"] for g in gates)}
    if status == "ok":
        p["comparison"] = {
            "first_divergence": {"component": "talker", "step": 3, "substep": -1, "layer": 1, "point": "layer1",
                                 "rel_l2": 0.02, "max_abs": 0.1, "cosine": 0.9998, "sqnr_db": 34.0, "tolerance": 0.01},
            "first_nonfinite": None, "max_rel_l2": 0.02, "points_compared": 100, "points_over": 3,
            "first_flip": None, "ref_frames": 10, "free_run": {"agreement": 0.5, "codebook0_agreement": 0.6,
                                                              "first_diff_frame": 4, "frames_compared": 10},
            "length_diff": 0,
        }
        p["audio"] = {"reference": f"audio/{pid}.reference.wav", "candidate": f"audio/{pid}.candidate.wav"}
    return p


@pytest.fixture
def summary() -> dict:
    return {
        "command": "parity run p.txt --out 'a|b'", "recipe": {"name": "unit"}, "tolerance": 0.01,
        "environment": {"torch": "2.11"}, "sides": {"reference": {"dtype": "float32"}, "candidate": {"dtype": "bfloat16"}},
        "prompts": [
            _prompt("p000", [_gate("no_nonfinite", True), _gate("max_rel_l2", True)]),
            _prompt("p001", [_gate("no_nonfinite", True), _gate("max_rel_l2", False, "max rel L2 0.5 (limit 0.1)\x01")],
                    text="<script>alert(1)</script> | pipe"),
            _prompt("p002", [], status="not_run"),
            _prompt("p003", []),  # every gate switched off
        ],
        "failure": "RuntimeError: CUDA out of memory <bad> | x",
        "counts": {"prompts": 4, "ran": 3, "passed": 2}, "passed": False,
    }


def test_junit_counts_and_cases(summary, tmp_path):
    path = tmp_path / "junit.xml"
    junit.write(summary, path)
    root = ET.parse(path).getroot()  # parses: the control character was dropped
    suite = root.find("testsuite")
    cases = [(c.get("classname"), c.get("name")) for c in suite.findall("testcase")]
    assert cases == [("parity.p000", "no_nonfinite"), ("parity.p000", "max_rel_l2"), ("parity.p001", "no_nonfinite"),
                     ("parity.p001", "max_rel_l2"), ("parity.p002", "run"), ("parity.p003", "run"), ("parity", "engine")]
    for element in (root, suite):
        assert (element.get("tests"), element.get("failures"), element.get("errors"), element.get("skipped")) == ("7", "1", "1", "1")
    failure = suite.find("testcase[@name='max_rel_l2'][@classname='parity.p001']/failure")
    assert failure.get("message").startswith("max rel L2 0.5") and "talker step 3 layer1" in failure.text
    assert suite.find("testcase[@classname='parity.p002']/skipped") is not None
    assert suite.find("testcase[@name='engine']/error").get("message").startswith("RuntimeError")


def test_step_summary_written_when_the_variable_is_set(summary, tmp_path, monkeypatch):
    target = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(target))
    html.write(summary, tmp_path, tmp_path / "report.html")
    md = target.read_text(encoding="utf-8")
    assert md.startswith("### parity (unit): ❌ FAIL")
    assert "| max_rel_l2 | 1/2 | p001 |" in md
    assert "| p001 | talker step 3 layer1 | 0.02 |" in md and "**FAIL** max_rel_l2" in md
    assert "| p002 | not_run |" in md
    assert "&lt;bad&gt; &#124; x" in md and "<bad>" not in md
    html.write(summary, tmp_path, tmp_path / "report.html")
    assert target.read_text(encoding="utf-8") == md * 2  # appended, never overwritten


def test_no_step_summary_without_the_variable(summary, tmp_path, monkeypatch):
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    assert step_summary.write_step_summary(summary) is None
    html.write(summary, tmp_path, tmp_path / "report.html")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]


def test_report_without_run_data_still_renders_and_escapes(summary, tmp_path):
    text = html.render(summary, tmp_path)
    assert 'id="verdict" class="verdict fail">FAIL<' in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt; | pipe" in text and "<script>alert" not in text
    assert "RuntimeError: CUDA out of memory &lt;bad&gt;" in text
    assert "points/p000.csv.gz is missing" in text and "no audio" in text
    assert "parity run p.txt --out &#39;a|b&#39;" in text
    assert text.count('class="prompt"') == 4


def test_optional_fields_are_rendered_when_present(summary, tmp_path):
    summary["prompts"][0]["mos"] = {"reference": {"ovrl": 3.25}, "candidate": {"ovrl": 3.0}, "delta": -0.25}
    summary["prompts"][0]["audible_from_s"] = 1.84
    summary["bisect"] = {"factors": ["attention", "dtype"], "steps": [{"factor": "<attention>", "restores": True}]}
    text = html.render(summary, tmp_path)
    assert "<th>MOS ref</th>" in text and "3.25" in text and "-0.250" in text
    assert "1.84 s" in text
    assert 'id="bisect"' in text and "&lt;attention&gt;" in text and "<attention>" not in text
    plain = html.render({**summary, "bisect": None, "prompts": [_prompt("p000", [])]}, tmp_path)
    assert "MOS ref" not in plain and 'id="bisect"' not in plain and "audible from" not in plain


def test_example_workflow_is_valid_and_points_at_real_files():
    yaml = pytest.importorskip("yaml")
    repo = Path(__file__).resolve().parents[1]
    flow = yaml.safe_load((repo / "recipes/ci/parity-gpu.yml").read_text())
    steps = flow["jobs"]["parity"]["steps"]
    run = next(s["run"] for s in steps if s.get("id") == "parity")
    for word in run.split():
        if word.startswith("recipes/"):
            assert (repo / word).is_file(), word
    uploaded = next(s for s in steps if "upload-artifact" in s.get("uses", ""))["with"]["path"]
    assert "runs/ci/report.html" in uploaded and "runs/ci/audio/" in uploaded
