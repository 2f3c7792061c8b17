"""The Hugging Face reference engine (``qwen_tts``), driven by parity's own decode loop.

``generate`` cannot take a StaticCache, cannot be teacher-forced and hides the code predictor's
sub-steps, so the loop below calls the same modules in the same order as ``generate`` does
(``tests/test_reference_engine.py`` proves it reproduces ``generate`` exactly). The prompt's
embeddings are built by the package itself: ``generate`` is called with the talker's ``generate``
intercepted, which hands over its exact inputs without decoding anything.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from parity.engines.base import Engine
from parity.errors import BadInput
from parity.layout import TraceLayout, qwen3_tts_layout
from parity.probes import Recorder
from parity.prompts import Prompt
from parity.recipe import Decoding, Side
from parity.refclip import forced_item, has_clip, resolve as resolve_clip
from parity.sampling import Chooser, SamplingParams
from parity.trace import FLOAT_FIELDS, Trace
from parity.traits import apply_side_traits
from parity.variants import Applied, Target, apply_variants, set_attention

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _Captured(Exception):
    """Raised by the intercepted talker.generate to stop the package's generate early."""


@dataclass
class TalkerInputs:
    """What the package's ``generate`` hands to ``talker.generate`` for one prompt."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    trailing_text_hidden: torch.Tensor
    tts_pad_embed: torch.Tensor
    eos_token_id: int
    suppress_tokens: list[int]
    min_new_tokens: int
    ref_codes: torch.Tensor | None = None  # the reference clip's codes [T, 16] (ICL voice cloning)
    ref_speaker: torch.Tensor | None = None  # the reference clip's speaker embedding [D] (voice cloning)

    @property
    def length(self) -> int:
        """Prefill positions of the longest row."""
        return int(self.inputs_embeds.shape[1])


def left_pad(rows: list[TalkerInputs]) -> tuple[TalkerInputs, list[int]]:
    """Stack single-prompt inputs into one batch, left-padded exactly as ``qwen_tts`` (and
    faster-qwen3-tts's local copy of it) pads a batch: zero embeddings before each shorter prompt
    with attention mask 0, and the trailing text padded at the end with ``tts_pad_embed``.
    Returns the batch and each row's number of padding positions."""
    lengths = [r.length for r in rows]
    width, trail = max(lengths), max(r.trailing_text_hidden.shape[1] for r in rows)
    first = rows[0]
    hidden = first.inputs_embeds.shape[-1]
    embeds = first.inputs_embeds.new_zeros((len(rows), width, hidden))
    mask = first.attention_mask.new_zeros((len(rows), width))
    trailing = first.tts_pad_embed.reshape(1, 1, hidden).repeat(len(rows), trail, 1)
    for b, r in enumerate(rows):
        embeds[b, width - r.length:] = r.inputs_embeds[0]
        mask[b, width - r.length:] = 1
        trailing[b, : r.trailing_text_hidden.shape[1]] = r.trailing_text_hidden[0]
    batch = replace(first, inputs_embeds=embeds, attention_mask=mask, trailing_text_hidden=trailing,
                    ref_codes=None, ref_speaker=None)
    return batch, [width - n for n in lengths]


def import_qwen_tts():
    """Import qwen_tts without its import-time banner (a flash-attn notice on stdout, and the
    sox package's shell probe, which writes to file descriptor 2 directly)."""
    import io
    import logging
    import os
    import sys

    logging.getLogger("sox").setLevel(logging.ERROR)
    if "qwen_tts" not in sys.modules:
        saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 2)
            with contextlib.redirect_stdout(io.StringIO()):
                import qwen_tts  # noqa: F401
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(devnull)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return sys.modules["qwen_tts"]


def default_speaker(wrapper) -> str | None:
    """The speaker a prompt without one gets: the first of the package's sorted speaker list.
    Every engine adapter must use this one rule, or the two sides synthesise different voices
    (seen on the GPU: a prefill that differed from layer 0 on, for prompts without a speaker)."""
    speakers = wrapper.get_supported_speakers() or []
    return speakers[0] if speakers else None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise BadInput("device 'cuda' requested but no CUDA GPU is visible; use device = \"cpu\" or \"auto\"")
    return torch.device(device)


@contextlib.contextmanager
def tf32_mode(enabled: bool):
    """Set TF32 for matmul and cuDNN for the duration of a run, then restore."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


class ReferenceEngine(Engine):
    """qwen_tts with settable dtype, attention, cache (dynamic / static:N), TF32 and device."""

    name = "reference"
    variant_family = "reference"
    make_chooser = None  # the token chooser class when not parity.sampling.Chooser (another engine's sampler trait)

    def __init__(self, side: Side, model_dir: Path | str):
        super().__init__(side, model_dir)
        self.wrapper = None
        self.device = resolve_device(side.device)
        self.recorder: Recorder | None = None
        self.applied: Applied | None = None  # the side's variants, applied at load
        self.traits_applied: Applied | None = None  # other engines' traits the side applies (parity.traits)

    # -- lifecycle ---------------------------------------------------------------------
    def load(self) -> None:
        Qwen3TTSModel = import_qwen_tts().Qwen3TTSModel

        self.wrapper = Qwen3TTSModel.from_pretrained(
            str(self.model_dir), dtype=TORCH_DTYPES[self.side.dtype], attn_implementation=self.side.attention
        )
        self.wrapper.model.to(self.device).eval()
        self.wrapper.device = self.device
        self.recorder = Recorder(self.talker, sublayers=self.side.probes == "sublayers")
        self.applied = apply_variants(self.talker, self.side.variants, self.variant_family)
        self.traits_applied = apply_side_traits(self, self.side)

    def close(self) -> None:
        if self.traits_applied is not None:
            self.traits_applied.undo()
            self.traits_applied = None
        if self.applied is not None:
            self.applied.undo()
            self.applied = None
        if self.recorder is not None:
            self.recorder.detach()
        self.wrapper = None
        self.recorder = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    LOAD_FIELDS = ("engine", "dtype", "device")  # everything else can change on a loaded model

    def can_reuse(self, side: Side) -> bool:
        return all(getattr(side, f) == getattr(self.side, f) for f in self.LOAD_FIELDS)

    def reconfigure(self, side: Side) -> None:
        """Switch a loaded engine to ``side`` without reloading: attention implementation, cache,
        TF32 and variants change in place (variants are undone and re-applied). ``side`` must
        agree on :attr:`LOAD_FIELDS`; those need a fresh engine."""
        for name in self.LOAD_FIELDS:
            if getattr(side, name) != getattr(self.side, name):
                raise ValueError(f"reconfigure cannot change '{name}' ({getattr(self.side, name)} -> {getattr(side, name)}); load a new engine")
        self.traits_applied.undo()
        self.applied.undo()
        set_attention(Target(self.talker, self.variant_family), side.attention)
        self.side = side
        self.applied = apply_variants(self.talker, side.variants, self.variant_family)
        self.traits_applied = apply_side_traits(self, side)

    def layout(self) -> TraceLayout:
        return qwen3_tts_layout(len(self.talker.model.layers), len(self.talker.code_predictor.model.layers),
                                int(self.talker.config.num_code_groups))

    @property
    def n_substeps(self) -> int:
        """Code-predictor sub-steps per frame: one per residual codebook."""
        return int(self.talker.config.num_code_groups) - 1

    @property
    def model(self):
        return self.wrapper.model

    @property
    def talker(self):
        return self.wrapper.model.talker

    def describe(self) -> dict:
        return {**super().describe(), "device": str(self.device)}

    # -- prompt preparation ------------------------------------------------------------
    def prepare(self, prompt: Prompt, force: Trace | None = None) -> TalkerInputs:
        """Build the talker's prefill inputs with the package's own code path. For a voice-clone
        prompt that includes encoding the reference clip (its codes and embedding are kept); with a
        ``force`` trace that recorded a clip, the prefill is built from the forcing trace's clip
        encoding (teacher forcing extends to the clip), while this engine's own is still kept."""
        captured: dict = {}
        clip: list = []
        clip_items = None
        if self.model.tts_model_type == "base" and has_clip(force) and prompt.ref_audio:
            own = self.wrapper.create_voice_clone_prompt(
                ref_audio=str(resolve_clip(prompt.ref_audio)), ref_text=prompt.ref_text, x_vector_only_mode=not prompt.ref_text)[0]
            clip.append(own)
            clip_items = [forced_item(force, own)]

        def intercept(**kwargs):
            captured.update(kwargs)
            raise _Captured

        package_clip_prompt = self.wrapper.create_voice_clone_prompt

        def keep_clip(*args, **kwargs):
            items = package_clip_prompt(*args, **kwargs)
            clip.extend(items)
            return items

        self.talker.generate = intercept  # instance attribute shadows the method
        self.wrapper.create_voice_clone_prompt = keep_clip
        try:
            self._call_package_generate(prompt, clip_items)
        except _Captured:
            pass
        except (ValueError, NotImplementedError) as e:
            raise BadInput(f"prompt {prompt.id} (line {prompt.line}): {str(e).splitlines()[0]}") from None
        finally:
            del self.talker.generate
            del self.wrapper.create_voice_clone_prompt
        item = clip[0] if clip else None
        return TalkerInputs(
            inputs_embeds=captured["inputs_embeds"],
            attention_mask=captured["attention_mask"],
            trailing_text_hidden=captured["trailing_text_hidden"],
            tts_pad_embed=captured["tts_pad_embed"],
            eos_token_id=int(captured["eos_token_id"]),
            suppress_tokens=list(captured["suppress_tokens"]),
            min_new_tokens=int(captured.get("min_new_tokens") or 0),
            ref_codes=None if item is None or item.ref_code is None else item.ref_code.detach().to("cpu", torch.long),
            ref_speaker=None if item is None else item.ref_spk_embedding.detach().to("cpu", torch.float32),
        )

    def _call_package_generate(self, prompt: Prompt, clip_items: list | None = None, **gen_kwargs) -> tuple[list[np.ndarray], int]:
        """Call the package's public generate entry point that fits the model type (``clip_items``:
        a ready voice-clone prompt to use instead of encoding the clip)."""
        w = self.wrapper
        kind = w.model.tts_model_type
        language = prompt.language or "auto"
        if kind == "custom_voice":
            speaker = prompt.speaker or default_speaker(w)
            return w.generate_custom_voice(
                prompt.text, speaker=speaker, language=language, instruct=prompt.instruct, **gen_kwargs
            )
        if kind == "voice_design":
            return w.generate_voice_design(prompt.text, instruct=prompt.instruct or "", language=language, **gen_kwargs)
        if kind == "base":
            if not prompt.ref_audio:
                raise BadInput(f"prompt {prompt.id} (line {prompt.line}): a base (voice-clone) model needs ref_audio in the prompt")
            if clip_items is not None:
                return w.generate_voice_clone(prompt.text, language=language, voice_clone_prompt=clip_items, **gen_kwargs)
            # ref_text given: ICL cloning (the clip's text and codes in the prefill); else x-vector only.
            return w.generate_voice_clone(
                prompt.text, language=language, ref_audio=str(resolve_clip(prompt.ref_audio)), ref_text=prompt.ref_text,
                x_vector_only_mode=not prompt.ref_text, **gen_kwargs
            )
        raise BadInput(f"model type '{kind}' is not supported; expected custom_voice, voice_design or base")

    def prompt_length(self, prompt: Prompt) -> int:
        return int(self.prepare(prompt).inputs_embeds.shape[1])

    # -- the decode loop ---------------------------------------------------------------
    def _new_cache(self, prefill_len: int, max_frames: int):
        from transformers import DynamicCache, StaticCache

        n = self.side.static_len
        if n is None:
            return DynamicCache(config=self.talker.config)
        if prefill_len + max_frames + 1 > n:
            raise BadInput(
                f"cache static:{n} is too small for a {prefill_len}-position prompt plus {max_frames} frames; "
                f"raise the cache size or lower decoding.max_frames"
            )
        return StaticCache(config=self.talker.config, max_cache_len=n)

    @torch.inference_mode()
    def run(self, prompt: Prompt, decoding: Decoding, force: Trace | None = None, record: bool = True) -> Trace:
        return self.run_batch([prompt], decoding, [force], record)[0]

    @torch.inference_mode()
    def run_batch(self, prompts: list[Prompt], decoding: Decoding, forces: list[Trace | None] | None = None,
                  record: bool = True) -> list[Trace]:
        """Decode ``prompts`` as one left-padded batch (one row each; a single prompt is a batch of
        one) and return one trace per row. Row b is teacher-forced on ``forces[b]`` when given."""
        forces = forces or [None] * len(prompts)
        rows = [self.prepare(p, f) for p, f in zip(prompts, forces)]
        inputs, pads = left_pad(rows)
        rec = self.recorder
        rec.reset()
        if record:
            rec.attach()
        try:
            with tf32_mode(self.side.tf32):
                outs = self._decode(inputs, decoding, forces, rec if record else None)
        finally:
            rec.detach()
        traces = []
        for b, (prompt, row, out, force) in enumerate(zip(prompts, rows, outs, forces)):
            if record:
                out.update(rec.finish(out["talker_tokens"].shape[0], out["codes"].shape[0], row=b))
            else:
                out.update({k: torch.zeros(0) for k in FLOAT_FIELDS})
            meta = {
                "prompt_id": prompt.id, "engine": self.name, "side": self.describe(), "forced": force is not None,
                "recorded": record, "prefill_len": row.length,
                "eos_token_id": inputs.eos_token_id, "max_frames": decoding.max_frames,
                "hit_max_frames": bool(out.pop("hit_max")),
                "n_talker_layers": len(self.talker.model.layers),
                "n_predictor_layers": len(self.talker.code_predictor.model.layers),
                "layout": self.layout().to_json(),
                "suppress_from": min(inputs.suppress_tokens) if inputs.suppress_tokens else None,
            }
            if record and rec.sublayers is not None:
                meta["sublayers"] = rec.sublayers.meta()
            if len(prompts) > 1:
                meta["batch"] = {"size": len(prompts), "row": b, "pad": pads[b], "padded_len": inputs.length,
                                 "mates": [p.id for p in prompts]}
            clip = {}
            if row.ref_codes is not None:
                clip["ref_codes"] = row.ref_codes
            if row.ref_speaker is not None:
                clip["ref_speaker"] = row.ref_speaker
            traces.append(Trace(**out, meta=meta, **clip))
        return traces

    def _decode(self, inputs: TalkerInputs, decoding: Decoding, forces: list[Trace | None], rec: Recorder | None) -> list[dict]:
        """The decode loop over a batch of B rows (B = 1 without batching). Every row runs its own
        token choice, stop rule and teacher forcing; a row that has stopped keeps feeding its last
        token so the batch stays rectangular, and nothing after its stop is kept."""
        talker = self.talker
        predictor = talker.code_predictor
        dev = self.device
        null = contextlib.nullcontext()
        n_rows = inputs.inputs_embeds.shape[0]
        n_sub = self.n_substeps
        params = SamplingParams(
            do_sample=decoding.do_sample, temperature=decoding.temperature, top_k=decoding.top_k,
            top_p=decoding.top_p, repetition_penalty=decoding.repetition_penalty,
        )
        make_chooser = self.make_chooser or Chooser
        talker_choosers = [make_chooser(params, dev, inputs.eos_token_id, inputs.min_new_tokens, inputs.suppress_tokens) for _ in range(n_rows)]
        pred_chooser = make_chooser(replace(params, repetition_penalty=1.0), dev)  # the predictor's generate has none
        # One generator per row, seeded alike: row b samples exactly as it would alone.
        generators = [torch.Generator(device=dev).manual_seed(decoding.seed) if decoding.do_sample else None for _ in range(n_rows)]

        prefill_len = inputs.length
        row_max = [f.n_frames if f is not None else decoding.max_frames for f in forces]
        cache = self._new_cache(prefill_len, max(row_max))
        mask = inputs.attention_mask
        with rec.at("talker", 0) if rec else null:
            out = talker(
                inputs_embeds=inputs.inputs_embeds, attention_mask=mask, past_key_values=cache, use_cache=True,
                trailing_text_hidden=inputs.trailing_text_hidden, tts_pad_embed=inputs.tts_pad_embed,
                cache_position=torch.arange(prefill_len, device=dev),
            )
        logits, past_hidden = out.logits[:, -1], out.past_hidden

        state = [{"tokens": [], "choices": [], "frames": [], "pred": [], "hit_max": False, "done": False,
                  "history": torch.zeros(0, dtype=torch.long, device=dev)} for _ in range(n_rows)]
        last = [inputs.eos_token_id] * n_rows
        for s in range(max(row_max) + 1):
            for b, row in enumerate(state):
                if row["done"]:
                    continue
                force = forces[b]
                choice = talker_choosers[b].choose(logits[b], row["history"], generators[b])
                token = int(force.talker_tokens[s]) if force is not None else choice
                row["tokens"].append(token)
                row["choices"].append(choice)
                last[b] = token
                if force is not None and s == force.n_steps - 1:
                    row["hit_max"], row["done"] = bool(force.meta.get("hit_max_frames")), True
                elif token == inputs.eos_token_id:
                    row["done"] = True
                elif s == row_max[b]:
                    row["hit_max"], row["done"] = True, True
                else:
                    row["history"] = torch.cat([row["history"], torch.tensor([token], device=dev)])
            if all(row["done"] for row in state):
                break
            token_t = torch.tensor([[t] for t in last], device=dev)
            active = [not row["done"] for row in state]
            codes, own = self._predict_frame(predictor, past_hidden, token_t, s, pred_chooser, generators, forces, active, rec)
            for b, row in enumerate(state):
                if active[b]:
                    row["frames"].append([last[b]] + codes[b])
                    row["pred"].append(own[b])

            # Talker step s+1 on frame s: the decode branch of talker.forward, with our predictor.
            code_t = torch.tensor(codes, device=dev)
            embeds = [talker.get_input_embeddings()(token_t)]
            embeds += [predictor.get_input_embeddings()[i](code_t[:, i : i + 1]) for i in range(n_sub)]
            step_embeds = torch.cat(embeds, dim=1).sum(1, keepdim=True)
            if s < inputs.trailing_text_hidden.shape[1]:
                step_embeds = step_embeds + inputs.trailing_text_hidden[:, s].unsqueeze(1)
            else:
                step_embeds = step_embeds + inputs.tts_pad_embed
            mask = torch.cat([mask, mask.new_ones((n_rows, 1))], dim=-1)
            cache_position = torch.tensor([prefill_len + s], device=dev)
            position_ids = (cache_position + talker.rope_deltas).view(1, n_rows, 1).expand(3, n_rows, 1)
            with rec.at("talker", s + 1) if rec else null:
                hidden = talker.model(
                    inputs_embeds=step_embeds, attention_mask=mask, position_ids=position_ids,
                    past_key_values=cache, use_cache=True, cache_position=cache_position,
                ).last_hidden_state
                logits = talker.codec_head(hidden)[:, -1]
            past_hidden = hidden[:, -1:, :]

        results = []
        for row in state:
            n_frames = len(row["frames"])
            results.append({
                "talker_tokens": torch.tensor(row["tokens"], dtype=torch.long),
                "talker_choice": torch.tensor(row["choices"], dtype=torch.long),
                "codes": torch.tensor(row["frames"], dtype=torch.long).view(n_frames, self.n_substeps + 1),
                "pred_choice": torch.tensor(row["pred"], dtype=torch.long).view(n_frames, self.n_substeps),
                "hit_max": row["hit_max"],
            })
        return results

    def _predict_frame(self, predictor, past_hidden, token_t, frame, chooser, generators, forces, active, rec):
        """The code predictor's 15 sub-steps for every row, as its nested ``generate(max_new_tokens=15)``
        runs them. Returns each row's 15 codes (forced where the row is forced) and its own choices."""
        from transformers import DynamicCache

        dev = self.device
        null = contextlib.nullcontext()
        n_rows = token_t.shape[0]
        cache = DynamicCache(config=predictor.config)
        first = torch.cat((past_hidden, self.talker.get_input_embeddings()(token_t)), dim=1)
        codes: list[list[int]] = [[] for _ in range(n_rows)]
        own: list[list[int]] = [[] for _ in range(n_rows)]
        for j in range(self.n_substeps):
            n_past = 0 if j == 0 else j + 1
            length = first.shape[1] if j == 0 else 1
            cache_position = torch.arange(n_past, n_past + length, device=dev)
            kwargs = dict(
                attention_mask=torch.ones((n_rows, n_past + length), dtype=torch.long, device=dev),
                position_ids=cache_position.unsqueeze(0).expand(n_rows, -1), past_key_values=cache, use_cache=True,
                cache_position=cache_position,
            )
            with rec.at("predictor", frame, j) if rec else null:
                if j == 0:
                    out = predictor(inputs_embeds=first, **kwargs)
                else:
                    ids = torch.tensor([[c[-1]] for c in codes], device=dev)
                    out = predictor(input_ids=ids, generation_steps=j, **kwargs)
            for b in range(n_rows):
                choice = chooser.choose(out.logits[b, -1], torch.zeros(0, dtype=torch.long, device=dev), generators[b] if active[b] else None)
                force = forces[b]
                code = int(force.codes[frame, j + 1]) if force is not None and active[b] else choice
                codes[b].append(code)
                own[b].append(choice)
        return codes, own

    # -- audio -------------------------------------------------------------------------
    @torch.inference_mode()
    def decode_audio(self, codes) -> tuple[np.ndarray, int]:
        if len(codes) == 0:
            return np.zeros(0, dtype=np.float32), int(self.model.speech_tokenizer.get_output_sample_rate())
        wavs, sr = self.model.speech_tokenizer.decode([{"audio_codes": torch.as_tensor(codes).to(self.device)}])
        return np.asarray(wavs[0], dtype=np.float32), int(sr)

