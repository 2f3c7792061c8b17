"""The faster-qwen3-tts-batch adapter: the package's batched loop and graph functions driven eagerly
on the CPU (graphs off) on the built-in base checkpoint, voice-clone prompts whose reference clips
differ in length, so the rows of a batch are padded differently."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trace_checks import assert_full_coverage

from parity import batching, compare
from parity.engines.faster import FasterEngine, ProbeCoverageError
from parity.engines.faster_batch import FasterBatchEngine
from parity.engines.reference import ReferenceEngine
from parity.errors import BadInput
from parity.prompts import Prompt
from parity.recipe import Decoding, Side

REPO = Path(__file__).resolve().parents[1]
PROMPTS = REPO / "recipes/prompts/voice-clone-batch.jsonl"
FRAMES = 4
DECODING = Decoding(max_frames=FRAMES)


def _prompts() -> list[Prompt]:
    """The first four prompts of the batch file (ICL on three clip lengths, one x-vector), with
    absolute clip paths."""
    out = []
    for i, line in enumerate(PROMPTS.read_text().splitlines()[:4]):
        row = json.loads(line)
        row["ref_audio"] = str(REPO / row["ref_audio"])
        out.append(Prompt(**row, line=i + 1))
    return out


@pytest.fixture(scope="module")
def base_dir(parity_cache):
    from parity.models import ensure_builtin

    return ensure_builtin("tiny-base")


@pytest.fixture(scope="module")
def references(base_dir):
    """Each prompt alone on the fp32 reference engine (batch 1)."""
    engine = ReferenceEngine(Side(dtype="float32"), base_dir)
    engine.load()
    traces = {p.id: engine.run(p, DECODING) for p in _prompts()}
    engine.close()
    return traces


def _batch_engine(base_dir, batch: int, **kw) -> FasterBatchEngine:
    engine = FasterBatchEngine(Side(engine="faster-qwen3-tts-batch", dtype="float32", cache="static:256", device="cpu",
                                    batch=batch), base_dir, **kw)
    engine.load()
    return engine


@pytest.fixture(scope="module")
def batch4(base_dir):
    engine = _batch_engine(base_dir, 4)
    yield engine
    engine.close()


def test_rows_teacher_forced_with_full_probe_coverage(batch4, references):
    """A batch of 4 left-padded voice-clone rows, each forced on its own batch-1 reference: every
    row consumes its own codes, records every layer of every step, and stays within fp32 noise of
    batch 1 whatever its padding."""
    prompts = _prompts()
    rows = batching.run_batched(batch4, prompts, DECODING, 4, forces=references)
    pads = []
    for p in prompts:
        row, ref = rows[p.id], references[p.id]
        assert_full_coverage(row, choices=True)
        assert torch.equal(row.codes, ref.codes) and torch.equal(row.talker_tokens, ref.talker_tokens)
        assert row.meta["prefill_len"] == ref.meta["prefill_len"]
        info = row.meta["batch"]
        assert info["size"] == 4 and info["mates"] == [q.id for q in prompts]
        assert info["pad"] == info["padded_len"] - ref.meta["prefill_len"]
        pads.append(info["pad"])
        points = compare.point_frame(row, ref, 1e-5)
        assert len(points) and points["rel_l2"].max() < 1e-5  # fp32: padding and batching are noise at most
    assert len(set(pads)) == 4 and min(pads) == 0  # every row padded differently, the longest not at all


def test_forcing_is_per_row(batch4, references):
    """Codes planted in one row's forcing trace (codebooks 1..15 all 7) are consumed by that row
    only: it reports its own different choices, and the other row equals the unplanted batch
    (two rows in the engine's batch of 4: a smaller batch is padded with idle rows)."""
    prompts = _prompts()[2:]
    forces = [references[p.id] for p in prompts]
    plain = batch4.run_batch(prompts, DECODING, forces)
    planted_codes = forces[1].codes.clone()
    planted_codes[:, 1:] = 7
    planted = type(forces[1])(**{**forces[1].__dict__, "codes": planted_codes})
    mixed = batch4.run_batch(prompts, DECODING, [forces[0], planted])
    assert torch.equal(mixed[1].codes, planted_codes)
    assert not torch.equal(mixed[1].pred_choice, planted_codes[:, 1:])
    for b in (0,):
        assert torch.equal(mixed[b].codes, plain[b].codes)
        assert torch.equal(mixed[b].talker_hidden, plain[b].talker_hidden)
        assert torch.equal(mixed[b].pred_hidden, plain[b].pred_hidden)


def test_batch_of_one_against_the_faster_engine(base_dir, references):
    """A batch of one runs the same talker modules as faster-qwen3-tts's own loop: the talker is
    bit-identical. The predictor is not: the batched predictor graph takes its attention masks
    from transformers' mask functions (none at its 2-token prefill, boolean after), faster-qwen3-tts
    builds additive float masks, and the attention kernels round differently (fp32 noise)."""
    prompts = [_prompts()[0], _prompts()[3]]  # ICL and x-vector
    fast = FasterEngine(Side(engine="faster", dtype="float32", cache="static:256"), base_dir, allow_cpu=True, cuda_graphs=False)
    fast.load()
    single = {p.id: fast.run(p, DECODING, force=references[p.id]) for p in prompts}
    fast_free = fast.run(prompts[0], DECODING)
    fast.close()
    one = _batch_engine(base_dir, 1)
    try:
        assert torch.equal(one.run(prompts[0], DECODING).codes, fast_free.codes)  # greedy fp32: same tokens free-running
        for p in prompts:
            forced, f_forced = one.run(p, DECODING, force=references[p.id]), single[p.id]
            assert "batch" not in forced.meta
            for field in ("codes", "talker_tokens", "talker_choice", "talker_hidden", "talker_logits"):
                assert torch.equal(getattr(forced, field), getattr(f_forced, field)), field
            pred = compare.point_frame(forced, f_forced, 1e-5)
            pred = pred[pred.component == "predictor"]["rel_l2"]
            assert 0 < pred.max() < 1e-5
    finally:
        one.close()


def test_missing_tap_is_an_error(base_dir, references):
    engine = _batch_engine(base_dir, 1)
    engine.taps.detach()  # as if the hooks had been registered after capture
    try:
        with pytest.raises(ProbeCoverageError, match="recorded nothing"):
            engine.run(_prompts()[0], Decoding(max_frames=2))
    finally:
        engine.close()


def test_refusals(base_dir, tiny_dir, batch4):
    custom = FasterBatchEngine(Side(engine="faster-qwen3-tts-batch", device="cpu"), tiny_dir)
    with pytest.raises(BadInput, match="voice cloning only.*'custom_voice'"):
        custom.load()
    custom.close()
    with pytest.raises(BadInput, match="batches of up to 4 rows, got 5"):
        batch4.run_batch(_prompts() + _prompts()[:1], DECODING)
    if not torch.cuda.is_available():
        with pytest.raises(BadInput, match="needs a CUDA GPU.*device = \"cpu\""):
            FasterBatchEngine(Side(engine="faster-qwen3-tts-batch"), base_dir)


def test_cli_cpu_recipe_reports_every_row(tmp_path):
    """The CPU recipe through the CLI on the six voice-clone prompts of the batch file: every row is
    reported with its padding and prefill error (summary.json, console, report), bf16 padding shows
    at the prefill of the most padded rows, and the candidate is this engine."""
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "parity.cli", "run", str(PROMPTS), "--recipe",
                        str(REPO / "recipes/faster-qwen3-tts-batch-cpu.toml"), "--out", str(out), "--max-frames", "3"],
                       capture_output=True, text=True, timeout=900, cwd=REPO)
    assert r.returncode in (0, 1), r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sides"]["candidate"]["engine"] == "faster-qwen3-tts-batch"
    assert summary["sides"]["candidate"]["max_batch_size"] == 4
    batch = summary["batch"]
    assert batch["size"] == 4 and len(batch["rows"]) == 6 and batch["rows_checked"] == 6
    assert len({row["pad"] for row in batch["rows"]}) > 1
    assert all(row["prefill_rel_l2"] is not None for row in batch["rows"])
    most_padded = max(row["pad"] for row in batch["rows"])
    assert max(row["prefill_rel_l2"] for row in batch["rows"] if row["pad"] == most_padded) > 0
    assert "batch of 4" in r.stdout
    html = (out / "report.html").read_text()
    assert 'id="batch"' in html


@pytest.mark.gpu
def test_graph_taps_equal_eager_values(base_dir, references):
    """On a GPU: the package's captured batched graphs with parity's per-row taps hold live values,
    row by row equal to the same engine run eagerly (fp32, batch of 4, forced)."""
    prompts = _prompts()

    def rows(cuda_graphs: bool) -> dict:
        engine = FasterBatchEngine(Side(engine="faster-qwen3-tts-batch", dtype="float32", cache="static:256", device="cuda",
                                        batch=4), base_dir, cuda_graphs=cuda_graphs)
        engine.load()
        try:
            return batching.run_batched(engine, prompts, DECODING, 4, forces=references)
        finally:
            engine.close()

    graphs, eager = rows(True), rows(False)
    assert graphs[prompts[0].id].meta["side"]["cuda_graphs"] and not eager[prompts[0].id].meta["side"]["cuda_graphs"]
    for p in prompts:
        a, b = graphs[p.id], eager[p.id]
        assert_full_coverage(a, choices=True)
        assert torch.equal(a.codes, references[p.id].codes)
        assert torch.allclose(a.talker_hidden, b.talker_hidden, rtol=0, atol=1e-5)
        assert torch.allclose(a.pred_hidden, b.pred_hidden, rtol=0, atol=1e-5)
        assert not torch.equal(a.pred_hidden[0], a.pred_hidden[1])  # slots rewritten by every replay
