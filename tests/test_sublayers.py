"""probes = "sublayers": coverage on both engines, the op-by-op split of the first diverging
layer on planted faults, and layer replay (real engines on the tiny random checkpoint, CPU)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from parity import analysis, compare, replay, sublayers
from parity.engines.faster import FasterEngine
from parity.engines.reference import ReferenceEngine
from parity.errors import BadInput
from parity.probes import SUBLAYER_POINTS, ProbeCoverageError
from parity.recipe import Decoding, Side, parse_recipe_text

FRAMES = 3
TOL = 1e-5
DECODING = Decoding(max_frames=FRAMES)


def _reference(tiny_dir) -> ReferenceEngine:
    engine = ReferenceEngine(Side(dtype="float32", probes="sublayers"), tiny_dir)
    engine.load()
    return engine


def _faster(tiny_dir) -> FasterEngine:
    engine = FasterEngine(Side(engine="faster", dtype="float32", cache="static:256", probes="sublayers"), tiny_dir,
                          allow_cpu=True, cuda_graphs=False)
    engine.load()
    return engine


@pytest.fixture(scope="module")
def ref_engine(tiny_dir):
    engine = _reference(tiny_dir)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def ref_trace(ref_engine, prompt):
    return ref_engine.run(prompt, DECODING)


def _perturb(x: torch.Tensor) -> torch.Tensor:
    """A deterministic relative error of about 1e-3 that no RMSNorm cancels (not a pure scale)."""
    return x + 1e-3 * x.roll(1, dims=-1)


@contextlib.contextmanager
def planted(module: torch.nn.Module, on: str = "output", decode_only: bool = False):
    """Perturb ``module``'s output (or its input, ``on="input"``) at every call; with
    ``decode_only``, only on single-position calls (decode steps, not the prefill)."""
    def fires(t: torch.Tensor) -> bool:
        return not decode_only or t.shape[-2] == 1

    if on == "output":
        def hook(m, args, out):
            return _perturb(out) if fires(out) else None
        handle = module.register_forward_hook(hook)
    else:
        def hook(m, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            if not fires(h):
                return None
            return ((_perturb(h), *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": _perturb(h)})
        handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _split(ref, forced):
    points = compare.point_frame(forced, ref, TOL)
    return sublayers.split(points, forced, ref, TOL), points


# -- coverage ----------------------------------------------------------------------------------

def _residual_identity(trace, component: str) -> None:
    """Each layer's output is its input + o_proj + mlp (the layer's two residual adds): holds only
    if every slot holds the op it is named for, at the right step, on this engine."""
    widths = trace.meta["sublayers"]["widths"][component]
    off = [sum(widths[:i]) for i in range(len(widths) + 1)]
    o_slice = slice(off[SUBLAYER_POINTS.index("o_proj")], off[SUBLAYER_POINTS.index("o_proj") + 1])
    m_slice = slice(off[SUBLAYER_POINTS.index("mlp")], off[SUBLAYER_POINTS.index("mlp") + 1])
    hidden = trace.talker_hidden if component == "talker" else trace.pred_hidden.flatten(0, 1)
    sub = trace.talker_sub if component == "talker" else trace.pred_sub.flatten(0, 1)
    for layer in range(sub.shape[1]):
        rebuilt = hidden[:, layer] + sub[:, layer, o_slice] + sub[:, layer, m_slice]
        assert torch.allclose(rebuilt, hidden[:, layer + 1], rtol=0, atol=1e-5), (component, layer)


def test_sublayer_coverage_on_both_engines(tiny_dir, prompt, ref_trace):
    faster = _faster(tiny_dir)
    try:
        forced = faster.run(prompt, DECODING, force=ref_trace)
    finally:
        faster.close()
    for trace in (ref_trace, forced):
        meta = trace.meta["sublayers"]
        assert meta["points"] == list(SUBLAYER_POINTS)
        n_t, n_p = trace.talker_hidden.shape[1] - 1, trace.pred_hidden.shape[2] - 1
        assert trace.talker_sub.shape == (trace.n_steps, n_t, sum(meta["widths"]["talker"]))
        assert trace.pred_sub.shape == (trace.n_frames, 15, n_p, sum(meta["widths"]["predictor"]))
        _residual_identity(trace, "talker")
        _residual_identity(trace, "predictor")
    # Both engines' ops agree in fp32 (the fast engine's own masks and static cache included).
    for field in ("talker_sub", "pred_sub"):
        a, b = getattr(forced, field), getattr(ref_trace, field)
        assert float((a - b).norm() / b.norm()) < 1e-5
    # And the split has nothing to explain: no layer over tolerance.
    assert _split(ref_trace, forced)[0] is None


def test_layer_probes_stay_the_default(tiny_dir, prompt):
    engine = ReferenceEngine(Side(dtype="float32"), tiny_dir)
    engine.load()
    trace = engine.run(prompt, Decoding(max_frames=1))
    engine.close()
    assert trace.talker_sub.numel() == 0 and "sublayers" not in trace.meta and not trace.has_sublayers


def test_missing_sublayer_tap_is_an_error_on_both_engines(tiny_dir, prompt, ref_engine, monkeypatch):
    faster = _faster(tiny_dir)
    faster.sublayers.taps.detach()  # as if registered after capture: nothing inside the layers fires
    try:
        with pytest.raises(ProbeCoverageError, match="sub-layer taps recorded nothing"):
            faster.run(prompt, Decoding(max_frames=2))
    finally:
        faster.close()
    # The reference: one op's hook never reports (a path that bypasses it).
    from parity.probes import SublayerTaps

    original = SublayerTaps.note
    monkeypatch.setattr(SublayerTaps, "note", lambda self, c, layer, name, value, heads_first=False:
                        None if name == "v" else original(self, c, layer, name, value, heads_first))
    with pytest.raises(ProbeCoverageError, match=r"sub-layer probes recorded nothing for talker\.layer0\.v"):
        ref_engine.run(prompt, Decoding(max_frames=2))


def test_stale_sublayer_slot_is_detected(tiny_dir, prompt, monkeypatch):
    from parity.probes import GraphSublayers

    faster = _faster(tiny_dir)
    monkeypatch.setattr(GraphSublayers, "_gather", lambda self, component: self._held[component].clear())
    try:
        with pytest.raises(ProbeCoverageError, match="stale talker sub-layer taps"):
            faster.run(prompt, Decoding(max_frames=2))
    finally:
        faster.close()


# -- the split -----------------------------------------------------------------------------------

@pytest.mark.parametrize("op, module, on, expect", [
    ("attn", lambda L: L.self_attn.o_proj, "input", "q/k/v bit-identical: the attention kernel or its mask"),
    ("mlp", lambda L: L.mlp, "output", "post_norm bit-identical: the MLP"),
    ("k", lambda L: L.self_attn.k_norm, "output", "k_norm or RoPE, or the k projection"),
])
def test_planted_sublayer_fault_is_attributed_to_its_op(tiny_dir, prompt, ref_trace, op, module, on, expect):
    cand = _reference(tiny_dir)
    try:
        with planted(module(cand.talker.model.layers[1]), on):
            forced = cand.run(prompt, DECODING, force=ref_trace)
    finally:
        cand.close()
    split, _ = _split(ref_trace, forced)
    assert (split["component"], split["step"], split["layer"]) == ("talker", 0, 1)
    assert split["op"] == op
    assert expect in split["text"]
    ops = {o["op"]: o for o in split["ops"]}
    assert ops["input"]["identical"] and ops["input_norm"]["identical"]
    upstream = {"attn": ("q", "k", "v"), "mlp": ("q", "k", "v", "attn", "o_proj", "post_norm"), "k": ("q", "v")}[op]
    assert all(ops[n]["identical"] for n in upstream)
    assert [o["op"] for o in split["ops"] if o.get("adds")] == [op]


def test_split_and_replay_are_recorded_and_rejudged(tiny_dir, tmp_path):
    """End to end: a real divergence source (an int8 KV cache on talker layer 1) through
    ``parity run --probes sublayers``; ``parity compare`` re-judges the saved record."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello world, this is a test.\n")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "parity.cli", "run", str(prompts), "--out", str(out), "--max-frames", "2", "--mos", "none",
           "--probes", "sublayers", "--set", "candidate.dtype=float32", "--set", "candidate.cache=dynamic",
           "--set", "candidate.attention=sdpa", "--set", 'candidate.variants=["kv_quant=int8@talker:1"]']
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr  # the smoke gates admit this error
    assert "sub-layer: talker step 0 layer 1: attention output" in " ".join(proc.stdout.split())
    summary = json.loads((out / "summary.json").read_text())
    c = summary["prompts"][0]["comparison"]
    assert c["sublayer"]["op"] == "attn" and c["replay"]["verdict"] == "layer"
    assert c["replay"]["control"]["rel_l2"] == 0.0
    import jsonschema

    jsonschema.validate(summary, json.loads((Path(analysis.__file__).parent / "schema" / "summary.schema.json").read_text()))
    assert "Inside talker layer 1 (sub-layer probes)" in (out / "report.html").read_text()
    again = subprocess.run([sys.executable, "-m", "parity.cli", "compare", str(out), "--out", str(tmp_path / "again")],
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    c2 = json.loads((tmp_path / "again" / "summary.json").read_text())["prompts"][0]["comparison"]
    assert c2["sublayer"] == c["sublayer"] and c2["replay"] == c["replay"]


# -- replay --------------------------------------------------------------------------------------

def test_replay_isolates_a_layer_fault_from_an_upstream_one(tiny_dir, prompt, ref_engine, ref_trace):
    cand = _reference(tiny_dir)
    layers = cand.talker.model.layers
    try:
        # Inside talker layer 1 (its MLP), decode steps only.
        with planted(layers[1].mlp, "output", decode_only=True):
            forced = cand.run(prompt, DECODING, force=ref_trace)
            at = sublayers.first_layer_over(compare.point_frame(forced, ref_trace, TOL))
            assert at == {"component": "talker", "step": 1, "substep": -1, "layer": 1}
            inside = replay.verdict(replay.measure(cand, ref_engine, prompt, DECODING, ref_trace, forced, at), TOL)
        # Upstream of talker layer 0: its input (the step's embedding) is off, the layer itself is not.
        with planted(layers[0], "input", decode_only=True):
            forced = cand.run(prompt, DECODING, force=ref_trace)
            at = sublayers.first_layer_over(compare.point_frame(forced, ref_trace, TOL))
            assert at == {"component": "talker", "step": 1, "substep": -1, "layer": 0}
            upstream = replay.verdict(replay.measure(cand, ref_engine, prompt, DECODING, ref_trace, forced, at), TOL)
    finally:
        cand.close()
    assert inside["verdict"] == "layer" and "computes differently" in inside["text"]
    assert inside["added_in_isolation"] > TOL and inside["control"]["rel_l2"] == 0.0
    assert inside["reference_on_candidate_input"]["rel_l2"] > TOL
    assert upstream["verdict"] == "input" and "its input already differed" in upstream["text"]
    assert upstream["added_in_isolation"] == 0.0 and upstream["output"]["rel_l2"] > TOL


def test_replay_runs_the_fast_engines_own_layer(tiny_dir, prompt, ref_engine, ref_trace):
    faster = _faster(tiny_dir)
    assert replay.supported(faster) and replay.supported(ref_engine)
    try:
        with planted(faster.tts.model.model.talker.model.layers[1].self_attn.o_proj, "input", decode_only=True):
            forced = faster.run(prompt, DECODING, force=ref_trace)
            at = sublayers.first_layer_over(compare.point_frame(forced, ref_trace, TOL))
            result = replay.verdict(replay.measure(faster, ref_engine, prompt, DECODING, ref_trace, forced, at), TOL)
    finally:
        faster.close()
    assert at["layer"] == 1 and result["verdict"] == "layer"
    assert result["control"]["rel_l2"] < TOL  # the replay reproduces the fast engine's own run


# -- recipe ---------------------------------------------------------------------------------------

def test_probes_is_a_top_level_recipe_key():
    recipe = parse_recipe_text('probes = "sublayers"\n')
    assert recipe.probes == "sublayers" and recipe.reference.probes == recipe.candidate.probes == "sublayers"
    assert parse_recipe_text("").candidate.probes == "layers"
    with pytest.raises(BadInput, match="probes must be one of layers, sublayers"):
        parse_recipe_text('probes = "ops"\n')
    with pytest.raises(BadInput, match=r"\[candidate\]: unknown key 'probes'"):
        parse_recipe_text('[candidate]\nprobes = "sublayers"\n')


@pytest.mark.gpu
def test_graph_sublayer_taps_equal_eager_values(tiny_dir, prompt, ref_trace):
    """Inside captured CUDA graphs the sub-layer slots hold live values: a graph run equals the
    same engine run eagerly, and no snapshot repeats (the stale check passed)."""
    side = Side(engine="faster", dtype="float32", cache="static:256", probes="sublayers")
    traces = []
    for graphs in (True, False):
        engine = FasterEngine(side, tiny_dir, cuda_graphs=graphs)
        engine.load()
        traces.append(engine.run(prompt, DECODING, force=ref_trace))
        engine.close()
    a, b = traces
    assert torch.allclose(a.talker_sub, b.talker_sub, rtol=0, atol=1e-5)
    assert torch.allclose(a.pred_sub, b.pred_sub, rtol=0, atol=1e-5)
    _residual_identity(a, "talker")
    _residual_identity(a, "predictor")


@pytest.mark.gpu
def test_replay_inside_graphs_reproduces_the_captured_run(tiny_dir, prompt, ref_engine, ref_trace):
    """On a GPU the fast engine's graphs run eagerly for the replay: the control shows that this
    reproduces what the captured graphs recorded, and a fault captured into the graph is found."""
    faster = FasterEngine(Side(engine="faster", dtype="float32", cache="static:256", probes="sublayers"), tiny_dir,
                          cuda_graphs=True)
    faster.load()
    try:
        with planted(faster.tts.model.model.talker.model.layers[1].self_attn.o_proj, "input", decode_only=True):
            forced = faster.run(prompt, DECODING, force=ref_trace)  # captures the graphs with the fault in them
            at = sublayers.first_layer_over(compare.point_frame(forced, ref_trace, TOL))
            result = replay.verdict(replay.measure(faster, ref_engine, prompt, DECODING, ref_trace, forced, at), TOL)
    finally:
        faster.close()
    assert at["layer"] == 1 and result["verdict"] == "layer"
    assert result["control"]["rel_l2"] < TOL
