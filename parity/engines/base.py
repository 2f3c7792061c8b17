"""The small interface every engine implements, and the registry that names them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from parity.errors import BadInput
from parity.prompts import Prompt
from parity.recipe import Decoding, Side
from parity.trace import Trace


class Engine(ABC):
    """Lifecycle: ``load()`` once, ``run()`` per prompt, ``close()`` to release memory."""

    name: str = "?"

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
        """Codes [F, 16] -> (mono float32 waveform, sample rate)."""

    @abstractmethod
    def close(self) -> None:
        """Release the model (and device memory)."""

    def describe(self) -> dict:
        """Settings to show in reports."""
        return {"engine": self.name, **self.side.__dict__}

    def prompt_length(self, prompt: Prompt) -> int | None:
        """Number of prefill positions the prompt will take (None when unknown before loading)."""
        return None


def make_engine(side: Side, model_dir: Path | str) -> Engine:
    """Instantiate the engine a side names (imports lazily: the faster engine needs CUDA)."""
    if side.engine == "reference":
        from parity.engines.reference import ReferenceEngine

        return ReferenceEngine(side, model_dir)
    if side.engine == "faster":
        from parity.engines.faster import FasterEngine

        return FasterEngine(side, model_dir)
    raise BadInput(f"unknown engine '{side.engine}'; available: reference, faster")
