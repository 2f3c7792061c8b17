"""The trace layout an engine declares: which components it runs, how many sub-steps each takes
per audio frame, and how many decoder layers each has probed.

Qwen3-TTS has two components: the talker (one step per frame; step 0 is the prefill) and the
code predictor (15 sub-steps per frame, one per residual codebook 1..15). compare, probes and
the report read these numbers from the layout instead of assuming them. An engine that cannot
hook its layers declares ``layers = 0`` for a component: only its logits and tokens are compared.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ComponentLayout:
    """One component of a decode step."""

    name: str  # "talker" or "predictor": the Trace field family that holds it
    substeps: int  # sub-steps per frame (talker 1, Qwen3-TTS predictor 15)
    layers: int  # decoder layers probed; the trace holds embed + these layers (0: logits only)


@dataclass(frozen=True)
class TraceLayout:
    """What a Trace of one engine on one model holds."""

    components: tuple[ComponentLayout, ...]
    codebooks: int  # codes per frame (Qwen3-TTS 16: codebook 0 from the talker, 1..15 from the predictor)

    def component(self, name: str) -> ComponentLayout:
        for c in self.components:
            if c.name == name:
                return c
        raise KeyError(f"the trace layout has no component {name!r} (it has {', '.join(c.name for c in self.components)})")

    @property
    def predictor_substeps(self) -> int:
        return self.component("predictor").substeps

    def to_json(self) -> dict:
        return {"components": [asdict(c) for c in self.components], "codebooks": self.codebooks}

    @classmethod
    def from_json(cls, data: dict) -> "TraceLayout":
        return cls(tuple(ComponentLayout(**c) for c in data["components"]), int(data["codebooks"]))


def qwen3_tts_layout(talker_layers: int, predictor_layers: int, codebooks: int = 16) -> TraceLayout:
    """The Qwen3-TTS layout: a talker step per frame, then ``codebooks - 1`` predictor sub-steps."""
    return TraceLayout(
        (ComponentLayout("talker", 1, talker_layers), ComponentLayout("predictor", codebooks - 1, predictor_layers)),
        codebooks,
    )
