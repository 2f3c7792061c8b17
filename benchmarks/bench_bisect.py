"""Run count and wall time of ``parity bisect`` over 8 settings, each variant's measured signature,
and sampler parity, on a built-in random checkpoint.

    python benchmarks/bench_bisect.py --out reports/bench_bisect_cpu.json
    python benchmarks/bench_bisect.py --model random:0.6b --device cuda --faster --out reports/bench_bisect_gpu.json

The bisect: reference fp32/sdpa/dynamic; candidate bf16 (load-time), eager attention, a 256-slot
StaticCache, TF32 on, and the variants kv_quant=fp8 (the planted culprit), fused_qkv,
fused_gate_up and sdpa_backend=flash (matmul_precision=highest on CUDA; harmless): 8 settings, one prompt, K teacher-forced
frames, bf16 tolerance 2.5e-2 (the fp32->bf16 change alone stays under it on the tiny model).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

from parity.recipe import DEFAULT_TOLERANCES, Decoding, Recipe, Side

PROMPT = "Hello world, this is a test."
VARIANTS = ["rmsnorm_lowp", "rmsnorm_lowp@predictor", "rope_lowp", "fused_qkv", "fused_gate_up", "kv_quant=fp8",
            "kv_quant=int8", "sdpa_backend=math", "matmul_precision=medium", "mask_row=2@talker:1"]


def bisect_recipe(model: str, device: str) -> Recipe:
    ref = Side(dtype="float32", device=device)
    # Forcing the flash SDPA kernel is a no-op on CPU (torch already picks it) but fails for fp32
    # on CUDA; there the fourth decoy is the default matmul precision set explicitly.
    decoy = "sdpa_backend=flash" if device == "cpu" else "matmul_precision=highest"
    cand = Side(dtype="bfloat16", attention="eager", cache="static:256", tf32=True, device=device,
                variants=("kv_quant=fp8", "fused_qkv", "fused_gate_up", decoy))
    return Recipe(name="bench8", model=model, reference=ref, candidate=cand,
                  tolerances={**DEFAULT_TOLERANCES, "bfloat16": 2.5e-2})


def faster_recipe(model: str, device: str) -> Recipe:
    """The faster engine against the reference: engine, attention and cache differ (the faster
    engine applies no variants yet, and loads once per distinct side: it cannot be reconfigured)."""
    ref = Side(dtype="bfloat16", device=device)
    cand = Side(engine="faster", dtype="bfloat16", attention="eager", cache="static:2048", device=device)
    return Recipe(name="faster3", model=model, reference=ref, candidate=cand)


def bench_bisect(model: str, device: str, steps: int, recipe: Recipe | None = None) -> dict:
    from parity.bisect import bisect

    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "p.txt"
        prompts.write_text(PROMPT + "\n")
        t0 = time.perf_counter()
        result = bisect(prompts, recipe or bisect_recipe(model, device), None, steps, None)
        wall = time.perf_counter() - t0
    if "proof" not in result:  # no divergence to explain
        return {"settings": [f["describe"] for f in result["factors"]], "steps": steps, "verdict": result["verdict"],
                "counts": result["counts"], "wall_s": wall}
    runs = result["runs"]
    return {
        "settings": [f["describe"] for f in result["factors"]], "steps": steps, "tolerance": result["tolerance"],
        "verdict": result["verdict"], "culprits": result["culprits"], "proof_holds": result["proof"]["holds"],
        "layers": [{"factor": e["factor"], "first_layer": e["first_layer"], "runs": len(e["runs"])} for e in result["layers"]],
        "counts": result["counts"], "wall_s": wall,
        "median_run_s": statistics.median(r["seconds"] for r in runs),
        "runs": [{k: r[k] for k in ("run", "purpose", "factors", "diverges", "max_rel_l2", "seconds", "layers")} for r in runs],
    }


def bench_variants(model: str, device: str, steps: int) -> list[dict]:
    """Each variant alone on a bf16 reference: where the error first appears and how large it gets."""
    from parity import compare
    from parity.engines.reference import ReferenceEngine
    from parity.models import resolve_model
    from parity.prompts import Prompt

    prompt = Prompt(id="p0", text=PROMPT, speaker=None, language="english", line=1)
    side = Side(dtype="bfloat16", device=device)
    engine = ReferenceEngine(side, resolve_model(model, 0))
    engine.load()
    rows = []
    try:
        decoding = Decoding(max_frames=steps)
        ref = engine.run(prompt, decoding)
        for spec in VARIANTS:
            engine.reconfigure(dataclasses.replace(side, variants=(spec,)))
            t0 = time.perf_counter()
            cand = engine.run(prompt, decoding, force=ref)
            seconds = time.perf_counter() - t0
            notes = {k: dict(v) for k, v in engine.applied.notes.items()}
            points = compare.point_frame(cand, ref, DEFAULT_TOLERANCES["bfloat16"])
            summary = compare.summarize(points, cand, ref, None, DEFAULT_TOLERANCES["bfloat16"])
            differs = points[points["max_abs"] > 0]
            first = None if not len(differs) else {k: compare._py(differs.iloc[0][k]) for k in ("component", "step", "substep", "point", "rel_l2")}
            rows.append({
                "variant": spec, "first_difference": first, "max_rel_l2": summary["max_rel_l2"],
                "first_over_tolerance": summary["first_divergence"], "first_nonfinite": summary["first_nonfinite"],
                "hints": [h["signature"] for h in summary["hints"]], "notes": notes, "run_s": seconds,
            })
        engine.reconfigure(side)
    finally:
        engine.close()
    return rows


def bench_sampler(trials: int) -> list[dict]:
    from parity.variants.sampler import compare_samplers, standard_cases

    rows = []
    for name, params, dtype in standard_cases():
        r = compare_samplers(params, trials=trials, logits_dtype=dtype, suppress_from=2048 - 200)
        rows.append({"case": name, "agreement": r["agreement"], "trials": trials, "examples": r["examples"][:3]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--faster", action="store_true", help="also bisect the faster engine against the reference (CUDA)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    data = {
        "what": "parity bisect over 8 settings (run count, loads, wall time); variant signatures; sampler parity",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "versions": {p: metadata.version(p) for p in ("torch", "transformers", "qwen-tts-hf", "faster-qwen3-tts")},
        "model": args.model, "device": args.device,
        "bisect": bench_bisect(args.model, args.device, args.steps),
        "variants": bench_variants(args.model, args.device, args.steps),
        "sampler": bench_sampler(args.trials),
    }
    if args.faster:
        data["bisect_faster"] = bench_bisect(args.model, args.device, args.steps, faster_recipe(args.model, args.device))
    data["machine"]["load_average_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1, default=str) + "\n")
    for key in ("bisect", "bisect_faster"):
        if key in data:
            b = data[key]
            print(f"{key}: {b['counts']['settings_runs']} settings runs + {b['counts']['layer_runs']} layer runs, "
                  f"{b['counts']['loads']} loads, {b['wall_s']:.1f} s; {b['verdict']}")
    for row in data["variants"]:
        print(f"  {row['variant']:28s} max rel L2 {row['max_rel_l2']}  first diff {row['first_difference']}")
    for row in data["sampler"]:
        print(f"  sampler {row['case']:40s} agreement {row['agreement']:.3f}")


if __name__ == "__main__":
    main()
