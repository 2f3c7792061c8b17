"""Model sources: hub ids, local checkpoint directories and built-in random-weight checkpoints.

Built-ins (``random:tiny``, ``random:0.6b``: CustomVoice models with preset speakers;
``random:tiny-base``, ``random:0.6b-base``: Base models for voice cloning, with the speaker
encoder and the codec's encoder; ``random:tiny-design``: a VoiceDesign model driven by
``instruct``) are made deterministically from a seed, saved once to a cache directory and then loaded through the same public ``Qwen3TTSModel.from_pretrained`` path
as any real checkpoint, so the loading code that users rely on is the code the tests run.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from parity.errors import BadInput

# Files a Qwen3-TTS checkpoint directory must have for `Qwen3TTSModel.from_pretrained`.
REQUIRED_FILES = ("config.json", "generation_config.json", "speech_tokenizer/config.json")
BUILTIN_PREFIX = "random:"
CHECKPOINT_FORMAT = 1  # bump when the built-in recipe changes, so stale caches are rebuilt


@dataclass(frozen=True)
class RandomSpec:
    """Dimensions of a built-in random-weight checkpoint."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    mrope_section: tuple[int, int, int]
    text_vocab: int
    text_hidden: int
    codebook: int
    predictor_layers: int
    decoder_hidden: int
    decoder_layers: int
    decoder_latent: int
    decoder_dim: int
    decoder_intermediate: int
    decoder_heads: int
    codebook_dim: int
    model_type: str = "custom_voice"  # custom_voice (preset speakers), base (voice clone), voice_design
    # Speaker encoder (ECAPA-TDNN, base models only); its embedding width is the talker's hidden size.
    speaker_channels: tuple[int, ...] = (512, 512, 512, 512, 1536)
    speaker_attention: int = 128
    speaker_scale: int = 8
    speaker_se: int = 128
    size_tag: str = ""  # config's tts_model_size (the package reads it to decide whether instruct is used)


_BUILTINS: dict[str, RandomSpec] = {
    # Small enough to build and generate a few dozen frames in about a second on a CPU.
    "tiny": RandomSpec(
        name="tiny", hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128,
        mrope_section=(4, 2, 2), text_vocab=512, text_hidden=64, codebook=256,
        predictor_layers=2, decoder_hidden=32, decoder_layers=2, decoder_latent=32,
        decoder_dim=32, decoder_intermediate=64, decoder_heads=2, codebook_dim=32,
    ),
    # The public Qwen3-TTS-12Hz-0.6B dimensions (not the package defaults).
    "0.6b": RandomSpec(
        name="0.6b", hidden=1024, layers=28, heads=16, kv_heads=8, head_dim=128, intermediate=3072,
        mrope_section=(24, 20, 20), text_vocab=151936, text_hidden=2048, codebook=2048,
        predictor_layers=5, decoder_hidden=512, decoder_layers=8, decoder_latent=1024,
        decoder_dim=1536, decoder_intermediate=1024, decoder_heads=16, codebook_dim=512, size_tag="0b6",
    ),
}
_TINY_SPEAKER = dict(speaker_channels=(32, 32, 32, 32, 96), speaker_attention=16, speaker_scale=4, speaker_se=16)
BUILTINS: dict[str, RandomSpec] = {
    **_BUILTINS,
    # Base (voice-clone) models: speaker encoder + codec encoder; prompts carry ref_audio (+ ref_text for ICL).
    "tiny-base": replace(_BUILTINS["tiny"], name="tiny-base", model_type="base", size_tag="tiny", **_TINY_SPEAKER),
    "0.6b-base": replace(_BUILTINS["0.6b"], name="0.6b-base", model_type="base"),
    # VoiceDesign: the voice is described by the prompt's instruct (the public model is 1.7B; tiny dims here).
    "tiny-design": replace(_BUILTINS["tiny"], name="tiny-design", model_type="voice_design", size_tag="tiny"),
}
ALIASES = {"tiny": "random:tiny", "tiny-0.6b-dims": "random:0.6b", "random:0.6b-dims": "random:0.6b"}

SPEAKERS = ("vivian", "ryan")
LANGUAGES = ("english", "chinese")
SPECIAL_TEXT_TOKENS = (
    "<|im_start|>", "<|im_end|>", "<|tts_pad|>", "<|tts_text_bos|>", "<|tts_text_eod|>", "<|endoftext|>",
)


def cache_root() -> Path:
    """Where built-in checkpoints live: $PARITY_CACHE, else the user cache directory."""
    env = os.environ.get("PARITY_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("parity"))


def resolve_model(source: str, seed: int = 0) -> Path | str:
    """Turn a ``--model`` value into something ``from_pretrained`` accepts.

    Built-ins become a cached local directory (built on first use); local directories are
    checked for the files a checkpoint needs; anything else is passed on as a hub id.
    """
    source = ALIASES.get(source, source)
    if source.startswith(BUILTIN_PREFIX):
        name = source[len(BUILTIN_PREFIX):]
        if name not in BUILTINS:
            raise BadInput(
                f"unknown built-in model '{source}'; available: "
                + ", ".join(BUILTIN_PREFIX + n for n in BUILTINS)
            )
        return ensure_builtin(name, seed)
    path = Path(source).expanduser()
    if path.exists() or source.startswith((".", "/", "~")):
        if not path.is_dir():
            raise BadInput(f"model path '{source}' is not a directory; pass a checkpoint directory, a hub id or random:tiny")
        missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
        if missing:
            raise BadInput(
                f"model directory '{source}' lacks {', '.join(missing)}; a Qwen3-TTS checkpoint needs "
                + ", ".join(REQUIRED_FILES)
            )
        return path
    if source.count("/") != 1:
        raise BadInput(f"model '{source}' is neither a directory nor a hub id (owner/name) nor a built-in (random:tiny, random:0.6b)")
    return source


def ensure_builtin(name: str, seed: int = 0) -> Path:
    """Return the cached directory of built-in ``name``, building it atomically if absent."""
    root = cache_root()
    target = root / f"random-{name}-seed{seed}-v{CHECKPOINT_FORMAT}"
    if builtin_intact(target):
        return target
    _check_cache_dir(root)
    if target.exists():  # a damaged built-in (ours, in our cache): rebuilt, never "re-download"
        shutil.rmtree(target, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build_random_checkpoint(BUILTINS[name], tmp, seed)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race, or a stale partial dir is in the way
            if all((target / f).is_file() for f in REQUIRED_FILES):
                return target
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def builtin_intact(target: Path) -> bool:
    """A built-in in the cache is usable: every required file, parseable configs and readable
    safetensors headers (a truncated or edited file makes it be rebuilt)."""
    try:
        if not all((target / f).is_file() for f in REQUIRED_FILES):
            return False
        for f in REQUIRED_FILES:
            if not isinstance(json.loads((target / f).read_text(encoding="utf-8")), dict):
                return False
        from safetensors import safe_open

        weights = sorted(target.glob("*.safetensors")) + sorted((target / "speech_tokenizer").glob("*.safetensors"))
        if len(weights) < 2:
            return False
        for w in weights:
            with safe_open(str(w), "pt") as f:
                keys = list(f.keys())
                if not keys:
                    return False
                f.get_slice(keys[-1]).get_shape()
            header_end = 8 + int.from_bytes(w.open("rb").read(8), "little")
            if w.stat().st_size < header_end:
                return False
        return True
    except Exception:  # unreadable in any way: not intact
        return False


def _check_cache_dir(root: Path) -> None:
    """The cache directory must be a writable directory (or creatable): one line otherwise."""
    where = "PARITY_CACHE" if os.environ.get("PARITY_CACHE") else "the cache directory"
    try:
        if root.exists() and not root.is_dir():
            raise BadInput(f"{where} '{root}' is a file, not a directory; point PARITY_CACHE at a directory")
        root.mkdir(parents=True, exist_ok=True)
        probe = Path(tempfile.mkdtemp(prefix=".write-test-", dir=root))
        probe.rmdir()
    except OSError as e:
        raise BadInput(f"{where} '{root}' is not writable ({e.strerror or e}); point PARITY_CACHE at a writable "
                       "directory") from None


def _codec_ids(codebook: int, speakers: tuple[str, ...] = SPEAKERS) -> dict:
    """Special codec ids, all in the top 1024 block of the talker vocabulary (generate suppresses
    that block except EOS, so specials must live there). Base and VoiceDesign models have no
    preset speakers."""
    base = codebook
    return {
        "codec_pad_id": base + 100, "codec_bos_id": base + 101, "codec_eos_token_id": base + 102,
        "codec_think_id": base + 106, "codec_nothink_id": base + 107,
        "codec_think_bos_id": base + 108, "codec_think_eos_id": base + 109,
        "codec_language_id": {lang: base + 200 + i for i, lang in enumerate(LANGUAGES)},
        "spk_id": {spk: base + 300 + i for i, spk in enumerate(speakers)},
        "spk_is_dialect": {spk: False for spk in speakers},
    }


def _bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte-level alphabet: printable bytes map to themselves, the rest to 256+."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _write_text_tokenizer(out: Path) -> dict[str, int]:
    """A byte-level Qwen2 tokenizer: 256 byte tokens, merges making `assistant` one token (generate
    slices the prompt by token position), and the chat/TTS specials. Returns the special ids."""
    from transformers import Qwen2Tokenizer

    byte_chars = list(_bytes_to_unicode().values())
    vocab = {ch: i for i, ch in enumerate(byte_chars)}
    merges, word = [], "assistant"
    prefix = word[0]
    for ch in word[1:]:
        merges.append(f"{prefix} {ch}")
        prefix += ch
        vocab.setdefault(prefix, len(vocab))
    for special in SPECIAL_TEXT_TOKENS:
        vocab[special] = len(vocab)
    tok = Qwen2Tokenizer(
        vocab=vocab, merges=[tuple(m.split(" ")) for m in merges],
        unk_token=None, bos_token=None, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
    )
    tok.add_special_tokens({"additional_special_tokens": [t for t in SPECIAL_TEXT_TOKENS if t != "<|endoftext|>"]})
    from qwen_tts.core.models import Qwen3TTSProcessor

    Qwen3TTSProcessor(tokenizer=tok).save_pretrained(str(out))
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TEXT_TOKENS}
    assert len(tok("assistant")["input_ids"]) == 1, "byte tokenizer must keep 'assistant' whole"
    return ids


def _config_dict(spec: RandomSpec, text_ids: dict[str, int]) -> dict:
    predictor = {
        "vocab_size": spec.codebook, "hidden_size": spec.hidden, "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.predictor_layers, "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads, "head_dim": spec.head_dim, "num_code_groups": 16,
        "max_position_embeddings": 65536, "rope_theta": 1000000, "rms_norm_eps": 1e-6,
        "layer_types": ["full_attention"] * spec.predictor_layers, "use_sliding_window": False,
    }
    talker = {
        "code_predictor_config": predictor, "vocab_size": spec.codebook + 1024,
        "hidden_size": spec.hidden, "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers, "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads, "head_dim": spec.head_dim, "num_code_groups": 16,
        "text_hidden_size": spec.text_hidden, "text_vocab_size": spec.text_vocab,
        "max_position_embeddings": 32768, "rope_theta": 1000000, "rms_norm_eps": 1e-6,
        "rope_scaling": {"interleaved": True, "mrope_section": list(spec.mrope_section), "rope_type": "default"},
        "hidden_act": "silu", "position_id_per_seconds": 13,
        **_codec_ids(spec.codebook, SPEAKERS if spec.model_type == "custom_voice" else ()),
    }
    speaker_encoder = {}
    if spec.model_type == "base":
        speaker_encoder = {
            "mel_dim": 128, "enc_dim": spec.hidden, "enc_channels": list(spec.speaker_channels),
            "enc_kernel_sizes": [5, 3, 3, 3, 1], "enc_dilations": [1, 2, 3, 4, 1],
            "enc_attention_channels": spec.speaker_attention, "enc_res2net_scale": spec.speaker_scale,
            "enc_se_channels": spec.speaker_se, "sample_rate": 24000,
        }
    return {
        "architectures": ["Qwen3TTSForConditionalGeneration"], "model_type": "qwen3_tts",
        "talker_config": talker, "speaker_encoder_config": speaker_encoder,
        "tokenizer_type": "qwen3_tts_tokenizer_12hz", "tts_model_size": spec.size_tag or spec.name,
        "tts_model_type": spec.model_type,
        "im_start_token_id": text_ids["<|im_start|>"], "im_end_token_id": text_ids["<|im_end|>"],
        "tts_pad_token_id": text_ids["<|tts_pad|>"], "tts_bos_token_id": text_ids["<|tts_text_bos|>"],
        "tts_eos_token_id": text_ids["<|tts_text_eod|>"], "dtype": "bfloat16",
    }


def _round_to_bf16(module) -> None:
    """Real checkpoints are stored in bf16: keep every weight bf16-representable."""
    import torch

    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.to(torch.bfloat16).to(p.dtype))


def _build_speech_tokenizer(spec: RandomSpec, out: Path, seed: int) -> None:
    import torch
    from qwen_tts.core import Qwen3TTSTokenizerV2Config, Qwen3TTSTokenizerV2Model
    from transformers import EncodecFeatureExtractor

    decoder = {
        "codebook_size": spec.codebook, "hidden_size": spec.decoder_hidden, "latent_dim": spec.decoder_latent,
        "num_attention_heads": spec.decoder_heads, "num_key_value_heads": spec.decoder_heads,
        "intermediate_size": spec.decoder_intermediate, "num_hidden_layers": spec.decoder_layers,
        "num_quantizers": 16, "decoder_dim": spec.decoder_dim, "codebook_dim": spec.codebook_dim,
        "upsample_rates": [8, 5, 4, 3], "upsampling_ratios": [2, 2], "sliding_window": 72,
        "max_position_embeddings": 8000,
    }
    # The encoder (Mimi) is only used for voice-clone references; keep it small at any size.
    encoder = {
        "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
        "head_dim": 16, "intermediate_size": 64, "num_filters": 8, "codebook_size": spec.codebook,
        "codebook_dim": 32, "num_quantizers": 16, "num_semantic_quantizers": 1, "frame_rate": 12.5,
        "upsampling_ratios": [8, 6, 5, 4], "sampling_rate": 24000, "upsample_groups": 32,
    }
    if spec.model_type == "base":  # the encoder runs (on the reference clip): quantise at the codebook's width
        encoder["vector_quantization_hidden_dimension"] = encoder["codebook_dim"]
    config = Qwen3TTSTokenizerV2Config(encoder_config=encoder, decoder_config=decoder)
    torch.manual_seed(seed + 1)
    model = Qwen3TTSTokenizerV2Model(config).eval()
    with torch.no_grad():
        for name, m in model.decoder.named_modules():
            if isinstance(m, (torch.nn.Conv1d, torch.nn.ConvTranspose1d)):
                fan_in = m.weight.shape[1] * m.weight.shape[2] if isinstance(m, torch.nn.Conv1d) else m.weight.shape[0] * m.weight.shape[2]
                m.weight.normal_(0.0, (1.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.zero_()
        for name, p in model.decoder.quantizer.named_parameters():
            if name.endswith("embedding_sum"):
                p.normal_(0.0, 1.0)
            elif name.endswith("cluster_usage"):
                p.fill_(1.0)
    if spec.model_type == "base":
        _init_encoder(model.encoder)
    _round_to_bf16(model)
    model.save_pretrained(str(out / "speech_tokenizer"))
    EncodecFeatureExtractor(feature_size=1, sampling_rate=24000).save_pretrained(str(out / "speech_tokenizer"))


def _init_encoder(encoder) -> None:
    """Make a random codec encoder give varied codes for an audible clip: fan-in scaled convolutions
    (activations keep their scale) and N(0, 1) codebooks (the default all-zero codebooks map every
    frame to code 0)."""
    import torch

    with torch.no_grad():
        for m in encoder.modules():
            if isinstance(m, torch.nn.Conv1d):
                m.weight.normal_(0.0, (1.0 / (m.weight.shape[1] * m.weight.shape[2])) ** 0.5)
                if m.bias is not None:
                    m.bias.zero_()
        for name, buf in list(encoder.named_buffers()) + list(encoder.named_parameters()):
            if name.endswith("embed_sum"):
                buf.normal_(0.0, 1.0)
            elif name.endswith("cluster_usage") or name.endswith("initialized"):
                buf.fill_(1)


def build_random_checkpoint(spec: RandomSpec, out: Path, seed: int = 0) -> Path:
    """Write a complete random-weight Qwen3-TTS checkpoint of ``spec``'s dimensions to ``out``."""
    import torch

    from parity.engines.reference import import_qwen_tts

    import_qwen_tts()
    from qwen_tts.core.models import Qwen3TTSConfig, Qwen3TTSForConditionalGeneration

    out.mkdir(parents=True, exist_ok=True)
    text_ids = _write_text_tokenizer(out)
    config_dict = _config_dict(spec, text_ids)
    torch.manual_seed(seed)
    model = Qwen3TTSForConditionalGeneration(Qwen3TTSConfig(**config_dict)).eval()
    _round_to_bf16(model)
    # Nothing is tied in this model; the package's list-valued _tied_weights_keys breaks saving.
    for m in model.modules():
        if isinstance(getattr(m, "_tied_weights_keys", None), list):
            m._tied_weights_keys = None
    model.save_pretrained(str(out), safe_serialization=True)
    # The auto-written config does not reload (speaker_encoder_config gains model_type ""):
    # write the dict ourselves.
    (out / "config.json").write_text(json.dumps(config_dict, indent=2))
    generation = {
        "do_sample": False, "top_k": 50, "top_p": 1.0, "temperature": 0.9, "repetition_penalty": 1.0,
        "subtalker_dosample": False, "subtalker_top_k": 50, "subtalker_top_p": 1.0,
        "subtalker_temperature": 0.9, "max_new_tokens": 2048,
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    _build_speech_tokenizer(spec, out, seed)
    (out / "PARITY_RANDOM.json").write_text(json.dumps({"spec": spec.name, "seed": seed, "format": CHECKPOINT_FORMAT}))
    return out
