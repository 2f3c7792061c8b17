"""Audio sources for the report's A/B players: embedded as data URIs while a byte budget lasts,
linked by relative path after that.

Embedded clips are MP3 at a constant ~66 kbit/s (``MP3_LEVEL``), encoded in memory from the run's
WAVs: 8 kB per second instead of 48 kB for 24 kHz 16-bit PCM, so all 18 prompts x 32 frames fit
in a 2 MB report (as WAV they took 4.3 MB and still did not all fit). Every player also links the
lossless WAV next to it (``audio/<id>.<side>.wav``); the scores and distances are computed on the
WAVs, never on the MP3. A clip MP3 cannot carry (an unusual sample rate) is embedded as WAV.

Prompts are embedded in report order, both sides of a prompt or neither, each one that still fits
the budget left by the rest of the report; the others are only linked, relative to report.html,
which plays when the report is opened inside its run directory (or an artifact that keeps
``audio/`` next to it). The report names the prompts whose audio is not in the file.
"""

from __future__ import annotations

import base64
import io
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

SIDES = ("reference", "candidate")
MP3, WAV, LINK = "mp3", "wav", "link"  # how a player's clip is held: embedded MP3, embedded WAV, linked
MP3_LEVEL = 0.6  # libsndfile's MP3 compression level: constant ~66 kbit/s at 24 kHz mono
MP3_BYTES_PER_S = 8400  # upper bound of that rate (measured 8016-8250 B/s), for planning without encoding


@dataclass
class Clip:
    """One side's audio of one prompt, as the player sees it."""

    side: str
    src: str | None  # data URI, relative URL, or None when the file is missing
    embedded: bool
    duration_s: float | None
    size: int  # bytes of the WAV file
    wav: str | None = None  # relative URL of the lossless WAV, when the player holds an MP3 copy
    kind: str = LINK  # MP3 or WAV (embedded) or LINK


def _inside(run_dir: Path, rel: str) -> Path | None:
    """The file a result's relative audio path names, only when it lies inside the run directory."""
    try:
        path = (run_dir / rel).resolve()
        path.relative_to(run_dir.resolve())
    except (ValueError, OSError):
        return None
    return path if path.is_file() else None


def encoded_size(n_bytes: int) -> int:
    """Characters a file of ``n_bytes`` takes as a base64 data URI."""
    return len("data:audio/mpeg;base64,") + 4 * ((n_bytes + 2) // 3)


def embedded_bytes(path: Path) -> int:
    """Bytes a WAV takes once embedded (an upper bound of its MP3 size, or the WAV's own size)."""
    from parity.report.rundata import audio_info

    info = audio_info(path)
    wav_size = path.stat().st_size
    return wav_size if info is None else min(wav_size, int(info[0] * MP3_BYTES_PER_S) + 2048)


# Data URIs encoded ahead by the run's prompt worker, by (path, size, mtime): the report, written
# in the same process at the end, takes them from here instead of encoding every clip then.
_AHEAD: dict[tuple[str, int, int], str] = {}
_AHEAD_LOCK = threading.Lock()
AHEAD_CHARS = 2_000_000  # about one report's worth; clips past it are encoded when the report is written


def _stamp(path: Path) -> tuple[str, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def encode_ahead(path: Path) -> None:
    """Encode a WAV's data URI now (the run calls this on its prompt worker, beside the engines),
    while the clips encoded so far hold less than ``AHEAD_CHARS``."""
    stamp = _stamp(path)
    with _AHEAD_LOCK:
        if stamp is None or sum(len(v) for v in _AHEAD.values()) >= AHEAD_CHARS:
            return
    try:
        uri = _encode(path)
    except Exception:  # only a speed-up: never fail the prompt; the report encodes the clip itself
        return
    with _AHEAD_LOCK:
        _AHEAD[stamp] = uri


def data_uri(path: Path) -> str:
    """A WAV as an MP3 data URI (the WAV itself when MP3 cannot carry it)."""
    stamp = _stamp(path)
    with _AHEAD_LOCK:
        ahead = _AHEAD.pop(stamp, None) if stamp else None
    return ahead if ahead is not None else _encode(path)


def _encode(path: Path) -> str:
    import soundfile as sf

    try:
        wav, sr = sf.read(str(path), dtype="float32")
        buf = io.BytesIO()
        sf.write(buf, wav, sr, format="MP3", bitrate_mode="CONSTANT", compression_level=MP3_LEVEL)
        return "data:audio/mpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    except (RuntimeError, ValueError, TypeError, OSError):  # libsndfile refuses the rate or channels
        return "data:audio/wav;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


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
        link = quote(path.relative_to(Path(run_dir).resolve()).as_posix())
        src = data_uri(path) if embed else link
        kind = LINK if not embed else (MP3 if src.startswith("data:audio/mpeg") else WAV)
        out.append(Clip(side, src, embed, duration, size, link if kind == MP3 else None, kind))
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
            sizes.append(embedded_bytes(path) if path else 0)
        cost = sum(encoded_size(s) for s in sizes if s)
        fits = cost > 0 and used + cost <= budget
        used += cost if fits else 0
        decision[p["id"]] = fits
    return decision
