"""Checks on recorded traces shared by the engine tests."""

from __future__ import annotations

import torch


def assert_full_coverage(trace, choices: bool = False) -> None:
    """Every talker step and every predictor sub-step recorded every layer, with finite values
    (and, with ``choices``, the engine's own choice at every sampled point)."""
    layers = trace.meta["n_talker_layers"] + 1
    assert trace.talker_hidden.shape[:2] == (trace.n_steps, layers)
    assert trace.talker_logits.shape[0] == trace.n_steps
    assert trace.pred_hidden.shape[:3] == (trace.n_frames, 15, trace.meta["n_predictor_layers"] + 1)
    assert trace.pred_logits.shape[:2] == (trace.n_frames, 15)
    if choices:
        assert trace.talker_choice.shape == trace.talker_tokens.shape and trace.pred_choice.shape == (trace.n_frames, 15)
    for t in (trace.talker_hidden, trace.talker_logits, trace.pred_hidden, trace.pred_logits):
        assert t.numel() and torch.isfinite(t).all()
