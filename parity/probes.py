"""Probes: forward hooks that record per-layer outputs at every talker step and predictor sub-step.

The decode loop tells the recorder where it is (``recorder.at("talker", step)`` or
``recorder.at("predictor", frame, sub)``); hooks copy the last position of each probed module into
that slot. ``finish`` stacks the slots into tensors and fails loudly if any probed point recorded
nothing, so a missing hook can never pass as an empty trace.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


class ProbeCoverageError(RuntimeError):
    """A probed module recorded nothing (or not at every step) during a run."""


def _last_position(x) -> torch.Tensor:
    t = x[0] if isinstance(x, (tuple, list)) else x
    return t[:, -1].detach().to(dtype=torch.float32, device="cpu", copy=True)  # [batch rows, hidden]


class Recorder:
    """Hooks on a Qwen3-TTS talker (and its code predictor) that fill per-point slots."""

    def __init__(self, talker: torch.nn.Module):
        self.talker = talker
        self.predictor = talker.code_predictor
        self.n_talker_layers = len(talker.model.layers)
        self.n_pred_layers = len(self.predictor.model.layers)
        self.n_substeps = int(talker.config.num_code_groups) - 1  # predictor sub-steps per frame
        self.context: tuple | None = None
        self.slots: dict[tuple, dict[str, torch.Tensor]] = {}
        self.hits: dict[str, int] = {}
        self._handles: list = []

    # -- hook management ---------------------------------------------------------------
    def attach(self) -> None:
        """Register the hooks (idempotent)."""
        if self._handles:
            return
        self._hook_stack("talker", self.talker.model.layers, [self.talker.codec_head])
        self._hook_stack("predictor", self.predictor.model.layers, list(self.predictor.lm_head))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook_stack(self, component: str, layers, heads) -> None:
        def pre_embed(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            self._put(component, "embed", hidden)

        self._handles.append(layers[0].register_forward_pre_hook(pre_embed, with_kwargs=True))
        for i, layer in enumerate(layers):
            self._handles.append(layer.register_forward_hook(self._make_hook(component, f"layer{i}")))
        for head in heads:
            self._handles.append(head.register_forward_hook(self._make_hook(component, "logits")))

    def _make_hook(self, component: str, point: str):
        def hook(module, args, output):
            self._put(component, point, output)

        return hook

    def _put(self, component: str, point: str, value) -> None:
        if self.context is None or self.context[0] != component:
            return
        key = f"{component}.{point}"
        self.hits[key] = self.hits.get(key, 0) + 1
        self.slots.setdefault(self.context, {})[point] = _last_position(value)

    @contextmanager
    def at(self, component: str, step: int, sub: int = -1) -> Iterator[None]:
        """Attribute everything the hooks see inside the block to (component, step, sub)."""
        previous = self.context
        self.context = (component, step, sub)
        try:
            yield
        finally:
            self.context = previous

    # -- assembling ------------------------------------------------------------------
    def finish(self, n_steps: int, n_frames: int, row: int = 0) -> dict[str, torch.Tensor]:
        """Stack batch row ``row``'s slots into trace tensors; raise ProbeCoverageError on any
        missing point."""
        talker_points = ["embed"] + [f"layer{i}" for i in range(self.n_talker_layers)]
        pred_points = ["embed"] + [f"layer{i}" for i in range(self.n_pred_layers)]
        talker_hidden, talker_logits = [], []
        for s in range(n_steps):
            slot = self._slot(("talker", s, -1), talker_points + ["logits"])
            talker_hidden.append(torch.stack([slot[p][row] for p in talker_points]))
            talker_logits.append(slot["logits"][row])
        pred_hidden, pred_logits = [], []
        for f in range(n_frames):
            rows_h, rows_l = [], []
            for j in range(self.n_substeps):
                slot = self._slot(("predictor", f, j), pred_points + ["logits"])
                rows_h.append(torch.stack([slot[p][row] for p in pred_points]))
                rows_l.append(slot["logits"][row])
            pred_hidden.append(torch.stack(rows_h))
            pred_logits.append(torch.stack(rows_l))
        p = self.predictor
        hp = p.config.hidden_size
        vp = p.config.vocab_size
        return {
            "talker_hidden": torch.stack(talker_hidden),
            "talker_logits": torch.stack(talker_logits),
            "pred_hidden": torch.stack(pred_hidden) if pred_hidden else torch.zeros(0, self.n_substeps, len(pred_points), hp),
            "pred_logits": torch.stack(pred_logits) if pred_logits else torch.zeros(0, self.n_substeps, vp),
        }

    def _slot(self, key: tuple, points: list[str]) -> dict[str, torch.Tensor]:
        slot = self.slots.get(key, {})
        missing = [p for p in points if p not in slot]
        if missing:
            component, step, sub = key
            where = f"{component} step {step}" + (f" sub-step {sub}" if sub >= 0 else "")
            raise ProbeCoverageError(
                f"probe coverage: {where} recorded nothing for {', '.join(missing)} "
                f"(hooks fired: {self.hits or 'none'})"
            )
        return slot

    def reset(self) -> None:
        self.slots.clear()
        self.hits.clear()
        self.context = None
