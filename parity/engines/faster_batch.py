"""The faster-qwen3-tts-batch engine (batched CUDA graphs over faster-qwen3-tts), observed per row.

faster-qwen3-tts-batch 0.2.0 wraps a loaded faster-qwen3-tts instance
(``BatchedFasterQwen3TTS(base, max_batch_size, max_seq_len)``) with a batched talker graph and a
batched 15-step predictor graph captured for a fixed number of rows, and decodes a batch with its
own loop (``batched_fast_generate``): the prompts' prefills are left-padded and run as one batched
forward, then every step runs all rows through the two graphs. Its public batch API is voice
cloning only (``generate_voice_clone_batch``), so this engine takes base (voice-clone) checkpoints.

The package's loop and graphs run unchanged; parity adds, as for the faster engine:

- per-row taps (:class:`RowTaps`): each layer's last-position output of every row, gathered into
  preallocated slots inside the graphs (one ``stack`` per graph);
- per-row teacher forcing: the predictor graph's sampler is wrapped graph-safely
  (:class:`RowForcingSampler`, a device flag and forced codes per row); the talker's token choice
  is eager in the loop and forced there. A forced row is stopped exactly where its forcing trace
  stopped by feeding the loop the end token after its last recorded token (the loop never consumes
  a row's last token, so this changes nothing it computes for the row).

The prefill of each row is built by the faster engine's prompt builder (the reference's defaults:
text streamed, no appended silence, the row's own clone mode), not by ``generate_voice_clone_batch``,
whose one set of defaults for every row (x-vector only, text in the prefill, silence appended)
would not match the reference side.

**transformers 5 adapters.** The package was written against transformers 4 and three of its calls
fail on the pinned transformers 5.16.1 (``benchmarks/probe_faster_qwen3_tts_batch.py`` shows each
failing line). The engine adapts exactly those calls and nothing else:

- ``StaticLayer.lazy_initialization(keys)`` lost its one-argument form: the graphs' StaticCache
  layers are initialised beforehand with keys and values of the same shape, so the package's own
  initialisation finds them ready and skips;
- ``create_causal_mask(input_embeds=..., cache_position=...)`` lost both keywords (the query
  position now comes from the cache's own length): the graphs' mask calls go through
  :func:`mask_at_position`, which passes ``inputs_embeds`` and sets the cache's length to the
  requested position for the duration of the call, so transformers builds the mask the package
  asked for;
- ``DynamicCache[layer]`` is gone: the batched prefill's cache reaches the talker graph's KV copy
  as a list of (keys, values) per layer.

On a machine without CUDA the same modules run eagerly on the CPU (the side's ``device = "cpu"``,
or ``allow_cpu=True``); the package's graphs ask CUDA for a device index, so on the CPU they are
built for the device ``cpu:0``, which carries one.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch

from parity.engines.faster import (
    NUM_SUB_STEPS,
    EagerReplay,
    FasterEngine,
    GraphTaps,
    ProbeCoverageError,
    _check_stale,
    _cpu_sync_shim,
)
from parity.engines.reference import tf32_mode
from parity.errors import BadInput
from parity.prompts import Prompt
from parity.recipe import Decoding, Side
from parity.trace import FLOAT_FIELDS, Trace

ADAPTERS = ("static-cache layers initialised with keys and values", "causal masks at the requested cache position",
            "prefill KV cache passed as (keys, values) per layer")


def _rows_last(x) -> torch.Tensor:
    """Every row's last-position output: [rows, hidden] (or [rows, vocab])."""
    t = x[0] if isinstance(x, (tuple, list)) else x
    return t[:, -1] if t.dim() == 3 else t


class RowTaps(GraphTaps):
    """:class:`GraphTaps` with a row axis: slots [points, rows, hidden], filled inside the graphs.

    The batched prefill is eager and may hold fewer rows than the graphs (a batch smaller than the
    engine's batch size): its gather writes the first rows only."""

    def __init__(self, talker, dtype: torch.dtype, device, rows: int):
        super().__init__(talker, dtype, device)
        self.rows = rows
        h, hp, vp = talker.config.hidden_size, self.pred.config.hidden_size, self.pred.config.vocab_size
        self.talker_slots = torch.zeros((self.n_t + 1, rows, h), dtype=dtype, device=device)
        self.pred_slots = torch.zeros((NUM_SUB_STEPS * (self.n_p + 1), rows, hp), dtype=dtype, device=device)
        self.pred_logit_slots = torch.zeros((NUM_SUB_STEPS, rows, vp), dtype=dtype, device=device)

    _pick = staticmethod(_rows_last)

    def _write_talker(self) -> None:
        n = self._talker_held[0].shape[0]
        if n == self.rows:
            torch.stack(self._talker_held, out=self.talker_slots)
        else:  # the eager prefill of a smaller batch
            self.talker_slots[:, :n].copy_(torch.stack(self._talker_held))


class RowForcingSampler:
    """Wraps the batched predictor graph's ``batched_sample_logits``: keeps every row's own choice
    for each of the 15 call sites in a device buffer and returns, per row, the forced code where
    that row's flag is on. The call-site index is a Python int, baked per call site in a capture."""

    def __init__(self, original, n_slots: int, rows: int, device):
        self.original = original
        self.own = torch.zeros((n_slots, rows), dtype=torch.long, device=device)
        self.forced = torch.zeros((n_slots, rows), dtype=torch.long, device=device)
        self.flag = torch.zeros(rows, dtype=torch.bool, device=device)
        self.index = 0
        self.n_slots = n_slots

    def __call__(self, logits, **kwargs):
        own = self.original(logits, **kwargs)
        i = self.index
        self.own[i].copy_(own)
        out = torch.where(self.flag, self.forced[i], own)
        self.index = (i + 1) % self.n_slots
        return out


def mask_at_position(mask_fn):
    """``mask_fn`` (transformers 5's ``create_causal_mask`` or its sliding-window sibling) callable
    the transformers 4 way the package calls it: ``input_embeds`` and ``cache_position``. transformers
    5 reads the query position from the cache's length, so the cache's static layers are set to
    ``cache_position[0]`` for the call and restored after it."""

    def call(config, input_embeds, attention_mask, cache_position, past_key_values, **kwargs):
        layers = [layer for layer in past_key_values.layers if getattr(layer, "is_initialized", False)]
        saved = [layer.cumulative_length.clone() for layer in layers]
        for layer in layers:
            layer.cumulative_length.fill_(int(cache_position[0]))
        try:
            return mask_fn(config, inputs_embeds=input_embeds, attention_mask=attention_mask,
                           past_key_values=past_key_values, **kwargs)
        finally:
            for layer, length in zip(layers, saved):
                layer.cumulative_length.copy_(length)

    return call


def _init_static_layers(cache, rows: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device) -> None:
    """Allocate a StaticCache's layers for ``rows`` rows the transformers 5 way (keys and values)."""
    dummy = torch.zeros(rows, kv_heads, 1, head_dim, dtype=dtype, device=device)
    for layer in cache.layers:
        if not layer.is_initialized:
            layer.lazy_initialization(dummy, dummy)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@contextlib.contextmanager
def _predictor_masks_adapted():
    """The predictor graph builds its masks with module-level functions: adapt them while it does."""
    import faster_qwen3_tts_batch.batched_predictor_graph as bpg

    saved = bpg.create_causal_mask, bpg.create_sliding_window_causal_mask
    bpg.create_causal_mask, bpg.create_sliding_window_causal_mask = (mask_at_position(f) for f in saved)
    try:
        yield
    finally:
        bpg.create_causal_mask, bpg.create_sliding_window_causal_mask = saved


def build_batched(base, rows: int, max_seq_len: int):
    """``BatchedFasterQwen3TTS(base, rows, max_seq_len)`` with the transformers 5 adapters installed
    (on the CPU its graphs are built for ``cpu:0``: they ask CUDA for the index of a plain device)."""
    from faster_qwen3_tts_batch import BatchedFasterQwen3TTS

    device = base.device
    if str(device) == "cpu":
        base.device = "cpu:0"
    try:
        batched = BatchedFasterQwen3TTS(base, max_batch_size=rows, max_seq_len=max_seq_len)
    finally:
        base.device = device
    pg, tg = batched.batched_predictor_graph, batched.batched_talker_graph
    pconf = pg.pred_model.config
    _init_static_layers(pg.static_cache, rows, getattr(pconf, "num_key_value_heads", pconf.num_attention_heads),
                        _head_dim(pconf), pg.dtype, pg.device)
    _init_static_layers(tg.static_cache, rows, tg._num_kv_heads, tg._head_dim, tg.dtype, tg.device)
    tg._mask_fn = mask_at_position(tg._mask_fn)
    copy_kv = tg.prefill_kv_batched
    tg.prefill_kv_batched = lambda cache, length, n_rows: copy_kv(
        [(layer.keys, layer.values) for layer in cache.layers], length, n_rows)
    return batched


class FasterBatchEngine(FasterEngine):
    """faster-qwen3-tts-batch 0.2.0: batches of up to ``side.batch`` voice-clone prompts, with
    per-row taps inside its batched graphs and per-row teacher forcing. ``run`` is a batch of one."""

    name = "faster-qwen3-tts-batch"
    variant_family = None

    def __init__(self, side: Side, model_dir: Path | str, allow_cpu: bool = False, cuda_graphs: bool = True, record: bool = True):
        if side.device == "cpu":
            allow_cpu = True
        elif side.device == "cuda" and not torch.cuda.is_available():
            raise BadInput("the faster-qwen3-tts-batch engine: device 'cuda' requested but no CUDA GPU is visible; "
                           "use device = \"cpu\" (its modules then run eagerly, without graphs)")
        if not torch.cuda.is_available() and not allow_cpu:
            raise BadInput("the faster-qwen3-tts-batch engine needs a CUDA GPU and none is visible; set device = \"cpu\" on "
                           "its side to run its modules eagerly on the CPU (e.g. recipes/faster-qwen3-tts-batch-cpu.toml)")
        super().__init__(side, model_dir, allow_cpu=True, cuda_graphs=cuda_graphs, record=record)
        if side.device == "cpu":
            self.device = torch.device("cpu")
            self.cuda_graphs = False
        self.rows = side.batch
        self.batched = None

    # -- lifecycle ---------------------------------------------------------------------
    def load(self) -> None:
        dtype, max_seq_len = self._open_tts()
        kind = self.tts.model.model.tts_model_type
        if kind != "base":
            raise BadInput(f"the faster-qwen3-tts-batch engine batches voice cloning only (its batch API is "
                           f"generate_voice_clone_batch); this checkpoint is '{kind}': use a base model such as random:tiny-base")
        self.batched = build_batched(self.tts, self.rows, max_seq_len)
        talker = self.tts.model.model.talker
        if self.with_taps:
            self.taps = RowTaps(talker, dtype, self.device, self.rows)
            self.taps.attach()
        import faster_qwen3_tts_batch.batched_predictor_graph as bpg

        self.pred_sampler = RowForcingSampler(bpg.batched_sample_logits, NUM_SUB_STEPS, self.rows, self.device)

    @contextlib.contextmanager
    def _sampler_installed(self):
        """The batched predictor graph calls its module-level ``batched_sample_logits``: point it at
        the per-row forcing wrapper while capturing and while running."""
        import faster_qwen3_tts_batch.batched_predictor_graph as bpg

        previous = bpg.batched_sample_logits
        bpg.batched_sample_logits = self.pred_sampler
        try:
            yield
        finally:
            bpg.batched_sample_logits = previous

    def close(self) -> None:
        self.batched = None
        super().close()

    def describe(self) -> dict:
        return {**super().describe(), "max_batch_size": self.rows, "transformers5_adapters": list(ADAPTERS)}

    # -- preparation -------------------------------------------------------------------
    def _ensure_captured(self, decoding: Decoding, prefill_len: int) -> None:
        """Sampling settings are baked into the predictor graph: set them, then capture both batched
        graphs once (the package's own ``capture``; eagerly its first steps, then replayed)."""
        key = (decoding.do_sample, decoding.temperature, decoding.top_k, decoding.top_p)
        if self._captured_for is not None:
            if key != self._captured_for:
                raise BadInput("the faster-qwen3-tts-batch engine's predictor graph was captured with other sampling "
                               "settings; use one decoding per run")
            return
        pg, tg = self.batched.batched_predictor_graph, self.batched.batched_talker_graph
        pg.do_sample, pg.temperature, pg.top_k, pg.top_p = key
        self.pred_sampler.index = 0
        # The package prints its capture progress: keep it off parity's console.
        with _cpu_sync_shim(self.device), self._sampler_installed(), _predictor_masks_adapted(), \
                contextlib.redirect_stdout(io.StringIO()):
            if self.cuda_graphs:
                pg.capture(num_warmup=3)
                tg.capture(prefill_len=prefill_len, num_warmup=3)
            else:
                _eager_setup(pg, tg, prefill_len)
        self.pred_sampler.index = 0
        self._captured_for = key

    # -- running -----------------------------------------------------------------------
    def run(self, prompt: Prompt, decoding: Decoding, force: Trace | None = None, record: bool = True) -> Trace:
        return self.run_batch([prompt], decoding, [force] if force is not None else None, record)[0]

    @torch.inference_mode()
    def run_batch(self, prompts: list[Prompt], decoding: Decoding, forces: list[Trace | None] | None = None,
                  record: bool = True) -> list[Trace]:
        """Decode ``prompts`` as one left-padded batch through the package's loop and graphs; one trace
        per row. Row b is teacher-forced on ``forces[b]`` when given."""
        from faster_qwen3_tts_batch.batched_generate import batched_fast_generate

        if not 1 <= len(prompts) <= self.rows:
            raise BadInput(f"the faster-qwen3-tts-batch engine was built for batches of up to {self.rows} rows, got {len(prompts)}")
        forces = forces or [None] * len(prompts)
        prepared, clips = [], []
        for prompt, force in zip(prompts, forces):
            m, talker, config, tie, tam, tth, tpe = self._prepare(prompt, force)
            prepared.append((tie, tam, tth))
            clips.append(self.clip or {})
        lengths = [int(tie.shape[1]) for tie, _, _ in prepared]
        padded_len = max(lengths)
        self._ensure_captured(decoding, padded_len)
        if decoding.do_sample:
            torch.manual_seed(decoding.seed)
        record = record and self.taps is not None
        rows = _RowRecorder(self, record, forces, decoding, int(config.codec_eos_token_id))
        with rows.installed(), self._sampler_installed(), tf32_mode(self.side.tf32), _cpu_sync_shim(self.device):
            results = batched_fast_generate(
                talker=talker, talker_input_embeds_list=[p[0] for p in prepared], attention_mask_list=[p[1] for p in prepared],
                trailing_text_hiddens_list=[p[2] for p in prepared], tts_pad_embed=tpe, config=config,
                predictor_graph=self.batched.batched_predictor_graph, talker_graph=self.batched.batched_talker_graph,
                max_new_tokens=max(rows.stop_at), min_new_tokens=2, temperature=decoding.temperature, top_k=decoding.top_k,
                top_p=decoding.top_p, do_sample=decoding.do_sample, repetition_penalty=decoding.repetition_penalty,
            )
        if record:
            self.taps.check_coverage()
        traces = []
        for b, (prompt, force, (codec_ids, timing)) in enumerate(zip(prompts, forces, results)):
            codes = codec_ids.cpu() if codec_ids is not None else torch.zeros(0, NUM_SUB_STEPS + 1, dtype=torch.long)
            tensors = rows.assemble(b, len(codes))
            meta = {
                "prompt_id": prompt.id, "engine": self.name, "side": self.describe(), "forced": force is not None,
                "recorded": record, "prefill_len": lengths[b], "eos_token_id": int(config.codec_eos_token_id),
                "max_frames": decoding.max_frames, "hit_max_frames": rows.hit_max[b],
                "n_talker_layers": len(talker.model.layers), "n_predictor_layers": len(talker.code_predictor.model.layers),
                "layout": self.layout().to_json(), "suppress_from": max(0, config.vocab_size - 1024), "timing": timing,
                "sampling": "seeded" if decoding.do_sample else "greedy",
            }
            if len(prompts) > 1:
                meta["batch"] = {"size": len(prompts), "row": b, "pad": padded_len - lengths[b], "padded_len": padded_len,
                                 "mates": [p.id for p in prompts]}
            traces.append(Trace(codes=codes, **tensors, meta=meta, **clips[b]))
        return traces


class _RowRecorder:
    """Per-batch bookkeeping around the package's loop: every row's token choice, forcing and stop
    at the talker's eager sampling call; forced codes before, and slot snapshots after, each graph
    replay (snapshots hold every row; each row keeps its own steps when assembled)."""

    def __init__(self, engine: FasterBatchEngine, record: bool, forces: list[Trace | None], decoding: Decoding, eos: int):
        self.e = engine
        self.record = record
        self.forces = forces
        self.eos = eos
        n = len(forces)
        # The last token index each row records: a forced row's own last step, else max_frames (its
        # token there is chosen but never consumed, as in the faster engine).
        self.stop_at = [f.n_steps - 1 if f is not None else decoding.max_frames for f in forces]
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.choices: list[list[int]] = [[] for _ in range(n)]
        self.done = [False] * n
        self.hit_max = [False] * n
        self.talker_hidden: list[torch.Tensor] = []
        self.pred_hidden: list[torch.Tensor] = []
        self.pred_logits: list[torch.Tensor] = []
        self.pred_choice: list[torch.Tensor] = []
        self.frame = 0

    def _talker_sample(self, original):
        def sample(logits, **kwargs):
            own = original(logits, **kwargs)
            fed = own.clone()
            chosen = own.tolist()
            for b, force in enumerate(self.forces):
                if self.done[b]:
                    fed[b] = self.eos
                    continue
                step = len(self.tokens[b])
                token = int(force.talker_tokens[step]) if force is not None else chosen[b]
                self.choices[b].append(chosen[b])
                self.tokens[b].append(token)
                if step == self.stop_at[b]:
                    self.done[b] = True
                    self.hit_max[b] = bool(force.meta.get("hit_max_frames")) if force is not None else token != self.eos
                    fed[b] = self.eos  # ends the row here; its last token is never consumed
                elif token == self.eos:
                    self.done[b] = True
                    fed[b] = self.eos
                else:
                    fed[b] = token
            return fed

        return sample

    @contextlib.contextmanager
    def installed(self):
        e = self.e
        talker = e.tts.model.model.talker
        pg, tg = e.batched.batched_predictor_graph, e.batched.batched_talker_graph
        taps, ps = e.taps, e.pred_sampler
        ps.flag.zero_()
        ps.flag[: len(self.forces)] = torch.tensor([f is not None for f in self.forces], device=ps.flag.device)
        ps.index = 0
        if taps is not None:
            taps.talker_logits = []
            taps.enabled_talker_logits = self.record
        import faster_qwen3_tts_batch.batched_generate as gen

        orig_forward, orig_pred_run, orig_talker_run = talker.forward, pg.run, tg.run
        orig_sample = gen.batched_sample_logits

        def prefill(*args, **kwargs):
            out = orig_forward(*args, **kwargs)
            if self.record:
                self.talker_hidden.append(taps.talker_slots.clone())
            return out

        def pred_run(pred_input):
            for b, force in enumerate(self.forces):
                if force is not None and self.frame < force.n_frames:
                    ps.forced[:, b].copy_(force.codes[self.frame, 1:].to(ps.forced.device))
            out = orig_pred_run(pred_input)
            self.pred_choice.append(ps.own.clone())
            if self.record:
                self.pred_hidden.append(taps.pred_slots.clone())
                self.pred_logits.append(taps.pred_logit_slots.clone())
            self.frame += 1
            return out

        def talker_run(input_embeds, position):
            out = orig_talker_run(input_embeds, position)
            if self.record:
                self.talker_hidden.append(taps.talker_slots.clone())
            return out

        talker.forward = prefill
        pg.run = pred_run
        tg.run = talker_run
        gen.batched_sample_logits = self._talker_sample(orig_sample)
        try:
            yield
        finally:
            del talker.forward
            del pg.run
            del tg.run
            gen.batched_sample_logits = orig_sample
            if taps is not None:
                taps.enabled_talker_logits = False

    def assemble(self, row: int, n_frames: int) -> dict[str, torch.Tensor]:
        """Row ``row``'s tensors: its own steps and frames out of the batch-wide snapshots."""
        n_steps = len(self.tokens[row])
        pred_choice = (torch.stack([c[:, row] for c in self.pred_choice[:n_frames]]).cpu()
                       if n_frames else torch.zeros(0, NUM_SUB_STEPS, dtype=torch.long))
        out = {
            "talker_tokens": torch.tensor(self.tokens[row], dtype=torch.long),
            "talker_choice": torch.tensor(self.choices[row], dtype=torch.long),
            "pred_choice": pred_choice,
        }
        if not self.record:
            return {**out, **{k: torch.zeros(0) for k in FLOAT_FIELDS}}
        taps = self.e.taps
        if len(self.talker_hidden) < n_steps or len(taps.talker_logits) < n_steps or len(self.pred_hidden) < n_frames:
            raise ProbeCoverageError(
                f"taps: {len(self.talker_hidden)} talker snapshots and {len(taps.talker_logits)} logits for row {row}'s "
                f"{n_steps} steps, {len(self.pred_hidden)} predictor snapshots for its {n_frames} frames"
            )
        talker_hidden = torch.stack([s[:, row] for s in self.talker_hidden[:n_steps]]).float().cpu()
        talker_logits = torch.stack([s[row] for s in taps.talker_logits[:n_steps]]).cpu()
        n_points = taps.n_p + 1
        if n_frames:
            pred_hidden = torch.stack([s[:, row] for s in self.pred_hidden[:n_frames]]).float().cpu().view(
                n_frames, NUM_SUB_STEPS, n_points, -1)
            pred_logits = torch.stack([s[:, row] for s in self.pred_logits[:n_frames]]).float().cpu()
        else:
            pred_hidden, pred_logits = torch.zeros(0), torch.zeros(0)
        _check_stale(talker_hidden, "talker")
        if n_frames:
            _check_stale(pred_hidden.flatten(0, 1), "predictor")
        return {**out, "talker_hidden": talker_hidden, "talker_logits": talker_logits,
                "pred_hidden": pred_hidden, "pred_logits": pred_logits}


def _eager_setup(pg, tg, prefill_len: int) -> None:
    """Graphs off: the set-up each ``capture`` does before capturing, then eager replays."""
    pg._init_cache_layers()
    pg._build_attention_masks()
    pg.graph, pg.captured = EagerReplay(pg._full_loop), True
    tg._init_cache_layers()
    tg._attention_mask_2d.fill_(1)
    tg.cache_position[0] = prefill_len
    tg.attn_mask = tg._mask_fn(config=tg.model.config, input_embeds=tg.input_buf, attention_mask=tg._attention_mask_2d,
                               cache_position=tg.cache_position, past_key_values=tg.static_cache).clone()
    tg.graph, tg.captured = EagerReplay(tg._decode_step), True
