"""The faster-qwen3-tts PR #48 setting, measured (needs a CUDA GPU): ICL voice cloning at the public
0.6B dimensions, bf16, faster-qwen3-tts's CUDA graphs over a StaticCache of 2048, with eager and
with sdpa attention, each against the HF reference (same dtype and attention, dynamic cache) and an
fp32 truth. Does eager drift step by step there?

For each attention it runs ``parity run`` with ``recipes/faster-qwen3-tts-icl-{eager,sdpa}.toml`` on
ICL prompts whose reference clip is written here (a voice-like clip of ``--clip-seconds``, so the
clip's codes fill the prefill as a real ICL prompt does), then reads each run's compared points and
reports per talker step the median over prompts of the largest relative L2 error over layers
(teacher-forced, candidate vs reference; and candidate vs truth), the growth from the first decode
steps to the last ones, the slope of log10(error) per step, and each prompt's first token flip.

    python benchmarks/bench_icl_drift.py --out reports/bench_icl_drift_gpu.json --runs /tmp/runs
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

TEXTS = [
    "The quick brown fox jumps over the lazy dog near the riverbank.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "When the sunlight strikes raindrops in the air, they act as a prism and form a rainbow.",
    "Six spoons of fresh snow peas, five thick slabs of blue cheese, and maybe a snack for her brother Bob.",
    "We also need a small plastic snake and a big toy frog for the kids.",
    "She can scoop these things into three red bags, and we will go meet her Wednesday at the train station.",
]
REF_TEXT = "This is the reference voice, reading a few calm sentences so the model can continue it."


def write_inputs(directory: Path, clip_seconds: float) -> Path:
    from parity.refclip import write_clip

    directory.mkdir(parents=True, exist_ok=True)
    clip = write_clip(directory / "ref-clip.wav", seconds=clip_seconds, seed=1)
    prompts = directory / "icl.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"icl{i:02d}", "text": t, "language": "english",
                                           "ref_audio": str(clip), "ref_text": REF_TEXT}) + "\n" for i, t in enumerate(TEXTS)))
    return prompts


def step_errors(run: Path, prompt_id: str, against: str = "reference") -> list[float]:
    """Per talker step: the largest relative L2 error over the talker's layers (candidate forced
    vs the reference; ``against='truth'``: candidate vs truth, from the saved traces)."""
    import pandas as pd

    if against == "reference":
        points = pd.read_csv(run / "points" / f"{prompt_id}.csv.gz")
        talker = points[(points.component == "talker") & (points.point != "logits")]
        return [float(v) for v in talker.groupby("step")["rel_l2"].max().sort_index()]
    from parity.trace import Trace

    cand = Trace.load(run / "traces", f"{prompt_id}.candidate.forced")
    truth = Trace.load(run / "traces", f"{prompt_id}.truth")
    n = min(cand.n_steps, truth.n_steps)
    a, b = cand.talker_hidden[:n].double(), truth.talker_hidden[:n].double()
    rel = (a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-30)
    return [float(v) for v in rel.max(dim=1).values]


def slope_log10(series: list[float], start: int = 1) -> float | None:
    """Least-squares slope of log10(error) per step over the decode steps (step >= start)."""
    pts = [(s, math.log10(e)) for s, e in enumerate(series) if s >= start and e > 0]
    if len(pts) < 3:
        return None
    mx = sum(s for s, _ in pts) / len(pts)
    my = sum(v for _, v in pts) / len(pts)
    sxx = sum((s - mx) ** 2 for s, _ in pts)
    return sum((s - mx) * (v - my) for s, v in pts) / sxx if sxx else None


def analyse(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    per_prompt, curves, truth_curves = {}, [], []
    for p in summary["prompts"]:
        if p.get("status") != "ok":
            continue
        errs = step_errors(run, p["id"])
        curves.append(errs)
        truth = step_errors(run, p["id"], "truth") if (run / "traces" / f"{p['id']}.truth.safetensors").is_file() else None
        if truth:
            truth_curves.append(truth)
        c = p["comparison"]
        per_prompt[p["id"]] = {
            "first_divergence": c.get("first_divergence"), "first_flip": c.get("first_flip"),
            "free_run_agreement": (c.get("free_run") or {}).get("agreement"),
            "reference_clip": c.get("reference_clip"), "slope_log10_per_step": slope_log10(errs),
            "error_by_step": errs,
        }
    n = min((len(c) for c in curves), default=0)
    median = [statistics.median(c[s] for c in curves) for s in range(n)]
    nt = min((len(c) for c in truth_curves), default=0)
    median_truth = [statistics.median(c[s] for c in truth_curves) for s in range(nt)]
    early = statistics.median(median[1:5]) if n > 5 else None
    late = statistics.median(median[-4:]) if n > 8 else None
    return {
        "run": str(run), "prompts": len(curves),
        "median_error_by_step": median, "median_error_vs_truth_by_step": median_truth,
        "prefill_error": median[0] if median else None,
        "early_decode_error": early, "late_decode_error": late,
        "growth_late_over_early": (late / early) if early and late else None,
        "slope_log10_per_step": slope_log10(median),
        "first_flip_steps": sorted(p["first_flip"]["step"] for p in per_prompt.values() if p["first_flip"]),
        "per_prompt": per_prompt,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, default=Path("/tmp/runs"), help="where the run directories go")
    ap.add_argument("--out", type=Path, default=Path("reports/bench_icl_drift_gpu.json"))
    ap.add_argument("--clip-seconds", type=float, default=8.0)
    ap.add_argument("--max-frames", type=int, default=64)
    ap.add_argument("--attentions", default="eager,sdpa")
    args = ap.parse_args()
    prompts = write_inputs(args.runs / "icl-inputs", args.clip_seconds)
    result: dict = {"setting": "ICL voice clone, 0.6B dims, bf16, faster-qwen3-tts CUDA graphs over StaticCache(2048) "
                               "vs HF reference (same dtype/attention, dynamic cache), fp32 truth",
                    "clip_seconds": args.clip_seconds, "max_frames": args.max_frames, "attentions": {}}
    for att in args.attentions.split(","):
        run = args.runs / f"faster-qwen3-tts-icl-{att}"
        cmd = [sys.executable, "-m", "parity.cli", "run", str(prompts), "--recipe", f"recipes/faster-qwen3-tts-icl-{att}.toml",
               "--out", str(run), "--force", "--max-frames", str(args.max_frames)]
        rc = subprocess.run(cmd).returncode
        print(f"{att}: parity run exit {rc}", flush=True)
        result["attentions"][att] = {"exit": rc, "command": " ".join(cmd), **(analyse(run) if (run / "summary.json").is_file() else {})}
    from parity.env import fingerprint

    result["environment"] = fingerprint()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    for att, r in result["attentions"].items():
        print(f"{att}: prefill {r.get('prefill_error')}, early decode {r.get('early_decode_error')}, late decode "
              f"{r.get('late_decode_error')}, growth x{r.get('growth_late_over_early')}, slope log10/step "
              f"{r.get('slope_log10_per_step')}, first flips at steps {r.get('first_flip_steps')}")


if __name__ == "__main__":
    main()
