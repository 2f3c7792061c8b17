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
from parity.sampling import Chooser, SamplingParams
from parity.trace import FLOAT_FIELDS, Trace
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

    def __init__(self, side: Side, model_dir: Path | str):
        super().__init__(side, model_dir)
        self.wrapper = None
        self.device = resolve_device(side.device)
        self.recorder: Recorder | None = None
        self.applied: Applied | None = None  # the side's variants, applied at load

    # -- lifecycle ---------------------------------------------------------------------
    def load(self) -> None:
        Qwen3TTSModel = import_qwen_tts().Qwen3TTSModel

        self.wrapper = Qwen3TTSModel.from_pretrained(
            str(self.model_dir), dtype=TORCH_DTYPES[self.side.dtype], attn_implementation=self.side.attention
        )
        self.wrapper.model.to(self.device).eval()
        self.wrapper.device = self.device
        self.recorder = Recorder(self.talker)
        self.applied = apply_variants(self.talker, self.side.variants, self.variant_family)

    def close(self) -> None:
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

    def reconfigure(self, side: Side) -> None:
        """Switch a loaded engine to ``side`` without reloading: attention implementation, cache,
        TF32 and variants change in place (variants are undone and re-applied). ``side`` must
        agree on :attr:`LOAD_FIELDS`; those need a fresh engine."""
        for name in self.LOAD_FIELDS:
            if getattr(side, name) != getattr(self.side, name):
                raise ValueError(f"reconfigure cannot change '{name}' ({getattr(self.side, name)} -> {getattr(side, name)}); load a new engine")
        self.applied.undo()
        set_attention(Target(self.talker, self.variant_family), side.attention)
        self.side = side
        self.applied = apply_variants(self.talker, side.variants, self.variant_family)

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
    def prepare(self, prompt: Prompt) -> TalkerInputs:
        """Build the talker's prefill inputs with the package's own code path."""
        captured: dict = {}

        def intercept(**kwargs):
            captured.update(kwargs)
            raise _Captured

        self.talker.generate = intercept  # instance attribute shadows the method
        try:
            self._call_package_generate(prompt)
        except _Captured:
            pass
        except (ValueError, NotImplementedError) as e:
            raise BadInput(f"prompt {prompt.id} (line {prompt.line}): {str(e).splitlines()[0]}") from None
        finally:
            del self.talker.generate
        return TalkerInputs(
            inputs_embeds=captured["inputs_embeds"],
            attention_mask=captured["attention_mask"],
            trailing_text_hidden=captured["trailing_text_hidden"],
            tts_pad_embed=captured["tts_pad_embed"],
            eos_token_id=int(captured["eos_token_id"]),
            suppress_tokens=list(captured["suppress_tokens"]),
            min_new_tokens=int(captured.get("min_new_tokens") or 0),
        )

    def _call_package_generate(self, prompt: Prompt, **gen_kwargs) -> tuple[list[np.ndarray], int]:
        """Call the package's public generate entry point that fits the model type."""
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
            return w.generate_voice_clone(
                prompt.text, language=language, ref_audio=prompt.ref_audio, ref_text=prompt.ref_text, **gen_kwargs
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
        inputs = self.prepare(prompt)
        rec = self.recorder
        rec.reset()
        if record:
            rec.attach()
        try:
            with tf32_mode(self.side.tf32):
                out = self._decode(inputs, decoding, force, rec if record else None)
        finally:
            rec.detach()
        if record:
            out.update(rec.finish(out["talker_tokens"].shape[0], out["codes"].shape[0]))
        else:
            out.update({k: torch.zeros(0) for k in FLOAT_FIELDS})
        meta = {
            "prompt_id": prompt.id, "engine": self.name, "side": self.describe(), "forced": force is not None,
            "recorded": record, "prefill_len": int(inputs.inputs_embeds.shape[1]),
            "eos_token_id": inputs.eos_token_id, "max_frames": decoding.max_frames,
            "hit_max_frames": bool(out.pop("hit_max")),
            "n_talker_layers": len(self.talker.model.layers),
            "n_predictor_layers": len(self.talker.code_predictor.model.layers),
            "layout": self.layout().to_json(),
            "suppress_from": min(inputs.suppress_tokens) if inputs.suppress_tokens else None,
        }
        return Trace(**out, meta=meta)

    def _decode(self, inputs: TalkerInputs, decoding: Decoding, force: Trace | None, rec: Recorder | None) -> dict:
        talker = self.talker
        predictor = talker.code_predictor
        dev = self.device
        null = contextlib.nullcontext()
        params = SamplingParams(
            do_sample=decoding.do_sample, temperature=decoding.temperature, top_k=decoding.top_k,
            top_p=decoding.top_p, repetition_penalty=decoding.repetition_penalty,
        )
        talker_chooser = Chooser(params, dev, inputs.eos_token_id, inputs.min_new_tokens, inputs.suppress_tokens)
        pred_chooser = Chooser(replace(params, repetition_penalty=1.0), dev)  # the predictor's generate has none
        generator = torch.Generator(device=dev).manual_seed(decoding.seed) if decoding.do_sample else None

        prefill_len = inputs.inputs_embeds.shape[1]
        max_frames = force.n_frames if force is not None else decoding.max_frames
        cache = self._new_cache(prefill_len, max_frames)
        mask = inputs.attention_mask
        with rec.at("talker", 0) if rec else null:
            out = talker(
                inputs_embeds=inputs.inputs_embeds, attention_mask=mask, past_key_values=cache, use_cache=True,
                trailing_text_hidden=inputs.trailing_text_hidden, tts_pad_embed=inputs.tts_pad_embed,
                cache_position=torch.arange(prefill_len, device=dev),
            )
        logits, past_hidden = out.logits[:, -1], out.past_hidden

        n_sub = self.n_substeps
        tokens, choices, frames, pred_choices = [], [], [], []
        history = torch.zeros(0, dtype=torch.long, device=dev)
        hit_max = False
        for s in range(max_frames + 1):
            choice = talker_chooser.choose(logits[0], history, generator)
            token = int(force.talker_tokens[s]) if force is not None else choice
            tokens.append(token)
            choices.append(choice)
            if force is not None and s == force.n_steps - 1:
                hit_max = bool(force.meta.get("hit_max_frames"))
                break
            if token == inputs.eos_token_id:
                break
            if s == max_frames:
                hit_max = True
                break
            history = torch.cat([history, torch.tensor([token], device=dev)])
            token_t = torch.tensor([[token]], device=dev)
            codes, own = self._predict_frame(predictor, past_hidden, token_t, s, pred_chooser, generator, force, rec)
            frames.append([token] + codes)
            pred_choices.append(own)

            # Talker step s+1 on frame s: the decode branch of talker.forward, with our predictor.
            code_t = torch.tensor([codes], device=dev)
            embeds = [talker.get_input_embeddings()(token_t)]
            embeds += [predictor.get_input_embeddings()[i](code_t[:, i : i + 1]) for i in range(n_sub)]
            step_embeds = torch.cat(embeds, dim=1).sum(1, keepdim=True)
            if s < inputs.trailing_text_hidden.shape[1]:
                step_embeds = step_embeds + inputs.trailing_text_hidden[:, s].unsqueeze(1)
            else:
                step_embeds = step_embeds + inputs.tts_pad_embed
            mask = torch.cat([mask, mask.new_ones((1, 1))], dim=-1)
            cache_position = torch.tensor([prefill_len + s], device=dev)
            position_ids = (cache_position + talker.rope_deltas).view(1, 1, 1).expand(3, 1, 1)
            with rec.at("talker", s + 1) if rec else null:
                hidden = talker.model(
                    inputs_embeds=step_embeds, attention_mask=mask, position_ids=position_ids,
                    past_key_values=cache, use_cache=True, cache_position=cache_position,
                ).last_hidden_state
                logits = talker.codec_head(hidden)[:, -1]
            past_hidden = hidden[:, -1:, :]

        n_frames = len(frames)
        return {
            "talker_tokens": torch.tensor(tokens, dtype=torch.long),
            "talker_choice": torch.tensor(choices, dtype=torch.long),
            "codes": torch.tensor(frames, dtype=torch.long).view(n_frames, n_sub + 1),
            "pred_choice": torch.tensor(pred_choices, dtype=torch.long).view(n_frames, n_sub),
            "hit_max": hit_max,
        }

    def _predict_frame(self, predictor, past_hidden, token_t, frame, chooser, generator, force, rec):
        """The code predictor's sub-steps (15 on Qwen3-TTS), as its nested ``generate`` runs them."""
        from transformers import DynamicCache

        dev = self.device
        null = contextlib.nullcontext()
        cache = DynamicCache(config=predictor.config)
        first = torch.cat((past_hidden, self.talker.get_input_embeddings()(token_t)), dim=1)
        codes, own = [], []
        for j in range(self.n_substeps):
            n_past = 0 if j == 0 else j + 1
            length = first.shape[1] if j == 0 else 1
            cache_position = torch.arange(n_past, n_past + length, device=dev)
            kwargs = dict(
                attention_mask=torch.ones((1, n_past + length), dtype=torch.long, device=dev),
                position_ids=cache_position.unsqueeze(0), past_key_values=cache, use_cache=True,
                cache_position=cache_position,
            )
            with rec.at("predictor", frame, j) if rec else null:
                if j == 0:
                    out = predictor(inputs_embeds=first, **kwargs)
                else:
                    out = predictor(input_ids=torch.tensor([[codes[-1]]], device=dev), generation_steps=j, **kwargs)
            choice = chooser.choose(out.logits[0, -1], torch.zeros(0, dtype=torch.long, device=dev), generator)
            code = int(force.codes[frame, j + 1]) if force is not None else choice
            codes.append(code)
            own.append(choice)
        return codes, own

    # -- audio -------------------------------------------------------------------------
    @torch.inference_mode()
    def decode_audio(self, codes) -> tuple[np.ndarray, int]:
        if len(codes) == 0:
            return np.zeros(0, dtype=np.float32), int(self.model.speech_tokenizer.get_output_sample_rate())
        wavs, sr = self.model.speech_tokenizer.decode([{"audio_codes": torch.as_tensor(codes).to(self.device)}])
        return np.asarray(wavs[0], dtype=np.float32), int(sr)

