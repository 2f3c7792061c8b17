"""Checks that run before any model weights are loaded, so bad input fails in seconds with exit 2.

``parity run`` calls :func:`preflight` after reading the prompts and the recipe and before loading
either side. For a local checkpoint directory (built-ins included) it:

- reads ``config.json`` and refuses prompts whose speaker or language the checkpoint does not
  offer (``talker_config.spk_id`` / ``codec_language_id``, the same lists the package validates
  against when it is already too late);
- tokenizes each prompt with the checkpoint's own text tokenizer (``AutoTokenizer``, no remote
  code) and refuses a prompt whose prefill plus ``max_frames`` cannot fit a side's sequence limit
  (its StaticCache size, else the engine's default / the model's ``max_position_embeddings``);
- checks the weights strictly: the model is built on the ``meta`` device (no memory, no weights)
  and every tensor it expects must be in the checkpoint's safetensors files with the same shape.
  ``from_pretrained`` only warns about a missing tensor and initialises it randomly, which would
  make every comparison meaningless; a checkpoint without safetensors files (pickle) is refused.

A hub id is checked after the reference side loads it (the files only exist locally then):
:func:`check_loaded_checkpoint`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

from parity.errors import BadInput
from parity.prompts import Prompt, validate_choices
from parity.recipe import Recipe, Side

# The sequence limit an engine uses when a side has no static cache (faster-qwen3-tts sizes its
# StaticCache to 2048 by default); other engines fall back to the model's max_position_embeddings.
DEFAULT_MAX_SEQ_LEN = {"faster": 2048, "faster-qwen3-tts-batch": 2048}


def local_checkpoint(model_dir: Path | str) -> Path | None:
    """The checkpoint's local directory, or None for a hub id that is not downloaded yet."""
    path = Path(model_dir)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(model_dir), local_files_only=True))
    except Exception:  # not in the local cache (or not a valid repo id): nothing to check yet
        return None


def read_config(directory: Path, name: str = "config.json") -> dict:
    """A checkpoint's JSON config as a dict; unreadable or malformed JSON is BadInput."""
    from parity import limits

    path = directory / name
    if not path.exists():
        raise BadInput(f"model directory '{directory}' lacks {name}; pass a complete Qwen3-TTS checkpoint")
    fix = corrupt_advice(directory)
    try:
        data = limits.parse_json(limits.read_text(path, "config", limits.CONFIG_LIMIT), "JSON", fix)
    except BadInput as e:
        reason = str(e).split(";")[0].replace(f"config '{path}' ", "")
        raise BadInput(f"'{path}' is not a readable JSON config ({reason}); {fix}") from None
    if not isinstance(data, dict):
        raise BadInput(f"'{path}' must hold a JSON object; {fix}")
    limits.check_model_config(data, f"'{path}'")
    return data


def corrupt_advice(directory: Path) -> str:
    """How to fix a corrupt checkpoint: built-ins are rebuilt by parity, a hub download is deleted
    and fetched again, a local directory is the user's to replace (parity never deletes it)."""
    text = str(directory)
    if "/hub/models--" in text or "\\hub\\models--" in text:
        root = text.split("/snapshots/")[0]
        return f"delete the downloaded copy '{root}' and run again to download it afresh"
    return "replace or re-download this checkpoint"


GENERATION_FIELDS = {  # generation_config.json fields the engines read, with their JSON types
    "do_sample": bool, "top_k": int, "top_p": (int, float), "temperature": (int, float), "repetition_penalty": (int, float),
    "subtalker_dosample": bool, "subtalker_top_k": int, "subtalker_top_p": (int, float),
    "subtalker_temperature": (int, float), "max_new_tokens": int,
}


def check_generation_config(directory: Path) -> None:
    """generation_config.json must be a JSON object whose known fields have their types (a
    malformed one otherwise fails inside the first model load)."""
    data = read_config(directory, "generation_config.json")
    for key, typ in GENERATION_FIELDS.items():
        value = data.get(key)
        if value is None:
            continue
        bad = not isinstance(value, typ) or (typ is not bool and isinstance(value, bool))
        if not bad and isinstance(value, (int, float)) and not typ is bool:
            bad = not (0 <= value <= 1e9)
        if bad:
            raise BadInput(f"'{directory / 'generation_config.json'}': {key} = {str(value)[:40]!r} is not a valid "
                           f"{getattr(typ, '__name__', 'number')}; {corrupt_advice(directory)}")


def check_variant_layers(recipe: Recipe, config: dict) -> None:
    """A variant restricted to layers the model does not have (``@talker:99``) is refused before
    any side runs, with the layer counts the config gives."""
    from parity.variants import parse_spec

    talker = config.get("talker_config") if isinstance(config.get("talker_config"), dict) else {}
    predictor = talker.get("code_predictor_config") if isinstance(talker.get("code_predictor_config"), dict) else {}
    counts = {"talker": talker.get("num_hidden_layers"), "predictor": predictor.get("num_hidden_layers")}
    for role in ("reference", "candidate", "truth"):
        side = getattr(recipe, role, None)
        for text in (side.variants if side is not None else ()):
            spec = parse_spec(text)
            n = counts.get(spec.scope.component or "")
            if spec.scope.layers is None or not isinstance(n, int):
                continue
            if spec.scope.layers[1] > n:
                raise BadInput(f"[{role}] variant '{text}': the model's {spec.scope.component} has {n} layers (0-{n - 1}); "
                               f"pick layers in that range")


def fetch_hub_config(repo_id: str) -> dict:
    """A hub model's config.json, before anything large is downloaded, so it is bounded and
    checked first. Offline-aware: with HF_HUB_OFFLINE set only the local cache is read; an
    unreachable hub is one line, not minutes of retries."""
    import logging
    import os
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, hf_hub_download

    offline = bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    if not offline:
        host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
        try:
            socket.create_connection((host, 443), timeout=5).close()
        except OSError as e:
            raise BadInput(f"model '{repo_id}' is not downloaded and the hub ({host}) cannot be reached "
                           f"({getattr(e, 'strerror', None) or e}); connect to the network, or pass a local checkpoint "
                           "directory or random:tiny") from None
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # its retry warnings would break the one-line contract
    try:
        path = hf_hub_download(repo_id, "config.json", local_files_only=offline)
    except Exception as e:
        why = "it is not in the local hub cache and HF_HUB_OFFLINE is set" if offline else _one_line(e)
        raise BadInput(f"model '{repo_id}' cannot be fetched ({why}); check the id, download it first "
                       "(huggingface-cli download ID) or pass a local checkpoint directory") from None
    finally:
        hub_logger.setLevel(level)
    return read_config(Path(path).parent)


def speakers_and_languages(config: dict) -> tuple[set[str] | None, set[str] | None]:
    """What the checkpoint offers, exactly as ``qwen_tts`` computes it (languages add 'auto',
    dialect entries are not languages). None where the config does not say."""
    talker = config.get("talker_config")
    if not isinstance(talker, dict):
        return None, None
    spk = talker.get("spk_id")
    lang = talker.get("codec_language_id")
    speakers = set(spk) if isinstance(spk, dict) else None
    languages = {"auto"} | {k for k in lang if "dialect" not in k} if isinstance(lang, dict) else None
    return speakers, languages


def side_limit(side: Side, config: dict) -> tuple[int, str]:
    """(positions a side can hold, what sets that limit) for the prompt-length check."""
    if side.static_len is not None:
        return side.static_len, f"its cache static:{side.static_len}"
    if side.engine in DEFAULT_MAX_SEQ_LEN:
        n = DEFAULT_MAX_SEQ_LEN[side.engine]
        return n, f"the {side.engine} engine's default cache of {n}"
    n = (config.get("talker_config") or {}).get("max_position_embeddings")
    if isinstance(n, int) and n > 0:
        return n, f"the model's max_position_embeddings {n}"
    return 1 << 62, "no limit"


def prefill_lower_bound(tokenizer, prompt: Prompt, config: dict, clip=None) -> int:
    """Positions the prompt's prefill takes at least: the chat-wrapped text (and instruct, where the
    model uses it) as ``qwen_tts`` tokenizes them, plus a voice-clone reference clip's positions
    (``clip``: its :class:`parity.refclip.ClipInfo`); the codec prefix comes on top."""
    from parity.refclip import extra_prefill_positions

    n = len(tokenizer(f"<|im_start|>assistant\n{prompt.text}<|im_end|>\n<|im_start|>assistant\n")["input_ids"])
    if clip is not None and prompt.ref_text:
        ref_tokens = len(tokenizer(f"<|im_start|>assistant\n{prompt.ref_text}<|im_end|>\n")["input_ids"]) - 5
        n += extra_prefill_positions(prompt, clip, max(ref_tokens, 0))
    elif clip is not None:
        n += extra_prefill_positions(prompt, clip)
    kind, size = config.get("tts_model_type"), str(config.get("tts_model_size"))
    uses_instruct = kind == "voice_design" or (kind == "custom_voice" and size not in "0b6")  # as qwen_tts
    if prompt.instruct and uses_instruct:
        n += len(tokenizer(f"<|im_start|>user\n{prompt.instruct}<|im_end|>\n")["input_ids"])
    return n


def check_fit(prompts: Iterable[Prompt], directory: Path, config: dict, recipe: Recipe, path: Path | None,
              clips: dict | None = None) -> None:
    """Refuse the first prompt that cannot fit a side's sequence limit (tokenizer only, no model)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except Exception as e:
        raise BadInput(f"model directory '{directory}': its text tokenizer does not load ({_one_line(e)}); "
                       "re-download the checkpoint") from None
    frames = recipe.decoding.max_frames
    limits = [(role, *side_limit(side, config)) for role, side in (("reference", recipe.reference), ("candidate", recipe.candidate))]
    for prompt in prompts:
        need = prefill_lower_bound(tokenizer, prompt, config, (clips or {}).get(prompt.id)) + frames + 1
        for role, limit, why in limits:
            if need > limit:
                where = f"{path}:{prompt.line}" if path else f"line {prompt.line}"
                raise BadInput(
                    f"{where}: prompt {prompt.id} needs at least {need} positions ({need - frames - 1} prompt tokens "
                    f"+ {frames + 1} frames) but the {role} side holds {limit} ({why}); shorten the prompt, "
                    f"lower decoding.max_frames or raise {role}.cache"
                )


def _ignored(key: str, patterns: Iterable[str] | None) -> bool:
    return any(re.search(p, key) for p in patterns or ())


def check_weights(directory: Path, config_cls, model_cls, what: str) -> None:
    """Strict loading, checked before loading: the model built on the meta device must find every
    tensor it expects, with its shape, in ``directory``'s safetensors files."""
    import torch
    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt*")]
        extra = f" (found {', '.join(pickles[:3])}: pickle files are never loaded)" if pickles else ""
        raise BadInput(f"{what} '{directory}' has no .safetensors weights{extra}; convert the checkpoint to safetensors")
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        try:
            with safe_open(str(f), "pt") as sf:
                for key in sf.keys():
                    shapes[key] = tuple(sf.get_slice(key).get_shape())
        except Exception as e:
            raise BadInput(f"{what} weights '{f}' are unreadable ({_one_line(e)}); {corrupt_advice(directory)}") from None
    try:
        config = config_cls.from_pretrained(str(directory))
        with torch.device("meta"):
            model = model_cls(config)
    except Exception as e:
        raise BadInput(f"{what} '{directory}': config.json does not describe a model ({_one_line(e)}); "
                       f"{corrupt_advice(directory)}") from None
    ignore = getattr(model_cls, "_keys_to_ignore_on_load_missing", None)
    missing, wrong = [], []
    for key, tensor in model.state_dict().items():
        if _ignored(key, ignore):
            continue
        if key not in shapes:
            missing.append(key)
        elif tuple(tensor.shape) != shapes[key]:
            wrong.append(f"{key} {list(shapes[key])} (model expects {list(tensor.shape)})")
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise BadInput(f"{what} '{directory}' is missing {len(missing)} tensor(s): {', '.join(missing[:3])}{more}; "
                       "the checkpoint is incomplete or for another model (it would load with random weights)")
    if wrong:
        raise BadInput(f"{what} '{directory}' has tensor(s) of the wrong shape: {wrong[0]}"
                       + (f" and {len(wrong) - 1} more" if len(wrong) > 1 else "") + "; the checkpoint does not match its config.json")


def check_checkpoint(directory: Path, config: dict) -> None:
    """Strict weight checks for the talker checkpoint and its speech tokenizer."""
    from parity.engines.reference import import_qwen_tts

    import_qwen_tts()
    from qwen_tts.core import (
        Qwen3TTSTokenizerV1Config, Qwen3TTSTokenizerV1Model, Qwen3TTSTokenizerV2Config, Qwen3TTSTokenizerV2Model,
    )
    from qwen_tts.core.models import Qwen3TTSConfig, Qwen3TTSForConditionalGeneration

    if config.get("model_type") != "qwen3_tts":
        raise BadInput(f"model directory '{directory}' holds model_type {config.get('model_type')!r}, not qwen3_tts; "
                       "pass a Qwen3-TTS checkpoint")
    check_weights(directory, Qwen3TTSConfig, Qwen3TTSForConditionalGeneration, "checkpoint")
    tok_dir = directory / "speech_tokenizer"
    tok_type = read_config(tok_dir).get("model_type")  # read_config also bounds its dimensions
    classes = {
        "qwen3_tts_tokenizer_12hz": (Qwen3TTSTokenizerV2Config, Qwen3TTSTokenizerV2Model),
        "qwen3_tts_tokenizer_25hz": (Qwen3TTSTokenizerV1Config, Qwen3TTSTokenizerV1Model),
    }
    if tok_type not in classes:
        raise BadInput(f"'{tok_dir}/config.json' names model_type {tok_type!r}; expected one of {', '.join(classes)}")
    check_weights(tok_dir, *classes[tok_type], "speech tokenizer")


def preflight(prompts: list[Prompt], recipe: Recipe, model_dir: Path | str, prompts_path: Path | None = None) -> bool:
    """Every check that needs the checkpoint's files but not its weights loaded. Returns False when
    the checkpoint is not local yet (a hub id to download), in which case nothing was checked."""
    directory = local_checkpoint(model_dir)
    if directory is None:
        config = fetch_hub_config(str(model_dir))  # bounded and checked before any weights download
        check_variant_layers(recipe, config)
        return False
    config = read_config(directory)
    check_generation_config(directory)
    check_variant_layers(recipe, config)
    speakers, languages = speakers_and_languages(config)
    validate_choices(prompts, speakers, languages, prompts_path)
    from parity.refclip import check_prompts

    clips = check_prompts(prompts, config.get("tts_model_type"), prompts_path)
    check_fit(prompts, directory, config, recipe, prompts_path, clips)
    check_checkpoint(directory, config)
    return True


def check_loaded_checkpoint(model_dir: Path | str, prompts: list[Prompt], recipe: Recipe, prompts_path: Path | None) -> None:
    """For a hub id: the same checks once ``from_pretrained`` has downloaded the files."""
    preflight(prompts, recipe, model_dir, prompts_path)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
