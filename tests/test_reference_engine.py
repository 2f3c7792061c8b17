"""The reference engine's own decode loop against the package's ``generate``, probes, forcing."""

from __future__ import annotations

import pytest
import torch

from parity.engines.reference import ReferenceEngine
from parity.probes import ProbeCoverageError
from parity.recipe import Decoding, Side

N_NEW = 10  # generate(max_new_tokens=N) decodes N-1 frames


def _generate_with_hidden(engine: ReferenceEngine, prompt):
    """Run the package's generate (greedy) and capture the talker's and predictor's outputs."""
    model = engine.model
    talker_out, pred_out = {}, []
    talker_generate, pred_generate = model.talker.generate, model.talker.code_predictor.generate

    def talker_wrap(**kw):
        talker_out["r"] = talker_generate(**kw)
        return talker_out["r"]

    def pred_wrap(**kw):
        r = pred_generate(**kw)
        pred_out.append(r)
        return r

    model.talker.generate = talker_wrap
    model.talker.code_predictor.generate = pred_wrap
    try:
        input_ids = engine.wrapper._tokenize_texts([engine.wrapper._build_assistant_text(prompt.text)])
        codes, _ = model.generate(
            input_ids=input_ids, instruct_ids=[None], languages=[prompt.language], speakers=[prompt.speaker],
            non_streaming_mode=True, max_new_tokens=N_NEW, do_sample=False, subtalker_dosample=False,
            repetition_penalty=1.0,
        )
    finally:
        del model.talker.generate
        del model.talker.code_predictor.generate
    return codes[0].cpu(), talker_out["r"], pred_out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_loop_reproduces_generate(tiny_dir, prompt, dtype):
    engine = ReferenceEngine(Side(dtype=dtype, attention="sdpa", cache="dynamic"), tiny_dir)
    engine.load()
    trace = engine.run(prompt, Decoding(max_frames=N_NEW - 1))
    codes, talker_result, pred_results = _generate_with_hidden(engine, prompt)

    assert torch.equal(trace.codes, codes)
    assert trace.talker_tokens.tolist() == talker_result.sequences[0].tolist()
    # Talker: generate's hidden_states[step][0] holds the input of every layer, then the final norm.
    n_layers = trace.meta["n_talker_layers"]
    norm = engine.talker.model.norm
    assert len(talker_result.hidden_states) == trace.n_steps
    for s, step_hidden in enumerate(talker_result.hidden_states):
        layers = step_hidden[0]
        for p in range(n_layers):  # embed + outputs of layers 0..L-2
            assert torch.equal(trace.talker_hidden[s, p], layers[p][0, -1].float()), (s, p)
        last = trace.talker_hidden[s, n_layers].to(layers[n_layers].dtype)
        assert torch.equal(norm(last).float(), layers[n_layers][0, -1].float()), s
    # Code predictor: one nested generate per frame, 15 sub-steps each.
    assert len(pred_results) == trace.n_frames
    p_layers = trace.meta["n_predictor_layers"]
    for f, result in enumerate(pred_results):
        assert result.sequences[0].tolist() == trace.codes[f, 1:].tolist()
        for j, sub_hidden in enumerate(result.hidden_states):
            for p in range(p_layers):
                assert torch.equal(trace.pred_hidden[f, j, p], sub_hidden[p][0, -1].float()), (f, j, p)


def test_probe_coverage_and_shapes(tiny_dir, prompt):
    engine = ReferenceEngine(Side(), tiny_dir)
    engine.load()
    trace = engine.run(prompt, Decoding(max_frames=6))
    cfg = engine.talker.config
    pcfg = engine.talker.code_predictor.config
    s, f = trace.n_steps, trace.n_frames
    assert s == f + 1
    assert trace.talker_hidden.shape == (s, cfg.num_hidden_layers + 1, cfg.hidden_size)
    assert trace.talker_logits.shape == (s, cfg.vocab_size)
    assert trace.pred_hidden.shape == (f, 15, pcfg.num_hidden_layers + 1, pcfg.hidden_size)
    assert trace.pred_logits.shape == (f, 15, pcfg.vocab_size)
    # Every slot holds a real recording: no all-zero rows left over from preallocation.
    assert (trace.talker_hidden.abs().sum(-1) > 0).all()
    assert (trace.pred_hidden.abs().sum(-1) > 0).all()


def test_missing_probe_is_an_error(tiny_dir, prompt, monkeypatch):
    engine = ReferenceEngine(Side(), tiny_dir)
    engine.load()
    make_hook = engine.recorder._make_hook

    def sabotaged(component, point):  # one hook that never records, as a replayed graph would
        if (component, point) == ("predictor", "layer1"):
            return lambda module, args, output: None
        return make_hook(component, point)

    monkeypatch.setattr(engine.recorder, "_make_hook", sabotaged)
    with pytest.raises(ProbeCoverageError, match="predictor step 0 sub-step 0 recorded nothing for layer1"):
        engine.run(prompt, Decoding(max_frames=3))


def test_teacher_forcing_follows_reference_tokens(tiny_dir, prompt):
    ref = ReferenceEngine(Side(dtype="float32"), tiny_dir)
    ref.load()
    ref_trace = ref.run(prompt, Decoding(max_frames=12))
    cand = ReferenceEngine(Side(dtype="bfloat16", attention="eager", cache="static:256"), tiny_dir)
    cand.load()
    forced = cand.run(prompt, Decoding(max_frames=12), force=ref_trace)
    assert torch.equal(forced.codes, ref_trace.codes)
    assert torch.equal(forced.talker_tokens, ref_trace.talker_tokens)
    # The forced side still records its own choices, which is how flips are found.
    free = cand.run(prompt, Decoding(max_frames=12), record=False)
    # Before any forced token is consumed, the forced run's own choice is the free run's token.
    assert forced.talker_choice[0] == free.talker_tokens[0]
    if free.talker_tokens[0] == ref_trace.talker_tokens[0]:
        assert forced.pred_choice[0, 0] == free.codes[0, 1]


def test_static_cache_too_small_is_bad_input(tiny_dir, prompt):
    from parity.errors import BadInput

    engine = ReferenceEngine(Side(cache="static:8"), tiny_dir)
    engine.load()
    with pytest.raises(BadInput, match="too small"):
        engine.run(prompt, Decoding(max_frames=4))
