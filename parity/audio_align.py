"""Where in the audio two sides diverge: codec frames to seconds, per-segment distances.

Both WAVs of a prompt are cut into fixed segments (80 ms by default, one 12.5 Hz codec frame);
each segment gets a waveform RMS difference and a log-mel distance, so a report can say
"audible from 1.84 s". The shorter WAV is padded with silence: audio that one side never produced
counts as a difference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CODEC_FRAME_RATE = 12.5  # Qwen3-TTS 12 Hz tokenizer: one codec frame per 80 ms
N_MELS = 64
TOP_DB = 80.0  # log-mel floor below the louder side's peak, so inaudible hiss compares as equal


def frame_to_seconds(frame: int | float, frame_rate: float = CODEC_FRAME_RATE) -> float:
    """Start time in seconds of codec frame ``frame`` (0-based) at ``frame_rate`` frames/s."""
    if frame_rate <= 0:
        raise ValueError(f"frame_rate must be positive, got {frame_rate}")
    if frame < 0:
        raise ValueError(f"frame must be >= 0, got {frame}")
    return float(frame) / float(frame_rate)


@dataclass
class SegmentDistances:
    """Per-segment distances between two waveforms; arrays share one index (the segment)."""

    start_s: np.ndarray  # segment start times in seconds
    rms_diff: np.ndarray  # RMS of (a - b) over the segment, in full-scale units
    logmel_db: np.ndarray  # RMS over active mel bands of the log-mel difference, in dB
    segment_s: float


def _segments(wav: np.ndarray, n_seg: int, seg_len: int) -> np.ndarray:
    padded = np.zeros(n_seg * seg_len, dtype=np.float64)
    padded[: wav.size] = wav
    return padded.reshape(n_seg, seg_len)


def segment_distances(
    wav_a: np.ndarray, wav_b: np.ndarray, sr: int, segment_s: float = 0.08
) -> SegmentDistances:
    """Waveform RMS difference and log-mel distance per ``segment_s`` segment of two mono WAVs.

    The WAVs share the rate ``sr`` and may differ in length (the shorter is zero-padded). Each
    segment is one Hann-windowed frame; the mel power of both sides is in dB relative to the
    louder side's peak, floored at -80 dB, and the log-mel distance is the RMS dB difference over
    the bands where either side is above that floor (halving the amplitude gives about 6 dB).
    """
    import librosa

    a = np.asarray(wav_a, dtype=np.float64).reshape(-1)
    b = np.asarray(wav_b, dtype=np.float64).reshape(-1)
    seg_len = int(round(segment_s * sr))
    if seg_len < 2:
        raise ValueError(f"segment of {segment_s} s at {sr} Hz is under 2 samples")
    n_seg = max(1, -(-max(a.size, b.size) // seg_len))
    seg_a, seg_b = _segments(a, n_seg, seg_len), _segments(b, n_seg, seg_len)

    rms_diff = np.sqrt(np.mean((seg_a - seg_b) ** 2, axis=1))

    window = np.hanning(seg_len)
    mel = librosa.filters.mel(sr=sr, n_fft=seg_len, n_mels=N_MELS)
    power_a = np.abs(np.fft.rfft(seg_a * window, axis=1)) ** 2 @ mel.T
    power_b = np.abs(np.fft.rfft(seg_b * window, axis=1)) ** 2 @ mel.T
    ref = max(power_a.max(), power_b.max(), 1e-20)
    floor = ref * 10.0 ** (-TOP_DB / 10.0)
    db_a = 10.0 * np.log10(np.maximum(power_a, floor) / ref)
    db_b = 10.0 * np.log10(np.maximum(power_b, floor) / ref)
    # Average only over bands where either side is above the floor, so a quiet or tonal segment
    # is not diluted by bands that are silent on both sides.
    active = (db_a > -TOP_DB) | (db_b > -TOP_DB)
    sq_sum = np.sum(np.where(active, (db_a - db_b) ** 2, 0.0), axis=1)
    logmel_db = np.sqrt(sq_sum / np.maximum(active.sum(axis=1), 1))

    return SegmentDistances(
        start_s=np.arange(n_seg) * seg_len / sr,
        rms_diff=rms_diff,
        logmel_db=logmel_db,
        segment_s=seg_len / sr,
    )


def audible_from(
    distances: SegmentDistances, threshold: float, metric: str = "logmel_db"
) -> float | None:
    """Start time (s) of the first segment whose ``metric`` exceeds ``threshold``, else None.

    ``metric`` is ``"logmel_db"`` (default) or ``"rms_diff"``. The answer is exact to one segment.
    """
    if metric not in ("logmel_db", "rms_diff"):
        raise ValueError(f"metric must be 'logmel_db' or 'rms_diff', got {metric!r}")
    over = np.flatnonzero(getattr(distances, metric) > threshold)
    return float(distances.start_s[over[0]]) if over.size else None
