"""report.html stays within its size limit (2 MB) for 18 prompts x 500 frames and still marks every first
divergence. The run directory is synthesized (no engine runs): points CSVs, traces and WAVs with
the shapes a Qwen3-TTS-0.6B-sized run writes (28 talker layers, 5 predictor layers)."""

from __future__ import annotations

import gzip
import re
import struct
import zlib
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from parity.compare import COLUMNS
from parity.report import html, plots
from parity.trace import Trace

N_PROMPTS, N_FRAMES = 18, 500
TALKER_LAYERS, PRED_LAYERS = 28, 5
TOL = 1e-2
SR = 24000


def _points(rng: np.random.Generator) -> pd.DataFrame:
    """Every point of a 500-frame run with bf16-like errors, all below tolerance, in execution order."""
    frames = []
    names = ["embed"] + [f"layer{i}" for i in range(TALKER_LAYERS)] + ["logits"]
    steps = np.arange(N_FRAMES + 1)
    for li, name in enumerate(names):
        frames.append(pd.DataFrame({"component": "talker", "step": steps, "substep": -1, "layer": li - 1, "point": name}))
    pnames = ["embed"] + [f"layer{i}" for i in range(PRED_LAYERS)] + ["logits"]
    f, s = np.meshgrid(np.arange(N_FRAMES), np.arange(15), indexing="ij")
    for li, name in enumerate(pnames):
        frames.append(pd.DataFrame({"component": "predictor", "step": f.ravel(), "substep": s.ravel(), "layer": li - 1, "point": name}))
    df = pd.concat(frames, ignore_index=True)
    df["rel_l2"] = rng.uniform(1e-4, 2e-3, len(df))
    df["max_abs"] = df["rel_l2"] * 3
    df["cosine"] = 1 - df["rel_l2"] ** 2 / 2
    df["sqnr_db"] = -20 * np.log10(df["rel_l2"])
    df["added"] = df["rel_l2"] / 3
    df["over"] = False
    order = df["component"].map({"talker": 0, "predictor": 1})
    df = df.assign(order=order).sort_values(["step", "order", "substep", "layer"]).drop(columns="order")
    return df[COLUMNS].reset_index(drop=True)


def _write_points(path: Path, base: pd.DataFrame, base_lines: list[str], first: dict) -> None:
    """The base points with exactly one point over tolerance (the first divergence), just over it
    and among small neighbours, so that a mean-pooled bin would hide it."""
    hit = np.flatnonzero((base["component"] == first["component"]) & (base["step"] == first["step"])
                         & (base["substep"] == first["substep"]) & (base["layer"] == first["layer"]))
    assert len(hit) == 1
    row = base.iloc[hit[0]].to_dict()
    row.update(rel_l2=first["rel_l2"], added=first["rel_l2"] / 2, over=True)
    lines = list(base_lines)
    lines[hit[0] + 1] = ",".join(str(row[c]) for c in COLUMNS)  # +1: the header line
    with gzip.open(path, "wt", compresslevel=1) as f:
        f.write("\n".join(lines) + "\n")


def _trace(codes: torch.Tensor, choice: torch.Tensor, pred_choice: torch.Tensor) -> Trace:
    """A trace with the right step/frame shapes; hidden sizes of 1 (the report reads only tokens)."""
    s, f = len(choice), len(codes)
    return Trace(
        talker_hidden=torch.zeros(s, TALKER_LAYERS + 1, 1), talker_logits=torch.zeros(s, 1),
        talker_tokens=torch.cat([codes[:, 0], torch.tensor([2150])])[:s], talker_choice=choice, codes=codes,
        pred_hidden=torch.zeros(f, 15, PRED_LAYERS + 1, 1), pred_logits=torch.zeros(f, 15, 1), pred_choice=pred_choice,
    )


def synthesize_run(run_dir: Path) -> dict:
    """A run directory with summary-shaped results; returns the summary."""
    import soundfile as sf

    rng = np.random.default_rng(0)
    for sub in ("points", "traces", "audio", "results"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    t = np.arange(int(N_FRAMES / 12.5 * SR)) / SR
    wav = (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    base = _points(rng)
    base_lines = base.to_csv(index=False).splitlines()
    prompts = []
    for i in range(N_PROMPTS):
        pid = f"p{i:03d}"
        if i % 2:
            first = {"component": "predictor", "step": 137 + 17 * i, "substep": 9, "layer": 3, "point": "layer3"}
        else:
            first = {"component": "talker", "step": 251 + 11 * i, "substep": -1, "layer": 17, "point": "layer17"}
        first.update(rel_l2=TOL * 1.05, max_abs=0.03, cosine=0.99994, sqnr_db=39.6, tolerance=TOL)
        _write_points(run_dir / "points" / f"{pid}.csv.gz", base, base_lines, first)
        codes = torch.from_numpy(rng.integers(0, 2048, (N_FRAMES, 16)))
        ref_tokens = torch.cat([codes[:, 0], torch.tensor([2150])])  # + EOS at the last step
        _trace(codes, ref_tokens, codes[:, 1:].clone()).save(run_dir / "traces", f"{pid}.reference")
        forced_choice = ref_tokens.clone()
        forced_choice[first["step"] + 5] += 1
        pred_choice = codes[:, 1:].clone()
        pred_choice[first["step"] + 2, 4] += 1
        _trace(codes, forced_choice, pred_choice).save(run_dir / "traces", f"{pid}.candidate.forced")
        free = codes[:480].clone()
        free[first["step"] + 5:, 0] = torch.from_numpy(rng.integers(0, 2048, 480 - first["step"] - 5))
        _trace(free, torch.cat([free[:, 0], torch.tensor([2150])]), free[:, 1:]).save(run_dir / "traces", f"{pid}.candidate.free")
        sf.write(str(run_dir / "audio" / f"{pid}.reference.wav"), wav, SR, subtype="PCM_16")
        sf.write(str(run_dir / "audio" / f"{pid}.candidate.wav"), wav[: 480 * SR * 2 // 25], SR, subtype="PCM_16")
        prompts.append({
            "id": pid, "text": f"Prompt number {i} & <friends>", "line": i + 1, "status": "ok", "passed": False,
            "comparison": {
                "first_divergence": first, "first_nonfinite": None, "max_rel_l2": first["rel_l2"],
                "points_compared": 67530, "points_over": 1, "bit_identical": False, "added_per_layer": [],
                "first_flip": {"component": "talker", "step": first["step"] + 5, "substep": -1, "ref_token": 5,
                               "cand_token": 6, "ref_rank_in_cand": 1, "cand_margin": 0.02, "ref_margin": 0.01,
                               "logit_error": 0.03, "logit_noise": 0.01, "near_tie": True},
                "ref_frames": N_FRAMES, "free_run": {"agreement": 0.6, "codebook0_agreement": 0.55,
                                                     "first_diff_frame": first["step"] + 5, "frames_compared": 480},
                "length_diff": -20, "length_diff_is_bookkeeping": False,
            },
            "gates": [{"name": "hidden_within_tolerance", "passed": False, "detail": "over"},
                      {"name": "no_nonfinite", "passed": True, "detail": "ok"}],
            "audio": {"reference": f"audio/{pid}.reference.wav", "candidate": f"audio/{pid}.candidate.wav"},
            "mos": {"reference": {"ovrl": 3.1}, "candidate": {"ovrl": 2.9}, "delta": {"ovrl": -0.2}},
            "audible_from_s": (first["step"] + 6) / 12.5,
        })
    return {
        "command": "parity run prompts.jsonl --out big", "prompts_file": "prompts.jsonl", "model": "random:0.6b",
        "recipe": {"name": "big"}, "tolerance": TOL, "environment": {"torch": "x"},
        "sides": {"reference": {"dtype": "float32"}, "candidate": {"dtype": "bfloat16"}},
        "failure": None, "prompts": prompts, "counts": {"prompts": N_PROMPTS, "ran": N_PROMPTS, "passed": 0},
        "passed": False, "bisect": [{"factor": "attention", "restores": True, "max_rel_l2": 1e-6}],
    }


def decode_palette_png(uri: str) -> np.ndarray:
    """Index image of a palette PNG data URI written by parity.report.png."""
    import base64

    data = base64.b64decode(uri.split(",", 1)[1])
    pos, idat, width = 8, b"", 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, width + 1)
    assert (raw[:, 0] == 0).all()
    return raw[:, 1:]


class _Svgs(HTMLParser):
    """Heatmap SVGs in order: their component, bin size, PNG and first-divergence box."""

    def __init__(self):
        super().__init__()
        self.maps: list[dict] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "svg" and "heatmap" in (a.get("class") or ""):
            self.maps.append({"component": a["data-component"], "bin": int(a["data-bin"]), "png": None, "first": None})
        elif tag == "image" and self.maps and self.maps[-1]["png"] is None:
            self.maps[-1]["png"] = a["href"]
        elif tag == "g" and a.get("class") == "first-divergence":
            self.maps[-1]["first"] = (int(a["data-step"]), int(a["data-row"]))


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("big")
    summary = synthesize_run(run_dir)
    html.write(summary, run_dir, run_dir / "report.html")
    return summary, run_dir, (run_dir / "report.html").read_text(encoding="utf-8")


def test_report_within_the_size_limit(big):
    summary, run_dir, text = big
    size = (run_dir / "report.html").stat().st_size
    print(f"report.html for {N_PROMPTS} prompts x {N_FRAMES} frames: {size / 1e6:.2f} MB")
    assert size <= html.SIZE_LIMIT
    assert text.count('class="prompt"') == N_PROMPTS


def test_audio_linked_and_named_when_the_mp3_does_not_fit(big):
    _, run_dir, text = big
    srcs = re.findall(r'<audio[^>]*src="([^"]*)"', text)
    assert len(srcs) == 2 * N_PROMPTS
    # One prompt's 40 s pair is about 0.9 MB as base64 MP3, more than the heatmaps leave of 2 MB:
    # nothing fits, everything is linked next to the report, and the report names those prompts.
    for s in srcs:
        assert re.fullmatch(r"audio/p\d{3}\.(reference|candidate)\.wav", s) and (run_dir / s).is_file()
        assert s.split("/")[1].split(".")[0] in text.split("is not in this file")[1][:2000]


def test_audio_linked_and_named_when_nothing_fits(big):
    summary, run_dir, _ = big
    text = html.render(summary, run_dir, size_limit=1_000_000)
    srcs = re.findall(r'<audio[^>]*src="([^"]*)"', text)
    assert srcs and not any(s.startswith("data:") for s in srcs)
    named = text.split("is not in this file")[1][:600]
    assert all(p["id"] in named for p in summary["prompts"])


def test_audio_embedded_while_the_budget_lasts(big):
    summary, run_dir, _ = big
    text = html.render(summary, run_dir, size_limit=5_000_000)  # room for a few 40 s MP3 pairs, not all 18
    assert len(text.encode()) <= 5_000_000
    srcs = re.findall(r'<audio[^>]*src="([^"]*)"', text)
    embedded = [s.startswith("data:audio/mpeg;base64,") for s in srcs]
    assert 0 < sum(embedded) < len(srcs)
    # Both sides of a prompt or neither, in report order.
    assert embedded[0::2] == embedded[1::2]
    assert embedded == sorted(embedded, reverse=True)


def test_every_first_divergence_is_marked_on_a_downsampled_heatmap(big):
    summary, _, text = big
    parser = _Svgs()
    parser.feed(text)
    assert len(parser.maps) == 2 * N_PROMPTS
    scale = plots.Scale(TOL)
    over_start = 2 + scale.n_under  # first palette index of the "over tolerance" colours
    for i, p in enumerate(summary["prompts"]):
        first = p["comparison"]["first_divergence"]
        maps = {m["component"]: m for m in parser.maps[2 * i: 2 * i + 2]}
        m = maps[first["component"]]
        other = maps["predictor" if first["component"] == "talker" else "talker"]
        assert other["first"] is None
        assert m["first"] is not None, f"{p['id']}: first divergence not marked"
        step, row = m["first"]
        assert step == first["step"]
        img = decode_palette_png(m["png"])
        if first["component"] == "predictor":
            assert img.shape == (15 * (PRED_LAYERS + 2), -(-N_FRAMES // m["bin"]))
            assert row == first["substep"] * (PRED_LAYERS + 2) + first["layer"] + 1
        else:
            assert img.shape == (TALKER_LAYERS + 2, -(-(N_FRAMES + 1) // m["bin"]))
            assert row == first["layer"] + 1
        assert m["bin"] > 1, "500 frames should be binned"
        col = first["step"] // m["bin"]
        # The cell survives binning: its bin shows an over-tolerance colour, and it is the only one.
        assert img[row, col] >= over_start, f"{p['id']}: first divergence lost in downsampling"
        assert (img >= over_start).sum() == 1


def test_optional_fields_render(big):
    _, _, text = big
    assert 'id="bisect"' in text and "attention" in text
    assert "MOS ref" in text and "-0.200" in text
    assert "audible from" in text
    assert "Prompt number 3 &amp; &lt;friends&gt;" in text


def test_tight_limit_bins_harder_but_keeps_the_marks(big):
    summary, run_dir, _ = big
    text = html.render(summary, run_dir, size_limit=1_000_000)
    assert len(text.encode()) <= 1_000_000
    parser = _Svgs()
    parser.feed(text)
    assert all(m["bin"] >= 4 for m in parser.maps)
    assert sum(m["first"] is not None for m in parser.maps) == N_PROMPTS
    assert "data:audio" not in text


def test_18_prompts_x_32_frames_embed_all_audio_as_mp3_within_2_mb(tmp_path):
    """The short-run case: every clip embedded (MP3), each with its lossless WAV linked, and the
    MP3 decodes to the WAV's length."""
    import base64
    import importlib.util
    import io

    import soundfile as sf

    spec = importlib.util.spec_from_file_location("bench_report_size", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_report_size.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    summary = bench.synthesise(tmp_path, 32)
    html.write(summary, tmp_path, tmp_path / "report.html")
    text = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert len(text.encode()) <= 2_000_000
    srcs = re.findall(r'<audio[^>]*src="([^"]*)"', text)
    assert len(srcs) == 2 * N_PROMPTS and all(s.startswith("data:audio/mpeg;base64,") for s in srcs)
    links = re.findall(r'<a class="small" href="(audio/[^"]+\.wav)">lossless WAV</a>', text)
    assert len(links) == 2 * N_PROMPTS and all((tmp_path / link).is_file() for link in links)
    mp3, wav = base64.b64decode(srcs[0].split(",", 1)[1]), tmp_path / links[0]
    assert sf.info(io.BytesIO(mp3)).duration == pytest.approx(sf.info(str(wav)).duration, abs=0.1)
