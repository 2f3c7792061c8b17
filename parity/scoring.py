"""Audio quality of both sides of a prompt: MOS from one or more scorers over one or more seeds,
paired deltas (candidate - reference), and where in the audio the two sides start to differ.

Scorers are loaded once per run, before any engine runs, so a missing UTMOS checkpoint is a
bad-input error up front rather than a failure after an hour of decoding. A clip a scorer cannot
take (empty, NaN, too short, ...) becomes a recorded per-clip error and the run goes on.
"""

from __future__ import annotations

import numpy as np

from parity import audio_align, mos

PRIMARY_METRIC = {"dnsmos": "ovrl", "utmos": "utmos"}  # the number a scorer's delta is taken on


def load_scorers(names: tuple[str, ...], utmos_checkpoint: str | None = None) -> dict[str, mos.Scorer]:
    """Instantiate the named scorers (BadInput for unknown names or a missing UTMOS checkpoint)."""
    scorers = {}
    for name in names:
        options = {"checkpoint": utmos_checkpoint} if name == "utmos" and utmos_checkpoint else {}
        scorers[name] = mos.get_scorer(name, **options)
    return scorers


def score_clips(scorers: dict[str, mos.Scorer], clips: list[tuple[np.ndarray, int]]) -> dict[str, list[mos.ClipScore]]:
    """Every clip scored by every scorer (a clip a scorer cannot take is a recorded error)."""
    return {name: [mos.score_clip(scorer, wav, sr) for wav, sr in clips] for name, scorer in scorers.items()}


def score_pairs(
    scorers: dict[str, mos.Scorer], ref_clips: list[tuple[np.ndarray, int]], cand_clips: list[tuple[np.ndarray, int]],
    ref_scores: dict[str, list[mos.ClipScore]] | None = None,
) -> dict | None:
    """Score paired clips (one pair per seed) with every scorer; ``ref_scores`` are the reference
    clips' scores when :func:`score_clips` already made them.

    Returns the report's ``mos`` entry: the first scorer's mean reference and candidate score and
    mean delta at the top level, and per scorer the per-clip scores, errors and paired statistics.
    """
    if not scorers:
        return None
    ref_scores = ref_scores if ref_scores is not None else score_clips(scorers, ref_clips)
    cand_scores = score_clips(scorers, cand_clips)
    by_scorer = {}
    for name in scorers:
        metric = PRIMARY_METRIC.get(name)
        ref, cand = ref_scores[name], cand_scores[name]

        def value(clip: mos.ClipScore) -> float | None:
            if clip.scores is None:
                return None
            return clip.scores.get(metric, next(iter(clip.scores.values())))

        by_scorer[name] = {
            "metric": metric,
            "reference": [c.scores for c in ref],
            "candidate": [c.scores for c in cand],
            "errors": [f"{side} clip {i}: {c.error}" for side, clips in (("reference", ref), ("candidate", cand))
                       for i, c in enumerate(clips) if c.error],
            "stats": mos.paired_stats([value(c) for c in ref], [value(c) for c in cand]),
        }
    primary = next(iter(by_scorer))
    stats = by_scorer[primary]["stats"]
    return {
        "scorer": primary, "metric": by_scorer[primary]["metric"], "seeds": len(ref_clips),
        "reference": stats["mean_ref"], "candidate": stats["mean_cand"], "delta": stats["mean_delta"],
        "worst_delta": stats["worst_delta"], "by_scorer": by_scorer,
    }


def audio_timing(ref_wav: np.ndarray, cand_wav: np.ndarray, sr: int, comparison: dict, threshold_db: float) -> dict:
    """Map the comparison's first divergence and first differing frame to seconds, and find where
    the two waveforms first differ audibly (log-mel distance over ``threshold_db``)."""
    first = comparison.get("first_divergence")
    free = comparison.get("free_run") or {}
    out = {
        "first_divergence_s": audio_align.frame_to_seconds(first["step"]) if first else None,
        "first_diff_frame_s": (
            audio_align.frame_to_seconds(free["first_diff_frame"]) if free.get("first_diff_frame") is not None else None
        ),
        "audible_from_s": None,
        "audible_threshold_db": threshold_db,
    }
    if len(ref_wav) and len(cand_wav):
        distances = audio_align.segment_distances(ref_wav, cand_wav, sr)
        out["audible_from_s"] = audio_align.audible_from(distances, threshold_db)
    return out
