"""The faster-qwen3-tts adapter: its engine's own modules driven eagerly on the CPU (CI), and
inside real CUDA graphs on a GPU (marked ``gpu``; evidence in reports/faster-qwen3-tts/)."""

from __future__ import annotations

import pytest
import torch

from parity import compare
from parity.engines.faster import FasterEngine, ProbeCoverageError
from parity.engines.reference import ReferenceEngine
from parity.errors import BadInput
from parity.recipe import Decoding, Side

FRAMES = 8


@pytest.fixture(scope="module")
def reference_trace(tiny_dir, prompt):
    engine = ReferenceEngine(Side(dtype="float32"), tiny_dir)
    engine.load()
    return engine.run(prompt, Decoding(max_frames=FRAMES))


def _faster(tiny_dir, **kw) -> FasterEngine:
    engine = FasterEngine(Side(engine="faster", dtype="float32", cache="static:256"), tiny_dir, **kw)
    engine.load()
    return engine


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_needs_cuda_without_allow_cpu(tiny_dir):
    with pytest.raises(BadInput, match="needs a CUDA GPU.*smoke.toml"):
        FasterEngine(Side(engine="faster"), tiny_dir)


def test_engine_modules_match_reference_in_fp32(tiny_dir, prompt, reference_trace):
    engine = _faster(tiny_dir, allow_cpu=True, cuda_graphs=False)
    free = engine.run(prompt, Decoding(max_frames=FRAMES))
    forced = engine.run(prompt, Decoding(max_frames=FRAMES), force=reference_trace)
    engine.close()
    assert torch.equal(free.codes, reference_trace.codes)  # greedy fp32: same tokens
    assert torch.equal(forced.codes, reference_trace.codes)
    assert forced.talker_hidden.shape == reference_trace.talker_hidden.shape
    assert forced.pred_hidden.shape == reference_trace.pred_hidden.shape
    points = compare.point_frame(forced, reference_trace, tol=1e-5)
    assert points["rel_l2"].max() < 1e-5
    # Not bit-identical: the engine's predictor uses a StaticCache and explicit masks.
    assert points["rel_l2"].max() > 0


def test_forcing_overrides_the_engines_choices(tiny_dir, prompt, reference_trace):
    """Force codes the engine would never choose (all 7s): it must consume them, and still
    report its own choices."""
    planted = reference_trace
    planted_codes = torch.full_like(planted.codes, 7)
    planted_codes[:, 0] = planted.codes[:, 0]
    fake = type(planted)(**{**planted.__dict__, "codes": planted_codes})
    engine = _faster(tiny_dir, allow_cpu=True, cuda_graphs=False)
    forced = engine.run(prompt, Decoding(max_frames=FRAMES), force=fake)
    engine.close()
    assert torch.equal(forced.codes, planted_codes)
    assert not torch.equal(forced.pred_choice, planted_codes[:, 1:])


def test_missing_tap_is_an_error(tiny_dir, prompt, monkeypatch):
    engine = _faster(tiny_dir, allow_cpu=True, cuda_graphs=False)
    engine.taps.detach()  # as if the hooks had been registered after capture
    with pytest.raises(ProbeCoverageError, match="recorded nothing"):
        engine.run(prompt, Decoding(max_frames=3))


@pytest.mark.gpu
def test_graph_taps_equal_eager_values(tiny_dir, prompt, reference_trace):
    """Taps inside captured graphs hold live values: a graph run equals the same engine eager."""
    graphs = _faster(tiny_dir, cuda_graphs=True)
    a = graphs.run(prompt, Decoding(max_frames=FRAMES), force=reference_trace)
    graphs.close()
    eager = _faster(tiny_dir, cuda_graphs=False)
    b = eager.run(prompt, Decoding(max_frames=FRAMES), force=reference_trace)
    eager.close()
    assert torch.equal(a.codes, reference_trace.codes)
    assert torch.allclose(a.talker_hidden, b.talker_hidden, rtol=0, atol=1e-5)
    assert torch.allclose(a.pred_hidden, b.pred_hidden, rtol=0, atol=1e-5)
    # Snapshots differ from step to step (no stale slot repeated).
    assert not torch.equal(a.pred_hidden[0], a.pred_hidden[1])


def test_stale_snapshot_is_detected():
    from parity.engines.faster import _check_stale

    live = torch.randn(4, 3, 8)
    _check_stale(live, "talker")  # every snapshot differs: fine
    stale = live.clone()
    stale[2] = stale[1]  # a replay that did not rewrite its slots
    with pytest.raises(ProbeCoverageError, match="snapshot 2 is identical to snapshot 1"):
        _check_stale(stale, "talker")


def test_variants_apply_to_the_faster_engine(tiny_dir, prompt, reference_trace):
    """A side's variants reach the engine's modules: an int8 KV cache on the talker only."""
    side = Side(engine="faster", dtype="float32", cache="static:256", variants=("kv_quant=int8@talker",))
    engine = FasterEngine(side, tiny_dir, allow_cpu=True, cuda_graphs=False)
    engine.load()
    forced = engine.run(prompt, Decoding(max_frames=FRAMES), force=reference_trace)
    engine.close()
    points = compare.point_frame(forced, reference_trace, tol=1e-5)
    first = compare.summarize(points, forced, reference_trace, None, 1e-5)["first_divergence"]
    # The error enters in the talker (int8 K/V is far above fp32 noise), not the predictor.
    assert first["component"] == "talker" and first["rel_l2"] > 1e-4


def test_two_engines_in_one_process_do_not_share_forcing(tiny_dir, prompt, reference_trace):
    """bisect keeps several engines loaded: one engine's forcing must not leak into another's."""
    import faster_qwen3_tts.predictor_graph as pg_mod

    original = pg_mod.sample_logits
    first = _faster(tiny_dir, allow_cpu=True, cuda_graphs=False)
    first.run(prompt, Decoding(max_frames=FRAMES), force=reference_trace)  # leaves forcing state behind
    second = _faster(tiny_dir, allow_cpu=True, cuda_graphs=False)
    free = second.run(prompt, Decoding(max_frames=FRAMES))
    assert pg_mod.sample_logits is original  # nothing left patched between runs
    assert torch.equal(free.codes, reference_trace.codes)
    assert torch.equal(free.pred_choice, free.codes[:, 1:])  # own choices are its own
    first.close()
    second.close()


def test_prompt_without_speaker_gets_the_same_voice_on_both_sides(tiny_dir, reference_trace):
    """Both adapters must pick the same default speaker, or the prefills differ from layer 0."""
    from parity.prompts import Prompt

    bare = Prompt(id="bare", text="Hello world, this is a test.", line=1)
    ref = ReferenceEngine(Side(dtype="float32"), tiny_dir)
    ref.load()
    ref_trace = ref.run(bare, Decoding(max_frames=2))
    engine = _faster(tiny_dir, allow_cpu=True, cuda_graphs=False)
    forced = engine.run(bare, Decoding(max_frames=2), force=ref_trace)
    engine.close()
    points = compare.point_frame(forced, ref_trace, tol=1e-5)
    prefill = points[(points.component == "talker") & (points.step == 0)]
    assert prefill["rel_l2"].max() < 1e-5
