"""A third-party engine, as a package outside parity would ship it: one file, registered through
the ``parity.engines`` entry-point group (tests/test_engines.py writes the entry point).

It is the reference engine with noise planted in the code predictor: from frame ``FRAME``
sub-step ``SUBSTEP`` on, the output of predictor decoder layer ``LAYER`` is perturbed. Its
sub-step count comes from the trace layout the engine declares, not from a constant.
"""

from __future__ import annotations

import torch

from parity.engines.reference import ReferenceEngine


class NoisyPredictorEngine(ReferenceEngine):
    name = "noisy-predictor"
    variant_family = "reference"
    FRAME, SUBSTEP, LAYER, SCALE = 1, 3, 0, 0.05

    def load(self) -> None:
        super().load()
        self._calls = 0
        self._substeps = self.layout().component("predictor").substeps
        layer = self.talker.code_predictor.model.layers[self.LAYER]
        self._handle = layer.register_forward_hook(self._perturb)

    def close(self) -> None:
        if getattr(self, "_handle", None) is not None:
            self._handle.remove()
            self._handle = None
        super().close()

    def run(self, prompt, decoding, force=None, record=True):
        self._calls = 0
        return super().run(prompt, decoding, force=force, record=record)

    def _perturb(self, module, args, output):
        frame, sub = divmod(self._calls, self._substeps)
        self._calls += 1
        if (frame, sub) < (self.FRAME, self.SUBSTEP):
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        noise = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(self._calls)).to(hidden.dtype)
        hidden = hidden + self.SCALE * hidden.abs().mean() * noise
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
