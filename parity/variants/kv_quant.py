"""Low-precision KV cache: fp8 (e4m3) or int8 with per-head scales, dequantised on read
(PyTorch PR #170486 for FlexAttention, FastDeploy PR #7028).

Every K/V write is scaled per (batch, head) by its absolute maximum over the written positions
and head dimension, rounded to fp8 e4m3 (max 448) or int8 (max 127), and stored dequantised. A
kernel that stores the 8-bit codes plus the scale and dequantises on read computes exactly these
values, so attention sees the same numbers. The variant measures the quantisation SQNR of what it
writes (``applied.notes["kv_quant=fp8"]``). Signature: error proportional to the K/V rounding, from layer 0 of
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


class _Power:
    """Signal and noise power of what was written, kept on the device (in place, so it also
    accumulates inside a captured CUDA graph); read back only when the notes are read."""

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None  # [k signal, k noise, v signal, v noise]

    def add(self, i: int, x: torch.Tensor, q: torch.Tensor) -> None:
        if self.sums is None:
            self.sums = torch.zeros(4, dtype=torch.float64, device=x.device)
        d = x.double()
        self.sums[2 * i].add_(d.pow(2).sum())
        self.sums[2 * i + 1].add_((d - q.double()).pow(2).sum())


class _QuantizingCache:
    """Wraps a transformers Cache: quantises K/V on ``update``, everything else passes through."""

    def __init__(self, cache, kind: str, power: _Power):
        self._cache = cache
        self._kind = kind
        self._power = power

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        qk, qv = fake_quantize(key_states, self._kind), fake_quantize(value_states, self._kind)
        self._power.add(0, key_states, qk)
        self._power.add(1, value_states, qv)
        return self._cache.update(qk, qv, layer_idx, cache_kwargs)

    def __getattr__(self, name):
        return getattr(self._cache, name)


def sqnr_db(signal: float, noise: float) -> float:
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class KVQuant(Variant):
    name = "kv_quant"
    summary = "KV cache stored as fp8 e4m3 or int8 with per-head scales, dequantised on read"
    args = ("fp8", "int8")
    default_arg = "fp8"

    def apply(self, target: Target, spec: Spec, applied: Applied) -> None:
        power = _Power()

        def refresh(note: dict) -> None:
            if power.sums is not None and not _capturing():
                ks, kn, vs, vn = power.sums.tolist()
                note.update(k_sqnr_db=sqnr_db(ks, kn), v_sqnr_db=sqnr_db(vs, vn))

        applied.note(str(spec), refresh)["format"] = spec.arg
        for _, _, layer in target.layers(spec.scope):

            def wrap(module, args, kwargs):
                cache = kwargs.get("past_key_values")
                if cache is not None and not isinstance(cache, _QuantizingCache):
                    kwargs["past_key_values"] = _QuantizingCache(cache, spec.arg, power)
                return args, kwargs

            applied.hook(layer.self_attn.register_forward_pre_hook(wrap, with_kwargs=True))
