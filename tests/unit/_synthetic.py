"""Synthetic traces for the unit tests: tiny tensors with errors planted at chosen points, so every
metric has a value known in closed form (no model is loaded).

Sizes: S talker steps, F = S - 1 frames, 2 talker layers (3 hidden points: embed, layer0, layer1),
1 predictor layer (2 hidden points), hidden width 4, talker vocabulary 8, predictor vocabulary 6.
The reference's hidden values are all 1.0, so a candidate value of ``1 + e`` at every element of a
point gives that point a relative L2 of exactly ``|e|`` (for e a short binary fraction).
"""

from __future__ import annotations

import torch

from parity.trace import Trace

H = 4
TALKER_POINTS = 3  # embed, layer0, layer1
PRED_POINTS = 2  # embed, layer0
V = 8
VP = 6


def make_trace(steps: int = 3, meta: dict | None = None) -> Trace:
    """A reference-like trace: hidden values 1.0, logits with a clear top-1 at token ``step % V``
    (talker) and ``(sub + 1) % VP`` (predictor), tokens and codes equal to those top-1 choices."""
    frames = steps - 1
    talker_logits = torch.zeros(steps, V)
    talker_tokens = torch.arange(steps) % V
    talker_logits[torch.arange(steps), talker_tokens] = 4.0
    pred_logits = torch.zeros(frames, 15, VP)
    pred_tokens = (torch.arange(15) + 1) % VP
    pred_logits[:, torch.arange(15), pred_tokens] = 4.0
    codes = torch.zeros(frames, 16, dtype=torch.long)
    codes[:, 0] = talker_tokens[1:]
    codes[:, 1:] = pred_tokens
    return Trace(
        talker_hidden=torch.ones(steps, TALKER_POINTS, H),
        talker_logits=talker_logits,
        talker_tokens=talker_tokens.clone(),
        talker_choice=talker_tokens.clone(),
        codes=codes,
        pred_hidden=torch.ones(frames, 15, PRED_POINTS, H),
        pred_logits=pred_logits,
        pred_choice=codes[:, 1:].clone(),
        meta=dict(meta or {}),
    )


def copy_trace(t: Trace, meta: dict | None = None) -> Trace:
    """A deep copy (tensors cloned) to plant errors in."""
    return Trace(**{k: getattr(t, k).clone() for k in (
        "talker_hidden", "talker_logits", "talker_tokens", "talker_choice",
        "codes", "pred_hidden", "pred_logits", "pred_choice")}, meta=dict(meta if meta is not None else t.meta))


def truncate(t: Trace, steps: int) -> Trace:
    """The first ``steps`` talker steps (and ``steps - 1`` frames) of a trace."""
    c = copy_trace(t)
    f = max(steps - 1, 0)
    return Trace(c.talker_hidden[:steps], c.talker_logits[:steps], c.talker_tokens[:steps], c.talker_choice[:steps],
                 c.codes[:f], c.pred_hidden[:f], c.pred_logits[:f], c.pred_choice[:f], meta=c.meta)
