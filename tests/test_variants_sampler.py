"""Sampler parity: identical logits into the reference's HF processors and faster-qwen3-tts's
sampler, seeded identically, over many random logit vectors."""

from __future__ import annotations

import torch

from parity.sampling import Chooser, SamplingParams
from parity.variants.sampler import compare_samplers, faster_choose

SAMPLE = SamplingParams(do_sample=True, temperature=0.9, top_k=50, top_p=1.0, repetition_penalty=1.05)


def test_greedy_with_penalty_and_suppression_agrees():
    r = compare_samplers(SamplingParams(do_sample=False, repetition_penalty=1.05), trials=200, suppress_from=1800)
    assert r["agreement"] == 1.0


def test_seeded_sampling_on_fp32_logits_agrees_exactly():
    """Same order (penalty, suppression, temperature, top-k) and the same draw: every token equal.
    This is what makes the other cases' disagreements attributable to the sampler."""
    r = compare_samplers(SAMPLE, trials=300, suppress_from=1800)
    assert r["agreement"] == 1.0


def test_sampling_on_bf16_logits_disagrees_sometimes():
    """faster-qwen3-tts samples from the model's bf16 logits (softmax in bf16); generate casts to fp32."""
    r = compare_samplers(SAMPLE, trials=400, logits_dtype="bfloat16")
    assert 0.9 < r["agreement"] < 1.0 and r["examples"]


def test_top_p_drops_the_token_that_crosses_the_threshold():
    """faster-qwen3-tts 0.5.4 removes every token whose cumulative mass exceeds top_p, including
    the one that crosses it; HF keeps that token. probs (0.5, 0.4, 0.1), top_p 0.8: HF samples
    from {0, 1}, faster only ever picks 0."""
    logits = torch.tensor([0.5, 0.4, 0.1]).log()
    params = SamplingParams(do_sample=True, temperature=1.0, top_k=0, top_p=0.8)
    chooser = Chooser(params, torch.device("cpu"))
    ref = {chooser.choose(logits, torch.zeros(0, dtype=torch.long), torch.Generator().manual_seed(s)) for s in range(200)}
    fast = {faster_choose(logits, torch.zeros(0, dtype=torch.long), params, s) for s in range(200)}
    assert ref == {0, 1} and fast == {0}
    r = compare_samplers(SamplingParams(do_sample=True, temperature=0.9, top_k=50, top_p=0.8), trials=300)
    assert r["agreement"] < 0.99
