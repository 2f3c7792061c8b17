"""Safety (issue 7): no pickle, no remote code, writes only inside --out, escaped HTML.

The end-to-end checks (a real run writes nothing outside --out, traces are safetensors, the report
escapes a prompt full of markup) are in test_reliability_faults.py, which shares its run.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("parity", "benchmarks", "tests") for p in (REPO / d).rglob("*.py"))


def _calls(text: str, name: str) -> list[str]:
    """The source text of every call ``name(...)`` (balanced parentheses)."""
    found = []
    for m in re.finditer(re.escape(name) + r"\s*\(", text):
        depth, i = 0, m.end() - 1
        for i in range(m.end() - 1, len(text)):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            if depth == 0:
                break
        found.append(text[m.start() : i + 1])
    return found


def test_sources_are_found():
    assert len(SOURCES) > 20 and any(p.name == "run.py" for p in SOURCES)


def test_every_torch_load_is_weights_only():
    offenders = [
        f"{p.relative_to(REPO)}: {call[:80]}"
        for p in SOURCES for call in _calls(p.read_text(encoding="utf-8"), "torch.load")
        if not re.search(r"weights_only\s*=\s*True", call)
    ]
    assert not offenders, offenders


@pytest.mark.parametrize("pattern", [
    "trust_remote_code" + r"\s*=\s*True",  # split so this file does not match itself
    r"^\s*import " + "pickle", r"\b" + "pickle" + r"\.loads?\(", r"\b" + "dill" + r"\b", r"\b" + "joblib" + r"\.load",
    r"allow_pickle\s*=\s*" + "True", r"torch\.save\(",
])
def test_no_untrusted_code_or_pickle_in_parity(pattern):
    offenders = [str(p.relative_to(REPO)) for p in SOURCES
                 if "parity" in p.parts[len(REPO.parts):][:1] and re.search(pattern, p.read_text(encoding="utf-8"), re.M)]
    assert not offenders, f"{pattern}: {offenders}"


def test_grep_finds_an_unsafe_load():
    """The checks above can fail."""
    unsafe = "x = torch." + "load(f, map_location=('cpu'))"  # split so the scan above does not see it
    assert not re.search(r"weights_only\s*=\s*True", _calls(unsafe, "torch.load")[0])
    assert _calls("torch.load(path, weights_only=True)", "torch.load") == ["torch.load(path, weights_only=True)"]


# ----- file names built from prompt ids stay inside --out ----------------------------------------

TEMPLATES = ["results/{id}.json", "traces/{id}.reference.safetensors", "traces/{id}.candidate.forced.json",
             "traces/{id}.truth.safetensors", "audio/{id}.candidate.wav", "points/{id}.csv.gz"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.one_of(st.text(max_size=70), st.sampled_from(["..", ".", "a/../..", "/etc/passwd", "a\\b", "~", "-rf", "a..b", "CON", "x" * 64])))
def test_prompt_ids_cannot_escape_out(tmp_path, prompt_id):
    from parity.errors import BadInput
    from parity.prompts import load_prompts

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"text": "hi", "id": prompt_id}) + "\n", encoding="utf-8")
    try:
        (prompt,) = load_prompts(path)
    except BadInput:
        return
    out = (tmp_path / "out").resolve()
    for template in TEMPLATES:
        target = (out / template.format(id=prompt.id)).resolve()
        assert target.parent.parent == out and "/" not in prompt.id and "\\" not in prompt.id
        assert not prompt.id.startswith((".", "-"))


@pytest.mark.parametrize("name", ["../../etc", "/abs/path", "..", "", "a/b\\c", ".hidden", "x" * 300])
def test_default_out_dir_is_one_component_under_runs(name):
    from parity.cli import default_out

    out = default_out(name)
    assert out.parent == Path("runs") and "/" not in out.name and not out.name.startswith(".") and len(out.name) < 100


def test_report_refuses_a_summary_whose_ids_are_paths(tmp_path, monkeypatch, capfd):
    from parity import cli

    (tmp_path / "summary.json").write_text(json.dumps({"prompts": [{"id": "../../etc/passwd", "status": "ok"}]}))
    monkeypatch.setattr(sys, "argv", ["parity", "report", str(tmp_path)])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 2 and "not a valid id" in capfd.readouterr().err
    assert not (tmp_path / "report.html").exists()


def test_html_report_escapes_user_text(tmp_path):
    """Every user-controlled string (prompt text, recipe name, command, failure) is escaped."""
    from parity.report import html

    evil = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    summary = {
        "command": f"parity run {evil}", "recipe": {"name": evil}, "model": evil, "passed": False,
        "failure": f"RuntimeError: {evil}", "counts": {"prompts": 1, "ran": 0, "passed": 0, "not_run": 1},
        "prompts": [{"id": "p000", "text": evil, "line": 1, "status": "not_run", "gates": [], "passed": False}],
        "sides": {"reference": {"engine": evil}}, "environment": {"host": evil}, "tolerance": 0.01,
    }
    text = html.render(summary, tmp_path)
    assert "<script>alert" not in text and "<img src=x" not in text
    assert "&lt;script&gt;alert" in text
