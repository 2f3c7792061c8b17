"""CUDA graphs on/off: a setting of the faster engine only, honoured when it loads.

Capturing the talker decode step and the 15-step predictor loop as CUDA graphs should not
change any number (the same kernels replay), but the capture fixes shapes, masks and sampling
settings at capture time, which is where graph-specific divergences come from. The variant does
nothing to the model; the faster engine reads :meth:`engine_settings` and captures or not.
"""

from __future__ import annotations

from parity.variants.base import Applied, Spec, Target, Variant


class CudaGraphs(Variant):
    name = "cuda_graphs"
    summary = "capture the faster engine's decode steps as CUDA graphs (on) or run them eagerly (off)"
    args = ("on", "off")
    default_arg = "off"
    per_layer = False
    engines = ("faster",)

    def apply(self, target: Target, spec: Spec, applied: Applied) -> None:
        """Nothing to change on the model: the engine honours :meth:`engine_settings` at load."""

    def engine_settings(self, spec: Spec) -> dict:
        return {"cuda_graphs": spec.arg == "on"}
