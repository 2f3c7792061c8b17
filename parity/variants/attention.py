"""Attention kernel choice: the SDPA backend (math / flash / efficient / cudnn).

The implementation itself (``eager`` / ``sdpa``) is a side setting (``attention`` in the
recipe); engines switch it on a loaded model with :func:`set_attention`. This variant picks the
kernel behind ``sdpa`` for the selected layers' attention calls. Availability depends on the
device: on CPU (torch 2.11) ``math`` and ``flash`` (a CPU flash kernel) run, ``efficient`` and
``cudnn`` do not ("No viable backend"); on CUDA all four may. Measured on Hopper (an H200):
sdpa with an explicit padded mask differs from the reference from layer 0 of the first decode step.
"""

from __future__ import annotations


from parity.variants.base import Applied, Spec, Target, Variant

BACKENDS = {
    "math": "MATH",
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
}


def set_attention(target: Target, implementation: str, applied: Applied | None = None, component: str | None = None) -> None:
    """Switch a loaded model's attention implementation (``eager`` / ``sdpa``); transformers reads
    it from the config at every forward, so no reload is needed. Only the given component when
    named. With ``applied``, the change is undone with it."""
    for c in (component,) if component else ("talker", "predictor"):
        config = target.config(c)
        if applied is not None:
            applied.set_attr(config, "_attn_implementation_internal", implementation)
        else:
            config._attn_implementation_internal = implementation


class SdpaBackend(Variant):
    name = "sdpa_backend"
    summary = "which SDPA kernel runs attention (math/flash/efficient/cudnn); on CPU only math and flash exist"
    args = tuple(BACKENDS)
    default_arg = "math"

    def apply(self, target: Target, spec: Spec, applied: Applied) -> None:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, BACKENDS[spec.arg])
        for _, _, layer in target.layers(spec.scope):
            attn = layer.self_attn
            original = attn.forward

            def forward(*args, _original=original, **kwargs):
                with sdpa_kernel(backend):
                    return _original(*args, **kwargs)

            applied.set_attr(attn, "forward", forward)
