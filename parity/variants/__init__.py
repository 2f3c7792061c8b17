"""Divergence sources as switchable settings (DESIGN section 5), one module each, and the registry.

Use from a recipe (``variants = ["rmsnorm_lowp@talker", "kv_quant=fp8"]`` on a side), from the
command line (``--set candidate.variants=rmsnorm_lowp,kv_quant=fp8``) or from code::

    applied = apply_variants(talker, ["rmsnorm_lowp@talker:0-4"], engine="reference")
    ...                      # run
    applied.undo()

An engine calls :func:`apply_variants` on its loaded qwen_tts talker (before any CUDA-graph
capture, so the change is captured too) and :func:`engine_settings` for the settings it must
honour itself (``cuda_graphs``). Sampler parity is a check over random logits rather than a
setting on an engine: ``parity.variants.sampler.compare_samplers``.
"""

from __future__ import annotations

from typing import Iterable

import torch

from parity.errors import BadInput
from parity.variants.attention import SdpaBackend, set_attention
from parity.variants.base import Applied, Scope, Spec, Target, Variant, parse_spec
from parity.variants.compile import Compile
from parity.variants.cuda_graphs import CudaGraphs
from parity.variants.fused import FusedGateUp, FusedQKV
from parity.variants.kv_quant import KVQuant
from parity.variants.mask_row import MaskRow
from parity.variants.precision import MatmulPrecision
from parity.variants.rmsnorm import RMSNormLowp
from parity.variants.rope import RopeLowp

VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        RMSNormLowp(), RopeLowp(), FusedQKV(), FusedGateUp(), KVQuant(), Compile(), SdpaBackend(),
        MatmulPrecision(), CudaGraphs(), MaskRow(),
    )
}

__all__ = [
    "VARIANTS", "Applied", "Scope", "Spec", "Target", "Variant", "apply_variants", "engine_settings",
    "get_variant", "parse", "parse_all", "set_attention",
]


def get_variant(name: str) -> Variant:
    """The registered variant called ``name``, or BadInput listing the available ones."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise BadInput(f"unknown variant '{name}'; available: {', '.join(sorted(VARIANTS))}") from None


def parse(text: str | Spec, engine: str | None = None) -> Spec:
    """Parse and check one spec (``engine``: also check the variant applies to that engine)."""
    spec = parse_spec(text) if isinstance(text, str) else text
    return get_variant(spec.name).check(spec, engine)


def parse_all(texts: Iterable[str | Spec], engine: str | None = None) -> list[Spec]:
    """Parse and check several specs; the same variant twice on overlapping scopes is refused."""
    specs = [parse(t, engine) for t in texts]
    seen: dict[str, Spec] = {}
    for spec in specs:
        key = str(spec)
        if key in seen:
            raise BadInput(f"variant '{key}' is given twice")
        for other in seen.values():
            if other.name == spec.name and not get_variant(spec.name).stackable and other.scope.overlaps(spec.scope):
                raise BadInput(f"variants '{other}' and '{key}' both apply to the same layers; give each layer one "
                               f"{spec.name} setting (e.g. restrict them with @talker / @predictor:A-B)")
        seen[key] = spec
    return specs


def engine_settings(specs: Iterable[str | Spec]) -> dict:
    """Settings the engine itself must honour when loading (e.g. ``{"cuda_graphs": False}``)."""
    settings: dict = {}
    for spec in parse_all(specs):
        settings.update(get_variant(spec.name).engine_settings(spec))
    return settings


def apply_variants(talker: torch.nn.Module, specs: Iterable[str | Spec], engine: str = "reference",
                   applied: Applied | None = None) -> Applied:
    """Apply variants to a loaded qwen_tts talker; ``.undo()`` on the result restores it exactly.
    If one fails to apply, the ones already applied are undone before the error is raised."""
    applied = applied or Applied()
    target = Target(talker, engine)
    try:
        for spec in parse_all(specs, engine):
            get_variant(spec.name).apply(target, spec, applied)
            applied.specs.append(spec)
    except BaseException:
        applied.undo()
        raise
    return applied
