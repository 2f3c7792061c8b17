"""Voice cloning (x-vector-only and ICL) and voice design on both engines, reference clips checked
up front, and batched decoding as a side setting (issue 16)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from trace_checks import assert_full_coverage

from parity import batching, compare, refclip
from parity.bisect import configure, find_factors
from parity.engines.faster import FasterEngine
from parity.engines.reference import ReferenceEngine
from parity.errors import BadInput
from parity.prompts import Prompt
from parity.recipe import Decoding, Side, parse_recipe_text

FRAMES = 4


@pytest.fixture(scope="module")
def base_dir(parity_cache):
    from parity.models import ensure_builtin

    return ensure_builtin("tiny-base")


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return refclip.write_clip(tmp_path_factory.mktemp("clips") / "ref.wav", seconds=1.2)


def _clone_prompt(clip: Path, mode: str) -> Prompt:
    ref_text = "This is the reference voice." if mode == "icl" else None
    return Prompt(id=mode, text="Hello world, this is a test.", language="english", ref_audio=str(clip), ref_text=ref_text, line=1)


# -- built-in checkpoints ---------------------------------------------------------------------

def test_base_checkpoint_has_both_encoders_and_is_deterministic(base_dir, tmp_path):
    from parity.models import BUILTINS, build_random_checkpoint

    config = json.loads((base_dir / "config.json").read_text())
    assert config["tts_model_type"] == "base"
    assert config["speaker_encoder_config"]["enc_dim"] == config["talker_config"]["hidden_size"]
    assert config["talker_config"]["spk_id"] == {}  # no preset speakers: the voice comes from the clip
    again = build_random_checkpoint(BUILTINS["tiny-base"], tmp_path / "again", seed=0)
    for name in ("model.safetensors", "speech_tokenizer/model.safetensors"):
        assert (again / name).read_bytes() == (base_dir / name).read_bytes(), name


# -- voice cloning on both engines ------------------------------------------------------------

@pytest.fixture(scope="module")
def clone_engines(base_dir):
    ref = ReferenceEngine(Side(dtype="float32"), base_dir)
    ref.load()
    fast = FasterEngine(Side(engine="faster", dtype="float32", cache="static:256"), base_dir, allow_cpu=True, cuda_graphs=False)
    fast.load()
    yield ref, fast
    ref.close()
    fast.close()


@pytest.mark.parametrize("mode", ["icl", "xvector"])
def test_clone_mode_teacher_forcing_exact_on_both_engines(clone_engines, clip, mode):
    ref, fast = clone_engines
    prompt = _clone_prompt(clip, mode)
    reference = ref.run(prompt, Decoding(max_frames=FRAMES))
    assert_full_coverage(reference)
    # The clip's encoding is in the trace: codes only in ICL mode, the speaker embedding in both.
    assert reference.ref_speaker.shape == (64,)
    assert (reference.ref_codes.shape[0] > 0) == (mode == "icl")
    if mode == "icl":  # the clip's codes sit in the prefill: ICL prompts are much longer
        assert reference.meta["prefill_len"] > reference.ref_codes.shape[0]

    again = ref.run(prompt, Decoding(max_frames=FRAMES), force=reference)
    assert torch.equal(again.codes, reference.codes) and torch.equal(again.talker_tokens, reference.talker_tokens)
    assert compare.point_frame(again, reference, 1e-5)["rel_l2"].max() == 0.0  # same engine, same settings: exact

    forced = fast.run(prompt, Decoding(max_frames=FRAMES), force=reference)
    assert_full_coverage(forced)
    assert torch.equal(forced.codes, reference.codes)
    assert forced.meta["prefill_len"] == reference.meta["prefill_len"]
    points = compare.point_frame(forced, reference, 1e-5)
    assert len(points) and points["rel_l2"].max() < 1e-5
    encoding = refclip.compare_encoding(forced, reference)
    assert encoding["mode"] == mode and encoding["speaker_rel_l2"] == 0.0
    if mode == "icl":
        assert encoding["codes_equal"]


def test_clip_encoding_is_teacher_forced_but_recorded_as_encoded(base_dir, clip):
    """A bf16 side encodes the clip itself (recorded), but its prefill is built from the forcing
    trace's encoding, so the prefill differs only by bf16 rounding, never by other codes."""
    prompt = _clone_prompt(clip, "icl")
    ref = ReferenceEngine(Side(dtype="float32"), base_dir)
    ref.load()
    reference = ref.run(prompt, Decoding(max_frames=2))
    ref.close()
    low = ReferenceEngine(Side(dtype="bfloat16"), base_dir)
    low.load()
    forced = low.run(prompt, Decoding(max_frames=2), force=reference)
    own_prefill = low.prepare(prompt)  # unforced: the prefill from its own encoding
    forced_prefill = low.prepare(prompt, reference)
    low.close()
    encoding = refclip.compare_encoding(forced, reference)
    assert encoding["speaker_rel_l2"] > 0  # bf16 speaker encoder: a different embedding, recorded
    same_codes = torch.equal(forced.ref_codes, reference.ref_codes)
    assert encoding["codes_equal"] == same_codes
    first = compare.point_frame(forced, reference, 1e-2)
    embed0 = first[(first.component == "talker") & (first.step == 0) & (first.point == "embed")]["rel_l2"].item()
    assert embed0 < 2e-2  # bf16 rounding of the forced prefill
    # Without forcing the prefill is built from its own speaker embedding (and codes): it differs.
    assert not torch.equal(own_prefill.inputs_embeds, forced_prefill.inputs_embeds)


def test_voice_design_on_both_engines(parity_cache):
    from parity.models import ensure_builtin

    design = ensure_builtin("tiny-design")
    prompt = Prompt(id="vd", text="Hello world, this is a test.", language="english", instruct="A calm low voice.", line=1)
    ref = ReferenceEngine(Side(dtype="float32"), design)
    ref.load()
    reference = ref.run(prompt, Decoding(max_frames=FRAMES))
    no_instruct = ref.prepare(Prompt(id="vd0", text=prompt.text, language="english", line=1))
    ref.close()
    assert reference.meta["prefill_len"] > no_instruct.length  # the instruct is in the prefill
    fast = FasterEngine(Side(engine="faster", dtype="float32", cache="static:256"), design, allow_cpu=True, cuda_graphs=False)
    fast.load()
    forced = fast.run(prompt, Decoding(max_frames=FRAMES), force=reference)
    fast.close()
    assert_full_coverage(forced)
    assert torch.equal(forced.codes, reference.codes)
    assert compare.point_frame(forced, reference, 1e-5)["rel_l2"].max() < 1e-5


# -- reference clips checked up front ----------------------------------------------------------

def _write(path: Path, wav, sr: int, subtype: str = "PCM_16") -> str:
    sf.write(str(path), np.asarray(wav, dtype=np.float32), sr, subtype=subtype)
    return str(path)


@pytest.mark.parametrize("case, expected", [
    ("missing", "file not found"),
    ("directory", "is a directory"),
    ("not_audio", "unreadable as audio"),
    ("empty", "empty"),
    ("nan", "NaN/inf"),
    ("short", "shorter than"),
    ("rate", "sample rate 8000 Hz"),
    ("silent", "silent"),
    ("url", "not a local file"),
])
def test_bad_clip_refused_with_one_line(tmp_path, case, expected):
    good = refclip.synth_clip(1.5)
    paths = {
        "missing": str(tmp_path / "nope.wav"),
        "directory": str(tmp_path),
        "empty": _write(tmp_path / "empty.wav", np.zeros(0), 24000),
        "nan": _write(tmp_path / "nan.wav", np.where(np.arange(len(good)) == 100, np.nan, good), 24000, "FLOAT"),
        "short": _write(tmp_path / "short.wav", good[:7200], 24000),
        "rate": _write(tmp_path / "rate.wav", good, 8000),
        "silent": _write(tmp_path / "silent.wav", np.zeros(36000), 24000),
        "url": "https://example.com/clip.wav",
    }
    if case == "not_audio":
        (tmp_path / "text.wav").write_text("not audio")
        paths[case] = str(tmp_path / "text.wav")
    with pytest.raises(BadInput, match=expected) as err:
        refclip.check_clip(paths[case], "p.jsonl:1: prompt a")
    assert "\n" not in str(err.value) and str(err.value).startswith("p.jsonl:1: prompt a: ref_audio")


def test_good_clip_and_model_type_rules(clip):
    info = refclip.check_clip(str(clip), "x")
    assert info.sample_rate == 24000 and abs(info.seconds - 1.2) < 1e-3 and info.codec_frames == 15
    icl, plain = _clone_prompt(clip, "icl"), Prompt(id="p", text="Hi.", line=2)
    assert set(refclip.check_prompts([icl], "base")) == {"icl"}
    with pytest.raises(BadInput, match="needs a reference clip"):
        refclip.check_prompts([plain], "base")
    with pytest.raises(BadInput, match="only used by a base"):
        refclip.check_prompts([icl], "custom_voice")


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "parity.cli", *args], capture_output=True, text=True, timeout=900, cwd=cwd)


def test_cli_refuses_a_bad_clip_before_loading(tmp_path):
    _write(tmp_path / "short.wav", refclip.synth_clip(0.4), 24000)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"text": "Hello.", "ref_audio": str(tmp_path / "short.wav"), "ref_text": "Hi."}) + "\n")
    out = tmp_path / "run"
    r = _cli("run", str(prompts), "--model", "random:tiny-base", "--out", str(out))
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "shorter than" in lines[0] and "p.jsonl:1" in lines[0]
    assert not out.exists()


# -- batching ---------------------------------------------------------------------------------

TEXTS = ["Hi.", "Hello world, this is a test.", "A much longer prompt that goes on for a while to pad the others.", "Short one."]


@pytest.fixture(scope="module")
def batch_prompts():
    return [Prompt(id=f"b{i}", text=t, speaker="vivian", language="english", line=i + 1) for i, t in enumerate(TEXTS)]


def _equal(a, b) -> bool:
    return all(torch.equal(getattr(a, k), getattr(b, k)) for k in
               ("talker_hidden", "talker_logits", "talker_tokens", "codes", "pred_hidden", "pred_logits", "pred_choice"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batch_of_one_is_no_batch(tiny_dir, batch_prompts, dtype):
    engine = ReferenceEngine(Side(dtype=dtype), tiny_dir)
    engine.load()
    decoding = Decoding(max_frames=FRAMES)
    alone = {p.id: engine.run(p, decoding) for p in batch_prompts[:2]}
    rows = batching.run_batched(engine, batch_prompts[:2], decoding, 1, forces=alone)
    engine.close()
    for p in batch_prompts[:2]:
        assert _equal(rows[p.id], alone[p.id])
        assert "batch" not in rows[p.id].meta


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batch_of_four_per_row_divergence(tiny_dir, batch_prompts, dtype):
    engine = ReferenceEngine(Side(dtype=dtype), tiny_dir)
    engine.load()
    decoding = Decoding(max_frames=FRAMES)
    alone = {p.id: engine.run(p, decoding) for p in batch_prompts}
    rows = batching.run_batched(engine, batch_prompts, decoding, 4, forces=alone)
    engine.close()
    errors = {}
    for p in batch_prompts:
        info = rows[p.id].meta["batch"]
        assert info["size"] == 4 and info["mates"] == [q.id for q in batch_prompts]
        assert info["pad"] == info["padded_len"] - alone[p.id].meta["prefill_len"]
        assert torch.equal(rows[p.id].codes, alone[p.id].codes)  # forced on its own batch-1 codes
        errors[p.id] = (info["pad"], compare.point_frame(rows[p.id], alone[p.id], 1e-5)["rel_l2"].max())
    padded = [e for pad, e in errors.values() if pad > 0]
    assert len(padded) == 3
    if dtype == "float32":
        assert max(e for _, e in errors.values()) < 1e-5  # fp32 noise at most
    else:
        assert min(padded) > 1e-4  # padding changes bf16 rounding: measurable on every padded row


def test_arrangements_fill_and_change_mates():
    first = batching.arrangement(5, 4)
    assert first == [([0, 1, 2, 3], 4), ([4, 0, 1, 2], 1)]
    second = batching.arrangement(5, 4, second=True)
    assert sorted(i for b, n in second for i in b[:n]) == [0, 1, 2, 3, 4]  # every prompt once as a real row
    mates = {i: set(b[:n]) for b, n in first for i in b[:n]}
    assert any(mates[i] != set(b[:n]) for b, n in second for i in b[:n])


def test_batch_recipe_rules_and_bisect_factor():
    text = '[candidate]\nengine = "reference"\nbatch = 4\n'
    recipe = parse_recipe_text(text)
    assert recipe.candidate.batch == 4 and "batch4" in recipe.candidate.label()
    factors, _ = find_factors(recipe.reference, recipe.candidate)
    batch = [f for f in factors if f.name == "batch"]
    assert batch and not batch[0].load_time
    assert configure(recipe.reference, batch).batch == 4
    with pytest.raises(BadInput, match="needs an engine that decodes batches"):
        parse_recipe_text('[candidate]\nengine = "faster"\nbatch = 4\n')
    with pytest.raises(BadInput, match="batch must be 1 on the reference side"):
        parse_recipe_text('[reference]\nbatch = 2\n')
    with pytest.raises(BadInput, match="between 1 and"):
        parse_recipe_text('[candidate]\nbatch = 0\n')


def test_batch_run_reports_per_row(tmp_path):
    """batch4.toml through the CLI on five prompts of different lengths: every row is reported with
    its padding, its prefill error, whether the divergence enters there, and whether it changed
    among other batch-mates (console, summary.json and report.html)."""
    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    r = _cli("run", str(repo / "recipes/prompts/batch-lengths.txt"), "--recipe", str(repo / "recipes/batch4.toml"),
             "--out", str(out), "--max-frames", "3")
    assert r.returncode in (0, 1), r.stderr
    summary = json.loads((out / "summary.json").read_text())
    batch = summary["batch"]
    assert batch["size"] == 4 and len(batch["rows"]) == 5
    assert len({row["pad"] for row in batch["rows"]}) > 1
    assert batch["rows_checked"] == 5
    padded = [row for row in batch["rows"] if row["pad"] > 0]
    assert padded and all(row["prefill_rel_l2"] is not None for row in batch["rows"])
    assert max(row["prefill_rel_l2"] for row in padded) > 0  # bf16: padding shows at the prefill
    assert "batch of 4" in r.stdout and batch["verdict"].split(";")[0] in " ".join(r.stdout.split())
    html = (out / "report.html").read_text()
    assert 'id="batch"' in html and "Batch row (batch of 4)" in html


def test_bisect_finds_batch_as_the_culprit(tmp_path, parity_cache):
    """Two bf16 sides that differ in batch only, with a tolerance tighter than the padding effect:
    bisect names batch and proves it (the candidate without it is the reference itself)."""
    from parity.bisect import bisect

    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(TEXTS) + "\n")
    recipe = parse_recipe_text('model = "random:tiny"\n[reference]\ndtype = "bfloat16"\n'
                               '[candidate]\nengine = "reference"\ndtype = "bfloat16"\nattention = "sdpa"\ncache = "dynamic"\nbatch = 4\n'
                               '[tolerances]\nbfloat16 = 1e-4\n')
    result = bisect(prompts, recipe, None, 2, tmp_path / "out")
    assert [f["name"] for f in result["factors"]] == ["batch"]
    assert result["culprits"] == ["batch"] and result["proof"]["holds"]
    assert result["candidate_run"]["diverges"]


def test_icl_clip_counts_in_the_up_front_length_check(base_dir, tmp_path):
    """An ICL clip's codes go into the prefill: a cache that holds the text but not the clip's
    12.5 codes per second is refused before loading; the same prompt x-vector-only fits."""
    from parity.preflight import preflight

    long_clip = refclip.write_clip(tmp_path / "long.wav", seconds=8.0)
    recipe = parse_recipe_text('model = "random:tiny-base"\n[candidate]\ncache = "static:96"\n[decoding]\nmax_frames = 8\n')
    icl = Prompt(id="a", text="Hello.", ref_audio=str(long_clip), ref_text="Hi there.", line=1)
    with pytest.raises(BadInput, match="needs at least 1[0-9][0-9] positions"):
        preflight([icl], recipe, base_dir, tmp_path / "p.jsonl")
    assert preflight([Prompt(id="b", text="Hello.", ref_audio=str(long_clip), line=1)], recipe, base_dir, tmp_path / "p.jsonl")
