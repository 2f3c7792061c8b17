"""Fused QKV projection and fused gate/up MLP: weights packed into one Linear, outputs split.

Mathematically equal to the separate projections; the one wider GEMM may block and accumulate
differently, so results may differ at the bit level only (vllm-omni PR #2277 vs its follow-ups).
Signature: differences of the order of the activation dtype's rounding, not growing by layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from parity.variants.base import Applied, Spec, Target, Variant


class _Packed:
    """One GEMM for several Linears sharing an input; part ``i`` is slice ``i`` of its output."""

    def __init__(self, linears: list[torch.nn.Linear]):
        self.weight = torch.cat([lin.weight.detach() for lin in linears])
        biases = [lin.bias for lin in linears]
        self.bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        self.sizes = [lin.out_features for lin in linears]
        self._input: torch.Tensor | None = None
        self._parts: tuple[torch.Tensor, ...] = ()

    def part(self, x: torch.Tensor, i: int) -> torch.Tensor:
        if i == 0 or self._input is not x:
            self._parts = F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)
            self._input = x
        out = self._parts[i]
        if i == len(self.sizes) - 1:
            self._input, self._parts = None, ()
        return out


class FusedQKV(Variant):
    name = "fused_qkv"
    summary = "q/k/v projections packed into one Linear, output split (equal in exact arithmetic)"

    def apply(self, target: Target, spec: Spec, applied: Applied) -> None:
        for _, _, layer in target.layers(spec.scope):
            attn = layer.self_attn
            packed = _Packed([attn.q_proj, attn.k_proj, attn.v_proj])
            for i, proj in enumerate((attn.q_proj, attn.k_proj, attn.v_proj)):
                applied.set_attr(proj, "forward", lambda x, _i=i, _p=packed: _p.part(x, _i))


class FusedGateUp(Variant):
    name = "fused_gate_up"
    summary = "MLP gate and up projections packed into one Linear, output split"

    def apply(self, target: Target, spec: Spec, applied: Applied) -> None:
        for _, _, layer in target.layers(spec.scope):
            mlp = layer.mlp
            weight = torch.cat([mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach()])
            n = mlp.gate_proj.out_features

            def forward(x, _mlp=mlp, _w=weight, _n=n):
                gate, up = F.linear(x, _w).split([_n, _n], dim=-1)
                return _mlp.down_proj(_mlp.act_fn(gate) * up)

            applied.set_attr(mlp, "forward", forward)
