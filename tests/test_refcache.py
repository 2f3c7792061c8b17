"""The reference-trace cache: what its key covers, reuse across runs, --refresh-reference,
corrupt and partial entries rebuilt (never trusted), and ``parity cache list|prune``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def parity(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PARITY_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "parity.cli", *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=600)


# -- the key ---------------------------------------------------------------------------------

@pytest.fixture()
def keyed(tmp_path, tiny_dir):
    """A key function over (model dir, side, decoding, prompt), with a private cache root."""
    from parity.refcache import ReferenceCache

    def key(model=tiny_dir, side=None, decoding=None, prompt=None, seeds=1):
        from parity.prompts import Prompt
        from parity.recipe import Decoding, Side

        cache = ReferenceCache(tmp_path / "c", Path(model), side or Side(device="cpu"), decoding or Decoding(max_frames=4), seeds,
                               "parity.engines.reference:ReferenceEngine")
        return cache.key(prompt or Prompt(id="a", text="Hello there.", line=1))

    return key


def test_key_covers_what_determines_the_reference(keyed, tiny_dir, tmp_path, monkeypatch):
    from parity import refcache
    from parity.prompts import Prompt
    from parity.recipe import Decoding, Side

    base = keyed()
    assert keyed() == base
    # Same content under another id and line: the same trace, so the same key.
    assert keyed(prompt=Prompt(id="other", text="Hello there.", line=9)) == base
    different = {
        "prompt text": keyed(prompt=Prompt(id="a", text="Hello there!", line=1)),
        "speaker": keyed(prompt=Prompt(id="a", text="Hello there.", speaker="ryan", line=1)),
        "dtype": keyed(side=Side(device="cpu", dtype="bfloat16")),
        "attention": keyed(side=Side(device="cpu", attention="eager")),
        "variants": keyed(side=Side(device="cpu", variants=("rope_lowp",))),
        "max_frames": keyed(decoding=Decoding(max_frames=5)),
        "sampling": keyed(decoding=Decoding(max_frames=4, do_sample=True, seed=3)),
    }
    monkeypatch.setattr(refcache, "TRACE_FORMAT_VERSION", refcache.TRACE_FORMAT_VERSION + 1)
    different["trace format"] = keyed()
    monkeypatch.undo()
    # The weights: the same checkpoint with one tensor value changed.
    copy = tmp_path / "model"
    shutil.copytree(tiny_dir, copy)
    from safetensors.torch import save_file

    weights = next(copy.glob("*.safetensors"))
    tensors = load_file(str(weights))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1
    save_file(tensors, str(weights), metadata={"format": "pt"})
    different["weights"] = keyed(model=copy)
    for what, key in different.items():
        assert key != base, what
    assert len(set(different.values())) == len(different)


def test_weights_digest_is_memoised_by_size_and_mtime(tiny_dir, tmp_path):
    from parity.refcache import weights_digest

    memo = tmp_path / "memo.json"
    first = weights_digest(tiny_dir, memo)
    assert memo.is_file() and weights_digest(tiny_dir, memo) == first
    copy = tmp_path / "m"
    shutil.copytree(tiny_dir, copy)
    assert weights_digest(copy, memo) == first  # content-addressed: the path does not matter
    (copy / "generation_config.json").write_text((copy / "generation_config.json").read_text() + " ")
    assert weights_digest(copy, memo) != first


def test_a_big_file_is_digested_in_pieces_that_cover_every_byte(tmp_path, monkeypatch):
    import hashlib

    from parity import refcache

    monkeypatch.setattr(refcache, "PIECE", 1000)
    small, big = tmp_path / "small", tmp_path / "big"
    small.write_bytes(b"x" * 1000)
    data = bytes(range(256)) * 10 + b"tail"  # 2564 bytes: pieces of 1000, 1000 and 564
    big.write_bytes(data)
    assert refcache.file_digest(small) == hashlib.sha256(b"x" * 1000).hexdigest()  # one piece: plain SHA-256
    pieces = b"".join(hashlib.sha256(data[i:i + 1000]).digest() for i in range(0, len(data), 1000))
    assert refcache.file_digest(big) == "pieces:" + hashlib.sha256(b"1000\n" + pieces).hexdigest()
    for where in (0, 1500, len(data) - 1):  # a change in any piece, the last byte too, changes it
        changed = bytearray(data)
        changed[where] ^= 1
        big.write_bytes(bytes(changed))
        assert refcache.file_digest(big) != "pieces:" + hashlib.sha256(b"1000\n" + pieces).hexdigest()


# -- reuse, refresh, corruption --------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_dir):
    """Runs over one private cache: (1) fills it; (2) only the candidate changed: reuses it."""
    root = tmp_path_factory.mktemp("refcache")
    cache = root / "cache"
    cache.mkdir()
    shutil.copytree(tiny_dir, cache / Path(tiny_dir).name)  # the built-in checkpoint, not rebuilt
    prompts = root / "p.txt"
    prompts.write_text("Hello, this is a quick parity check.\nThe quick brown fox jumps over the lazy dog.\n")
    common = ["--mos", "none", "--max-frames", "3"]
    first = parity("run", str(prompts), "--out", str(root / "r1"), *common, cache=cache)
    second = parity("run", str(prompts), "--out", str(root / "r2"), *common, "--set", "candidate.attention=sdpa", cache=cache)
    return {"root": root, "cache": cache, "prompts": prompts, "common": common, "first": first, "second": second}


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _same_reference(a: Path, b: Path, prompt_id: str = "p000") -> bool:
    ta = load_file(str(a / "traces" / f"{prompt_id}.reference.safetensors"))
    tb = load_file(str(b / "traces" / f"{prompt_id}.reference.safetensors"))
    return ta.keys() == tb.keys() and all(ta[k].equal(tb[k]) for k in ta)


def test_second_run_with_only_the_candidate_changed_reuses_the_reference(runs):
    r1, r2 = runs["root"] / "r1", runs["root"] / "r2"
    assert runs["first"].returncode in (0, 1), runs["first"].stderr
    assert runs["second"].returncode in (0, 1), runs["second"].stderr
    s1, s2 = _summary(r1), _summary(r2)
    assert (s1["reference_cache"]["hits"], s1["reference_cache"]["misses"]) == (0, 2)
    assert (s2["reference_cache"]["hits"], s2["reference_cache"]["misses"]) == (2, 0)
    assert all(p["timing"]["reference_cached"] for p in s2["prompts"])
    assert not any(p["timing"]["reference_cached"] for p in s1["prompts"])
    assert _same_reference(r1, r2) and _same_reference(r1, r2, "p001")
    assert s2["sides"]["reference"]["engine"] == "reference"  # the settings come with the entry
    assert "reference cache: 2 of 2 prompts reused" in runs["second"].stdout
    assert "2 of 2 prompts reused from the cache" in (r2 / "report.html").read_text()
    # Reused traces are compared like fresh ones: the candidate changed, so its error did.
    assert s1["prompts"][0]["comparison"]["max_rel_l2"] != s2["prompts"][0]["comparison"]["max_rel_l2"]


def test_where_the_time_went_is_recorded_and_shown(runs):
    from parity.report.console import time_line
    from parity.results import Summary

    s1, s2 = _summary(runs["root"] / "r1"), _summary(runs["root"] / "r2")
    for s in (s1, s2):
        tool = dict(s["tool_time"])
        assert set(tool) == {"process_age_s", "setup_s", "setup_parts", "sides_s", "drain_s"}
        parts = tool.pop("setup_parts")
        assert all(v >= 0 for v in tool.values()) and all(v >= 0 for v in parts.values())
        assert set(parts) >= {"prompts_s", "checkpoint_s", "preflight_s", "scorers_s", "engines_made_s", "reference_cache_s"}
        assert sum(parts.values()) <= tool["setup_s"] + 0.01  # the stages are laps of the setup
        # The engines' loads, passes and codec decoding happen inside the sides' span.
        t = [p["timing"] for p in s["prompts"]]
        engines = sum(s["engine_load_s"].values()) + sum(x["forced_s"] + x["free_s"] + x["candidate_audio_s"] for x in t)
        engines += sum(x["reference_s"] + x["reference_audio_s"] for x in t if not x["reference_cached"])
        assert 0 < engines <= tool["sides_s"]
    # A cached reference decoded no audio in the second run; the first decoded it.
    assert all(p["timing"]["reference_audio_s"] == 0 for p in s2["prompts"])
    assert all(p["timing"]["reference_audio_s"] > 0 for p in s1["prompts"])
    line = time_line(Summary.from_json(s1))
    assert line.startswith("time: ") and f"both sides {s1['tool_time']['sides_s']:.1f} s" in line
    assert line.replace("time: ", "Time: ", 1) in (runs["root"] / "r1" / "report.html").read_text()
    # A summary from before it was recorded, or with junk in it, shows no line rather than failing.
    assert time_line(Summary.from_json({**s1, "tool_time": None})) is None
    assert "setup 0.0 s" in time_line(Summary.from_json({**s1, "tool_time": {**s1["tool_time"], "setup_s": "x"}}))
    # The setup's stages of 0.1 s or more, largest first.
    parts = {"preflight_s": 0.5, "scorers_s": 2.0, "prompts_s": 0.01, "environment_s": True}
    line = time_line(Summary.from_json({**s1, "tool_time": {**s1["tool_time"], "setup_parts": parts}}))
    assert "(scorers 2.0, preflight 0.5)," in line
    assert "setup_parts" not in line


def test_refresh_reference_ignores_the_cache(runs):
    out = runs["root"] / "r3"
    proc = parity("run", str(runs["prompts"]), "--out", str(out), *runs["common"], "--refresh-reference", cache=runs["cache"])
    assert proc.returncode in (0, 1), proc.stderr
    s = _summary(out)
    assert (s["reference_cache"]["hits"], s["reference_cache"]["refreshed"]) == (0, 2)
    assert "--refresh-reference: 2 prompts run again" in proc.stdout
    assert _same_reference(runs["root"] / "r1", out)  # deterministic: the rerun matches what was cached


@pytest.mark.parametrize("damage", ["flip_a_byte", "drop_the_manifest", "truncate_audio"])
def test_corrupt_or_partial_entry_is_rebuilt_never_trusted(runs, damage, tmp_path):
    from parity.refcache import entries

    cache = tmp_path / "cache"
    shutil.copytree(runs["cache"], cache)
    entry = sorted((cache / "reference-traces").glob("*/*"), key=lambda p: p.name)[0]
    if damage == "flip_a_byte":
        path = entry / "reference.safetensors"
        data = bytearray(path.read_bytes())
        data[-5] ^= 0x01  # a flipped bit inside a tensor: it still parses
        path.write_bytes(bytes(data))
    elif damage == "drop_the_manifest":
        (entry / "manifest.json").unlink()
    else:
        path = entry / "audio.safetensors"
        path.write_bytes(path.read_bytes()[:100])
    out = tmp_path / "r"
    proc = parity("run", str(runs["prompts"]), "--out", str(out), *runs["common"], cache=cache)
    assert proc.returncode in (0, 1), proc.stderr
    s = _summary(out)
    assert s["reference_cache"]["rebuilt"] == 1 and s["reference_cache"]["misses"] == 1 and s["reference_cache"]["hits"] == 1
    assert "1 corrupt entry rebuilt" in proc.stdout
    assert _same_reference(runs["root"] / "r1", out) and _same_reference(runs["root"] / "r1", out, "p001")
    assert all(e.ok for e in entries(cache / "reference-traces"))


# -- parity cache list / prune ---------------------------------------------------------------

def test_cache_list_and_prune(runs, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(runs["cache"], cache)
    listed = parity("cache", "list", cache=cache)
    assert listed.returncode == 0 and "2 entries" in listed.stdout and "corrupt" not in listed.stdout
    entries = sorted((cache / "reference-traces").glob("*/*/manifest.json"))
    old = time.time() - 10 * 86400
    os.utime(entries[0], (old, old))  # last used ten days ago
    assert parity("cache", "prune", cache=cache).returncode == 2  # says what to prune
    bad_age = parity("cache", "prune", "--older-than", "7x", cache=cache)
    assert bad_age.returncode == 2 and "is not an age" in bad_age.stderr
    pruned = parity("cache", "prune", "--older-than", "7d", cache=cache)
    assert pruned.returncode == 0 and "removed 1 entries" in pruned.stdout, pruned.stdout
    assert not entries[0].exists() and entries[1].exists()
    assert (cache / Path(next(cache.glob("random-*"))).name).is_dir()  # the built-in checkpoint is not the cache's to prune
    assert parity("cache", "prune", "--all", cache=cache).returncode == 0
    assert not list((cache / "reference-traces").glob("*/*"))


def test_a_reference_fault_bypasses_the_cache(runs, tmp_path, tiny_dir):
    """The test hook's reference faults must hit the real engine, not a cached trace."""
    from parity.recipe import Side, default_recipe
    from parity.run import Run

    recipe = replace(default_recipe(), reference=Side(device="cpu"))
    run = Run(runs["prompts"], recipe, tmp_path / "o")
    assert run._reference_cache(tiny_dir, ("reference", 0, "raise")) is None
