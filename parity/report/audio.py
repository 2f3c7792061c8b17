"""Audio sources for the report's A/B players: embedded as data URIs while a byte budget lasts,
compressed when the WAV does not fit, linked by relative path after that.

A 500-frame prompt is 40 s of 24 kHz 16-bit audio, about 1.9 MB a side (2.6 MB as base64), so
18 such prompts cannot be embedded as WAV in a 5 MB report. Prompts are taken in report order,
both sides of a prompt together: the WAVs when they still fit the budget left by the rest of the
report, else the same audio as Ogg Vorbis (lossy, about 32 kbit/s: a tenth of the size) when that fits,
else linked as ``audio/<id>.<side>.wav`` relative to report.html, which plays only when the
report is opened inside its run directory (or an artifact that keeps ``audio/`` next to it).
The report names the prompts whose audio is not in the file.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import quote

SIDES = ("reference", "candidate")
WAV, OGG, LINK = "wav", "ogg", "link"
OGG_BYTES_PER_S = 4_500  # Ogg Vorbis at compression level 0.9 (about 32 kbit/s), for estimates


@dataclass
class Clip:
    """One side's audio of one prompt, as the player sees it."""

    side: str
    src: str | None  # data URI, relative URL, or None when the file is missing
    embedded: bool
    duration_s: float | None
    size: int  # bytes of the WAV file
    kind: str = LINK  # WAV or OGG (embedded) or LINK


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


def ogg_uri(path: Path) -> str | None:
    """The WAV at ``path`` as an Ogg Vorbis data URI (mono), or None when it cannot be encoded."""
    stat = path.stat()
    return _ogg_uri(str(path), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=256)
def _ogg_uri(path: str, mtime_ns: int, size: int) -> str | None:  # mtime/size: the cache key
    import soundfile as sf

    try:
        wav, sr = sf.read(path, dtype="float32", always_2d=True)
        buf = io.BytesIO()
        # Vorbis rather than Opus: as small for speech at this rate, and about 4x faster to encode.
        sf.write(buf, wav.mean(axis=1), sr, format="OGG", subtype="VORBIS", compression_level=0.9)
    except Exception:  # no Vorbis in this libsndfile, or an unreadable file: the clip is linked instead
        return None
    return "data:audio/ogg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def clips(run_dir: Path, prompt: dict, embed: bool | str) -> list[Clip]:
    """Both sides' clips of a prompt (``prompt['audio']`` maps side -> path in the run dir);
    ``embed`` is WAV, OGG or LINK (True/False mean WAV/LINK)."""
    from parity.report.rundata import audio_info

    how = {True: WAV, False: LINK}.get(embed, embed) if isinstance(embed, bool) else embed
    out = []
    for side in SIDES:
        rel = (prompt.get("audio") or {}).get(side)
        path = _inside(Path(run_dir), rel) if isinstance(rel, str) else None
        info = audio_info(path) if path else None
        if path is None or info is None:
            out.append(Clip(side, None, False, None, 0))
            continue
        duration, size = info
        src = None
        if how == WAV:
            src = "data:audio/wav;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
        elif how == OGG:
            src = ogg_uri(path)
        kind = how if src else LINK
        if src is None:
            src = quote(path.relative_to(Path(run_dir).resolve()).as_posix())
        out.append(Clip(side, src, kind != LINK, duration, size, kind))
    return out


def plan(run_dir: Path, prompts: list[dict], budget: int) -> dict[str, str]:
    """How each prompt's audio goes into the report, in order, both sides alike: WAV while the
    pair fits in what is left of ``budget`` characters, else OGG when the compressed pair fits,
    else LINK. A pair whose estimated compressed size cannot fit is not encoded at all."""
    from parity.report.rundata import audio_info

    used = 0
    decision: dict[str, str] = {}
    for p in prompts:
        paths = []
        for side in SIDES:
            rel = (p.get("audio") or {}).get(side)
            path = _inside(Path(run_dir), rel) if isinstance(rel, str) else None
            if path is not None:
                paths.append(path)
        decision[p["id"]] = LINK
        if not paths:
            continue
        cost = sum(encoded_size(path.stat().st_size) for path in paths)
        if used + cost <= budget:
            used += cost
            decision[p["id"]] = WAV
            continue
        seconds = sum((audio_info(path) or (0.0, 0))[0] for path in paths)
        if used + 0.8 * encoded_size(int(seconds * OGG_BYTES_PER_S)) > budget:
            continue  # would not fit even if it compressed a little better than usual
        uris = [ogg_uri(path) for path in paths]
        cost = sum(len(u) for u in uris if u)
        if all(uris) and used + cost <= budget:
            used += cost
            decision[p["id"]] = OGG
    return decision
