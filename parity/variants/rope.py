"""RoPE cos/sin computed in the activation dtype instead of fp32 (vllm-omni PR #2277).

The reference rotary embedding multiplies positions by the inverse frequencies in fp32 (autocast
off) and only rounds the finished cos/sin. The variant does the product and the cos/sin in the
activation dtype: in bf16 ``position * inv_freq`` loses absolute precision as the position grows,
so the error grows with position (present from the prefill, larger at later steps). A no-op in fp32.

Both sets of cos/sin are computed; a pre-hook swaps in the low-precision pair for the selected
decoder layers only, so the variant can be restricted to a layer range.
"""

from __future__ import annotations

import torch

from parity.variants.base import Applied, Spec, Target, Variant


def lowp_cos_sin(rotary: torch.nn.Module, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin like ``rotary.forward`` but with the frequency product and cos/sin in ``x.dtype``.
    Handles the talker's 3-axis MRoPE ids [3, B, T] and the predictor's plain ids [B, T]."""
    dtype = x.dtype
    inv = rotary.inv_freq.to(device=x.device, dtype=dtype)
    if position_ids.ndim == 3:
        freqs = inv[None, None, :, None].expand(3, position_ids.shape[1], -1, 1) @ position_ids[:, :, None, :].to(dtype)
        freqs = freqs.transpose(2, 3)
    else:
        freqs = (inv[None, :, None].expand(position_ids.shape[0], -1, 1) @ position_ids[:, None, :].to(dtype)).transpose(1, 2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * rotary.attention_scaling, emb.sin() * rotary.attention_scaling


class RopeLowp(Variant):
    name = "rope_lowp"
    summary = "RoPE position*frequency and cos/sin in the activation dtype instead of fp32 (a bug vllm-omni fixed for Qwen3-TTS in pull request 2277)"

    def apply(self, target: Target, spec: Spec, applied: Applied) -> None:
        for component in target.components(spec.scope):
            rotary = target.model(component).rotary_emb
            state: dict = {}
            original = rotary.forward

            def forward(x, position_ids, _original=original, _rotary=rotary, _state=state):
                _state["low"] = lowp_cos_sin(_rotary, x, position_ids)
                return _original(x, position_ids)

            applied.set_attr(rotary, "forward", forward)
            stack = target.model(component).layers
            for i in target.layer_range(component, spec.scope):

                def swap(module, args, kwargs, _state=state):
                    kwargs["position_embeddings"] = _state["low"]
                    return args, kwargs

                applied.hook(stack[i].register_forward_pre_hook(swap, with_kwargs=True))
