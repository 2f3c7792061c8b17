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

It also declares its one difference from the reference as a trait, ``example-perturbed.layer_noise``
(docs/engines.md, "Traits"): the reference can take it (``traits = ["example-perturbed.layer_noise"]``)
and the engine can run without it (``traits = ["-example-perturbed.layer_noise"]``), so
``parity bisect`` names the trait rather than the whole engine.
"""

from __future__ import annotations

import torch

from parity.engines.reference import ReferenceEngine
from parity.prompts import Prompt
from parity.recipe import Decoding, Side
from parity.trace import Trace
from parity.traits import Trait, removed_traits
from parity.variants import Applied

LAYER = 1  # talker decoder layer whose output is perturbed
STEP = 2  # first talker step perturbed (0 is the prefill)
SCALE = 1e-2  # relative size of the noise


def noise_hook():
    """A forward hook for talker layer ``LAYER``: relative noise from talker step ``STEP`` on. It
    counts steps itself: a call over more than one position is a prefill (step 0)."""
    state = {"step": 0}

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        step = state["step"] = 0 if hidden.shape[1] > 1 else state["step"] + 1
        if step < STEP:
            return None  # unchanged: the hook returns nothing
        generator = torch.Generator(device="cpu").manual_seed(step)
        noise = torch.randn(hidden.shape, generator=generator, dtype=torch.float32).to(hidden.device, hidden.dtype)
        perturbed = hidden + SCALE * hidden.abs().mean() * noise
        return (perturbed, *output[1:]) if isinstance(output, tuple) else perturbed

    return hook


def add_noise(engine, applied: Applied) -> None:
    """The trait on a reference-family engine: the same hook on its talker layer ``LAYER``."""
    layers = engine.talker.model.layers
    if not 0 <= LAYER < len(layers):
        raise ValueError(f"example-perturbed plants at talker layer {LAYER}, but the model has {len(layers)} layers")
    applied.hook(layers[LAYER].register_forward_hook(noise_hook()))


class PerturbedEngine(ReferenceEngine):
    """The reference engine plus relative noise at one talker layer from one step on."""

    name = "example-perturbed"
    variant_family = "reference"  # it drives the same qwen_tts talker, so reference variants apply
    traits = [Trait("example-perturbed", "layer_noise", f"relative noise ({SCALE:g}) on talker layer {LAYER}'s output "
                    f"from talker step {STEP} on", apply=add_noise)]
    LAYER, STEP, SCALE = LAYER, STEP, SCALE

    def load(self) -> None:
        super().load()
        self.noise: Applied | None = None
        self._plant()

    def _plant(self) -> None:
        """The engine's own noise, unless its side removes the trait."""
        if self.noise is not None:
            self.noise.undo()
        self.noise = Applied()
        self.noisy = "layer_noise" not in removed_traits(self.side)
        if self.noisy:
            add_noise(self, self.noise)

    def reconfigure(self, side: Side) -> None:
        super().reconfigure(side)
        self._plant()

    def close(self) -> None:
        if getattr(self, "noise", None) is not None:
            self.noise.undo()
            self.noise = None
        super().close()

    def run(self, prompt: Prompt, decoding: Decoding, force: Trace | None = None, record: bool = True) -> Trace:
        trace = super().run(prompt, decoding, force=force, record=record)
        if self.noisy:
            trace.meta["planted"] = {"component": "talker", "step": self.STEP, "layer": self.LAYER, "scale": self.SCALE}
        return trace
