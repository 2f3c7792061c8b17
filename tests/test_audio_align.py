"""Codec frames to seconds and per-segment audio distances (parity.audio_align)."""

from __future__ import annotations

import numpy as np
import pytest

from parity.audio_align import audible_from, frame_to_seconds, segment_distances

SR = 24000


def tone(freq: float, seconds: float, sr: int = SR, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return amp * np.sin(2 * np.pi * freq * t)


def test_frame_to_seconds():
    assert frame_to_seconds(23) == pytest.approx(1.84)
    assert frame_to_seconds(0) == 0.0
    assert frame_to_seconds(25, frame_rate=25.0) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        frame_to_seconds(-1)
    with pytest.raises(ValueError):
        frame_to_seconds(3, frame_rate=0)


@pytest.mark.parametrize("metric, threshold", [("logmel_db", 6.0), ("rms_diff", 0.01)])
def test_divergence_at_one_second_is_found(metric, threshold):
    rng = np.random.default_rng(0)
    common = tone(220, 1.0) + 0.01 * rng.standard_normal(SR)
    a = np.r_[common, tone(220, 1.0)]
    b = np.r_[common, tone(1500, 1.0)]
    d = segment_distances(a, b, SR)
    assert d.segment_s == pytest.approx(0.08)
    start = audible_from(d, threshold, metric=metric)
    assert start is not None
    assert abs(start - 1.0) <= d.segment_s
    before = getattr(d, metric)[d.start_s + d.segment_s <= 1.0]
    assert before.size == 12 and np.all(before == 0.0)


def test_identical_signals_never_diverge():
    wav = tone(440, 2.0)
    d = segment_distances(wav, wav.copy(), SR)
    assert np.all(d.rms_diff == 0) and np.all(d.logmel_db == 0)
    assert audible_from(d, 0.0) is None


def test_different_lengths_count_the_missing_audio():
    long = tone(300, 2.0)
    short = long[: int(1.5 * SR)]
    d = segment_distances(long, short, SR)
    assert d.start_s.size == 25  # 2.0 s in 80 ms segments
    assert audible_from(d, 6.0) == pytest.approx(1.44)  # the segment 1.44-1.52 s holds the end
    assert audible_from(segment_distances(short, long, SR), 6.0) == audible_from(d, 6.0)


def test_inaudible_noise_floor_is_not_a_divergence():
    rng = np.random.default_rng(1)
    wav = tone(440, 1.0)
    d = segment_distances(wav, wav + 1e-6 * rng.standard_normal(wav.size), SR)
    assert d.logmel_db.max() < 1.0
    assert d.rms_diff.max() < 1e-5


def test_louder_copy_is_a_log_mel_shift_in_db():
    wav = tone(440, 1.0)
    d = segment_distances(wav, 0.5 * wav, SR)
    # Half the amplitude is -6.02 dB in every mel band above the -80 dB floor; bands within 6 dB
    # of the floor on the quieter side are clipped there and count a little less.
    assert 5.0 < np.median(d.logmel_db) <= 6.03


def test_segment_length_follows_the_rate():
    d = segment_distances(np.zeros(16000), np.zeros(16000), 16000, segment_s=0.1)
    assert d.start_s.tolist() == pytest.approx([0.1 * i for i in range(10)])
    with pytest.raises(ValueError):
        segment_distances(np.zeros(10), np.zeros(10), 16000, segment_s=1e-5)


def test_unknown_metric():
    d = segment_distances(np.zeros(100), np.zeros(100), SR)
    with pytest.raises(ValueError, match="metric"):
        audible_from(d, 1.0, metric="snr")
