"""Every bad input of issue 7 -> exit 2, one line on stderr, no traceback, nothing written.

The table runs the real entry point (``parity.cli.main``) in-process, capturing file descriptors
1 and 2 (so output that bypasses ``sys.stderr``, like a C library's, is caught too); a few rows
also run as a separate ``parity`` process. A row that raised an unexpected exception would
propagate out of ``main`` and fail the test with its traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[1]


# ----- broken checkpoints (copies of the tiny built-in) -----------------------------------------


def _copy_tiny(tiny_dir: Path, dest: Path) -> Path:
    shutil.copytree(tiny_dir, dest)
    return dest


def _edit_tensors(path: Path, edit: Callable[[dict], None]) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def broken(tiny_dir, tmp_path_factory) -> dict[str, Path]:
    """Checkpoints that from_pretrained would load with a warning (or not at all)."""
    import torch

    root = tmp_path_factory.mktemp("broken-ckpt")
    out = {}
    d = out["missing_tensor"] = _copy_tiny(tiny_dir, root / "missing_tensor")
    _edit_tensors(d / "model.safetensors", lambda t: t.pop("talker.model.layers.0.mlp.down_proj.weight"))
    d = out["wrong_shape"] = _copy_tiny(tiny_dir, root / "wrong_shape")
    _edit_tensors(d / "model.safetensors", lambda t: t.__setitem__("talker.model.layers.0.mlp.down_proj.weight", torch.zeros(3, 3)))
    d = out["truncated"] = _copy_tiny(tiny_dir, root / "truncated")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    d = out["tokenizer_missing_tensor"] = _copy_tiny(tiny_dir, root / "tokenizer_missing_tensor")
    _edit_tensors(d / "speech_tokenizer" / "model.safetensors", lambda t: t.pop(sorted(t)[0]))
    d = out["pickle_only"] = _copy_tiny(tiny_dir, root / "pickle_only")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    d = out["missing_file"] = _copy_tiny(tiny_dir, root / "missing_file")
    (d / "generation_config.json").unlink()
    d = out["bad_config"] = _copy_tiny(tiny_dir, root / "bad_config")
    (d / "config.json").write_text('{"model_type": "qwen3_tts",')
    return out


# ----- the table ---------------------------------------------------------------------------------


@dataclass
class Case:
    """One bad input: files to write, the arguments, and a fragment the message must contain."""

    id: str
    args: Callable[[Path, dict], list[str]]  # (tmp dir, broken checkpoints) -> argv after 'parity'
    needle: str
    files: dict[str, str | bytes] | None = None
    fresh_out: bool = True  # --out does not exist before: it must still not exist after
    subprocess: bool = False  # also run as a separate process


GOOD = "Hello there.\n"
RUN = ["run"]


def run_args(prompts: str = "p.txt", *extra: str) -> Callable[[Path, dict], list[str]]:
    return lambda d, b: [*RUN, str(d / prompts), "--out", str(d / "out"), "--max-frames", "3", *extra]


def model_args(name: str) -> Callable[[Path, dict], list[str]]:
    return lambda d, b: [*RUN, str(d / "p.txt"), "--out", str(d / "out"), "--max-frames", "3", "--model", str(b[name])]


CASES = [
    # prompt files
    Case("prompt-missing", run_args("nope.txt"), "prompt file not found"),
    Case("prompt-is-dir", lambda d, b: [*RUN, str(d), "--out", str(d / "out")], "is a directory"),
    Case("prompt-empty", run_args(), "no prompts", files={"p.txt": ""}),
    Case("prompt-only-comments", run_args(), "no prompts", files={"p.txt": "# one\n\n   # two\n"}),
    Case("prompt-not-utf8", run_args(), "p.txt:2: not valid UTF-8", files={"p.txt": b"fine\ncaf\xe9\n"}),
    Case("prompt-line-too-long", run_args(), "p.txt:1: line is 2001 characters", files={"p.txt": "a" * 2001 + "\n"}),
    Case("prompt-over-static-cache", run_args("p.txt", "--set", "candidate.cache=static:64"),
         "p.txt:2: prompt p001 needs at least", files={"p.txt": "Short.\n" + "word " * 30 + "\n"}),
    Case("prompt-over-max-position", run_args("p.txt", "--set", "reference.cache=static:40", "--set", "candidate.cache=static:40"),
         "the reference side holds 40", files={"p.txt": "x" * 40 + "\n"}),
    Case("jsonl-malformed-line", run_args("p.jsonl"), "p.jsonl:2: malformed JSON",
         files={"p.jsonl": '{"text": "ok"}\n{"text": "broken"\n'}),
    Case("jsonl-unknown-field", run_args("p.jsonl"), "unknown field(s) 'voice'", files={"p.jsonl": '{"text": "a", "voice": "x"}\n'}),
    Case("jsonl-wrong-type", run_args("p.jsonl"), "text must be a string, got number", files={"p.jsonl": '{"text": 5}\n'}),
    Case("unknown-speaker", run_args("p.jsonl"), "unknown speaker 'bob'; available: ryan, vivian",
         files={"p.jsonl": '{"text": "a", "speaker": "bob"}\n'}, subprocess=True),
    Case("unknown-language", run_args("p.jsonl"), "unknown language 'klingon'; available: auto, chinese, english",
         files={"p.jsonl": '{"text": "a", "language": "klingon"}\n'}),
    # recipes
    Case("recipe-missing", run_args("p.txt", "--recipe", "/nonexistent/r.toml"), "does not exist"),
    Case("recipe-syntax", run_args("p.txt", "--recipe", "{d}/r.toml"), "line 3", files={"r.toml": 'name = "x"\n\n[decoding\n'},
         subprocess=True),
    Case("recipe-unknown-key", run_args("p.txt", "--recipe", "{d}/r.toml"), "unknown key 'colour'", files={"r.toml": 'colour = "red"\n'}),
    Case("recipe-unknown-section-key", run_args("p.txt", "--recipe", "{d}/r.toml"), "[candidate]: unknown key 'dtyp'",
         files={"r.toml": '[candidate]\ndtyp = "bfloat16"\n'}),
    Case("recipe-wrong-type", run_args("p.txt", "--recipe", "{d}/r.toml"), "'max_frames' must be an integer",
         files={"r.toml": '[decoding]\nmax_frames = "ten"\n'}),
    Case("recipe-out-of-range", run_args("p.txt", "--recipe", "{d}/r.toml"), "top_p must be in (0, 1]", files={"r.toml": "[decoding]\ntop_p = 2.0\n"}),
    Case("recipe-nan", run_args("p.txt", "--recipe", "{d}/r.toml"), "must be a finite number", files={"r.toml": "[gates]\nmax_rel_l2 = nan\n"}),
    Case("recipe-not-utf8", run_args("p.txt", "--recipe", "{d}/r.toml"), "not UTF-8", files={"r.toml": b'name = "\xff"\n'}),
    Case("set-tolerances-not-table", run_args("p.txt", "--set", "tolerances=5"), "tolerances"),
    Case("set-huge-static-cache", run_args("p.txt", "--set", "candidate.cache=static:99999999999"), "'static:N' with 0 < N <= 1048576"),
    Case("max-frames-zero", run_args("p.txt", "--max-frames", "0"), "--max-frames must be between 1 and 100000"),
    # names
    Case("unknown-engine", run_args("p.txt", "--set", "candidate.engine=fastest"), "unknown engine 'fastest'; available: reference, faster"),
    Case("unknown-variant", run_args("p.txt", "--set", "candidate.variants=warp_drive"), "unknown variant 'warp_drive'; available:"),
    Case("unknown-builtin-model", run_args("p.txt", "--model", "random:huge"), "available: random:tiny, random:0.6b"),
    # --out
    Case("out-is-file", lambda d, b: [*RUN, str(d / "p.txt"), "--out", str(d / "p.txt")], "is not a directory", fresh_out=False),
    Case("out-not-writable", lambda d, b: [*RUN, str(d / "p.txt"), "--out", str(d / "p.txt" / "sub")], "is not writable", fresh_out=False),
    Case("out-not-empty", run_args(), "is not empty; pass --force", files={"out/old.txt": "x"}, fresh_out=False),
    Case("force-foreign-dir", run_args("p.txt", "--force"), "--force refuses to delete", files={"out/thesis.tex": "x"}, fresh_out=False),
    Case("force-and-resume", run_args("p.txt", "--force", "--resume"), "exclude each other"),
    Case("resume-not-a-run", run_args("p.txt", "--resume"), "has no run.json", files={"out/x": "x"}, fresh_out=False),
    Case("resume-unreadable-run-json", run_args("p.txt", "--resume"), "run.json' is unreadable", files={"out/run.json": "{"},
         fresh_out=False),
    # checkpoints
    Case("model-dir-missing-files", model_args("missing_file"), "lacks generation_config.json"),
    Case("model-bad-config", model_args("bad_config"), "config.json' is not a readable JSON config"),
    Case("model-missing-tensor", model_args("missing_tensor"), "is missing 1 tensor(s): talker.model.layers.0.mlp.down_proj.weight",
         subprocess=True),
    Case("model-wrong-shape", model_args("wrong_shape"), "wrong shape: talker.model.layers.0.mlp.down_proj.weight [3, 3]"),
    Case("model-truncated-safetensors", model_args("truncated"), "are unreadable (SafetensorError"),
    Case("speech-tokenizer-missing-tensor", model_args("tokenizer_missing_tensor"), "speech tokenizer"),
    Case("model-pickle-only", model_args("pickle_only"), "no .safetensors weights (found pytorch_model.bin"),
    # command line
    Case("cli-missing-argument", lambda d, b: ["run"], "Missing argument 'prompts'.; see parity run --help"),
    Case("cli-bad-integer", lambda d, b: ["run", str(d / "p.txt"), "--max-frames", "many"], "Invalid value for '--max-frames'"),
    Case("cli-unknown-option", lambda d, b: ["run", str(d / "p.txt"), "--colour"], "No such option: --colour"),
    Case("report-not-a-run", lambda d, b: ["report", str(d)], "has no summary.json"),
]


def _setup(case: Case, tmp_path: Path, broken: dict) -> list[str]:
    (tmp_path / "p.txt").write_text(GOOD)
    for name, content in (case.files or {}).items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return [a.replace("{d}", str(tmp_path)) for a in case.args(tmp_path, broken)]


def _check(case: Case, code, stderr: str, tmp_path: Path) -> None:
    assert "Traceback" not in stderr, stderr
    assert code == 2, (code, stderr)
    lines = [ln for ln in stderr.strip("\n").splitlines() if not ln.startswith("parity: [")]  # progress log lines
    assert len(lines) == 1, stderr
    assert lines[0].startswith("parity: error: "), stderr
    assert case.needle in lines[0], (case.needle, lines[0])
    if case.fresh_out:
        assert not (tmp_path / "out").exists(), "refused before writing anything"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_in_process(case: Case, tmp_path, broken, capfd, monkeypatch):
    from parity import cli

    args = _setup(case, tmp_path, broken)
    monkeypatch.setattr(sys, "argv", ["parity", *args])
    capfd.readouterr()
    with pytest.raises(SystemExit) as info:
        cli.main()
    _, err = capfd.readouterr()
    _check(case, info.value.code, err, tmp_path)


SUBPROCESS_CASES = [c for c in CASES if c.subprocess]


@pytest.mark.slow
@pytest.mark.parametrize("case", SUBPROCESS_CASES, ids=[c.id for c in SUBPROCESS_CASES])
def test_bad_input_real_process(case: Case, tmp_path, broken):
    args = _setup(case, tmp_path, broken)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "parity.cli", *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    _check(case, proc.returncode, proc.stderr, tmp_path)


def test_the_table_fails_on_a_traceback(tmp_path, monkeypatch, capfd):
    """The harness itself can fail: an unexpected exception escapes main() (never exit 2)."""
    from parity import cli

    monkeypatch.setattr("parity.prompts.load_prompts", lambda *a, **k: 1 / 0)
    monkeypatch.setattr("parity.run.load_prompts", lambda *a, **k: 1 / 0)
    monkeypatch.setattr(sys, "argv", ["parity", "run", str(tmp_path / "p.txt"), "--out", str(tmp_path / "o")])
    with pytest.raises(ZeroDivisionError):
        cli.main()


def test_unknown_scorer_lists_the_available_ones():
    from parity.errors import BadInput
    from parity.mos import get_scorer

    with pytest.raises(BadInput, match=r"unknown scorer 'nope'; available: dnsmos, utmos"):
        get_scorer("nope")


def test_fault_hook_value_is_checked(tmp_path, monkeypatch, capfd):
    """The PARITY_FAULT test hook refuses a malformed value like any bad input."""
    from parity import cli

    (tmp_path / "p.txt").write_text(GOOD)
    monkeypatch.setenv("PARITY_FAULT", "candidate:two:oom")
    monkeypatch.setattr(sys, "argv", ["parity", "run", str(tmp_path / "p.txt"), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 2 and "PARITY_FAULT" in capfd.readouterr().err


def test_preflight_bound_is_a_lower_bound(tiny_dir):
    """The tokenizer-only prefill estimate never exceeds the engine's real prefill length, so the
    pre-load length check refuses only prompts that really cannot fit."""
    from transformers import AutoTokenizer

    from parity.engines.reference import ReferenceEngine
    from parity.preflight import prefill_lower_bound, read_config
    from parity.prompts import Prompt
    from parity.recipe import Side

    config = read_config(Path(tiny_dir))
    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    engine = ReferenceEngine(Side(), tiny_dir)
    engine.load()
    try:
        for p in [Prompt("a", "Hi"), Prompt("b", "One.", speaker="ryan", language="english"),
                  Prompt("c", "A longer sentence, with punctuation; and digits 1234.", instruct="speak slowly"),
                  Prompt("d", "你好，世界。", language="chinese")]:
            assert prefill_lower_bound(tok, p, config) <= engine.prompt_length(p)
    finally:
        engine.close()


def test_force_wipes_only_parity_runs(tmp_path):
    from parity.errors import BadInput
    from parity.run import check_out_dir

    from parity.outdir import force_plan, write_marker

    run = tmp_path / "run"
    (run / "traces").mkdir(parents=True)
    (run / "run.json").write_text("{}")
    (run / "notes.txt").write_text("mine")
    with pytest.raises(BadInput, match="no parity run marker"):  # a run.json alone proves nothing
        check_out_dir(run, force=True, resume=False)
    write_marker(run, ["run.json", "traces"])
    assert check_out_dir(run, force=True, resume=False) is None  # a parity run: may be overwritten
    assert {p.name for p in force_plan(run)} == {"run.json", "traces", ".parity-run.json"}  # notes.txt stays
    other = tmp_path / "other"
    (other / ".git").mkdir(parents=True)
    with pytest.raises(BadInput, match="refuses to delete"):
        check_out_dir(other, force=True, resume=False)
    assert (other / ".git").is_dir()


def test_resume_refuses_other_recipe_or_prompts(tmp_path):
    from parity.errors import BadInput
    from parity.recipe import default_recipe
    from parity.run import check_resumable

    rec = json.loads(json.dumps(default_recipe().to_dict(), default=str))
    previous = {"recipe": rec, "prompts_digest": "abc", "prompts_file": "p.txt"}
    check_resumable(previous, {"recipe": rec, "prompts_digest": "abc"}, tmp_path)
    other = json.loads(json.dumps(rec))
    other["decoding"]["max_frames"] = 7
    with pytest.raises(BadInput, match=r"decoding.max_frames 24 -> 7"):
        check_resumable(previous, {"recipe": other, "prompts_digest": "abc"}, tmp_path)
    with pytest.raises(BadInput, match="other prompts"):
        check_resumable(previous, {"recipe": rec, "prompts_digest": "xyz"}, tmp_path)
