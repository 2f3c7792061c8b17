"""fp32 matmul precision (``torch.set_float32_matmul_precision``): highest / high / medium.

``high`` lets fp32 matmuls use TF32 (CUDA, Ampere+) or bf16x3; ``medium`` bf16. The TF32 switch
for the whole side is the recipe's ``tf32`` setting; this variant sets the precision for the
selected layers' forward calls only and restores it after each call. On CPU it can change the
fp32 kernel too (measured on the tiny model, 2-core x86: ``medium`` differs by rel L2 1.5e-7).
"""

from __future__ import annotations

import torch

from parity.variants.base import Applied, Spec, Target, Variant


def _current() -> str:
    """The precision in force, read from the legacy TF32 flag the engines set (``tf32`` side
    setting). On CUDA, torch 2.11's generic ``get_float32_matmul_precision`` raises once the
    legacy and per-backend flags have both been touched ("mix of the legacy and new APIs"),
    so it is not used."""
    return "high" if torch.backends.cuda.matmul.allow_tf32 else "highest"


class MatmulPrecision(Variant):
    name = "matmul_precision"
    summary = "torch.set_float32_matmul_precision for the selected layers (highest/high/medium)"
    args = ("highest", "high", "medium")
    default_arg = "high"

    def apply(self, target: Target, spec: Spec, applied: Applied) -> None:
        for _, _, layer in target.layers(spec.scope):
            original = layer.forward

            def forward(*args, _original=original, **kwargs):
                old = _current()
                torch.set_float32_matmul_precision(spec.arg)
                try:
                    return _original(*args, **kwargs)
                finally:
                    torch.set_float32_matmul_precision(old)

            applied.set_attr(layer, "forward", forward)
