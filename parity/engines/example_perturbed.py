"""A worked example of bringing your own engine (docs/engines.md walks through it).

``example-perturbed`` is the reference engine with one planted fault: from talker step
``STEP`` on, the output of talker decoder layer ``LAYER`` gets a small deterministic relative
noise (``SCALE``). Compared against the plain reference, ``parity run`` must report the first
divergence at exactly talker step ``STEP``, ``layer{LAYER}``: everything before it is bit-identical.
The tests run it (``tests/test_engines.py``), and it is a quick way to see what a real divergence
looks like in the report::

    parity run recipes/prompts/smoke.txt --set candidate.engine=example-perturbed \\
        --set candidate.dtype=float32 --set candidate.attention=sdpa --set candidate.cache=dynamic

It is one file plus one line in ``parity.engines.registry.BUILTIN_ENGINES``; a package outside
parity would register the same class through a ``parity.engines`` entry point instead.

It inherits everything else from the reference engine: loading, the decode loop with teacher
forcing, the probes, the trace layout and audio decoding. An engine that is not a wrapper
implements :class:`parity.engines.base.Engine` itself (see the guide).
"""

from __future__ import annotations

import torch

from parity.engines.reference import ReferenceEngine
from parity.prompts import Prompt
from parity.recipe import Decoding
from parity.trace import Trace


class PerturbedEngine(ReferenceEngine):
    """The reference engine plus relative noise at one talker layer from one step on."""

    name = "example-perturbed"
    variant_family = "reference"  # it drives the same qwen_tts talker, so reference variants apply

    LAYER = 1  # talker decoder layer whose output is perturbed
    STEP = 2  # first talker step perturbed (0 is the prefill)
    SCALE = 1e-2  # relative size of the noise

    def load(self) -> None:
        super().load()
        self._step = 0
        layers = self.talker.model.layers
        if not 0 <= self.LAYER < len(layers):
            raise ValueError(f"example-perturbed plants at talker layer {self.LAYER}, but the model has {len(layers)} layers")
        self._handle = layers[self.LAYER].register_forward_hook(self._perturb)

    def close(self) -> None:
        handle = getattr(self, "_handle", None)
        if handle is not None:
            handle.remove()
            self._handle = None
        super().close()

    def run(self, prompt: Prompt, decoding: Decoding, force: Trace | None = None, record: bool = True) -> Trace:
        self._step = 0  # the layer runs once per talker step: count the steps of this prompt
        trace = super().run(prompt, decoding, force=force, record=record)
        trace.meta["planted"] = {"component": "talker", "step": self.STEP, "layer": self.LAYER, "scale": self.SCALE}
        return trace

    def _perturb(self, module, args, output):
        step, self._step = self._step, self._step + 1
        if step < self.STEP:
            return None  # unchanged: the hook returns nothing
        hidden = output[0] if isinstance(output, tuple) else output
        generator = torch.Generator(device="cpu").manual_seed(step)
        noise = torch.randn(hidden.shape, generator=generator, dtype=torch.float32).to(hidden.device, hidden.dtype)
        perturbed = hidden + self.SCALE * hidden.abs().mean() * noise
        return (perturbed, *output[1:]) if isinstance(output, tuple) else perturbed
