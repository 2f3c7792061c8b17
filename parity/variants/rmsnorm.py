"""RMSNorm variance computed in the activation dtype instead of fp32 (vllm-omni PR #2277).

The reference ``Qwen3TTSRMSNorm`` upcasts to fp32, computes the variance and the scaling there and
rounds once. The variant keeps everything in the activation dtype (bf16: the variance, the rsqrt
and the product are each rounded), as the buggy fast path did. Signature: error enters at the
first norm of the chosen component (the input norm of its first selected layer) and at every norm
after it; worst in the 15-step code predictor. A no-op in fp32.
"""

from __future__ import annotations

import torch

from parity.variants.base import Applied, Spec, Target, Variant


def _lowp_forward(norm: torch.nn.Module):
    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + norm.variance_epsilon)
        return norm.weight * hidden_states

    return forward


class RMSNormLowp(Variant):
    name = "rmsnorm_lowp"
    summary = "RMSNorm variance and scaling in the activation dtype instead of fp32 (a bug vllm-omni fixed for Qwen3-TTS in pull request 2277)"
    outside_layers = True  # the component's final norm

    def apply(self, target: Target, spec: Spec, applied: Applied) -> None:
        norms = []
        for _, _, layer in target.layers(spec.scope):
            attn = layer.self_attn
            norms += [layer.input_layernorm, attn.q_norm, attn.k_norm, layer.post_attention_layernorm]
        for component in target.components(spec.scope):
            if target.whole(component, spec.scope):
                norms.append(target.model(component).norm)
        for norm in norms:
            applied.set_attr(norm, "forward", _lowp_forward(norm))
