"""Trace storage: exact round trips, bf16 sides stored in bf16, tokens-only traces."""

from __future__ import annotations

import pytest
import torch

from parity.engines.reference import ReferenceEngine
from parity.recipe import Decoding, Side
from parity.trace import FLOAT_FIELDS, TENSOR_FIELDS, Trace


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def trace(request, tiny_dir, prompt):
    engine = ReferenceEngine(Side(dtype=request.param), tiny_dir)
    engine.load()
    return engine.run(prompt, Decoding(max_frames=4))


def test_round_trip_is_exact_and_bf16_is_stored_narrow(trace, tmp_path):
    trace.save(tmp_path, "t")
    again = Trace.load(tmp_path, "t")
    for k in TENSOR_FIELDS:
        assert torch.equal(getattr(again, k), getattr(trace, k)), k
    from safetensors import safe_open

    with safe_open(str(tmp_path / "t.safetensors"), "pt") as f:
        stored = f.get_slice("pred_hidden").get_dtype()
    assert stored == ("BF16" if trace.meta["side"]["dtype"] == "bfloat16" else "F32")


def test_values_a_narrow_dtype_cannot_hold_stay_wide(trace, tmp_path):
    if trace.meta["side"]["dtype"] != "bfloat16":
        pytest.skip("only a bf16 side is narrowed")
    trace.talker_hidden = trace.talker_hidden.clone()
    trace.talker_hidden[0, 0, 0] += 1e-6  # not bf16-representable, e.g. a variant computing in fp32
    trace.save(tmp_path, "w")
    assert torch.equal(Trace.load(tmp_path, "w").talker_hidden, trace.talker_hidden)


def test_tokens_only_keeps_tokens_and_drops_tensors(trace, tmp_path):
    trace.save(tmp_path, "k", tokens_only=True)
    light = Trace.load(tmp_path, "k")
    assert torch.equal(light.codes, trace.codes) and torch.equal(light.talker_tokens, trace.talker_tokens)
    assert all(getattr(light, k).numel() == 0 for k in FLOAT_FIELDS)
    assert light.meta["stored"] == "tokens"
    assert (tmp_path / "k.safetensors").stat().st_size < 4096
