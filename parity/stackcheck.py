"""The install self-check: is the installed stack one that imports and runs together?

It reads package metadata only (nothing is imported), so it can run before anything imports
``qwen_tts`` and turn a broken install into one line with the command that fixes it, instead of a
traceback from deep inside torchaudio's shared library.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

# What works beyond the exact pins (measured; README "Installing"): transformers 5.15.1 and 5.16.1
# run the 12Hz speech tokenizer, 5.17-5.20 fail on `MimiConfig.rope_theta`, 5.21+ on `upsample`.
WORKING_RANGES = {"transformers": SpecifierSet(">=5.15.1,<5.17")}

# Used only when parity runs from a source tree without installed metadata.
FALLBACK_PINS = {"torch": "2.11.0", "torchaudio": "2.11.0", "transformers": "5.16.1",
                 "qwen-tts-hf": "0.1.1.post1"}


@dataclass(frozen=True)
class StackProblem:
    """One reason the installed stack will not run, with the command that fixes it."""

    package: str
    installed: str | None
    expected: str
    fix: str

    def line(self) -> str:
        """The one-line message: what is installed, what works, how to fix it."""
        have = f"{self.package} {self.installed}" if self.installed else f"{self.package} is not installed"
        return f"broken install: {have}, parity needs {self.expected}; fix with: {self.fix}"


def installed_version(dist: str) -> str | None:
    """The installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def pinned_versions() -> dict[str, str]:
    """Exact pins (`name==X`) from parity's own installed metadata, i.e. from pyproject.toml."""
    pins = dict(FALLBACK_PINS)
    try:
        requirements = importlib.metadata.requires("parity") or []
    except importlib.metadata.PackageNotFoundError:
        return pins
    for text in requirements:
        req = Requirement(text)
        if req.marker is not None:  # extras (test) and platform-specific entries
            continue
        exact = [s.version for s in req.specifier if s.operator == "=="]
        if len(exact) == 1 and "*" not in exact[0]:
            pins[req.name.lower()] = exact[0]
    return pins


def _release(version: str) -> tuple[int, ...] | None:
    """X.Y.Z of a version, ignoring a local build tag such as +cu128."""
    try:
        return Version(version).release
    except InvalidVersion:
        return None


def check_stack(versions: dict[str, str | None] | None = None) -> list[StackProblem]:
    """Problems of the installed stack; an empty list means it should import and run.

    ``versions`` maps distribution names to installed versions (None when missing); by default
    they are read from the environment. Tests pass simulated versions here.
    """
    names = ("torch", "torchaudio", "transformers", "qwen-tts-hf", "qwen-tts")
    have = versions if versions is not None else {n: installed_version(n) for n in names}
    pins = pinned_versions()
    problems: list[StackProblem] = []

    torch_v, audio_v = have.get("torch"), have.get("torchaudio")
    pair = f"pip install torch=={pins['torch']} torchaudio=={pins['torchaudio']}"
    if _release(pins["torch"]) != _release(pins["torchaudio"]) and torch_v is not None:
        # The pins themselves disagree (an edited pyproject): match torchaudio to the torch in place.
        base = ".".join(map(str, _release(torch_v) or ()))
        pair = f"pip install torchaudio=={base}"
    if torch_v is None:
        problems.append(StackProblem("torch", None, f"torch {pins['torch']}", pair))
    elif audio_v is None:
        problems.append(StackProblem("torchaudio", None, f"torchaudio {pins['torchaudio']}", pair))
    elif _release(torch_v) != _release(audio_v):
        # torchaudio's compiled library is built against one torch release: 2.11.1 beside torch
        # 2.11.0 fails at import with an undefined symbol, so only equal releases are accepted.
        problems.append(StackProblem(
            "torchaudio", audio_v, f"the release of torch {torch_v} (a torchaudio built for it)", pair))

    tf_v = have.get("transformers")
    tf_fix = f"pip install transformers=={pins['transformers']}"
    if tf_v is None:
        problems.append(StackProblem("transformers", None, str(WORKING_RANGES["transformers"]), tf_fix))
    elif _release(tf_v) is None or Version(tf_v) not in WORKING_RANGES["transformers"]:
        problems.append(StackProblem("transformers", tf_v, str(WORKING_RANGES["transformers"]), tf_fix))

    if have.get("qwen-tts-hf") is None:
        qwen_fix = f"pip install qwen-tts-hf=={pins['qwen-tts-hf']}"
        if have.get("qwen-tts") is not None:  # the official package pins transformers 4.x
            qwen_fix = f"pip uninstall -y qwen-tts && {qwen_fix}"
        problems.append(StackProblem("qwen-tts-hf", None, pins["qwen-tts-hf"], qwen_fix))
    return problems


def require_stack() -> None:
    """Raise BadInput (exit 2, one line) for the first problem of the installed stack."""
    from parity.errors import BadInput

    problems = check_stack()
    if problems:
        raise BadInput(problems[0].line())
