"""Sampler parity: identical logits into the reference's sampler and faster-qwen3-tts's, compare the
tokens they choose (faster-qwen3-tts PR #11: "identical logits, different tokens").

The reference side chooses with the Hugging Face logits processors ``generate`` uses
(:class:`parity.sampling.Chooser`: repetition penalty, suppression, temperature, top-k, top-p, on
logits cast to fp32 as ``generate`` does). faster-qwen3-tts calls
``faster_qwen3_tts.sampling.apply_repetition_penalty`` and ``sample_logits`` on the logits as its
model produced them (bf16 in a bf16 model: no cast). Both draw with ``torch.multinomial`` from a
generator seeded identically per trial, so any disagreement comes from the processing: order,
boundaries (top-p), or the dtype the softmax runs in.

This is a check over random logits, not a setting on an engine: :func:`compare_samplers`.
"""

from __future__ import annotations

from dataclasses import asdict

import torch

from parity.sampling import Chooser, SamplingParams

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def faster_choose(logits: torch.Tensor, history: torch.Tensor, params: SamplingParams, seed: int,
                  suppress_mask: torch.Tensor | None = None) -> int:
    """faster-qwen3-tts's talker-side choice, as its decode loop makes it, with the global RNG
    seeded (and restored afterwards: it has no generator argument)."""
    from faster_qwen3_tts.sampling import apply_repetition_penalty, sample_logits

    x = logits.clone().unsqueeze(0)
    if params.repetition_penalty != 1.0 and history.numel():
        x = apply_repetition_penalty(x, history, params.repetition_penalty)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        token = sample_logits(x, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                              do_sample=params.do_sample, suppress_mask=suppress_mask)
    return int(token.reshape(-1)[0])


def compare_samplers(params: SamplingParams, trials: int = 500, vocab: int = 2048, logits_dtype: str = "float32",
                     seed: int = 0, history_len: int = 16, suppress_from: int | None = None, scale: float = 3.0) -> dict:
    """Agreement of the two samplers over ``trials`` random logit vectors (N(0, scale^2) in
    ``logits_dtype``) with random token histories; ``suppress_from`` suppresses the ids from there
    up, as the talker does for the codec's special block."""
    gen = torch.Generator().manual_seed(seed)
    suppress = list(range(suppress_from, vocab)) if suppress_from is not None else None
    mask = None
    if suppress:
        mask = torch.zeros(vocab, dtype=torch.bool)
        mask[suppress_from:] = True
    chooser = Chooser(params, torch.device("cpu"), suppress_tokens=suppress)
    agree, examples = 0, []
    for i in range(trials):
        logits = (torch.randn(vocab, generator=gen) * scale).to(DTYPES[logits_dtype])
        history = torch.randint(0, vocab, (history_len,), generator=gen)
        trial_seed = seed * 1_000_003 + i
        ref = chooser.choose(logits, history, torch.Generator().manual_seed(trial_seed))
        fast = faster_choose(logits, history, params, trial_seed, mask)
        if ref == fast:
            agree += 1
        elif len(examples) < 5:
            examples.append({"trial": i, "reference": ref, "faster": fast})
    return {
        "params": asdict(params), "logits_dtype": logits_dtype, "trials": trials, "vocab": vocab,
        "agreement": agree / trials, "disagreements": trials - agree, "examples": examples,
    }


def compare_samplers_on(rows: list[tuple[torch.Tensor, torch.Tensor]], params: SamplingParams, seed: int = 0,
                        suppress_mask: torch.Tensor | None = None) -> dict:
    """Both samplers on given logits (e.g. a run's recorded logits where the candidate chose
    differently): ``rows`` are (logits [V], token history). Returns each side's tokens and how
    many agree; trial ``i`` draws with seed ``seed * 1_000_003 + i`` on both sides."""
    suppress = [int(i) for i in suppress_mask.nonzero().flatten()] if suppress_mask is not None else None
    chooser = Chooser(params, torch.device("cpu"), suppress_tokens=suppress)
    ref_tokens, fast_tokens = [], []
    for i, (logits, history) in enumerate(rows):
        trial_seed = seed * 1_000_003 + i
        ref_tokens.append(chooser.choose(logits, history, torch.Generator().manual_seed(trial_seed)))
        fast_tokens.append(faster_choose(logits, history, params, trial_seed, suppress_mask))
    agree = sum(int(a == b) for a, b in zip(ref_tokens, fast_tokens))
    return {"rows": len(rows), "agreement": agree / len(rows) if rows else None, "reference": ref_tokens, "faster": fast_tokens}


def standard_cases() -> list[tuple[str, SamplingParams, str]]:
    """The cases the benchmark and tests report: greedy and seeded sampling, fp32 and bf16 logits."""
    sample = SamplingParams(do_sample=True, temperature=0.9, top_k=50, top_p=1.0, repetition_penalty=1.05)
    return [
        ("greedy, fp32 logits", SamplingParams(do_sample=False, repetition_penalty=1.05), "float32"),
        ("greedy, bf16 logits", SamplingParams(do_sample=False, repetition_penalty=1.05), "bfloat16"),
        ("sample t0.9 k50 rp1.05, fp32 logits", sample, "float32"),
        ("sample t0.9 k50 rp1.05, bf16 logits", sample, "bfloat16"),
        ("sample t0.9 k50 p0.8, fp32 logits", SamplingParams(do_sample=True, temperature=0.9, top_k=50, top_p=0.8), "float32"),
    ]
