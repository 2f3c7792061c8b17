"""Reference clips for voice cloning: checked up front, and a small audible clip made in code.

A prompt's ``ref_audio`` is a local audio file (WAV, FLAC, OGG: whatever libsndfile reads). Both
engines read it themselves and encode it with the model's codec encoder (its codes go into the
prefill in ICL mode) and speaker encoder (the x-vector, in both modes), so a clip that cannot be
encoded fails late and differently on each side. :func:`check_clip` refuses such a clip before any
model loads, with one line naming the prompt, the file and the fix:

- not a local file (a URL or inline base64: ``qwen_tts`` would fetch or decode it; parity compares
  what both sides read from the same bytes), missing, a directory, unreadable or not audio;
- empty, NaN/inf samples, silent (peak below -80 dBFS: the speaker embedding of silence is noise);
- shorter than :data:`MIN_SECONDS` (a few codec frames do not describe a voice) or longer than
  :data:`MAX_SECONDS` (ICL puts 12.5 codes per second into the prefill);
- a sample rate outside :data:`RATE_RANGE`: ``qwen_tts`` resamples to 24 kHz, but a clip below
  16 kHz lacks the band the speaker encoder's mel spectrum covers (up to 12 kHz), and rates above
  48 kHz are almost always a mislabelled header.

Mode: a prompt with ``ref_audio`` and ``ref_text`` is ICL voice cloning (the reference's text and
codes in the prefill); with ``ref_audio`` only it is x-vector-only cloning (the speaker embedding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from parity.errors import BadInput
from parity.prompts import Prompt

MIN_SECONDS = 1.0
MAX_SECONDS = 60.0
RATE_RANGE = (16000, 48000)
SILENT_PEAK = 1e-4  # -80 dBFS
CODEC_FRAME_RATE = 12.5  # Qwen3-TTS 12 Hz codec: codes per second of reference audio


@dataclass(frozen=True)
class ClipInfo:
    """What the checks learnt about one clip."""

    path: Path  # absolute
    sample_rate: int
    seconds: float
    channels: int
    peak: float

    @property
    def codec_frames(self) -> int:
        """Codec frames the clip encodes to (an upper bound; the encoder may drop a partial frame)."""
        return math.ceil(self.seconds * CODEC_FRAME_RATE)


def clip_mode(prompt: Prompt) -> str | None:
    """'icl', 'xvector' or None (no reference clip)."""
    if not prompt.ref_audio:
        return None
    return "icl" if prompt.ref_text else "xvector"


def resolve(ref_audio: str) -> Path:
    """The clip's absolute path (relative paths are taken from the current directory)."""
    return Path(ref_audio).expanduser().resolve()


def check_clip(ref_audio: str, where: str) -> ClipInfo:
    """Read and check one clip; BadInput ``WHERE: ref_audio 'X': what; fix`` on any problem."""
    import soundfile as sf

    def bad(what: str, fix: str) -> BadInput:
        shown = ref_audio if len(ref_audio) <= 80 else ref_audio[:77] + "..."
        return BadInput(f"{where}: ref_audio {shown!r}: {what}; {fix}")

    if ref_audio.startswith(("http://", "https://", "data:")) or ("/" not in ref_audio and len(ref_audio) > 256):
        raise bad("not a local file (URLs and inline base64 are not read)", "download the clip and pass its path")
    try:
        path = resolve(ref_audio)
        exists, is_dir = path.exists(), path.is_dir()
    except (OSError, ValueError, RuntimeError) as e:
        raise bad(f"unusable path ({e})", "check the path") from None
    if not exists:
        raise bad("file not found", "check the path (relative paths start from the current directory)")
    if is_dir:
        raise bad("is a directory", "pass an audio file (WAV, FLAC, OGG)")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError for non-audio
        text = str(e).strip().splitlines()
        raise bad(f"unreadable as audio ({text[0] if text else type(e).__name__})",
                  "pass a WAV, FLAC or OGG file libsndfile can read") from None
    frames, channels = data.shape
    if frames == 0:
        raise bad("empty (no samples)", "record or pick a clip of a few seconds of speech")
    if not np.isfinite(data).all():
        first = int(np.flatnonzero(~np.isfinite(data).all(axis=1))[0])
        raise bad(f"holds NaN/inf samples (first at {first / sr:.3f} s)", "re-export the clip")
    if not RATE_RANGE[0] <= sr <= RATE_RANGE[1]:
        raise bad(f"sample rate {sr} Hz is outside {RATE_RANGE[0]}-{RATE_RANGE[1]} Hz",
                  "resample it to 24000 Hz (e.g. sox in.wav -r 24000 out.wav)")
    seconds = frames / sr
    if seconds < MIN_SECONDS:
        raise bad(f"{seconds:.2f} s is shorter than {MIN_SECONDS:g} s", f"use at least {MIN_SECONDS:g} s of speech (3-10 s is typical)")
    if seconds > MAX_SECONDS:
        raise bad(f"{seconds:.1f} s is longer than {MAX_SECONDS:g} s", f"cut it to at most {MAX_SECONDS:g} s (3-10 s is typical)")
    peak = float(np.abs(data).max())
    if peak < SILENT_PEAK:
        raise bad(f"silent (peak {peak:.1e})", "pass a clip with audible speech")
    return ClipInfo(path=path, sample_rate=int(sr), seconds=seconds, channels=channels, peak=peak)


def check_prompts(prompts: Iterable[Prompt], model_type: str | None, prompts_path: Path | str | None = None) -> dict[str, ClipInfo]:
    """Check every prompt's clip against the model type (None: unknown yet, only the clips are
    checked). Returns the clip of each prompt that has one, by prompt id."""
    clips: dict[str, ClipInfo] = {}
    for p in prompts:
        where = f"{prompts_path}:{p.line}: prompt {p.id}" if prompts_path is not None else f"prompt {p.id} (line {p.line})"
        if model_type == "base" and not p.ref_audio:
            raise BadInput(f"{where}: a base (voice-clone) model needs a reference clip; add \"ref_audio\": "
                           "\"clip.wav\" (and \"ref_text\" for ICL cloning) to the prompt")
        if model_type not in (None, "base") and p.ref_audio:
            raise BadInput(f"{where}: ref_audio is only used by a base (voice-clone) model, this one is {model_type}; "
                           "drop ref_audio or pass a base model (e.g. --model random:tiny-base)")
        if model_type == "base" and p.instruct:
            raise BadInput(f"{where}: instruct is not used by the reference's voice cloning (qwen_tts ignores it for "
                           "base models), so the two sides would get different prompts; drop instruct")
        if p.ref_audio:
            clips[p.id] = check_clip(p.ref_audio, where)
    return clips


def extra_prefill_positions(prompt: Prompt, clip: ClipInfo | None, ref_text_tokens: int = 0) -> int:
    """Prefill positions a clip adds to the prompt (for the up-front length check): the speaker
    embedding, and in ICL mode the reference text and one position per codec frame plus codec BOS."""
    if clip is None:
        return 0
    if clip_mode(prompt) == "xvector":
        return 1
    return 1 + ref_text_tokens + clip.codec_frames + 1


def synth_clip(seconds: float = 1.5, sample_rate: int = 24000, seed: int = 0) -> np.ndarray:
    """A small audible, voice-like waveform (for tests and example recipes): a harmonic tone whose
    pitch glides like intonation, with syllable-rate amplitude and a little breath noise. Peak 0.5."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * sample_rate))) / sample_rate
    f0 = 140.0 + 25.0 * np.sin(2 * np.pi * 0.7 * t) + 8.0 * np.sin(2 * np.pi * 5.0 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * 4.0 * t - np.pi / 2)
    wav = voice * envelope + 0.05 * rng.standard_normal(len(t))
    return (0.5 * wav / np.abs(wav).max()).astype(np.float32)


def write_clip(path: Path | str, seconds: float = 1.5, sample_rate: int = 24000, seed: int = 0) -> Path:
    """Write :func:`synth_clip` as a 16-bit WAV; returns the path."""
    import soundfile as sf

    path = Path(path)
    sf.write(str(path), synth_clip(seconds, sample_rate, seed), sample_rate, subtype="PCM_16")
    return path


def forced_item(force, own):
    """Teacher forcing for the clip: a ``qwen_tts`` voice-clone prompt item holding the forcing
    trace's clip encoding (codes and speaker embedding) in place of the engine's own ``own`` item,
    on its device and dtype. The engine's own encoding is still what its trace records."""
    from qwen_tts.inference.qwen3_tts_model import VoiceClonePromptItem

    spk = own.ref_spk_embedding
    codes = None if own.ref_code is None else force.ref_codes.to(own.ref_code.device, own.ref_code.dtype)
    return VoiceClonePromptItem(ref_code=codes, ref_spk_embedding=force.ref_speaker.to(spk.device, spk.dtype),
                                x_vector_only_mode=own.x_vector_only_mode, icl_mode=own.icl_mode, ref_text=own.ref_text)


def has_clip(trace) -> bool:
    """Whether a trace recorded a reference clip's encoding."""
    return trace is not None and trace.ref_speaker.numel() > 0


def compare_encoding(cand, ref) -> dict | None:
    """How the two sides encoded the reference clip (both engines run the model's codec encoder and
    speaker encoder themselves): code agreement and the speaker embedding's error. None when the
    prompt has no clip. In ICL mode the codes sit in the prefill, so a code that differs makes the
    two sides' prompts differ from that position on, before any decoding."""
    import torch

    if ref.ref_speaker.numel() == 0 and cand.ref_speaker.numel() == 0:
        return None
    out: dict = {"mode": "icl" if ref.ref_codes.numel() else "xvector"}
    a, b = ref.ref_speaker.float().flatten(), cand.ref_speaker.float().flatten()
    if a.shape == b.shape and a.numel():
        diff = (b - a).double()
        norm = float(a.double().norm())
        out["speaker_rel_l2"] = float(diff.norm()) / norm if norm > 0 else float(diff.norm())
        out["speaker_max_abs"] = float(diff.abs().max())
        out["speaker_cosine"] = float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))
    else:
        out["speaker_shapes"] = [list(a.shape), list(b.shape)]
    if out["mode"] == "icl":
        rc, cc = ref.ref_codes, cand.ref_codes
        out["code_frames"] = {"reference": int(rc.shape[0]), "candidate": int(cc.shape[0])}
        n = min(rc.shape[0], cc.shape[0])
        same = rc[:n] == cc[:n]
        out["codes_equal"] = bool(rc.shape == cc.shape and bool(same.all()))
        out["code_agreement"] = float(same.float().mean()) if n else None
        bad = (~same).nonzero()
        out["first_code_diff"] = {"frame": int(bad[0, 0]), "codebook": int(bad[0, 1])} if len(bad) else (
            None if rc.shape[0] == cc.shape[0] else {"frame": n, "codebook": 0})
    return out


def encoding_hint(encoding: dict | None, tol: float) -> dict | None:
    """A hint when the clip's codes differ, or its speaker embedding differs by more than the
    tolerance ``tol`` (relative L2), between the sides; None otherwise."""
    if not encoding:
        return None
    if encoding.get("mode") == "icl" and not encoding.get("codes_equal"):
        d = encoding["first_code_diff"]
        agreement = encoding.get("code_agreement")
        return {"text": f"the reference clip was coded differently by the two sides (first at clip frame {d['frame']}, "
                        f"codebook {d['codebook']}): free-running, the candidate's ICL prefill differs from that position "
                        "on (the teacher-forced comparison is built on the reference's encoding)",
                "evidence": f"code agreement {agreement:.1%}" if agreement is not None else "clip lengths differ",
                "source": "reference_clip"}
    rel = encoding.get("speaker_rel_l2")
    if rel is not None and rel > tol:
        return {"text": f"the reference clip's speaker embedding differs between the sides (rel L2 {rel:.2g}): "
                        "free-running, the prefill position that holds it differs before any decoding",
                "evidence": f"cosine {encoding.get('speaker_cosine'):.6f}", "source": "reference_clip"}
    return None
