"""Audio sources for the report's A/B players: embedded as data URIs while a byte budget lasts,
linked by relative path after that.

A 500-frame prompt is 40 s of 24 kHz 16-bit audio, about 1.9 MB a side (2.6 MB as base64), so
18 such prompts cannot be embedded in a 5 MB report (one prompt's pair alone takes 5 MB). Prompts
are embedded in report order, both sides of a prompt or neither, each one that still fits the
budget left by the rest of the report; the others are linked as
``audio/<id>.<side>.wav`` relative to report.html, which plays when the report is opened inside
its run directory (or an artifact that keeps ``audio/`` next to it). The report says which.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

SIDES = ("reference", "candidate")


@dataclass
class Clip:
    """One side's audio of one prompt, as the player sees it."""

    side: str
    src: str | None  # data URI, relative URL, or None when the file is missing
    embedded: bool
    duration_s: float | None
    size: int  # bytes of the WAV file


def _inside(run_dir: Path, rel: str) -> Path | None:
    """The file a result's relative audio path names, only when it lies inside the run directory."""
    try:
        path = (run_dir / rel).resolve()
        path.relative_to(run_dir.resolve())
    except (ValueError, OSError):
        return None
    return path if path.is_file() else None


def encoded_size(n_bytes: int) -> int:
    """Characters a file of ``n_bytes`` takes as a base64 WAV data URI."""
    return len("data:audio/wav;base64,") + 4 * ((n_bytes + 2) // 3)


def clips(run_dir: Path, prompt: dict, embed: bool) -> list[Clip]:
    """Both sides' clips of a prompt (``prompt['audio']`` maps side -> path in the run dir)."""
    from parity.report.rundata import audio_info

    out = []
    for side in SIDES:
        rel = (prompt.get("audio") or {}).get(side)
        path = _inside(Path(run_dir), rel) if isinstance(rel, str) else None
        info = audio_info(path) if path else None
        if path is None or info is None:
            out.append(Clip(side, None, False, None, 0))
            continue
        duration, size = info
        if embed:
            src = "data:audio/wav;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
        else:
            src = quote(path.relative_to(Path(run_dir).resolve()).as_posix())
        out.append(Clip(side, src, embed, duration, size))
    return out


def plan(run_dir: Path, prompts: list[dict], budget: int) -> dict[str, bool]:
    """Which prompts get their audio embedded: in order, both sides or neither, each prompt
    whose pair still fits in what is left of ``budget`` characters."""
    used = 0
    decision: dict[str, bool] = {}
    for p in prompts:
        sizes = []
        for side in SIDES:
            rel = (p.get("audio") or {}).get(side)
            path = _inside(Path(run_dir), rel) if isinstance(rel, str) else None
            sizes.append(path.stat().st_size if path else 0)
        cost = sum(encoded_size(s) for s in sizes if s)
        fits = cost > 0 and used + cost <= budget
        used += cost if fits else 0
        decision[p["id"]] = fits
    return decision
