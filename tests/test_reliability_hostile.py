"""Every input is hostile (issue 14): the fault matrix.

Each case runs the real ``parity`` entry point (in this process, capturing file descriptors, or as
a separate process where a signal or a second process is part of the case) and asserts three
things: the exit code, exactly one line on stderr (no traceback, no library warning), and that
nothing outside the run directory changed (every file of the case's sandbox is fingerprinted
before and after, the run directory excepted). Faults are injected with the test hooks
``PARITY_FAULT_AT=PHASE:N:KIND`` (parity/faults.py) and ``PARITY_FAULT=SIDE:K:KIND``; the engines
stay real.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[1]
PROMPTS = "Hello there.\nTwo words.\n"
FAST = ["--max-frames", "2", "--mos", "none"]


# ----- harness -----------------------------------------------------------------------------------


def fingerprint(root: Path, skip: Path | None) -> dict[str, str]:
    """path -> size + content hash (or link target) of everything under ``root`` except ``skip``."""
    out = {}
    for path in sorted(root.rglob("*")):
        if skip is not None and (path == skip or skip in path.parents):
            continue
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = "link:" + os.readlink(path)
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = "special"
    return out


@dataclass
class Outcome:
    code: int
    stderr: str
    stdout: str = ""

    @property
    def messages(self) -> list[str]:
        """stderr without the progress log lines ("parity: [  12.3 s] ...") a run writes there off a terminal."""
        return [ln for ln in self.stderr.strip("\n").splitlines() if not ln.startswith("parity: [")]

    @property
    def line(self) -> str:
        assert "Traceback" not in self.stderr, self.stderr
        lines = self.messages
        assert len(lines) == 1, f"stderr must be one line (besides progress):\n{self.stderr}"
        return lines[0]


def in_process(argv: list[str], capfd, monkeypatch, env: dict[str, str] | None = None) -> Outcome:
    from parity import cli

    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(sys, "argv", ["parity", *argv])
    capfd.readouterr()
    with pytest.raises(SystemExit) as info:
        cli.main()
    out, err = capfd.readouterr()
    return Outcome(info.value.code, err, out)


def as_process(argv: list[str], env: dict[str, str] | None = None, stdout=subprocess.PIPE, timeout: int = 600) -> Outcome:
    full = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    for k in ("PARITY_FAULT", "PARITY_FAULT_AT"):
        if k not in (env or {}):
            full.pop(k, None)
    proc = subprocess.run([sys.executable, "-m", "parity.cli", *argv], stdout=stdout, stderr=subprocess.PIPE,
                          text=True, cwd=REPO, env=full, timeout=timeout)
    return Outcome(proc.returncode, proc.stderr, proc.stdout or "")


@pytest.fixture
def sandbox(tmp_path) -> Path:
    """A case's world: a prompt file and whatever the case adds; the run directory is sandbox/out."""
    (tmp_path / "p.txt").write_text(PROMPTS)
    return tmp_path


def check(outcome: Outcome, code: int, needle: str, before: dict, sandbox: Path, out: Path | None = None) -> str:
    """The three assertions every case makes; returns the stderr line."""
    line = outcome.line
    assert outcome.code == code, (outcome.code, outcome.stderr)
    assert needle in line, (needle, line)
    after = fingerprint(sandbox, out if out is not None else sandbox / "out")
    assert after == before, "files outside the run directory changed"
    return line


def consistent(out: Path, ran: int, failure: str | None = None) -> dict:
    """A run directory left by a failure: a summary that says it failed and why, finished prompts
    only with their results, no lock and no temporary files left behind."""
    s = json.loads((out / "summary.json").read_text())
    assert s["passed"] is False and s["counts"]["ran"] == ran, s["counts"]
    if failure is not None:
        assert failure in (s["failure"] or ""), s["failure"]
    assert sorted(p.name for p in (out / "results").iterdir()) == [p["id"] + ".json" for p in s["prompts"] if p["status"] == "ok"]
    leftovers = [p.name for p in out.rglob(".*") if p.name != ".parity-run.json"]
    assert not leftovers, leftovers
    for name in s["outputs"]:
        assert (out / name).is_file() or name in s.get("missing_outputs", []), name
    return s


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_dir) -> Path:
    """One complete run (2 prompts) that read-back cases copy and damage."""
    root = tmp_path_factory.mktemp("finished")
    (root / "p.txt").write_text(PROMPTS)
    outcome = as_process(["run", str(root / "p.txt"), "--out", str(root / "out"), *FAST])
    assert outcome.code in (0, 1), outcome.stderr
    return root


def copy_run(finished_run: Path, sandbox: Path) -> Path:
    shutil.copytree(finished_run / "out", sandbox / "out")
    return sandbox / "out"


def run_argv(sandbox: Path, *extra: str, prompts: str = "p.txt") -> list[str]:
    return ["run", str(sandbox / prompts), "--out", str(sandbox / "out"), *FAST, *extra]


# ----- 1. failure paths from every state, by fault injection ------------------------------------

PHASES = [
    # (fault, exit code, stderr needle, prompts finished, summary failure needle)
    ("before_load:1:raise", 3, "fault injected at before_load", 0, "RuntimeError"),
    ("load:1:raise", 3, "fault injected at load", 0, "RuntimeError"),
    ("load:1:oom", 3, "OutOfMemoryError", 0, "OutOfMemoryError"),
    ("load:1:memory", 3, "MemoryError", 0, "MemoryError"),
    ("load:1:sigterm", 143, "interrupted (SIGTERM)", 0, "interrupted by SIGTERM"),
    ("load:2:sigint", 130, "interrupted (SIGINT)", 0, "interrupted by SIGINT"),  # the candidate's load
    ("between:1:sigterm", 143, "interrupted (SIGTERM)", 0, "interrupted by SIGTERM"),
    ("between:1:raise", 3, "fault injected at between", 0, "RuntimeError"),
    ("traces:1:enospc", 3, "disk full", 0, "No space left"),
    # traces written: ref p000 (1, 2), ref p001 (3, 4), candidate p000 (5-8), candidate p001 (9): p000 is kept
    ("traces:9:enospc", 3, "1 of 2 prompts finished", 1, "No space left"),
    ("report:1:raise", 3, "writing report.html failed", 2, "writing report.html failed"),
    ("report:1:sigterm", 143, "interrupted (SIGTERM)", 2, "interrupted by SIGTERM"),
    ("report:1:enospc", 3, "disk full", 2, "No space left"),
]


@pytest.mark.slow
@pytest.mark.parametrize("fault,code,needle,ran,failure", PHASES, ids=[p[0] for p in PHASES])
def test_fault_at_every_phase(fault, code, needle, ran, failure, sandbox, tiny_dir):
    before = fingerprint(sandbox, sandbox / "out")
    outcome = as_process(run_argv(sandbox), env={"PARITY_FAULT_AT": fault})
    check(outcome, code, needle, before, sandbox)
    s = consistent(sandbox / "out", ran, failure)
    if fault.startswith("report"):
        assert not (sandbox / "out" / "report.html").exists() and s["missing_outputs"] == ["report.html"]


@pytest.mark.slow
def test_full_disk_keeps_finished_prompts_and_resume_finishes(sandbox, tiny_dir):
    before = fingerprint(sandbox, sandbox / "out")
    check(as_process(run_argv(sandbox), env={"PARITY_FAULT_AT": "traces:9:enospc"}), 3, "--resume", before, sandbox)
    kept = (sandbox / "out" / "results" / "p000.json").read_bytes()
    outcome = as_process(run_argv(sandbox, "--resume"))
    assert outcome.code in (0, 1) and outcome.messages == [], outcome.stderr
    assert (sandbox / "out" / "results" / "p000.json").read_bytes() == kept  # reused, not recomputed
    assert json.loads((sandbox / "out" / "summary.json").read_text())["counts"]["ran"] == 2
    assert fingerprint(sandbox, sandbox / "out") == before


def test_fault_hook_value_is_checked(sandbox, capfd, monkeypatch):
    before = fingerprint(sandbox, sandbox / "out")
    outcome = in_process(run_argv(sandbox), capfd, monkeypatch, env={"PARITY_FAULT_AT": "lunch:1:raise"})
    check(outcome, 2, "PARITY_FAULT_AT", before, sandbox)
    assert not (sandbox / "out").exists()


def test_malformed_generation_config_is_refused_before_load(sandbox, tiny_dir, capfd, monkeypatch):
    model = sandbox / "model"
    shutil.copytree(tiny_dir, model)
    (model / "generation_config.json").write_text('{"temperature": "hot", ')
    before = fingerprint(sandbox, sandbox / "out")
    outcome = in_process(run_argv(sandbox, "--model", str(model)), capfd, monkeypatch)
    check(outcome, 2, "generation_config.json' is not a readable JSON config", before, sandbox)
    (model / "generation_config.json").write_text('{"temperature": "hot"}')
    before = fingerprint(sandbox, sandbox / "out")
    check(in_process(run_argv(sandbox, "--model", str(model)), capfd, monkeypatch), 2, "temperature = 'hot'", before, sandbox)


@pytest.mark.parametrize("offline", ["1", ""])
def test_unreachable_hub_id_is_one_line(offline, sandbox, capfd, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", bool(offline))
    monkeypatch.setattr(hc, "ENDPOINT", "https://hub.invalid")
    before = fingerprint(sandbox, sandbox / "out")
    outcome = in_process(run_argv(sandbox, "--model", "nobody/no-such-model-xyz"), capfd, monkeypatch)
    line = check(outcome, 2, "nobody/no-such-model-xyz", before, sandbox)
    assert ("HF_HUB_OFFLINE" in line) if offline else ("cannot be reached" in line)
    assert not (sandbox / "out").exists()


# ----- 2. the lock on --out ------------------------------------------------------------------------


def _live_lock(out: Path) -> None:
    """A lock held by a live process (this test process) that the parity process must respect."""
    from parity.outdir import LOCK_NAME, _start_time

    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK_NAME).write_text(json.dumps({"pid": os.getpid(), "start_ticks": _start_time(os.getpid()), "started": "now"}))


@pytest.mark.parametrize("extra", [[], ["--force"], ["--resume"]])
def test_a_locked_out_is_refused(extra, sandbox, finished_run):
    out = copy_run(finished_run, sandbox) if extra else sandbox / "out"
    _live_lock(out)
    inside = fingerprint(out, None)
    before = fingerprint(sandbox, out)
    outcome = as_process(run_argv(sandbox, *extra))
    check(outcome, 2, f"is in use by another parity run (pid {os.getpid()}", before, sandbox)
    assert fingerprint(out, None) == inside  # nothing of the other run touched


def test_bisect_refuses_a_locked_out(sandbox):
    _live_lock(sandbox / "out")
    before = fingerprint(sandbox, sandbox / "out")
    outcome = as_process(["bisect", str(sandbox / "p.txt"), "--out", str(sandbox / "out"), "--set", "candidate.dtype=bfloat16"])
    check(outcome, 2, "is in use by another parity run", before, sandbox)
    assert not (sandbox / "out" / "bisect.json").exists()


def test_bisect_out_that_is_a_file_is_refused_up_front(sandbox, capfd, monkeypatch):
    (sandbox / "out").write_text("not a directory")
    before = fingerprint(sandbox, None)
    outcome = in_process(["bisect", str(sandbox / "p.txt"), "--out", str(sandbox / "out")], capfd, monkeypatch)
    check(outcome, 2, "exists and is not a directory", before, sandbox, out=sandbox / "nothing")


@pytest.mark.slow
def test_stale_lock_of_a_dead_process_is_taken_over(sandbox, tiny_dir):
    from parity.outdir import LOCK_NAME

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (sandbox / "out").mkdir()
    (sandbox / "out" / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "start_ticks": "1", "started": "long ago"}))
    before = fingerprint(sandbox, sandbox / "out")
    outcome = as_process(run_argv(sandbox))
    assert outcome.code in (0, 1) and outcome.messages == [], outcome.stderr
    assert not (sandbox / "out" / LOCK_NAME).exists()  # released at the end
    assert fingerprint(sandbox, sandbox / "out") == before


@pytest.mark.slow
def test_second_run_into_a_running_one_is_refused(sandbox, tiny_dir):
    """The real race of the issue: run A is writing; run B with --force must not touch it."""
    env = {**os.environ, "PARITY_FAULT": "candidate:0:hang", "PYTHONUNBUFFERED": "1"}
    env.pop("PARITY_FAULT_AT", None)
    first = subprocess.Popen([sys.executable, "-m", "parity.cli", *run_argv(sandbox)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    try:
        deadline = time.time() + 300
        def hanging() -> bool:  # the candidate has loaded (run.json says so) and hangs on prompt 0
            try:
                return "candidate" in json.loads((sandbox / "out" / "run.json").read_text())["sides"]
            except (OSError, ValueError, KeyError):
                return False

        while not hanging():
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.2)
        inside = fingerprint(sandbox / "out", None)
        before = fingerprint(sandbox, sandbox / "out")
        check(as_process(run_argv(sandbox, "--force")), 2, f"(pid {first.pid}", before, sandbox)
        assert fingerprint(sandbox / "out", None) == inside
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    assert first.returncode == 143 and "interrupted" in Outcome(first.returncode, err).line


# ----- 3. --force deletes only what a parity run wrote --------------------------------------------


def test_force_keeps_a_project_with_its_own_run_json(sandbox, capfd, monkeypatch):
    out = sandbox / "out"
    out.mkdir()
    (out / "run.json").write_text("{}")
    (out / "thesis.tex").write_text("\\documentclass{article}")
    (out / "traces").mkdir()
    inside = fingerprint(out, None)
    before = fingerprint(sandbox, out)
    check(in_process(run_argv(sandbox, "--force"), capfd, monkeypatch), 2, "no parity run marker", before, sandbox)
    assert fingerprint(out, None) == inside


def test_force_on_a_run_deletes_only_its_marked_entries(sandbox, finished_run, capfd, monkeypatch):
    """--force is refused late here (a bad recipe value) so the deletion itself is checked by
    force_plan; then a forged marker naming paths outside the directory deletes nothing there."""
    from parity.outdir import MARKER_NAME, force_plan

    out = copy_run(finished_run, sandbox)
    (out / "notes.txt").write_text("mine")
    plan = {p.name for p in force_plan(out)}
    assert "notes.txt" not in plan and {"run.json", "traces", "summary.json", MARKER_NAME} <= plan
    (sandbox / "victim.txt").write_text("outside")
    marker = json.loads((out / MARKER_NAME).read_text())
    marker["entries"] += ["../victim.txt", "..", "/etc/passwd"]
    (out / MARKER_NAME).write_text(json.dumps(marker))
    assert all(p.parent == out for p in force_plan(out))
    before = fingerprint(sandbox, out)
    outcome = in_process(run_argv(sandbox, "--force", "--set", "decoding.temperature=1e-30"), capfd, monkeypatch)
    check(outcome, 2, "temperature must be between", before, sandbox)
    assert (out / "notes.txt").read_text() == "mine" and (sandbox / "victim.txt").is_file()


@pytest.mark.slow
def test_force_rerun_keeps_foreign_files(sandbox, finished_run, tiny_dir):
    out = copy_run(finished_run, sandbox)
    (out / "notes.txt").write_text("mine")
    (out / "traces" / "stale.bin").write_text("old run")
    before = fingerprint(sandbox, out)
    outcome = as_process(run_argv(sandbox, "--force"))
    assert outcome.code in (0, 1) and outcome.messages == [], outcome.stderr
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "traces" / "stale.bin").exists()  # traces/ is parity's: wiped as a whole
    assert fingerprint(sandbox, out) == before


# ----- 4. output streams ---------------------------------------------------------------------------


def test_full_stdout_is_one_line(sandbox):
    before = fingerprint(sandbox, sandbox / "out")
    with open("/dev/full", "w") as full:
        outcome = as_process(["env"], stdout=full)
    check(outcome, 2, "cannot write to standard output", before, sandbox)


@pytest.mark.parametrize("argv", [["env"], ["run", "/nonexistent/pr\u00f6mpts.txt"]], ids=["env", "error"])
def test_ascii_terminal_gets_no_traceback(argv, sandbox):
    before = fingerprint(sandbox, sandbox / "out")
    outcome = as_process(argv, env={"PYTHONIOENCODING": "ascii"})
    if argv == ["env"]:
        assert outcome.code == 0 and outcome.messages == [] and "stack check" in outcome.stdout, outcome.stderr
        assert fingerprint(sandbox, sandbox / "out") == before
    else:
        check(outcome, 2, "prompt file not found", before, sandbox)


# ----- 5. parity report and --resume validate what they read back ------------------------------


def _edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


REPORT_DAMAGE = {
    "summary-not-utf8": (lambda out: (out / "summary.json").write_bytes(b'{"prompts": ["caf\xe9"]}'), "not UTF-8"),
    "summary-5000-digits": (lambda out: (out / "summary.json").write_text("1" * 5000), "not usable JSON"),
    "summary-huge-int-field": (lambda out: _edit_json(out / "summary.json", lambda s: s["prompts"][0].__setitem__("line", 10 ** 300)),
                               "out of range"),
    "summary-missing-prompts": (lambda out: _edit_json(out / "summary.json", lambda s: s.pop("prompts")), "no prompt list"),
    "summary-gate-wrong-type": (lambda out: _edit_json(out / "summary.json", lambda s: s["prompts"][0]["gates"][0].__setitem__("passed", "yes")),
                                "gates[0]"),
    "summary-tolerance-nan": (lambda out: _edit_json(out / "summary.json", lambda s: s.__setitem__("tolerance", float("nan"))),
                              "tolerance"),
    "summary-step-string": (lambda out: _edit_json(out / "summary.json", lambda s: s["prompts"][0]["comparison"].__setitem__(
        "first_divergence", {"step": "ten"})), "first_divergence.step"),
    "summary-deep": (lambda out: (out / "summary.json").write_text("[" * 100000 + "]" * 100000), "JSON"),
    "points-garbage": (lambda out: (out / "points" / "p000.csv.gz").write_bytes(
        __import__("gzip").compress(b"component,step,substep,layer,point,rel_l2,added\ntalker,x,0,0,embed,1,1\n")), "step"),
    "points-not-gzip": (lambda out: (out / "points" / "p000.csv.gz").write_bytes(b"\x1f\x8b garbage"), "not a readable points CSV"),
    "trace-shapes": (lambda out: _swap_forced_shape(out), "does not fit the reference trace"),
    "summary-is-fifo": (lambda out: ((out / "summary.json").unlink(), os.mkfifo(out / "summary.json")), "is a pipe"),
}


def _swap_forced_shape(out: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = out / "traces" / "p000.candidate.forced.safetensors"
    tensors = load_file(str(path))
    tensors["talker_choice"] = tensors["talker_choice"].reshape(1, -1).repeat(2, 1)
    save_file(tensors, str(path))


@pytest.mark.parametrize("damage", sorted(REPORT_DAMAGE))
def test_report_refuses_damaged_run(damage, sandbox, finished_run, capfd, monkeypatch):
    out = copy_run(finished_run, sandbox)
    edit, needle = REPORT_DAMAGE[damage]
    edit(out)
    before = fingerprint(sandbox, out)
    check(in_process(["report", str(out)], capfd, monkeypatch), 2, needle, before, sandbox)


RESUME_DAMAGE = {
    "result-edited": (lambda out: _edit_json(out / "results" / "p001.json", lambda r: r["comparison"].__setitem__("max_rel_l2", 0.0)),
                      "results/p001.json' does not match its traces and recipe"),
    "result-unsealed": (lambda out: _edit_json(out / "results" / "p000.json", lambda r: r.pop("digest")), "p000.json' does not match"),
    "trace-swapped": (lambda out: shutil.copy(out / "traces" / "p001.reference.safetensors",
                                              out / "traces" / "p000.reference.safetensors"), "p000.json' does not match"),
    "result-wrong-type": (lambda out: _edit_json(out / "results" / "p000.json", lambda r: r.__setitem__("gates", "all good")),
                          "gates: must be a list"),
    "run-json-5000-digits": (lambda out: (out / "run.json").write_text("9" * 5000), "not usable JSON"),
    "run-json-not-utf8": (lambda out: (out / "run.json").write_bytes(b"\xff\xfe"), "not UTF-8"),
}


@pytest.mark.parametrize("damage", sorted(RESUME_DAMAGE))
def test_resume_refuses_damaged_run(damage, sandbox, finished_run, capfd, monkeypatch):
    out = copy_run(finished_run, sandbox)
    edit, needle = RESUME_DAMAGE[damage]
    edit(out)
    inside = fingerprint(out, None)
    before = fingerprint(sandbox, out)
    check(in_process(run_argv(sandbox, "--resume"), capfd, monkeypatch), 2, needle, before, sandbox)
    changed = {k for k in set(inside) | set(fingerprint(out, None)) if inside.get(k) != fingerprint(out, None).get(k)}
    assert changed <= {".parity-run.json"}, changed  # the run's own files are left as they were


# ----- 6. limits: size, file type, model config bounds, checked before any cost -----------------


def _million_layers(sandbox: Path, tiny_dir: Path) -> Path:
    model = sandbox / "model"
    shutil.copytree(tiny_dir, model)
    _edit_json(model / "config.json", lambda c: c["talker_config"].__setitem__("num_hidden_layers", 1_000_000))
    return model


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


LIMIT_CASES = [
    ("prompts-dev-zero", lambda d, t: ["run", "/dev/zero", "--out", str(d / "out")], "'/dev/zero' is a device"),
    ("recipe-dev-zero", lambda d, t: run_argv(d, "--recipe", "/dev/zero"), "'/dev/zero' is a device"),
    ("utmos-fifo", lambda d, t: run_argv(d, "--mos", "utmos", "--utmos-checkpoint", str(_fifo(d / "utmos.pt"))), "is a pipe"),
    ("million-layers", lambda d, t: run_argv(d, "--model", str(_million_layers(d, t))), "num_hidden_layers = 1000000 is outside"),
    ("variant-layer-99", lambda d, t: run_argv(d, "--set", "candidate.variants=rmsnorm_lowp@talker:99"), "talker has 2 layers (0-1)"),
    ("two-kv-quant", lambda d, t: run_argv(d, "--set", "candidate.variants=kv_quant=fp8,kv_quant=int8"), "both apply to the same layers"),
    ("temperature-tiny", lambda d, t: run_argv(d, "--set", "decoding.do_sample=true", "--set", "decoding.temperature=1e-30"),
     "temperature must be between 0.01 and 100"),
    ("temperature-huge", lambda d, t: run_argv(d, "--set", "decoding.temperature=1e300"), "temperature must be between"),
    ("repetition-penalty-huge", lambda d, t: run_argv(d, "--set", "decoding.repetition_penalty=1e30"), "repetition_penalty must be in"),
]


@pytest.mark.parametrize("make,needle", [c[1:] for c in LIMIT_CASES], ids=[c[0] for c in LIMIT_CASES])
def test_limits_refuse_before_any_cost(make, needle, sandbox, tiny_dir, capfd, monkeypatch):
    argv = make(sandbox, tiny_dir)
    before = fingerprint(sandbox, sandbox / "out")
    check(in_process(argv, capfd, monkeypatch), 2, needle, before, sandbox)
    assert not (sandbox / "out").exists()


def test_recipe_from_a_pipe_is_read(sandbox, capfd, monkeypatch):
    """`--recipe <(...)`: a pipe is read (its content is what gets refused here)."""
    pipe = _fifo(sandbox / "recipe.fifo")
    writer = threading.Thread(target=lambda: pipe.write_text("[decoding]\ntop_p = 2.0\n"))
    writer.start()
    before = fingerprint(sandbox, sandbox / "out")
    outcome = in_process(run_argv(sandbox, "--recipe", str(pipe)), capfd, monkeypatch)
    writer.join(5)
    check(outcome, 2, "top_p must be in (0, 1]", before, sandbox)


# ----- 7. no code execution from user paths --------------------------------------------------------


def _clone_with_hubconf(d: Path) -> Path:
    clone = d / "SpeechMOS"
    clone.mkdir()
    (clone / "hubconf.py").write_text(f"open({str(d / 'pwned')!r}, 'w').write('ran')\n")
    import torch

    torch.save({"wav2vec2.x": torch.ones(1), "blstm.y": torch.ones(1)}, clone / "utmos22_strong_step7459_v1.pt")
    return clone


def _pickle_bomb(d: Path) -> Path:
    import torch

    class Bomb:
        def __reduce__(self):
            return (open, (str(d / "pwned"), "w"))

    path = d / "utmos.pt"
    torch.save({"x": Bomb()}, path)
    return path


def _torchscript(d: Path) -> Path:
    import torch

    class M(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean()

    path = d / "scripted.pt"
    torch.jit.script(M()).save(str(path))
    return path


CODE_CASES = [
    ("hubconf-clone", _clone_with_hubconf, "never does"),
    ("pickle-object", _pickle_bomb, "tensors only"),
    ("torchscript", _torchscript, "TorchScript program"),
]


@pytest.mark.parametrize("make,needle", [c[1:] for c in CODE_CASES], ids=[c[0] for c in CODE_CASES])
def test_user_paths_never_run_code(make, needle, sandbox, capfd, monkeypatch):
    path = make(sandbox)
    before = fingerprint(sandbox, sandbox / "out")
    outcome = in_process(run_argv(sandbox, "--mos", "utmos", "--utmos-checkpoint", str(path)), capfd, monkeypatch)
    check(outcome, 2, needle, before, sandbox)  # one line: no torch serialization warning either
    assert not (sandbox / "pwned").exists()


# ----- 8. input formats and exit codes -------------------------------------------------------------

FORMAT_CASES = [
    ("txt-forced-jsonl", {"p.txt": "Plain words.\n"}, ["--format", "jsonl"], "p.txt:1: malformed JSON"),
    ("unknown-format", {}, ["--format", "xml"], "--format 'xml' is not one of text, jsonl"),
    ("ref-audio-missing", {"v.jsonl": '{"text": "hi", "ref_audio": "/nonexistent/voice.wav"}\n'}, [], "v.jsonl:1: ref_audio"),
    ("ref-audio-dir", {"v.jsonl": '{"text": "hi", "ref_audio": "/tmp"}\n'}, [], "is a directory"),
]


@pytest.mark.parametrize("files,extra,needle", [c[1:] for c in FORMAT_CASES], ids=[c[0] for c in FORMAT_CASES])
def test_prompt_format_and_ref_audio(files, extra, needle, sandbox, capfd, monkeypatch):
    for name, text in files.items():
        (sandbox / name).write_text(text)
    prompts = next((n for n in files if n.endswith(".jsonl")), "p.txt")
    before = fingerprint(sandbox, sandbox / "out")
    check(in_process(run_argv(sandbox, *extra, prompts=prompts), capfd, monkeypatch), 2, needle, before, sandbox)


def test_text_line_starting_with_brace_is_a_prompt(tmp_path):
    from parity.prompts import load_prompts

    path = tmp_path / "p.txt"
    path.write_text('{"text": 5} is what I want said.\n')
    assert [p.text for p in load_prompts(path)] == ['{"text": 5} is what I want said.']
    assert load_prompts(path, fmt="text")[0].text.startswith("{")


# ----- 9. the cache --------------------------------------------------------------------------------


def _unwritable_dir(d: Path) -> str:
    if os.geteuid() == 0:  # root writes through permissions: use a place no one can create in
        return "/sys/parity-cache-test"
    path = d / "ro"
    path.mkdir()
    path.chmod(0o555)
    return str(path)


@pytest.mark.parametrize("kind", ["file", "read-only"])
def test_unusable_parity_cache_is_one_line(kind, sandbox, capfd, monkeypatch):
    if kind == "file":
        (sandbox / "cache").write_text("not a directory")
        cache = str(sandbox / "cache")
    else:
        cache = _unwritable_dir(sandbox)
    before = fingerprint(sandbox, sandbox / "out")
    outcome = in_process(run_argv(sandbox), capfd, monkeypatch, env={"PARITY_CACHE": cache})
    check(outcome, 2, "is a file" if kind == "file" else "is not writable", before, sandbox)
    assert "PARITY_CACHE" in outcome.line


def test_corrupt_downloaded_checkpoint_says_what_to_delete(sandbox, tiny_dir, capfd, monkeypatch):
    snap = sandbox / "hub" / "models--org--tts" / "snapshots" / "abc123"
    shutil.copytree(tiny_dir, snap)
    data = (snap / "model.safetensors").read_bytes()
    (snap / "model.safetensors").write_bytes(data[: len(data) // 3])
    before = fingerprint(sandbox, sandbox / "out")
    outcome = in_process(run_argv(sandbox, "--model", str(snap)), capfd, monkeypatch)
    check(outcome, 2, f"delete the downloaded copy '{sandbox / 'hub' / 'models--org--tts'}'", before, sandbox)


def test_corrupt_builtin_is_rebuilt(tmp_path, monkeypatch, tiny_dir):
    from parity import models

    monkeypatch.setenv("PARITY_CACHE", str(tmp_path))
    target = tmp_path / tiny_dir.name
    shutil.copytree(tiny_dir, target)
    good = (target / "model.safetensors").read_bytes()
    (target / "model.safetensors").write_bytes(good[: len(good) // 2])
    assert not models.builtin_intact(target)
    assert models.ensure_builtin("tiny") == target
    assert models.builtin_intact(target) and (target / "model.safetensors").read_bytes() == good  # same seed, same bytes
