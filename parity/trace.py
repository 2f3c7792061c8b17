"""The Trace: what one engine did on one prompt, point by point.

Layout (S talker steps, F frames, L talker layers, P predictor layers; S == F + 1):

- talker step 0 is the prefill (last prompt position), talker step s >= 1 consumes frame s-1;
  token 0 of frame s is chosen from talker step s's logits;
- frame s's codes 1..15 come from the 15 code-predictor sub-steps of frame s (sub-step 0 is the
  2-token prefill [talker hidden, codebook-0 embedding]);
- hidden points are ``embed`` (the input of layer 0) followed by each decoder layer's output, all
  at the last position;
- voice cloning: ``ref_codes`` [T, 16] is the reference clip as the engine's codec encoder coded
  it (ICL mode; empty otherwise) and ``ref_speaker`` [D] its speaker embedding (empty without a clip).

Tensors are saved with safetensors (never pickle); the rest goes into a small JSON file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

if TYPE_CHECKING:
    from parity.layout import TraceLayout

# Bump when what a saved trace means changes (fields, layout, storage): cached reference traces
# of another version are never reused.
TRACE_FORMAT_VERSION = 2
from parity import strictjson

TENSOR_FIELDS = (
    "talker_hidden", "talker_logits", "talker_tokens", "talker_choice",
    "codes", "pred_hidden", "pred_logits", "pred_choice",
)
# probes = "sublayers": each decoder layer's ops (parity.probes.SUBLAYER_POINTS) at the last position,
# concatenated per layer; meta["sublayers"] names the points and their widths. Empty otherwise.
SUBLAYER_FIELDS = ("talker_sub", "pred_sub")
CLIP_FIELDS = ("ref_codes", "ref_speaker")  # the reference clip's encoding (voice cloning); small, always kept

FLOAT_FIELDS = ("talker_hidden", "talker_logits", "pred_hidden", "pred_logits")
STORAGE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _narrow(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast to the side's own dtype only where that is exact (it always is for values recorded
    from that dtype; a variant that computes in fp32 on a bf16 side keeps fp32)."""
    if dtype == torch.float32 or t.numel() == 0:
        return t
    narrow = t.to(dtype)
    return narrow if torch.equal(narrow.float(), t) else t


@dataclass
class Trace:
    """Per-point record of one engine run on one prompt (see module docstring for the layout)."""

    talker_hidden: torch.Tensor  # [S, L+1, H] float32
    talker_logits: torch.Tensor  # [S, V] float32, raw codec_head output
    talker_tokens: torch.Tensor  # [S] long, the token-0 actually used (forced or chosen)
    talker_choice: torch.Tensor  # [S] long, the engine's own choice
    codes: torch.Tensor  # [F, 16] long, the codes actually used
    pred_hidden: torch.Tensor  # [F, 15, P+1, Hp] float32
    pred_logits: torch.Tensor  # [F, 15, Vp] float32
    pred_choice: torch.Tensor  # [F, 15] long, the engine's own choices
    meta: dict = field(default_factory=dict)
    ref_codes: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 16, dtype=torch.long))  # [T, 16]
    ref_speaker: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # [D] float32
    talker_sub: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # [S, L, sum(widths)] float32
    pred_sub: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # [F, 15, P, sum(widths)] float32

    @property
    def has_sublayers(self) -> bool:
        return self.talker_sub.numel() > 0 and isinstance(self.meta.get("sublayers"), dict)

    @property
    def n_frames(self) -> int:
        return int(self.codes.shape[0])

    @property
    def n_steps(self) -> int:
        return int(self.talker_tokens.shape[0])

    @property
    def layout(self) -> "TraceLayout":
        """The layout the engine declared (``meta["layout"]``), else read off the tensors' shapes."""
        from parity.layout import TraceLayout, qwen3_tts_layout

        if isinstance(self.meta.get("layout"), dict):
            return TraceLayout.from_json(self.meta["layout"])
        codebooks = int(self.codes.shape[1]) if self.codes.dim() == 2 and self.codes.shape[1] else int(self.pred_choice.shape[-1]) + 1
        talker_layers = int(self.talker_hidden.shape[1]) - 1 if self.talker_hidden.dim() == 3 else 0
        pred_layers = int(self.pred_hidden.shape[2]) - 1 if self.pred_hidden.dim() == 4 else 0
        return qwen3_tts_layout(talker_layers, pred_layers, codebooks)

    @property
    def forced(self) -> bool:
        return bool(self.meta.get("forced", False))

    def save(self, directory: str | Path, name: str, tokens_only: bool = False) -> None:
        """Write ``name.safetensors`` and ``name.json`` into ``directory`` atomically.

        Hidden states and logits of a bf16/fp16 side are stored in that dtype: they were recorded
        from it, so the cast is exact and halves the file. ``tokens_only`` keeps the tokens and
        codes and drops the per-layer tensors (for long runs where only the verdicts matter).
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        storage = STORAGE_DTYPES.get((self.meta.get("side") or {}).get("dtype"), torch.float32)
        tensors = {}
        for k in TENSOR_FIELDS:
            t = getattr(self, k)
            if k in FLOAT_FIELDS:
                t = torch.zeros(0) if tokens_only else _narrow(t, storage)
            tensors[k] = t.contiguous()
        for k in CLIP_FIELDS:
            tensors[k] = getattr(self, k).contiguous()
        for k in SUBLAYER_FIELDS:
            t = getattr(self, k)
            if t.numel() and not tokens_only:
                tensors[k] = _narrow(t, storage).contiguous()
        from parity.outdir import atomic_write_text, atomic_write_with

        atomic_write_with(directory / f"{name}.safetensors", lambda tmp: save_file(tensors, str(tmp)))
        meta = {**self.meta, "stored": "tokens" if tokens_only else "full"}
        atomic_write_text(directory / f"{name}.json", strictjson.dumps(meta, indent=1))

    @classmethod
    def load(cls, directory: str | Path, name: str) -> "Trace":
        """Read a trace written by :meth:`save`."""
        from parity import limits

        directory = Path(directory)
        tensors = load_file(str(directory / f"{name}.safetensors"))
        meta = limits.read_json(directory / f"{name}.json", "trace metadata")
        clip = {k: tensors[k] for k in CLIP_FIELDS if k in tensors}  # traces written before voice cloning lack them
        clip.update({k: tensors[k].float() for k in SUBLAYER_FIELDS if k in tensors})  # only with probes = "sublayers"
        return cls(**{k: tensors[k].float() if k in FLOAT_FIELDS else tensors[k] for k in TENSOR_FIELDS}, meta=meta, **clip)
