"""The faster-qwen3-tts engine's traits: where its fast path computes differently from the reference.

Read from faster-qwen3-tts 0.5.4 (``talker_graph.py``, ``predictor_graph.py``, ``generate.py``,
``sampling.py``) against the reference's ``qwen_tts`` + transformers path:

- ``static_cache``: the talker decodes over a ``StaticCache`` padded to ``max_seq_len`` positions
  (the side's ``cache = "static:N"``); the reference's cache grows with the sequence.
- ``prefill``: the prompt runs through the talker with no cache given (a fresh, unpadded
  ``DynamicCache`` and transformers' causal mask over the prompt only); its K/V are then copied
  into the static cache (``TalkerGraph.prefill_kv``). A reference with ``cache = "static:N"``
  prefills straight into the padded cache instead.
- ``decode_mask``: each talker decode step gets the engine's own additive float mask (0 where
  allowed, the dtype's minimum elsewhere, over every cache position, ``_build_attention_masks``),
  passed as a ready 4-D mask, instead of the mask transformers builds from the cache.
- ``talker_graph``: the talker decode step is captured as a CUDA graph and replayed.
- ``predictor_cache``: the code predictor's 15 sub-steps run on the engine's own ``StaticCache`` of
  17 positions with precomputed additive masks; the reference's predictor uses a fresh
  ``DynamicCache`` per frame and transformers' masks.
- ``predictor_graph``: the predictor's whole 15-step loop is captured as one CUDA graph.
- ``sampler``: the engine's ``sample_logits`` (suppression, end-of-speech suppressed for the first
  2 frames, repetition penalty over the codebook-0 history, temperature, top-k, top-p, a draw from
  the global generator, on logits in the model's dtype) instead of the Hugging Face logits
  processors on float32 logits with a seeded generator.

Applying a trait to the reference calls the engine's own code where it can (its mask builder,
its K/V copy, its predictor masks, its sampler), so a change in the engine shows on both sides.
Removing traits from the engine is :func:`remove_traits`. Graph traits can only be removed (the
reference has no graphs); a graph is captured around the engine's own cache and mask, so removing
those removes the graph too (``requires``).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch

from parity.traits import Trait
from parity.variants import Applied

if TYPE_CHECKING:
    from parity.recipe import Decoding, Side

PREDICTOR_POSITIONS = 17  # 2 prefill positions + 15 codebooks: faster-qwen3-tts's predictor cache


def _graphs_off(reference: "Side", candidate: "Side") -> str | None:
    """Why the candidate captures no CUDA graphs here, or None when it does."""
    if "cuda_graphs=off" in candidate.variants:
        return "the candidate runs with cuda_graphs=off"
    if candidate.device == "cpu" or (candidate.device == "auto" and not torch.cuda.is_available()):
        return "no CUDA graphs on the CPU (the engine's graph functions run eagerly there)"
    return None


def _needs_static(reference: "Side", candidate: "Side") -> str | None:
    if candidate.static_len is None:
        return "the candidate's cache is dynamic: it prefills like the reference"
    return None


# -- applied to the reference ------------------------------------------------------------------

def _apply_decode_mask(engine, applied: Applied) -> None:
    """The reference's talker decode steps take the engine's additive mask: the row of the
    current position from the table ``TalkerGraph._build_attention_masks`` builds, over the
    reference's cache length (the static length, or the keys so far with a dynamic cache)."""
    from faster_qwen3_tts.talker_graph import TalkerGraph

    inner = engine.talker.model
    original = inner.forward
    tables: dict = {}

    def table(capacity: int, dtype, device, padding: torch.Tensor | None):
        key = (capacity, dtype, str(device), None if padding is None else tuple(padding.flatten().tolist()))
        if key not in tables:
            tables.clear()  # one table at a time: a 2048-position table is 2048 rows
            ns = SimpleNamespace(max_seq_len=capacity, device=device, dtype=dtype, model=inner, attn_mask=None)
            TalkerGraph._build_attention_masks(ns, padding)
            tables[key] = ns.attn_mask_table
        return tables[key]

    def forward(*args, **kwargs):
        embeds, cache, position = kwargs.get("inputs_embeds"), kwargs.get("past_key_values"), kwargs.get("cache_position")
        if embeds is None or embeds.shape[1] != 1 or cache is None or position is None:
            return original(*args, **kwargs)  # the prefill keeps transformers' mask, as in the engine
        pos = int(position[0])
        static = cache.get_max_cache_shape()
        length = static if static and static > 0 else pos + 1
        # A dynamic cache grows: build the table for the next power of two, so it is rebuilt rarely.
        capacity = length if static and static > 0 else max(256, 1 << (length - 1).bit_length())
        mask2d = kwargs.get("attention_mask")
        padding = None
        if mask2d is not None and mask2d.dim() == 2 and not bool(mask2d.all()):
            padding = torch.ones((mask2d.shape[0], capacity), dtype=mask2d.dtype, device=mask2d.device)
            padding[:, : mask2d.shape[1]] = mask2d
        kwargs["attention_mask"] = table(capacity, embeds.dtype, embeds.device, padding)[pos][..., :length]
        return original(*args, **kwargs)

    applied.set_attr(inner, "forward", forward)


def _apply_prefill(engine, applied: Applied) -> None:
    """With a static cache, the reference prefills on a fresh DynamicCache and copies the K/V into
    its static cache with the engine's own ``TalkerGraph.prefill_kv``. (With a dynamic cache the
    reference already prefills this way.)"""
    from faster_qwen3_tts.talker_graph import TalkerGraph
    from transformers import DynamicCache, StaticCache

    talker = engine.talker
    original = talker.forward

    def forward(*args, **kwargs):
        cache, embeds = kwargs.get("past_key_values"), kwargs.get("inputs_embeds")
        if not isinstance(cache, StaticCache) or embeds is None or embeds.shape[1] <= 1:
            return original(*args, **kwargs)
        fresh = DynamicCache(config=talker.config)
        out = original(*args, **{**kwargs, "past_key_values": fresh})
        ns = SimpleNamespace(static_cache=cache, num_layers=len(fresh.layers), max_seq_len=cache.get_max_cache_shape(),
                             device=embeds.device)
        TalkerGraph.prefill_kv(ns, fresh)
        return out

    applied.set_attr(talker, "forward", forward)


def _apply_predictor_cache(engine, applied: Applied) -> None:
    """The reference's code predictor runs each frame's 15 sub-steps on a 17-position
    StaticCache with the masks ``PredictorGraph._make_attn_mask`` builds."""
    from faster_qwen3_tts.predictor_graph import PredictorGraph
    from transformers import StaticCache

    predictor = engine.talker.code_predictor
    original = predictor.forward
    inner = predictor.model
    state: dict = {"for": None, "cache": None}

    def forward(*args, **kwargs):
        cache, position = kwargs.get("past_key_values"), kwargs.get("cache_position")
        if cache is None or position is None:
            return original(*args, **kwargs)
        if state["for"] is not cache:  # a new frame: the reference made a new cache for it
            if state["cache"] is None:
                state["cache"] = StaticCache(config=inner.config, max_cache_len=PREDICTOR_POSITIONS)
            state["cache"].reset()
            state["for"] = cache
        dtype = next(inner.parameters()).dtype
        ns = SimpleNamespace(max_seq=PREDICTOR_POSITIONS, device=position.device, pred_model=inner,
                             has_sliding_layers="sliding_attention" in (getattr(inner.config, "layer_types", None) or []))
        mask = PredictorGraph._make_attn_mask(ns, torch.zeros((), dtype=dtype), position)  # a dict, as the engine passes it
        return original(*args, **{**kwargs, "past_key_values": state["cache"], "attention_mask": mask})

    applied.set_attr(predictor, "forward", forward)


class EngineChooser:
    """The engine's ``sample_logits`` in the reference's ``Chooser`` interface: the talker's (with
    ``eos_token_id``) applies the engine's suppression, end-of-speech suppression for the first 2
    frames and repetition penalty; the predictor's samples plainly. Logits stay in their dtype and
    a draw uses the global generator, as in the engine."""

    _seeded_for = None  # the run's generator whose seed last seeded the global one

    def __init__(self, params, device, eos_token_id: int | None = None, min_new_tokens: int = 0,
                 suppress_tokens: list[int] | None = None):
        self.params = params
        self.eos = eos_token_id

    def choose(self, logits: torch.Tensor, history: torch.Tensor, generator) -> int:
        from faster_qwen3_tts.sampling import apply_repetition_penalty, sample_logits

        p = self.params
        if generator is not None and EngineChooser._seeded_for is not generator:
            # The engine seeds the global generator once per run (torch.manual_seed) and draws from it.
            torch.manual_seed(generator.initial_seed())
            EngineChooser._seeded_for = generator
        logits = logits.unsqueeze(0).clone()
        kwargs = {}
        if self.eos is not None:
            vocab = logits.shape[-1]
            suppress = torch.zeros(vocab, dtype=torch.bool, device=logits.device)
            suppress[max(0, vocab - 1024):] = True
            suppress[self.eos] = False
            if p.repetition_penalty != 1.0 and history.numel() > 0:
                logits = apply_repetition_penalty(logits, history, p.repetition_penalty)
            kwargs = {"suppress_mask": suppress, "suppress_tokens": [self.eos] if history.numel() < 2 else None}
        token = sample_logits(logits, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, do_sample=p.do_sample, **kwargs)
        return int(token.view(-1)[0])


def _apply_sampler(engine, applied: Applied) -> None:
    """The reference picks tokens with the engine's sampler (:class:`EngineChooser`)."""
    applied.set_attr(engine, "make_chooser", EngineChooser)


FASTER_TRAITS: list[Trait] = [
    Trait("faster", "static_cache", "the talker decodes over a StaticCache padded to max_seq_len positions",
          field="cache"),
    Trait("faster", "prefill", "the prompt is prefilled on an unpadded DynamicCache and its K/V copied into the "
          "static cache (not prefilled into the padded cache)", apply=_apply_prefill, active=_needs_static),
    Trait("faster", "decode_mask", "the talker's decode step takes the engine's own additive float mask (0 / dtype "
          "minimum over every cache position) instead of transformers' causal mask", apply=_apply_decode_mask),
    Trait("faster", "talker_graph", "the talker decode step is captured as a CUDA graph and replayed",
          requires=("static_cache", "decode_mask"), active=_graphs_off),
    Trait("faster", "predictor_cache", "the code predictor's 15 sub-steps run on its own 17-position StaticCache "
          "with precomputed additive masks (not a DynamicCache with transformers' masks)", apply=_apply_predictor_cache),
    Trait("faster", "predictor_graph", "the code predictor's 15-step loop is captured as one CUDA graph",
          requires=("predictor_cache", "sampler"), active=_graphs_off),
    Trait("faster", "sampler", "tokens are chosen by the engine's sample_logits (its suppression, repetition "
          "penalty and top-k/top-p, logits in the model dtype, the global generator) instead of the Hugging Face "
          "logits processors", apply=_apply_sampler),
]


# -- removed from the engine -------------------------------------------------------------------

def removed_from(side: "Side") -> set[str]:
    """The faster traits a faster side runs without: its ``-faster.X`` entries, plus
    ``static_cache`` when its cache is dynamic."""
    from parity.traits import removed_traits

    names = removed_traits(side)
    if side.cache == "dynamic":
        names.add("static_cache")
    return names


def remove_traits(engine, names: set[str], applied: Applied) -> None:
    """Make a loaded, captured (or eagerly set up) faster engine compute the ``names`` traits the
    reference's way; ``applied.undo()`` restores it. Removing the talker's cache or mask runs the
    talker step eagerly; removing the predictor's cache or sampler runs the predictor eagerly."""
    from parity.engines.faster import EagerReplay

    tts = engine.tts
    tg, pg = tts.talker_graph, tts.predictor_graph
    talker = tts.model.model.talker
    if names & {"talker_graph", "static_cache", "decode_mask"}:
        applied.set_attr(tg, "graph", EagerReplay(lambda: tg._decode_step()))
    if names & {"predictor_graph", "predictor_cache", "sampler"}:
        applied.set_attr(pg, "graph", EagerReplay(lambda: pg._full_loop()))
    static = "static_cache" not in names
    state: dict = {"dynamic": None, "prefill_len": 0}
    if not static:
        def keep_dynamic(past_key_values):
            """The prefill's DynamicCache becomes the decode cache (nothing is copied)."""
            state["dynamic"] = past_key_values
            return past_key_values.get_seq_length()

        applied.set_attr(tg, "prefill_kv", keep_dynamic)
    if not static or "decode_mask" in names:
        applied.set_attr(tg, "_decode_step", lambda: _decode_step(tg, state["dynamic"] if not static else tg.static_cache,
                                                                  "decode_mask" in names))
    if "prefill" in names and static:
        _prefill_into_static(talker, tg, state, applied)
    if "predictor_cache" in names:
        applied.set_attr(pg, "_full_loop", lambda: _predictor_loop_dynamic(pg))
    if "sampler" in names:
        applied.set_attr(engine, "run_patches", lambda decoding: _reference_sampler_patches(engine, decoding))


def _decode_step(tg, cache, hf_mask: bool) -> None:
    """``TalkerGraph._decode_step`` on ``cache``: with ``hf_mask`` a 2-D mask over the keys so far
    (transformers builds the 4-D mask, as for the reference), else the engine's additive mask row
    over the cache's length."""
    pos = int(tg.cache_position[0])
    if hf_mask:
        mask = torch.ones((1, pos + 1), dtype=torch.long, device=tg.input_buf.device)
    else:
        mask = tg.attn_mask if cache is tg.static_cache else tg.attn_mask[..., : pos + 1]
    out = tg.model(inputs_embeds=tg.input_buf, attention_mask=mask, past_key_values=cache,
                   cache_position=tg.cache_position, position_ids=tg.position_ids, use_cache=True)
    tg.output_buf.copy_(out.last_hidden_state)


def _prefill_into_static(talker, tg, state: dict, applied: Applied) -> None:
    """The prompt goes straight into the padded static cache (as the reference with a static cache
    does); ``prefill_kv`` then has nothing to copy."""
    original = talker.forward

    def forward(*args, **kwargs):
        embeds = kwargs.get("inputs_embeds")
        if kwargs.get("past_key_values") is None and embeds is not None and embeds.shape[1] > 1:
            tg.static_cache.reset()
            state["prefill_len"] = int(embeds.shape[1])
            kwargs = {**kwargs, "past_key_values": tg.static_cache,
                      "cache_position": torch.arange(embeds.shape[1], device=embeds.device)}
        return original(*args, **kwargs)

    applied.set_attr(talker, "forward", forward)
    applied.set_attr(tg, "prefill_kv", lambda past_key_values: state["prefill_len"])


def _predictor_loop_dynamic(pg) -> torch.Tensor:
    """``PredictorGraph._full_loop`` on a fresh DynamicCache with 2-D masks over the keys so far
    (transformers builds the rest), as the reference's predictor runs."""
    import faster_qwen3_tts.predictor_graph as pg_mod
    from transformers import DynamicCache

    def sample(logits):
        return pg_mod.sample_logits(logits[:, 0, :], temperature=pg.temperature, top_k=pg.top_k, top_p=pg.top_p,
                                    do_sample=pg.do_sample)

    cache = DynamicCache(config=pg.pred_model.config)
    device = pg.input_buf.device
    h = pg.small_to_mtp(pg.input_buf)
    out = pg.pred_model(inputs_embeds=h, attention_mask=torch.ones((1, 2), dtype=torch.long, device=device),
                        past_key_values=cache, cache_position=pg.prefill_cache_pos, use_cache=True)
    tok = sample(pg.lm_heads[0](out.last_hidden_state[:, -1:, :]))
    pg.output_tokens[0] = tok[0]
    for cb in range(1, pg.num_codebooks):
        emb = pg.small_to_mtp(pg.codec_embeds[cb - 1](tok.unsqueeze(0)))
        out = pg.pred_model(inputs_embeds=emb, attention_mask=torch.ones((1, cb + 2), dtype=torch.long, device=device),
                            past_key_values=cache, cache_position=pg.decode_cache_positions[cb - 1], use_cache=True)
        tok = sample(pg.lm_heads[cb](out.last_hidden_state[:, -1:, :]))
        pg.output_tokens[cb] = tok[0]
    return pg.output_tokens


def _reference_sampler_patches(engine, decoding: "Decoding") -> list[tuple[object, str, object]]:
    """For one run: the engine's talker and predictor sampling replaced by the reference's
    ``Chooser`` (the Hugging Face processors on float32 logits, one seeded generator for both, as
    the reference decodes). The engine's own repetition penalty is neutralised; it hands over the
    codebook-0 history, which the reference's penalty then uses."""
    from dataclasses import replace

    import faster_qwen3_tts.generate as gen_mod

    from parity.sampling import Chooser, SamplingParams

    config = engine.tts.model.model.talker.config
    eos, vocab = int(config.codec_eos_token_id), int(config.vocab_size)
    device = engine.device
    params = SamplingParams(do_sample=decoding.do_sample, temperature=decoding.temperature, top_k=decoding.top_k,
                            top_p=decoding.top_p, repetition_penalty=decoding.repetition_penalty)
    generator = torch.Generator(device=device).manual_seed(decoding.seed) if decoding.do_sample else None
    suppress = [i for i in range(vocab - 1024, vocab) if i != eos]  # qwen_tts's own list
    state = {"history": torch.zeros(0, dtype=torch.long, device=device)}
    predictor = Chooser(replace(params, repetition_penalty=1.0), device)

    def keep_history(logits, token_history, repetition_penalty):
        state["history"] = token_history
        return logits

    def talker_sample(logits, *, temperature, top_k, top_p, do_sample, suppress_mask=None, suppress_tokens=None):
        chooser = Chooser(params, device, eos, 0, suppress + ([eos] if suppress_tokens else []))
        return torch.tensor([chooser.choose(logits.reshape(-1), state["history"], generator)], device=logits.device)

    def predictor_sample(logits, **kwargs):
        return torch.tensor([predictor.choose(logits.reshape(-1), torch.zeros(0, dtype=torch.long, device=device), generator)],
                            device=logits.device)

    return [(gen_mod, "apply_repetition_penalty", keep_history), (gen_mod, "sample_logits", talker_sample),
            (engine.pred_sampler, "original", predictor_sample)]
