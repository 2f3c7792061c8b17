"""Token choice for the decode loop, built from the same Hugging Face logits processors that
``generate`` uses, in the same order, so greedy choices match ``generate`` exactly."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


@dataclass(frozen=True)
class SamplingParams:
    """One sampler's settings (the talker's codebook 0, or the code predictor's codes)."""

    do_sample: bool = False
    temperature: float = 0.9
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0


class Chooser:
    """Picks a token from float32 logits: processors, then warpers, then argmax or a draw."""

    def __init__(
        self,
        params: SamplingParams,
        device: torch.device,
        eos_token_id: int | None = None,
        min_new_tokens: int = 0,
        suppress_tokens: list[int] | None = None,
    ):
        self.params = params
        procs = LogitsProcessorList()
        if params.repetition_penalty != 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(penalty=params.repetition_penalty))
        if eos_token_id is not None and min_new_tokens > 0:
            eos = torch.tensor([eos_token_id], device=device)
            procs.append(MinNewTokensLengthLogitsProcessor(0, min_new_tokens, eos, device=device))
        if suppress_tokens:
            procs.append(SuppressTokensLogitsProcessor(suppress_tokens, device=device))
        if params.do_sample:
            if params.temperature not in (None, 1.0):
                procs.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k:
                procs.append(TopKLogitsWarper(top_k=params.top_k, min_tokens_to_keep=1))
            if params.top_p is not None and params.top_p < 1.0:
                procs.append(TopPLogitsWarper(top_p=params.top_p, min_tokens_to_keep=1))
        self.processors = procs

    def choose(self, logits: torch.Tensor, history: torch.Tensor, generator: torch.Generator | None) -> int:
        """``logits`` [V] in any dtype (cast to float32 as generate does); ``history`` [n] long:
        the tokens this sampler produced so far (what repetition penalty and min length see)."""
        scores = logits.to(dtype=torch.float32, copy=True).unsqueeze(0)
        scores = self.processors(history.unsqueeze(0), scores)
        if self.params.do_sample:
            probs = torch.softmax(scores, dim=-1)
            return int(torch.multinomial(probs, 1, generator=generator)[0, 0])
        return int(scores.argmax(dim=-1)[0])
