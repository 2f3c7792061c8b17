"""The small interface every engine implements (see docs/engines.md for a walk-through).

An engine is constructed cheaply (no weights), then ``load()`` once, ``run()`` per prompt and
``close()``. It is also a context manager (``with engine: ...`` loads and always closes). The
rest of parity drives engines only through :mod:`parity.engines.lifecycle`, which maps load
errors to exit codes and records peak memory; engines are looked up by name in
:mod:`parity.engines.registry`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from parity.layout import TraceLayout
from parity.prompts import Prompt
from parity.recipe import Decoding, Side
from parity.trace import Trace


class Engine(ABC):
    """Lifecycle: ``load()`` once, ``run()`` per prompt, ``close()`` to release memory."""

    name: str = "?"
    # Which engine's variants (parity.variants) this engine applies: "reference" for engines that
    # drive a qwen_tts talker like the reference does; None when it applies none.
    variant_family: str | None = None
    # The ways this engine computes differently from the reference (parity.traits.Trait); a
    # bisect between this engine and the reference searches them instead of the whole engine.
    traits: list = []

    def __init__(self, side: Side, model_dir: Path | str):
        self.side = side
        self.model_dir = model_dir

    @abstractmethod
    def load(self) -> None:
        """Load weights onto the device with this side's settings."""

    @abstractmethod
    def run(self, prompt: Prompt, decoding: Decoding, force: Trace | None = None, record: bool = True) -> Trace:
        """Decode one prompt. With ``force``, consume ``force``'s tokens (teacher forcing) and
        stop where it stopped; with ``record``, probe every layer at every step."""

    @abstractmethod
    def decode_audio(self, codes) -> tuple[np.ndarray, int]:
        """Codes [F, codebooks] -> (mono float32 waveform, sample rate)."""

    @abstractmethod
    def close(self) -> None:
        """Release the model (and device memory). Safe to call on a half-loaded engine."""

    @abstractmethod
    def layout(self) -> TraceLayout:
        """The trace layout of the loaded model: components, sub-steps per frame, layers."""

    def describe(self) -> dict:
        """Settings to show in reports."""
        return {"engine": self.name, **self.side.__dict__}

    def can_reuse(self, side: Side) -> bool:
        """Whether this loaded engine can become ``side`` through ``reconfigure(side)`` instead of a
        fresh load; by default every change of setting needs a fresh engine."""
        return side == self.side

    def prompt_length(self, prompt: Prompt) -> int | None:
        """Number of prefill positions the prompt will take (None when unknown before loading)."""
        return None

    def __enter__(self) -> "Engine":
        self.load()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_engine(side: Side, model_dir: Path | str) -> Engine:
    """Instantiate (not load) the engine a side names, through the registry."""
    from parity.engines.registry import engine_class

    return engine_class(side.engine)(side, model_dir)
