"""CLI conventions and the costly mistakes refused before anything is built (no engine runs).

How fast these answer is measured by benchmarks/bench_cli_startup.py, not asserted here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def parity(*args: str, env: dict | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "parity.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=300)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("parity: error: "), proc.stderr
    return lines[0]


def test_version():
    from importlib.metadata import version

    proc = parity("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"parity {version('parity')}"


def test_bare_parity_prints_usage_not_an_empty_error():
    proc = parity()
    assert proc.returncode == 2
    assert "Usage: parity" in proc.stdout and "run" in proc.stdout and "bisect" in proc.stdout
    assert "error" not in proc.stderr


@pytest.mark.parametrize("command", [[], ["run"], ["bisect"], ["report"], ["env"]])
def test_help_with_h_and_no_bool_metavar(command):
    proc = parity(*command, "-h")
    assert proc.returncode == 0, proc.stderr
    assert "Usage: parity" in proc.stdout and "<bool>" not in proc.stdout


def test_run_has_json_verbose_quiet_and_the_root_has_completion():
    run_help = parity("run", "--help").stdout
    assert all(flag in run_help for flag in ("--json", "--verbose", "-v", "--quiet", "-q"))
    assert "--json" in parity("bisect", "--help").stdout and "--json" in parity("env", "--help").stdout
    proc = parity("--show-completion", "bash")
    assert proc.returncode == 0 and "_PARITY_COMPLETE" in proc.stdout


def test_completion_completes_commands():
    proc = subprocess.run([sys.executable, "-m", "parity.cli"], capture_output=True, text=True, cwd=REPO, timeout=60,
                          env={**os.environ, "_PARITY_COMPLETE": "complete_bash", "COMP_WORDS": "parity bis", "COMP_CWORD": "1"})
    assert proc.stdout.split() == ["bisect"]


def test_max_frames_zero_names_the_option(tmp_path):
    line = one_error_line(parity("run", "recipes/prompts/smoke.txt", "--max-frames", "0", "--out", str(tmp_path / "o")))
    assert "--max-frames" in line and "--set" not in line
    assert not (tmp_path / "o").exists()


def test_typo_flag_is_one_line():
    line = one_error_line(parity("run", "recipes/prompts/smoke.txt", "--max-frame", "3"))
    assert "--max-frame" in line


@pytest.mark.parametrize("as_txt", [False, True])
def test_recipe_given_as_prompts_is_refused(tmp_path, as_txt):
    path = Path("recipes/smoke.toml")
    if as_txt:  # the content gives it away, whatever the name
        path = tmp_path / "prompts.txt"
        path.write_text((REPO / "recipes/smoke.toml").read_text())
    out = tmp_path / "out"
    line = one_error_line(parity("run", str(path), "--out", str(out)))
    assert "recipe" in line and "--recipe" in line
    assert not out.exists()


def test_prompt_text_with_brackets_is_not_a_recipe(tmp_path):
    from parity.mistakes import check_prompts_not_recipe

    path = tmp_path / "p.txt"
    path.write_text("[laughs] Hello there.\nThe ratio x = 3 is fine.\nA third prompt.\n")
    check_prompts_not_recipe(path)  # no error


@pytest.mark.parametrize("make", [False, True])
def test_resume_on_a_new_or_empty_directory_is_refused(tmp_path, make):
    out = tmp_path / "fresh"
    if make:
        out.mkdir()
    line = one_error_line(parity("run", "recipes/prompts/smoke.txt", "--out", str(out), "--resume"))
    assert "--resume" in line and str(out) in line
    assert out.exists() == make and (not make or not any(out.iterdir()))


def test_cuda_recipe_without_a_gpu_is_refused_before_building_a_checkpoint(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    cache = tmp_path / "cache"
    out = tmp_path / "out"
    line = one_error_line(parity("run", "recipes/prompts/smoke.txt", "--recipe", "recipes/faster-qwen3-tts.toml",
                                 "--out", str(out), env={"PARITY_CACHE": str(cache)}))
    assert "CUDA" in line
    assert not out.exists() and (not cache.exists() or not any(cache.rglob("*.safetensors")))


def test_faster_engine_on_the_cpu_recipe_is_not_refused(tmp_path):
    # The faster engine's CPU recipe (device = "cpu") runs without a GPU through the CLI; only a side
    # that needs CUDA (a cuda device, or the faster engine on an unspecified device) is refused.
    out = tmp_path / "out"
    proc = parity("run", "recipes/prompts/smoke.txt", "--recipe", "recipes/faster-qwen3-tts-cpu.toml", "--max-frames", "2",
                  "--mos", "none", "--out", str(out), "--json", env={"PARITY_CACHE": str(tmp_path / "cache")})
    assert proc.returncode in (0, 1), proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["sides"]["candidate"]["engine"].startswith("faster") and summary["counts"]["ran"] == 3


def test_env_json_is_machine_readable():
    proc = parity("env", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["stack_ok"] is True and data["problems"] == [] and "torch" in data["fingerprint"]
