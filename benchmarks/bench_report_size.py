"""report.html size: a real smoke run (its run directory is re-rendered) and synthesised runs of
18 prompts x 32 and x 500 frames at Qwen3-TTS-0.6B layer counts (28 talker, 5 predictor layers),
with speech-band noise as audio (the worst case for a lossy codec's size at a constant bit rate
is the same as for speech; a pure tone would flatter FLAC/WAV compression).

For each: bytes of the report, and how many of them are audio, heatmap PNGs and other SVG, and
how many prompts' audio is embedded. Run it against the code in PYTHONPATH, e.g. once on the old
tree and once on the new:

    PYTHONPATH=/path/to/old python benchmarks/bench_report_size.py --smoke-run runs/smoke --label before --out reports/bench_report_size.json
    python benchmarks/bench_report_size.py --smoke-run runs/smoke --label after --out reports/bench_report_size.json

Results of several labels accumulate in the one JSON file.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _synthesiser(n_frames: int):
    """tests/test_report_size.py's synthesiser, re-pointed at ``n_frames`` frames."""
    spec = importlib.util.spec_from_file_location("report_size_synth", REPO / "tests" / "test_report_size.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.N_FRAMES = n_frames
    return module


def synthesise(run_dir: Path, n_frames: int) -> dict:
    """A run directory of 18 prompts x ``n_frames`` frames; each first divergence is placed inside
    the run (the test's positions are for 500 frames and are scaled here)."""
    import soundfile as sf

    m = _synthesiser(n_frames)
    rng = np.random.default_rng(0)
    for sub in ("points", "traces", "audio", "results"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    base = m._points(rng)
    lines = base.to_csv(index=False).splitlines()
    n_samples = int(n_frames / 12.5 * m.SR)
    prompts = []
    summary = None
    for i in range(m.N_PROMPTS):
        pid = f"p{i:03d}"
        step = (137 + 17 * i if i % 2 else 251 + 11 * i) * n_frames // 500
        first = ({"component": "predictor", "step": step, "substep": 9, "layer": 3, "point": "layer3"} if i % 2 else
                 {"component": "talker", "step": step, "substep": -1, "layer": 17, "point": "layer17"})
        first.update(rel_l2=m.TOL * 1.05, max_abs=0.03, cosine=0.99994, sqnr_db=39.6, tolerance=m.TOL)
        m._write_points(run_dir / "points" / f"{pid}.csv.gz", base, lines, first)
        import torch

        codes = torch.from_numpy(rng.integers(0, 2048, (n_frames, 16)))
        ref_tokens = torch.cat([codes[:, 0], torch.tensor([2150])])
        m._trace(codes, ref_tokens, codes[:, 1:].clone()).save(run_dir / "traces", f"{pid}.reference")
        m._trace(codes, ref_tokens, codes[:, 1:].clone()).save(run_dir / "traces", f"{pid}.candidate.forced")
        m._trace(codes, ref_tokens, codes[:, 1:]).save(run_dir / "traces", f"{pid}.candidate.free")
        for side in ("reference", "candidate"):
            noise = rng.standard_normal(n_samples).astype(np.float32)
            wav = 0.2 * np.convolve(noise, np.ones(4) / 4, mode="same")  # speech-band noise
            sf.write(str(run_dir / "audio" / f"{pid}.{side}.wav"), wav, m.SR, subtype="PCM_16")
        prompts.append({
            "id": pid, "text": f"Prompt number {i}", "line": i + 1, "status": "ok", "passed": False,
            "comparison": {
                "first_divergence": first, "first_nonfinite": None, "max_rel_l2": first["rel_l2"], "nonfinite_points": 0,
                "points_compared": len(base), "points_over": 1, "bit_identical": False, "added_per_layer": [],
                "first_flip": None, "ref_frames": n_frames, "hints": [],
                "free_run": {"agreement": 0.6, "codebook0_agreement": 0.55, "first_diff_frame": step, "frames_compared": n_frames},
                "length_diff": 0, "length_diff_is_bookkeeping": False, "first_nonfinite_reference": None, "nonfinite_audio": {},
            },
            "gates": [{"name": "hidden_within_tolerance", "passed": False, "detail": "over"}],
            "audio": {"reference": f"audio/{pid}.reference.wav", "candidate": f"audio/{pid}.candidate.wav"},
            "mos": {"reference": 3.1, "candidate": 2.9, "delta": -0.2}, "timing": {}, "codebook0": {},
            "audible_from_s": (step + 1) / 12.5,
        })
        summary = {"schema_version": 2, "command": "parity run", "recipe": {"name": "synthetic"}, "tolerance": m.TOL,
                   "sides": {"reference": {"dtype": "float32"}, "candidate": {"dtype": "bfloat16"}}, "failure": None,
                   "prompts": prompts, "passed": False, "peak_memory": {},
                   "counts": {"prompts": len(prompts), "ran": len(prompts), "passed": 0, "not_run": 0}}
    return summary


def composition(path: Path) -> dict:
    """Bytes of report.html, and of its embedded audio, heatmap PNGs and other inline SVG."""
    text = path.read_text(encoding="utf-8")
    audio = re.findall(r'data:audio/[a-z0-9.+-]+;base64,[A-Za-z0-9+/=]+', text)
    png = re.findall(r'data:image/png;base64,[A-Za-z0-9+/=]+', text)
    total = path.stat().st_size
    return {
        "bytes": total, "mb": round(total / 1e6, 3),
        "audio_bytes": sum(map(len, audio)), "audio_clips_embedded": len(audio),
        "audio_clips": len(re.findall(r"<audio\b", text)), "audio_kind": sorted({a.split(";")[0] for a in audio}),
        "png_bytes": sum(map(len, png)),
        "rest_bytes": total - sum(map(len, audio)) - sum(map(len, png)),
    }


def render(run_dir: Path, summary: dict | None) -> tuple[dict, float]:
    """Render report.html of a run directory (from its summary.json when ``summary`` is None)."""
    from parity.report import html

    if summary is None:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    t0 = time.perf_counter()
    html.write(summary, run_dir, run_dir / "report.html")
    return composition(run_dir / "report.html"), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke-run", type=Path, help="a finished `parity run recipes/prompts/smoke.txt` directory")
    ap.add_argument("--label", default="now")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    import parity.report.html as html_mod

    result: dict = {"size_limit": getattr(html_mod, "SIZE_LIMIT", None), "parity": str(Path(html_mod.__file__).parents[2])}
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke_run:
            run = Path(tmp) / "smoke"
            shutil.copytree(args.smoke_run, run, ignore=shutil.ignore_patterns("report.html", "compare"))
            result["smoke"], result["smoke_render_s"] = render(run, None)
        for frames in (32, 500):
            run = Path(tmp) / f"synth{frames}"
            summary = synthesise(run, frames)
            result[f"18x{frames}"], result[f"18x{frames}_render_s"] = render(run, summary)
    print(json.dumps(result, indent=1))
    if args.out:
        data = json.loads(args.out.read_text()) if args.out.is_file() else {}
        data[args.label] = result
        args.out.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
