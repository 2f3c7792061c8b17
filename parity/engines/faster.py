"""The faster-qwen3-tts engine (CUDA graphs over a StaticCache), observed inside its graphs.

The engine's own code runs unchanged: its prompt builder, its ``fast_generate`` loop, its
captured talker decode step and 15-step predictor loop, its sampler. parity adds two things,
both installed before the graphs are captured so that they become part of them:

- taps (``GraphTaps``): forward hooks that copy each layer's last-position output into a
  preallocated device slot; inside a capture the copy is recorded into the graph, so every
  replay rewrites the slot. After each replay the slots are snapshotted (one copy per graph).
- forcing (``ForcingSampler``): the engine's ``sample_logits`` call sites are wrapped; the
  wrapper keeps the engine's own choice in a device buffer and returns
  ``where(force_flag, forced_token, own_choice)``. Inside the predictor graph the buffers are
  device tensors, so forcing is graph-safe; sampling settings are baked in at capture.

Its traits (``parity/engines/faster_traits.py``: static cache, prefill, decode mask, talker and
predictor graphs, predictor cache, sampler) can be removed per side (``traits = ["-faster.X"]``,
or ``cache = "dynamic"``); the removals are made after capture and undone in place.

Graphs can be switched off (``cuda_graphs=False``): the captured functions then run eagerly.
On a machine without CUDA the adapter can drive the same modules eagerly on the CPU
(``FasterEngine(..., allow_cpu=True)``), which is how CI covers this file.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from parity.engines.base import Engine
from parity.engines.faster_traits import FASTER_TRAITS, removed_from, remove_traits
from parity.engines.reference import TORCH_DTYPES, default_speaker, import_qwen_tts, tf32_mode
from parity.errors import BadInput
from parity.layout import TraceLayout, qwen3_tts_layout
from parity.prompts import Prompt
from parity.recipe import Decoding, Side
from parity.refclip import forced_item, has_clip, resolve as resolve_clip
from parity.trace import FLOAT_FIELDS, Trace
from parity.variants import Applied, apply_variants, engine_settings

NUM_SUB_STEPS = 15  # faster-qwen3-tts's predictor graph is built for 16-codebook models


class ProbeCoverageError(RuntimeError):
    """A tap recorded nothing, or a slot was not rewritten by a replay."""


class EagerReplay:
    """Stands in for a captured CUDA graph: ``replay()`` runs the captured function eagerly."""

    def __init__(self, fn):
        self.fn = fn

    def replay(self) -> None:
        self.fn()


def _last(x) -> torch.Tensor:
    t = x[0] if isinstance(x, (tuple, list)) else x
    return t[0, -1] if t.dim() == 3 else t[0]


class GraphTaps:
    """Device slots for every probed point, filled inside the graphs.

    Hooks only keep references to each layer's last-position output (a view, no kernel); the
    last hook of a talker step, and of the 15th predictor sub-step, gathers them with one
    ``torch.stack(..., out=slots)``. Inside a capture that stack is a single recorded kernel per
    graph, instead of one copy per tapped point (about 120 per frame at 0.6B), and the held
    references keep the captured tensors alive, so their memory is not reused before the gather.
    """

    def __init__(self, talker, dtype: torch.dtype, device):
        pred = talker.code_predictor
        self.talker, self.pred = talker, pred
        self.n_t = len(talker.model.layers)
        self.n_p = len(pred.model.layers)
        h, hp, vp = talker.config.hidden_size, pred.config.hidden_size, pred.config.vocab_size
        self.talker_slots = torch.zeros((self.n_t + 1, h), dtype=dtype, device=device)
        self.pred_slots = torch.zeros((NUM_SUB_STEPS * (self.n_p + 1), hp), dtype=dtype, device=device)
        self.pred_logit_slots = torch.zeros((NUM_SUB_STEPS, vp), dtype=dtype, device=device)
        self._talker_held: list[torch.Tensor] = []
        self._pred_held: list[torch.Tensor] = []
        self._logits_held: list[torch.Tensor] = []
        self.taps_written: dict[str, int] = {}
        self.talker_logits: list[torch.Tensor] = []
        self.enabled_talker_logits = False
        self._handles: list = []

    # What a hook keeps of an output: batch row 0's last position (a subclass with a row axis
    # keeps every row's).
    _pick = staticmethod(_last)

    def _write_talker(self) -> None:
        """Gather the held talker outputs of one step into the slots (one kernel)."""
        torch.stack(self._talker_held, out=self.talker_slots)

    def attach(self) -> None:
        t_layers, p_layers = self.talker.model.layers, self.pred.model.layers
        self._handles.append(t_layers[0].register_forward_pre_hook(self._pre(self._talker_held, "talker"), with_kwargs=True))
        for i, layer in enumerate(t_layers):
            self._handles.append(layer.register_forward_hook(self._post_talker(i, last=i == self.n_t - 1)))
        self._handles.append(p_layers[0].register_forward_pre_hook(self._pre(self._pred_held, "predictor"), with_kwargs=True))
        for i, layer in enumerate(p_layers):
            self._handles.append(layer.register_forward_hook(self._post_pred(i)))
        for j, head in enumerate(self.pred.lm_head):
            self._handles.append(head.register_forward_hook(self._post_head(j)))
        self._handles.append(self.talker.codec_head.register_forward_hook(self._codec_head))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _count(self, key: str) -> None:
        self.taps_written[key] = self.taps_written.get(key, 0) + 1

    def _pre(self, held: list, component: str):
        def hook(module, args, kwargs):
            held.append(self._pick(args[0] if args else kwargs["hidden_states"]))
            self._count(f"{component}.embed")

        return hook

    def _post_talker(self, i: int, last: bool):
        def hook(module, args, output):
            self._talker_held.append(self._pick(output))
            self._count(f"talker.layer{i}")
            if last:
                if len(self._talker_held) == self.n_t + 1:
                    self._write_talker()
                self._talker_held.clear()  # clear, not rebind: the embed pre-hook holds this list

        return hook

    def _post_pred(self, i: int):
        def hook(module, args, output):
            self._pred_held.append(self._pick(output))
            self._count(f"predictor.layer{i}")

        return hook

    def _post_head(self, j: int):
        def hook(module, args, output):
            self._logits_held.append(self._pick(output))
            self._count("predictor.logits")
            if j == NUM_SUB_STEPS - 1:
                if len(self._pred_held) == self.pred_slots.shape[0] and len(self._logits_held) == NUM_SUB_STEPS:
                    torch.stack(self._pred_held, out=self.pred_slots)
                    torch.stack(self._logits_held, out=self.pred_logit_slots)
                self._pred_held.clear()
                self._logits_held.clear()

        return hook

    def _codec_head(self, module, args, output):
        # Always eager in faster-qwen3-tts and in the batched package's loop (outside both graphs).
        if self.enabled_talker_logits:
            self.talker_logits.append(self._pick(output).to(torch.float32, copy=True))

    def check_coverage(self) -> None:
        """Every point must have been written at least once (at capture or in an eager run)."""
        expected = [f"talker.layer{i}" for i in range(self.n_t)] + ["talker.embed", "predictor.embed", "predictor.logits"]
        expected += [f"predictor.layer{i}" for i in range(self.n_p)]
        missing = [k for k in expected if not self.taps_written.get(k)]
        if missing:
            raise ProbeCoverageError(f"graph taps recorded nothing for: {', '.join(missing)}")


class ForcingSampler:
    """Wraps the predictor graph's ``sample_logits``: keeps the engine's own choice for each of
    the 15 call sites in a device buffer and returns the forced token while the flag is on. The
    call-site index is a Python int, so each captured call site reads and writes its own slot."""

    def __init__(self, original, n_slots: int, device):
        self.original = original
        self.own = torch.zeros(n_slots, dtype=torch.long, device=device)
        self.forced = torch.zeros(n_slots, dtype=torch.long, device=device)
        self.flag = torch.zeros((), dtype=torch.bool, device=device)
        self.index = 0  # Python counter: baked per call site inside a capture
        self.n_slots = n_slots

    def __call__(self, logits, **kwargs):
        own = self.original(logits, **kwargs)
        i = self.index
        self.own[i : i + 1].copy_(own.view(-1)[:1])
        out = torch.where(self.flag, self.forced[i : i + 1], own.view(-1)[:1]).view(own.shape)
        self.index = (i + 1) % self.n_slots
        return out


class FasterEngine(Engine):
    """faster-qwen3-tts 0.5.4 with graph-safe taps and teacher forcing."""

    name = "faster"
    variant_family = "faster"
    traits = FASTER_TRAITS

    def __init__(self, side: Side, model_dir: Path | str, allow_cpu: bool = False, cuda_graphs: bool = True, record: bool = True):
        super().__init__(side, model_dir)
        # device = "cpu" asks for the engine's graph functions run eagerly on the CPU (no graphs).
        allow_cpu = allow_cpu or side.device == "cpu"
        if not torch.cuda.is_available() and not allow_cpu:
            raise BadInput(
                "the faster engine (faster-qwen3-tts) needs a CUDA GPU and none is visible; "
                "on a CPU use a reference-only recipe such as recipes/smoke.toml, or device = \"cpu\" "
                "on the faster side to run its modules eagerly (no CUDA graphs)"
            )
        self.device = torch.device("cuda" if torch.cuda.is_available() and side.device != "cpu" else "cpu")
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.with_taps = record
        self.tts = None
        self.taps: GraphTaps | None = None
        self._captured_for: tuple | None = None
        self.clip: dict | None = None  # the last voice-clone prompt's clip encoding
        # Traits removed (parity.engines.faster_traits): applied once the graphs are captured.
        self.traits_applied: Applied | None = None
        self.run_patches = None  # set by a removed trait: decoding -> [(object, attribute, value)] for one run

    # -- lifecycle ---------------------------------------------------------------------
    def _open_tts(self) -> tuple[torch.dtype, int]:
        """Load the faster-qwen3-tts instance (CUDA, or its modules on the CPU); its dtype and cache length."""
        import_qwen_tts()
        dtype = TORCH_DTYPES[self.side.dtype]
        max_seq_len = self.side.static_len or 2048
        if self.device.type == "cuda":
            from faster_qwen3_tts import FasterQwen3TTS

            self.tts = FasterQwen3TTS.from_pretrained(
                str(self.model_dir), device="cuda", dtype=dtype, attn_implementation=self.side.attention,
                max_seq_len=max_seq_len,
            )
        else:
            self.tts = _cpu_instance(self.model_dir, dtype, self.side.attention, max_seq_len)
        return dtype, max_seq_len

    def load(self) -> None:
        dtype, max_seq_len = self._open_tts()
        talker = self.tts.model.model.talker
        # Variants change the modules the graphs will capture, so they go in before capture and
        # before the taps (which hook the layers as they then are).
        self.applied = apply_variants(talker, self.side.variants, self.name)
        self.cuda_graphs = engine_settings(self.side.variants).get("cuda_graphs", self.cuda_graphs) and self.device.type == "cuda"
        if self.with_taps:
            self.taps = GraphTaps(talker, dtype, self.device)
            self.taps.attach()
        self.sublayers = None  # probes = "sublayers": taps inside each layer, also captured into the graphs
        if self.with_taps and self.side.probes == "sublayers":
            from parity.probes import GraphSublayers

            self.sublayers = GraphSublayers(talker, dtype, self.device, NUM_SUB_STEPS)
            self.sublayers.attach()
        import faster_qwen3_tts.predictor_graph as pg_mod

        # Installed only while this engine captures or runs (see _sampler_installed), so several
        # engines in one process never wrap each other's samplers.
        self.pred_sampler = ForcingSampler(pg_mod.sample_logits, NUM_SUB_STEPS, self.device)

    @contextlib.contextmanager
    def _sampler_installed(self):
        """The predictor graph calls the module-level ``sample_logits``: point it at our forcing
        wrapper while capturing (the graph then holds our buffers) and while running eagerly."""
        import faster_qwen3_tts.predictor_graph as pg_mod

        previous = pg_mod.sample_logits
        pg_mod.sample_logits = self.pred_sampler
        try:
            yield
        finally:
            pg_mod.sample_logits = previous

    def close(self) -> None:
        if self.traits_applied is not None:
            self.traits_applied.undo()
            self.traits_applied = None
        if self.taps is not None:
            self.taps.detach()
        if getattr(self, "sublayers", None) is not None:
            self.sublayers.detach()
            self.sublayers = None
        if getattr(self, "applied", None) is not None:
            self.applied.undo()
            self.applied = None
        self.tts = None
        self.taps = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def layout(self) -> TraceLayout:
        talker = self.tts.model.model.talker
        return qwen3_tts_layout(len(talker.model.layers), len(talker.code_predictor.model.layers), NUM_SUB_STEPS + 1)

    def describe(self) -> dict:
        return {**super().describe(), "device": str(self.device), "cuda_graphs": self.cuda_graphs, "taps": self.with_taps,
                "traits_removed": sorted(removed_from(self.side))}

    # -- traits ------------------------------------------------------------------------
    def can_reuse(self, side: Side) -> bool:
        """Traits, TF32 and a dynamic cache or the loaded static length change in place; the rest reloads."""
        same = all(getattr(side, f) == getattr(self.side, f) for f in ("engine", "dtype", "attention", "device", "variants"))
        return same and side.static_len in (None, self.tts.talker_graph.max_seq_len)

    def reconfigure(self, side: Side) -> None:
        """Switch the traits this engine runs without (and ``cache`` between dynamic and the loaded
        static length) in place: the removals are undone and made again."""
        if not self.can_reuse(side):
            raise ValueError(f"reconfigure changes only traits, TF32 and cache kind; {side.label()} needs a new engine")
        self.side = side
        if self._captured_for is not None:
            self._apply_trait_removals()

    def _apply_trait_removals(self) -> None:
        if self.traits_applied is not None:
            self.traits_applied.undo()
        self.traits_applied = Applied()
        remove_traits(self, removed_from(self.side), self.traits_applied)

    @contextlib.contextmanager
    def _run_patches_installed(self, decoding: Decoding):
        """Patches a removed trait needs for one run (the reference's sampler), then restored."""
        patches = self.run_patches(decoding) if self.run_patches is not None else []
        saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
        for obj, name, value in patches:
            setattr(obj, name, value)
        try:
            yield
        finally:
            for obj, name, value in reversed(saved):
                setattr(obj, name, value)

    # -- preparation -------------------------------------------------------------------
    def _speaker(self, prompt: Prompt) -> str | None:
        return prompt.speaker or default_speaker(self.tts.model)

    def _ensure_captured(self, decoding: Decoding, prefill_len: int) -> None:
        """Sampling settings are baked into the predictor graph: set them, then capture once."""
        key = (decoding.do_sample, decoding.temperature, decoding.top_k, decoding.top_p)
        if self._captured_for is not None:
            if key != self._captured_for:
                raise BadInput("the faster engine's predictor graph was captured with other sampling settings; use one decoding per run")
            return
        pg = self.tts.predictor_graph
        pg.do_sample, pg.temperature, pg.top_k, pg.top_p = key
        if self.taps is not None:
            self.taps.sub = 0
        self.pred_sampler.index = 0
        with _cpu_sync_shim(self.device), self._sampler_installed():
            if self.cuda_graphs:
                self.tts._warmed_up = False  # _prepare set it to keep the engine from capturing early
                self.tts.warmup(prefill_len)
            else:
                _eager_setup(self.tts)
        self.pred_sampler.index = 0
        self._captured_for = key
        self._apply_trait_removals()

    def prompt_length(self, prompt: Prompt) -> int:
        return int(self._prepare(prompt)[3].shape[1])

    def _prepare(self, prompt: Prompt, force: Trace | None = None):
        """The engine's own prompt builder for the model type, with each method's own default text
        layout (custom voice and voice design: whole text in the prefill; voice clone: streamed).
        For a voice-clone prompt the engine encodes the clip itself; its codes and speaker
        embedding are kept in ``self.clip`` for the trace; with a ``force`` trace that recorded a
        clip, the prefill is built from that trace's clip encoding instead (teacher forcing)."""
        kind = self.tts.model.model.tts_model_type
        self.tts._warmed_up = True  # capture is ours to schedule (after taps and sampling are set)
        self.clip = None
        language = prompt.language or "auto"
        if kind == "custom_voice":
            return self.tts._prepare_generation_custom(
                text=prompt.text, language=language, speaker=self._speaker(prompt),
                instruct=prompt.instruct, non_streaming_mode=True,
            )
        if kind == "voice_design":
            return self.tts._prepare_generation_custom(
                text=prompt.text, language=language, speaker=None, instruct=prompt.instruct, non_streaming_mode=True,
            )
        if kind != "base":
            raise BadInput(f"the faster engine adapter supports custom_voice, voice_design and base models; this checkpoint is '{kind}'")
        if not prompt.ref_audio:
            raise BadInput(f"prompt {prompt.id} (line {prompt.line}): a base (voice-clone) model needs ref_audio in the prompt")
        wrapper = self.tts.model
        package_clip_prompt = wrapper.create_voice_clone_prompt
        items: list = []

        def keep_clip(*args, **kwargs):
            out = package_clip_prompt(*args, **kwargs)
            items.extend(out)
            return out

        # The engine caches encoded clips by path; clear it so every run encodes (and records) its clip.
        self.tts._voice_prompt_cache.clear()
        wrapper.create_voice_clone_prompt = keep_clip
        try:
            # append_silence=False: the engine's default pads ICL clips with 0.5 s of silence, which
            # the reference does not; both sides must encode the same clip.
            m, talker, config, tie, tam, tth, tpe, _ref_codes = self.tts._prepare_generation(
                text=prompt.text, ref_audio=str(resolve_clip(prompt.ref_audio)), ref_text=prompt.ref_text or "",
                language=language, xvec_only=not prompt.ref_text, non_streaming_mode=False, append_silence=False,
            )
            if has_clip(force):  # again, on the forcing trace's clip encoding (the engine's own is in items)
                self.tts._voice_prompt_cache.clear()
                m, talker, config, tie, tam, tth, tpe, _ref_codes = self.tts._prepare_generation(
                    text=prompt.text, ref_text=prompt.ref_text or "", language=language, non_streaming_mode=False,
                    voice_clone_prompt=[forced_item(force, items[0])],
                )
        finally:
            del wrapper.create_voice_clone_prompt
        item = items[0]
        self.clip = {"ref_speaker": item.ref_spk_embedding.detach().to("cpu", torch.float32)}
        if item.ref_code is not None:
            self.clip["ref_codes"] = item.ref_code.detach().to("cpu", torch.long)
        return m, talker, config, tie, tam, tth, tpe

    # -- running -----------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, prompt: Prompt, decoding: Decoding, force: Trace | None = None, record: bool = True) -> Trace:
        from faster_qwen3_tts.generate import fast_generate

        m, talker, config, tie, tam, tth, tpe = self._prepare(prompt, force)
        self._ensure_captured(decoding, tie.shape[1])
        if decoding.do_sample:
            torch.manual_seed(decoding.seed)
        record = record and self.taps is not None
        steps = _StepRecorder(self, record, force)
        max_frames = force.n_frames if force is not None else decoding.max_frames
        with self._run_patches_installed(decoding), steps.installed(), self._sampler_installed(), \
                tf32_mode(self.side.tf32), _cpu_sync_shim(self.device):
            codec_ids, timing = fast_generate(
                talker=talker, talker_input_embeds=tie, attention_mask=tam, trailing_text_hiddens=tth,
                tts_pad_embed=tpe, config=config, predictor_graph=self.tts.predictor_graph,
                talker_graph=self.tts.talker_graph, max_new_tokens=max_frames, min_new_tokens=2,
                temperature=decoding.temperature, top_k=decoding.top_k, top_p=decoding.top_p,
                do_sample=decoding.do_sample, repetition_penalty=decoding.repetition_penalty,
            )
        codes = codec_ids.cpu() if codec_ids is not None else torch.zeros(0, 16, dtype=torch.long)
        if record:
            # Python hooks fire only while capturing (or eagerly): every tap must have fired by now.
            self.taps.check_coverage()
            if self.sublayers is not None:
                self.sublayers.check_coverage()
        tensors = steps.assemble(len(codes))
        hit_max = len(codes) == max_frames and (force is None or bool(force.meta.get("hit_max_frames")))
        meta = {
            "prompt_id": prompt.id, "engine": self.name, "side": self.describe(), "forced": force is not None,
            "recorded": record, "prefill_len": int(tie.shape[1]), "eos_token_id": int(config.codec_eos_token_id),
            "max_frames": decoding.max_frames, "hit_max_frames": hit_max,
            "n_talker_layers": len(talker.model.layers), "n_predictor_layers": len(talker.code_predictor.model.layers),
            "layout": self.layout().to_json(),
            "suppress_from": max(0, config.vocab_size - 1024), "timing": timing,
            "sampling": "seeded" if decoding.do_sample else "greedy",
        }
        if record and self.sublayers is not None:
            meta["sublayers"] = self.sublayers.meta()
        return Trace(codes=codes, **tensors, meta=meta, **(self.clip or {}))

    @torch.inference_mode()
    def decode_audio(self, codes) -> tuple[np.ndarray, int]:
        tok = self.tts.model.model.speech_tokenizer
        if len(codes) == 0:
            return np.zeros(0, dtype=np.float32), int(tok.get_output_sample_rate())
        wavs, sr = tok.decode({"audio_codes": torch.as_tensor(codes).to(self.device).unsqueeze(0)})
        wav = wavs[0]
        wav = wav.flatten().cpu().numpy() if hasattr(wav, "cpu") else np.asarray(wav).flatten()
        return wav.astype(np.float32), int(sr)


class _StepRecorder:
    """Per-run bookkeeping around the engine's loop: forcing values before each sampling call,
    slot snapshots after the prefill and after each graph replay."""

    def __init__(self, engine: FasterEngine, record: bool, force: Trace | None):
        self.e = engine
        self.record = record
        self.force = force
        self.talker_hidden: list[torch.Tensor] = []
        self.pred_hidden: list[torch.Tensor] = []
        self.pred_logits: list[torch.Tensor] = []
        self.talker_choice: list[int] = []
        self.talker_tokens: list[int] = []
        self.pred_choice: list[torch.Tensor] = []
        self.talker_sub: list[torch.Tensor] = []  # sub-layer snapshots (probes = "sublayers")
        self.pred_sub: list[torch.Tensor] = []
        self.frame = 0

    @contextlib.contextmanager
    def installed(self):
        e = self.e
        tts = e.tts
        talker = tts.model.model.talker
        taps = e.taps
        ps = e.pred_sampler
        forcing = self.force is not None
        ps.flag.fill_(forcing)
        ps.index = 0
        if taps is not None:
            taps.talker_logits = []
            taps.enabled_talker_logits = self.record
            taps.sub = 0
        import faster_qwen3_tts.generate as gen_mod

        orig_forward, orig_pred_run, orig_talker_run = talker.forward, tts.predictor_graph.run, tts.talker_graph.run
        orig_sample = gen_mod.sample_logits

        def talker_sample(logits, **kw):
            """The talker's token choice is eager in the engine: force it here, per step."""
            step = len(self.talker_tokens)
            own = orig_sample(logits, **kw)
            choice = int(own.view(-1)[0])
            token = int(self.force.talker_tokens[step]) if forcing else choice
            self.talker_choice.append(choice)
            self.talker_tokens.append(token)
            return torch.tensor([token], device=own.device, dtype=own.dtype).view(own.shape)

        def prefill(*args, **kwargs):
            out = orig_forward(*args, **kwargs)
            if self.record:
                self.talker_hidden.append(taps.talker_slots.clone())
                if e.sublayers is not None:
                    self.talker_sub.append(e.sublayers.talker_snapshot())
            return out

        def pred_run(pred_input):
            if forcing:
                ps.forced.copy_(self.force.codes[self.frame, 1:].to(ps.forced.device))
            out = orig_pred_run(pred_input)
            self.pred_choice.append(ps.own.clone())
            if self.record:
                self.pred_hidden.append(taps.pred_slots.clone())
                self.pred_logits.append(taps.pred_logit_slots.clone())
                if e.sublayers is not None:
                    self.pred_sub.append(e.sublayers.pred_snapshot())
            self.frame += 1
            return out

        def talker_run(input_embeds, position):
            out = orig_talker_run(input_embeds, position)
            if self.record:
                self.talker_hidden.append(taps.talker_slots.clone())
                if e.sublayers is not None:
                    self.talker_sub.append(e.sublayers.talker_snapshot())
            return out

        # Put back what was there before (a removed trait may have patched talker.forward).
        before = [(obj, name, vars(obj).get(name)) for obj, name in
                  ((talker, "forward"), (tts.predictor_graph, "run"), (tts.talker_graph, "run"))]
        talker.forward = prefill
        tts.predictor_graph.run = pred_run
        tts.talker_graph.run = talker_run
        gen_mod.sample_logits = talker_sample
        try:
            yield
        finally:
            for obj, name, value in before:
                if value is None:
                    delattr(obj, name)
                else:
                    setattr(obj, name, value)
            gen_mod.sample_logits = orig_sample
            if taps is not None:
                taps.enabled_talker_logits = False

    def assemble(self, n_frames: int) -> dict[str, torch.Tensor]:
        n_steps = len(self.talker_tokens)
        out = {
            "talker_tokens": torch.tensor(self.talker_tokens, dtype=torch.long),
            "talker_choice": torch.tensor(self.talker_choice, dtype=torch.long),
            "pred_choice": torch.stack(self.pred_choice).cpu() if self.pred_choice else torch.zeros(0, 15, dtype=torch.long),
        }
        if not self.record:
            return {**out, **{k: torch.zeros(0) for k in FLOAT_FIELDS}}
        talker_hidden = torch.stack(self.talker_hidden).float().cpu()
        talker_logits = torch.stack(self.e.taps.talker_logits).cpu()
        n_points = self.e.taps.n_p + 1
        pred_hidden = (
            torch.stack(self.pred_hidden).float().cpu().view(len(self.pred_hidden), NUM_SUB_STEPS, n_points, -1)
            if self.pred_hidden else torch.zeros(0)
        )
        pred_logits = torch.stack(self.pred_logits).float().cpu() if self.pred_logits else torch.zeros(0)
        if talker_hidden.shape[0] != n_steps or talker_logits.shape[0] != n_steps or len(self.pred_hidden) != n_frames:
            raise ProbeCoverageError(
                f"taps: {talker_hidden.shape[0]} talker snapshots and {talker_logits.shape[0]} logits for "
                f"{n_steps} steps, {len(self.pred_hidden)} predictor snapshots for {n_frames} frames"
            )
        _check_stale(talker_hidden, "talker")
        if n_frames:
            _check_stale(pred_hidden.flatten(0, 1), "predictor")
        if self.e.sublayers is not None:
            out.update(self.e.sublayers.assemble(self.talker_sub, self.pred_sub, n_steps, n_frames))
        return {**out, "talker_hidden": talker_hidden, "talker_logits": talker_logits,
                "pred_hidden": pred_hidden, "pred_logits": pred_logits}


def _check_stale(hidden: torch.Tensor, component: str) -> None:
    """A replay that did not rewrite the slots leaves a snapshot bit-identical to the one before
    it; real decode steps never repeat exactly (the position changes every step)."""
    if hidden.shape[0] < 2:
        return
    same = (hidden[1:] == hidden[:-1]).flatten(1).all(dim=1)
    if bool(same.any()):
        n = int(same.nonzero()[0, 0]) + 1
        raise ProbeCoverageError(f"stale {component} taps: snapshot {n} is identical to snapshot {n - 1} (slots not rewritten by the replay)")


def _eager_setup(tts) -> None:
    """Graphs off: prepare the engine's static caches and masks, and replay eagerly."""
    pg, tg = tts.predictor_graph, tts.talker_graph
    pg._init_cache_layers()
    pg._build_attention_masks()
    pg.graph, pg.captured = EagerReplay(pg._full_loop), True
    tg._init_cache_layers()
    tg._build_attention_masks()
    tg.graph, tg.captured = EagerReplay(tg._decode_step), True


@contextlib.contextmanager
def _cpu_sync_shim(device: torch.device):
    """The engine calls torch.cuda.synchronize() for its timings; on the CPU there is nothing to wait for."""
    if device.type == "cuda":
        yield
        return
    original = torch.cuda.synchronize
    torch.cuda.synchronize = lambda *a, **k: None
    try:
        yield
    finally:
        torch.cuda.synchronize = original


def _cpu_instance(model_dir, dtype, attention: str, max_seq_len: int):
    """Build a FasterQwen3TTS on the CPU from the same parts ``from_pretrained`` uses (it refuses
    non-CUDA devices). Only for driving the engine's modules eagerly (graphs off)."""
    from faster_qwen3_tts import FasterQwen3TTS
    from faster_qwen3_tts.predictor_graph import PredictorGraph
    from faster_qwen3_tts.talker_graph import TalkerGraph
    from qwen_tts import Qwen3TTSModel

    base = Qwen3TTSModel.from_pretrained(str(model_dir), dtype=dtype, attn_implementation=attention)
    talker = base.model.talker
    # "cpu:0" carries an index, so the graph helpers do not ask CUDA for the current device.
    pred = PredictorGraph(talker.code_predictor, talker.code_predictor.model.config, talker.config.hidden_size,
                          device="cpu:0", dtype=dtype, do_sample=False)
    tg = TalkerGraph(talker.model, talker.config, device="cpu:0", dtype=dtype, max_seq_len=max_seq_len)
    return FasterQwen3TTS(base_model=base, predictor_graph=pred, talker_graph=tg, device="cpu", dtype=dtype,
                          max_seq_len=max_seq_len)
