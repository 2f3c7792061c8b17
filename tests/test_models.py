"""Model sources: built-in random checkpoints, local directories, hub ids."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from parity.errors import BadInput
from parity.models import BUILTINS, build_random_checkpoint, resolve_model


def test_builtin_is_deterministic(tmp_path, tiny_dir):
    again = build_random_checkpoint(BUILTINS["tiny"], tmp_path / "again", seed=0)
    a, b = load_file(str(tiny_dir / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = build_random_checkpoint(BUILTINS["tiny"], tmp_path / "other", seed=1)
    c = load_file(str(other / "model.safetensors"))
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_builtin_weights_are_bf16_representable(tiny_dir):
    for t in load_file(str(tiny_dir / "model.safetensors")).values():
        if t.is_floating_point():
            assert torch.equal(t, t.to(torch.bfloat16).to(t.dtype))


def test_local_directory_loads_through_public_path(tmp_path, tiny_dir, prompt):
    from parity.engines.reference import ReferenceEngine
    from parity.recipe import Decoding, Side

    local = tmp_path / "my-checkpoint"
    shutil.copytree(tiny_dir, local)
    assert resolve_model(str(local)) == local
    engine = ReferenceEngine(Side(), resolve_model(str(local)))
    engine.load()
    trace = engine.run(prompt, Decoding(max_frames=4))
    wav, sr = engine.decode_audio(trace.codes)
    assert sr == 24000 and len(wav) == 1920 * trace.n_frames
    assert wav.std() > 1e-3  # audible, not the ~1e-8 of the default init


def test_missing_files_and_bad_names(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    with pytest.raises(BadInput, match="speech_tokenizer/config.json"):
        resolve_model(str(tmp_path / "ckpt"))
    with pytest.raises(BadInput, match="available: random:tiny"):
        resolve_model("random:nope")
    with pytest.raises(BadInput, match="neither a directory nor a hub id"):
        resolve_model("not-a-hub-id")
    assert resolve_model("Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice") == "Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice"
