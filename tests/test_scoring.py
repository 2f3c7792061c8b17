"""Scoring both sides' audio: paired MOS across seeds, per-clip errors, audio timing."""

from __future__ import annotations

import numpy as np
import pytest

from parity import scoring
from parity.errors import BadInput

SR = 24000


def _voiced(seconds: float, seed: int) -> np.ndarray:
    """A crude voiced sound: harmonics of a wandering pitch under a syllable-rate envelope."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    f0 = 140 + 20 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6))
    phase = 2 * np.pi * np.cumsum(f0) / SR
    wav = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 4 * t)) ** 2
    return (0.1 * wav * envelope).astype(np.float32)


def test_paired_scores_over_seeds_rank_a_damaged_candidate_lower():
    scorers = scoring.load_scorers(("dnsmos",))
    ref = [(_voiced(4.0, s), SR) for s in range(2)]
    rng = np.random.default_rng(0)
    cand = [(w + 0.05 * rng.standard_normal(len(w)).astype(np.float32), sr) for w, sr in ref]
    result = scoring.score_pairs(scorers, ref, cand)
    stats = result["by_scorer"]["dnsmos"]["stats"]
    assert result["seeds"] == 2 and stats["n"] == 2
    assert result["delta"] < 0 and result["worst_delta"] <= result["delta"]
    assert result["reference"] > result["candidate"]


def test_a_bad_clip_is_recorded_and_the_rest_is_scored():
    scorers = scoring.load_scorers(("dnsmos",))
    ref = [(_voiced(3.0, 0), SR), (_voiced(3.0, 1), SR)]
    cand = [(np.zeros(0, dtype=np.float32), SR), (_voiced(3.0, 1), SR)]  # seed 0 produced nothing
    result = scoring.score_pairs(scorers, ref, cand)
    entry = result["by_scorer"]["dnsmos"]
    assert entry["stats"]["n"] == 1 and entry["stats"]["n_dropped"] == 1
    assert len(entry["errors"]) == 1 and entry["errors"][0].startswith("candidate clip 0")
    assert entry["stats"]["mean_delta"] == pytest.approx(0.0, abs=1e-6)  # identical second pair


def test_unknown_scorer_and_missing_utmos_checkpoint_are_bad_input(monkeypatch):
    with pytest.raises(BadInput, match="unknown scorer 'pesq'"):
        scoring.load_scorers(("pesq",))
    monkeypatch.delenv("PARITY_UTMOS_CHECKPOINT", raising=False)
    with pytest.raises(BadInput, match="PARITY_UTMOS_CHECKPOINT"):
        scoring.load_scorers(("utmos",))


def test_audio_timing_maps_frames_and_finds_the_audible_point():
    a = _voiced(3.0, 0)
    b = a.copy()
    b[int(1.6 * SR):] = _voiced(3.0, 5)[int(1.6 * SR):]
    comparison = {"first_divergence": {"step": 10}, "free_run": {"first_diff_frame": 20}}
    timing = scoring.audio_timing(a, b, SR, comparison, threshold_db=6.0)
    assert timing["first_divergence_s"] == pytest.approx(0.8)
    assert timing["first_diff_frame_s"] == pytest.approx(1.6)
    assert timing["audible_from_s"] == pytest.approx(1.6, abs=0.1)
    same = scoring.audio_timing(a, a.copy(), SR, {"first_divergence": None, "free_run": {}}, 6.0)
    assert same["audible_from_s"] is None and same["first_divergence_s"] is None
