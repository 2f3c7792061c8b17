"""The console at 80 columns, the run overview behind it and the report's first screen, and the
off-terminal progress lines: all from summary records built from JSON (no engine runs here)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from parity.report import html
from parity.report.console import closing_line, print_summary
from parity.report.overview import overview, short_where
from parity.report.progress import Progress
from parity.results import Divergence, Flip, Summary

REPO = Path(__file__).resolve().parents[1]


def _prompt(pid: str, first: dict | None, passed: bool, agreement: float, hints=None, audible=None) -> dict:
    return {
        "id": pid, "text": "hello", "status": "ok", "passed": passed,
        "gates": [{"name": "hidden_within_tolerance", "passed": passed, "detail": ""}],
        "comparison": {
            "first_divergence": first, "max_rel_l2": 0.02, "points_compared": 10, "points_over": 1,
            "first_flip": {"component": "predictor", "step": 4, "substep": 10, "layer": -1, "point": "logits",
                           "ref_token": 1, "cand_token": 2, "ref_rank_in_cand": 1, "cand_margin": 0.031, "ref_margin": 0.001,
                           "logit_error": 0.05, "logit_noise": 0.002, "near_tie": True},
            "free_run": {"agreement": agreement, "codebook0_agreement": agreement, "first_diff_frame": 3},
            "ref_frames": 24, "length_diff": 0, "hints": hints if hints is not None else [],
        },
        "audio": {"reference": f"audio/{pid}.reference.wav", "candidate": f"audio/{pid}.candidate.wav"},
        "mos": {"scorer": "dnsmos", "metric": "ovrl", "reference": 3.0, "candidate": 2.9, "delta": -0.1, "worst_delta": -0.1},
        "audible_from_s": audible, "audible_threshold_db": 6.0,
    }


TALK = {"component": "talker", "step": 1, "substep": -1, "layer": 0, "point": "layer0", "rel_l2": 0.0035}
PRED = {"component": "predictor", "step": 0, "substep": 10, "layer": 1, "point": "layer1", "rel_l2": 0.02}
HINT = {"class": "enters_at_layer", "label": "hint", "text": "enters at layer 0 of the first decode step: the single-token "
        "decode path differs", "evidence": {"rel_l2": 0.0035, "earlier_steps_max_rel_l2": 0.0}}


def record(prompts: list[dict], model: str = "random:tiny") -> Summary:
    """The typed record the console and the overview read."""
    return Summary.from_json(summary(prompts, model))


def summary(prompts: list[dict], model: str = "random:tiny") -> dict:
    """summary.json's content (what the HTML report renders)."""
    return {
        "model": model, "tolerance": 1e-3, "prompts": prompts, "passed": all(p["passed"] for p in prompts),
        "counts": {"prompts": len(prompts), "ran": len(prompts), "passed": sum(p["passed"] for p in prompts), "not_run": 0},
        "sides": {"reference": {"engine": "reference", "dtype": "float32", "attention": "sdpa", "cache": "dynamic"},
                  "candidate": {"engine": "faster", "dtype": "bfloat16", "attention": "sdpa", "cache": "static:2048"}},
        "command": "parity run prompts.txt --recipe r.toml --out runs/x --max-frames 32 --force",
        "prompts_file": "prompts.txt",
    }


def test_short_labels_are_distinct_and_stable():
    assert short_where(Divergence.from_json(TALK)) == "talk s1 L0"
    assert short_where(Divergence.from_json(PRED)) == "pred f0.s10 L1"
    assert short_where(Divergence.from_json({**PRED, "substep": 1})) == "pred f0.s1 L1"  # 'predictor 0.1' and '0.10' looked alike
    assert short_where(Divergence.from_json({**TALK, "step": 0, "layer": -1, "point": "embed"})) == "talk s0 emb"
    flip = Flip.from_json(_prompt("p", None, True, 1.0)["comparison"]["first_flip"])
    assert short_where(flip) == "pred f4.s10"


def test_overview_counts_where_and_takes_the_leading_hint():
    prompts = [_prompt(f"p{i:02d}", TALK, False, 0.9, [HINT]) for i in range(15)]
    prompts += [_prompt(f"q{i}", PRED, False, 0.9, []) for i in range(2)] + [_prompt("r0", None, True, 1.0)]
    o = overview(record(prompts))
    assert o.where[0] == ("talker step 1 layer0", 15) and o.where_short[1] == ("pred f0.s10 L1", 2)
    assert o.within == 1 and o.ran == 18
    assert o.why.startswith("enters at layer 0 of the first decode step") and "(15/18 prompts; the numbers are p00's)" in o.why
    assert o.why_evidence == ["p00's evidence: rel l2 0.0035, earlier steps max rel l2 0"]


def test_overview_without_hints_and_with_a_bisect():
    prompts = [_prompt("p0", TALK, False, 0.9, [])]
    assert overview(record(prompts)).why is None
    bisect = {"verdict": "culprit: kv_quant=int8 (proof holds)", "proof": {
        "culprits_alone": {"run": 7, "purpose": "proof", "factors": ["kv_quant=int8"], "side": "x", "diverges": True,
                           "first_divergence": TALK, "max_rel_l2": 0.03},
        "candidate_without": {"run": 8, "purpose": "proof", "factors": [], "side": "x", "diverges": False, "max_rel_l2": 1e-6},
        "candidate_without_is_reference": False, "holds": True}}
    o = overview(record(prompts), bisect)
    assert o.why_source == "bisect" and "kv_quant=int8" in o.why
    assert any("run 7" in e for e in o.why_evidence) and any("run 8" in e and "parity" in e for e in o.why_evidence)


def test_overview_explains_an_empty_audible_from_and_names_the_scorer():
    o = overview(record([_prompt("p0", TALK, True, 0.2)]))
    assert "no 80 ms segment" in o.audible and "6 dB" in o.audible
    assert "DNSMOS" in o.mos and "-0.100" in o.mos
    assert o.low_agreement == ["p0"]
    assert any("random weights" in w for w in o.warnings)
    assert not overview(record([_prompt("p0", TALK, True, 0.2)], model="Qwen/x")).warnings


def test_console_fits_80_columns_with_hints_audio_and_closing_line():
    prompts = [_prompt("p000", PRED, True, 0.023), _prompt("p001", TALK, False, 0.9, [HINT]), _prompt("p002", None, True, 1.0)]
    buf = io.StringIO()
    print_summary(record(prompts), Console(file=buf, width=80, force_terminal=False, color_system=None), seconds=24.2)
    text = buf.getvalue()
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80, text
    row = next(line for line in lines if line.startswith("p000"))
    assert "pred f0.s10 L1" in row and "pass !" in row and "2.3%" in row and "0.031 tie" in row
    assert any(line.startswith("p001: hint: enters at layer 0 of the first decode step") for line in lines)
    assert not any(line.startswith("p000: hint") for line in lines)  # hints only under failing prompts
    assert any(line.startswith("audio: ΔMOS -0.100") for line in lines)
    assert "reference: reference" not in text
    assert "1 failed, 2 passed in 24 s" in lines[-1]


def test_console_prints_the_flip_label_the_record_carries():
    p = _prompt("p000", PRED, False, 0.5)
    p["comparison"]["first_flip"].update(label="sampler", near_tie=False)
    buf = io.StringIO()
    print_summary(record([p]), Console(file=buf, width=80, force_terminal=False, color_system=None))
    row = next(line for line in buf.getvalue().splitlines() if line.startswith("p000"))
    assert "0.031 sampler" in row
    words = " ".join(buf.getvalue().split())
    assert "FAIL hidden within tolerance" in words  # the gate's name wraps between words, not inside one


def test_closing_line_counts_not_run():
    s = summary([_prompt("a", None, True, 1.0)])
    s["prompts"].append({"id": "b", "status": "not_run", "passed": False, "gates": []})
    s["passed"] = False
    assert closing_line(Summary.from_json(s), 3.4)[0] == "1 passed, 1 not run in 3 s"


def test_report_first_screen_answers_where_why_and_whether_it_matters(tmp_path):
    prompts = [_prompt(f"p{i:02d}", TALK, False, 0.9, [HINT]) for i in range(15)]
    prompts += [_prompt(f"q{i}", PRED, False, 0.4) for i in range(3)]
    text = html.render(summary(prompts), tmp_path)
    first = text[:text.index('id="prompts"')]
    assert "15/18" in first and "talker step 1 layer0" in first
    assert "the single-token decode path differs" in first and "earlier steps max rel l2 0" in first
    assert "DNSMOS" in first and "no 80 ms segment" in first and "random weights" in first
    # the one-step bisect command: the run's own command, run-only options dropped, --out the run
    assert "parity bisect prompts.txt --recipe r.toml --out runs/x</code>" in first
    assert text.index('id="prompts"') < text.index('id="details"') < text.index('id="fingerprint"')
    assert "FINDINGS" not in text and "#2277" not in text


def test_report_first_screen_with_no_hints(tmp_path):
    text = html.render(summary([_prompt("p0", TALK, False, 0.9, [])]), tmp_path)
    why = text[text.index('id="why"'):text.index('id="matters"')]
    assert "no hint matches" in why and "parity bisect" in why


def test_progress_off_a_terminal_is_plain_lines():
    buf = io.StringIO()
    progress = Progress(stream=buf, live=False)
    progress("reference", 1, 2, "p000")
    progress("reference", 2, 2, "p001")
    progress("candidate", 1, 2, "p000")
    lines = buf.getvalue().splitlines()
    assert len(lines) == 3 and all(line.startswith("parity: [") and " s] " in line for line in lines)
    assert "reference 1/2 p000 done (ETA" in lines[0] and "candidate 1/2 p000" in lines[2]
    assert "\r" not in buf.getvalue()


def test_quiet_progress_prints_nothing():
    buf = io.StringIO()
    Progress(stream=buf, live=False, quiet=True)("reference", 1, 2, "p000")
    assert buf.getvalue() == ""


def test_engine_prints_go_to_the_log_not_stdout(tmp_path):
    code = (
        "import logging, os, sys\n"
        "from parity.capture import engine_output_to\n"
        "print('before')\n"
        f"with engine_output_to(lambda: {str(tmp_path)!r}):\n"
        "    print('CUDA graph captured!')\n"
        "    os.write(1, b'from C\\n')\n"
        "    logging.getLogger('faster_qwen3_tts.model').warning('Could not infer sample rate')\n"
        "print('after')\n"
        "logging.getLogger('faster_qwen3_tts.model').warning('outside the block')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["before", "after"]
    assert (tmp_path / "engine.log").read_text().split("\n")[:3] == [
        "CUDA graph captured!", "from C", "WARNING faster_qwen3_tts.model: Could not infer sample rate"]
    # Logged inside the block: in the log only; outside it: on stderr as Python prints it.
    assert proc.stderr.strip() == "outside the block"


def test_bisect_renders_as_tables_with_a_verdict_line(tmp_path):
    outcome = {"purpose": "alone", "factors": ["kv_quant=int8"], "side": "x", "seconds": 0.123456789}
    result = {
        "verdict": "culprit: kv_quant=int8 (proof holds)", "steps": 4, "tolerance": 0.005,
        "factors": [{"name": "kv_quant=int8", "describe": "+kv_quant=int8", "load_time": False},
                    {"name": "dtype", "describe": "dtype: float32 -> bfloat16", "load_time": True}],
        "culprits": ["kv_quant=int8"],
        "alone": {"kv_quant=int8": {**outcome, "run": 2, "diverges": True, "first_divergence": TALK, "max_rel_l2": 0.0123456789},
                  "dtype": {**outcome, "run": 3, "diverges": False, "max_rel_l2": 0.000123456789}},
        "removed": {},
        "proof": {"culprits_alone": {**outcome, "run": 5, "diverges": True, "first_divergence": TALK, "max_rel_l2": 0.01},
                  "candidate_without": None, "candidate_without_is_reference": True, "holds": True},
        "layers": [{"factor": "kv_quant=int8", "first_layer": {"component": "talker", "layer": 3}, "note": "first matters at talker layer 3",
                    "runs": [{"run": 7}, {"run": 8}]}],
        "counts": {"runs": 9, "reference_runs": 1, "loads": 2, "seconds": 7.04},
    }
    (tmp_path / "bisect.json").write_text(json.dumps({"bisect": result}))
    text = html.render(summary([_prompt("p0", TALK, False, 0.9, [])]), tmp_path)
    section = text[text.index('id="bisect"'):text.index('id="details"')]
    assert "culprit: kv_quant=int8 (proof holds)" in section and 'id="bisect-settings"' in section
    assert "diverges at talk s1 L0 (0.0035) · run 2" in section and "within tolerance (max 0.00012) · run 3" in section
    assert "talker layer 3" in section and "7, 8" in section
    assert "0.123456789" not in section and "{&#34;" not in section  # no raw JSON, no 15-digit floats
    why = text[text.index('id="why"'):text.index('id="matters"')]
    assert "kv_quant=int8" in why and "run 5" in why and "reference itself" in why
