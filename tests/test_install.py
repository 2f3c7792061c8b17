"""The install: pins, the lock, and the self-check that turns a broken stack into one line."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
# Every direct dependency that has broken this stack before must be pinned exactly.
MUST_BE_EXACT = ["torch", "torchaudio", "transformers", "qwen-tts-hf", "faster-qwen3-tts", "faster-qwen3-tts-batch", "speechmos", "utmos-pytorch"]


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


# Each lock and the extras it pins: requirements.lock is the tested set (what CI and the GPU
# machine install); requirements-dev.lock adds the development tools on top of it.
LOCKS = {"requirements.lock": ("test",), "requirements-dev.lock": ("test", "dev")}


def _direct_requirements(extras: tuple[str, ...] | None = None) -> list[Requirement]:
    """The project's dependencies plus those of ``extras`` (every extra when None)."""
    project = _pyproject()["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for name, extra in project.get("optional-dependencies", {}).items():
        if extras is None or name in extras:
            reqs += [Requirement(r) for r in extra]
    return reqs


def _lock(name: str = "requirements.lock") -> dict[str, list[tuple[str, str | None]]]:
    """name -> [(version, marker or None)] from a lock file (a universal lock may list a
    package once per Python range)."""
    entries: dict[str, list[tuple[str, str | None]]] = {}
    for line in (REPO / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        req = Requirement(line)
        (pin,) = [s.version for s in req.specifier if s.operator == "=="]
        entries.setdefault(req.name.lower(), []).append((pin, str(req.marker) if req.marker else None))
    return entries


def test_breakers_are_pinned_exactly():
    reqs = {r.name.lower(): r for r in _direct_requirements()}
    for name in MUST_BE_EXACT:
        spec = list(reqs[name].specifier)
        assert len(spec) == 1 and spec[0].operator == "==" and "*" not in spec[0].version, (name, str(reqs[name]))


def test_every_extra_has_a_lock():
    assert set(_pyproject()["project"]["optional-dependencies"]) == {e for extras in LOCKS.values() for e in extras}


@pytest.mark.parametrize("lock_name", LOCKS)
def test_lock_names_the_command_that_regenerates_it(lock_name):
    head = (REPO / lock_name).read_text().splitlines()[:3]
    assert any(re.search(rf"uv pip compile pyproject\.toml .*-o {re.escape(lock_name)}", line) for line in head), head


@pytest.mark.parametrize("lock_name", LOCKS)
@pytest.mark.parametrize("python", ["3.11", "3.12"])
def test_every_direct_dependency_is_locked_at_an_allowed_version(python, lock_name):
    """The lock and pyproject agree, on each supported Python: every direct dependency has exactly
    one lock entry that applies there, and pyproject allows its version."""
    lock = _lock(lock_name)
    env = {**default_environment(), "python_version": python, "python_full_version": f"{python}.0",
           "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"}
    for req in _direct_requirements(LOCKS[lock_name]):
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        entries = lock.get(req.name.lower())
        assert entries, f"{req.name} is missing from {lock_name}"
        applying = [v for v, marker in entries if marker is None or Requirement(f"x; {marker}").marker.evaluate(env)]
        assert len(applying) == 1, (req.name, python, entries)
        assert req.specifier.contains(applying[0], prereleases=True), (req.name, applying[0], str(req.specifier))


def test_supported_pythons_are_declared_and_include_this_one():
    spec = _pyproject()["project"]["requires-python"]
    from packaging.specifiers import SpecifierSet

    allowed = SpecifierSet(spec)
    assert "3.11" in allowed and "3.12" in allowed and "3.10" not in allowed and "3.13" not in allowed
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in allowed
    readme = (REPO / "README.md").read_text()
    assert "3.11" in readme and "3.12" in readme


def test_installed_stack_passes_the_check():
    """The environment the tests run in was installed from the lock: the check finds nothing."""
    from parity.stackcheck import check_stack

    assert check_stack() == []


GOOD = {"torch": "2.11.0", "torchaudio": "2.11.0", "transformers": "5.16.1", "qwen-tts-hf": "0.1.1.post1", "qwen-tts": None}


@pytest.mark.parametrize("change, package, fix", [
    ({"torchaudio": "2.11.1"}, "torchaudio 2.11.1", "pip install torch==2.11.0 torchaudio==2.11.0"),
    ({"torch": "2.15.0"}, "torchaudio 2.11.0", "pip install torch==2.11.0 torchaudio==2.11.0"),
    ({"torchaudio": None}, "torchaudio is not installed", "pip install torch==2.11.0 torchaudio==2.11.0"),
    ({"transformers": "5.17.0"}, "transformers 5.17.0", "pip install transformers==5.16.1"),
    ({"transformers": "4.57.3"}, "transformers 4.57.3", "pip install transformers==5.16.1"),
    ({"qwen-tts-hf": None, "qwen-tts": "0.1.1"}, "qwen-tts-hf is not installed", "pip uninstall -y qwen-tts"),
])
def test_check_names_versions_and_fix(change, package, fix):
    from parity.stackcheck import check_stack

    (problem,) = check_stack({**GOOD, **change})
    line = problem.line()
    assert package in line and fix in line and "\n" not in line


def test_fix_matches_torch_when_the_pins_disagree(monkeypatch):
    """A pyproject edited to a pair that never worked must not be repeated back as the fix."""
    from parity import stackcheck

    monkeypatch.setattr(stackcheck, "pinned_versions", lambda: {**stackcheck.FALLBACK_PINS, "torchaudio": "2.11.1"})
    (problem,) = stackcheck.check_stack({**GOOD, "torchaudio": "2.11.1"})
    assert problem.fix == "pip install torchaudio==2.11.0"


@pytest.mark.parametrize("ok", [
    {"torch": "2.11.0+cu128", "torchaudio": "2.11.0+cu128"},  # local build tags are the same release
    {"transformers": "5.15.1"},
])
def test_check_accepts_working_variants(ok):
    from parity.stackcheck import check_stack

    assert check_stack({**GOOD, **ok}) == []


@pytest.mark.parametrize("command", [["run", "recipes/prompts/smoke.txt"], ["bisect", "recipes/prompts/smoke.txt"], ["env"]])
def test_cli_refuses_a_simulated_mismatch_in_one_line(command, monkeypatch, capfd, tmp_path):
    """torchaudio 2.11.1 beside torch 2.11.0 (what pip resolved on a fresh machine): exit 2 and one
    line naming both versions and the fix, before any model or qwen_tts is touched."""
    from parity import cli, stackcheck

    fake = {**GOOD, "torchaudio": "2.11.1"}
    monkeypatch.setattr(stackcheck, "installed_version", lambda dist: fake.get(dist))
    monkeypatch.setattr(sys, "argv", ["parity", *command, *(["--out", str(tmp_path / "o")] if command[0] != "env" else [])])
    monkeypatch.chdir(REPO)
    capfd.readouterr()
    with pytest.raises(SystemExit) as info:
        cli.main()
    out, err = capfd.readouterr()
    assert info.value.code == 2
    assert not (tmp_path / "o").exists()
    text = err if command[0] != "env" else out
    assert "torchaudio 2.11.1" in text and "torch 2.11.0" in text and "pip install torch==2.11.0 torchaudio==2.11.0" in text
    if command[0] != "env":
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_dev_lock_extends_the_tested_lock():
    """requirements-dev.lock is compiled against requirements.lock: every tested pin is in it,
    unchanged (regenerate it with the command at its top whenever requirements.lock changes)."""
    tested, dev = _lock("requirements.lock"), _lock("requirements-dev.lock")
    missing = {name: pins for name, pins in tested.items() if sorted(dev.get(name, []), key=str) != sorted(pins, key=str)}
    assert not missing, f"requirements-dev.lock differs from requirements.lock for {missing}"
