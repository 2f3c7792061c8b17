"""A fully masked attention row: softmax over a row that is all -inf gives NaN (FastDeploy PR #7028).

``mask_row=S@talker:L`` masks every key for the query of decode step ``S`` (S >= 1; for the code
predictor, sub-step ``S`` of every frame) in decoder layer ``L``, and computes that one call with
the unguarded eager softmax, as the FastDeploy kernel did. PyTorch's own SDPA kernels on CPU
(math and flash) guard against it (measured: the row comes out 0, not NaN), so without forcing
the eager softmax the variant would not reproduce the bug under ``attention = "sdpa"``.

It exists to exercise NaN detection: the comparison must report the first non-finite value at
(component, step S, layer L) and nothing non-finite before it. The step is counted in Python, so
it needs eager execution: on the faster engine use it with ``cuda_graphs=off``.
"""

from __future__ import annotations

import contextlib

import torch

from parity.errors import BadInput
from parity.variants.base import Applied, Spec, Target, Variant


@contextlib.contextmanager
def eager_attention(config):
    """Use the eager (unguarded softmax) attention for the duration of one call."""
    old = config._attn_implementation_internal
    config._attn_implementation_internal = "eager"
    try:
        yield
    finally:
        config._attn_implementation_internal = old


class MaskRow(Variant):
    name = "mask_row"
    summary = "mask one attention row completely (all -inf) at one step and layer -> NaN; tests NaN detection"
    default_arg = "1"
    per_layer = False
    needs_layer = True
    stackable = True  # several masked rows (other steps) on one layer are meaningful

    def _arg_ok(self, arg: str | None) -> bool:
        return arg is not None and arg.isdigit() and int(arg) >= 1

    def check(self, spec: Spec, engine: str | None = None) -> Spec:
        if spec.arg is not None and not self._arg_ok(spec.arg):
            raise BadInput(f"variant '{spec}': mask_row=S needs a decode step S >= 1 (e.g. mask_row=2@talker:1)")
        if spec.scope.layers is not None and spec.scope.layers[1] - spec.scope.layers[0] != 1:
            raise BadInput(f"variant '{spec}': mask_row masks one layer; name one, e.g. mask_row@talker:1")
        return super().check(spec, engine)

    def apply(self, target: Target, spec: Spec, applied: Applied) -> None:
        step = int(spec.arg)
        (component, _, layer), = list(target.layers(spec.scope))
        attn = layer.self_attn
        original = attn.forward
        calls = {"since_prefill": 0}
        note = applied.note(str(spec))
        note["masked_calls"] = 0

        def forward(*args, **kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            calls["since_prefill"] = 0 if hidden.shape[1] > 1 else calls["since_prefill"] + 1
            if calls["since_prefill"] != step:
                return original(*args, **kwargs)
            kwargs["attention_mask"] = torch.full((1, 1, hidden.shape[1], 1), float("-inf"), dtype=hidden.dtype, device=hidden.device)
            note["masked_calls"] += 1
            with eager_attention(attn.config):
                return original(*args, **kwargs)

        applied.set_attr(attn, "forward", forward)
