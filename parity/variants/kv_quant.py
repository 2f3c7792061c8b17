"""Low-precision KV cache: fp8 (e4m3) or int8 with per-head scales, dequantised on read
(PyTorch PR #170486 for FlexAttention, FastDeploy PR #7028).

Every K/V write is scaled per (batch, head) by its absolute maximum over the written positions
and head dimension, rounded to fp8 e4m3 (max 448) or int8 (max 127), and stored dequantised. A
kernel that stores the 8-bit codes plus the scale and dequantises on read computes exactly these
values, so attention sees the same numbers. The variant measures the quantisation SQNR of what it
writes (``notes["kv_quant"]``). Signature: error proportional to the K/V rounding, from layer 0 of
the prefill on, not growing with position.
"""

from __future__ import annotations

import math

import torch

from parity.variants.base import Applied, Spec, Target, Variant

QMAX = {"fp8": 448.0, "int8": 127.0}


def fake_quantize(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Round ``x`` [B, H, T, D] to ``kind`` with one scale per (B, H); return it dequantised."""
    xf = x.float()
    scale = xf.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12) / QMAX[kind]
    if kind == "fp8":
        q = (xf / scale).to(torch.float8_e4m3fn).float()
    else:
        q = torch.round(xf / scale).clamp(-127, 127)
    return (q * scale).to(x.dtype)


class _QuantizingCache:
    """Wraps a transformers Cache: quantises K/V on ``update``, everything else passes through."""

    def __init__(self, cache, kind: str, stats: dict):
        self._cache = cache
        self._kind = kind
        self._stats = stats

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        qk, qv = fake_quantize(key_states, self._kind), fake_quantize(value_states, self._kind)
        for name, x, q in (("k", key_states, qk), ("v", value_states, qv)):
            self._stats[f"{name}_signal"] += float(x.double().pow(2).sum())
            self._stats[f"{name}_noise"] += float((x.double() - q.double()).pow(2).sum())
        return self._cache.update(qk, qv, layer_idx, cache_kwargs)

    def __getattr__(self, name):
        return getattr(self._cache, name)


def sqnr_db(signal: float, noise: float) -> float:
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


class KVQuant(Variant):
    name = "kv_quant"
    summary = "KV cache stored as fp8 e4m3 or int8 with per-head scales, dequantised on read"
    args = ("fp8", "int8")
    default_arg = "fp8"

    def apply(self, target: Target, spec: Spec, applied: Applied) -> None:
        stats = {"k_signal": 0.0, "k_noise": 0.0, "v_signal": 0.0, "v_noise": 0.0}
        note = applied.notes.setdefault(str(spec), {"format": spec.arg})

        def refresh() -> None:
            note["k_sqnr_db"] = sqnr_db(stats["k_signal"], stats["k_noise"])
            note["v_sqnr_db"] = sqnr_db(stats["v_signal"], stats["v_noise"])

        for _, _, layer in target.layers(spec.scope):

            def wrap(module, args, kwargs):
                cache = kwargs.get("past_key_values")
                if cache is not None and not isinstance(cache, _QuantizingCache):
                    kwargs["past_key_values"] = _QuantizingCache(cache, spec.arg, stats)
                return args, kwargs

            def measured(module, args, kwargs, output):
                refresh()

            attn = layer.self_attn
            applied.hook(attn.register_forward_pre_hook(wrap, with_kwargs=True))
            applied.hook(attn.register_forward_hook(measured, with_kwargs=True))
