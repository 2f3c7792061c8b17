"""Sub-layer probe overhead inside faster-qwen3-tts's CUDA graphs (needs a CUDA GPU).

One process, one model size, three engines captured alike and timed in alternation (so clock and
thermal drift fall on all three): no probes, layer probes (the default) and sub-layer probes
(``probes = "sublayers"``). Reports ms per frame from the engine's own decode timing (the loop with
the graph replays and parity's per-replay snapshots; not the host copy after it), the overhead of
each against no probes (goals: layers <= 1%, sublayers <= 2%), what the sub-layer traces cost in
memory, and a correctness check: the sub-layer values recorded inside the graphs equal those of
the same engine run eagerly (graphs off) on the same forced codes.

    python benchmarks/sublayer_overhead_gpu.py --model random:0.6b --frames 200 --reps 5 --out-dir reports
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path

import torch

from parity.engines.faster import FasterEngine
from parity.env import fingerprint
from parity.models import resolve_model
from parity.prompts import Prompt
from parity.recipe import Decoding, Side

PROMPT = Prompt(id="bench", text="The quick brown fox jumps over the lazy dog near the riverbank.", speaker="vivian", language="english")
MODES = ("off", "layers", "sublayers")


def ms_per_frame(engine: FasterEngine, frames: int, record: bool) -> tuple[float, int]:
    trace = engine.run(PROMPT, Decoding(max_frames=frames), record=record)
    t = trace.meta["timing"]
    return t["decode_s"] * 1000 / max(t["steps"], 1), int(t["steps"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="random:0.6b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--attention", default="sdpa")
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out-dir", required=True)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("sublayer_overhead_gpu.py needs a CUDA GPU")
    model_dir = resolve_model(args.model)
    base = Side(engine="faster", dtype=args.dtype, attention=args.attention, cache="static:2048", device="cuda")
    result: dict = {"model": args.model, "dtype": args.dtype, "attention": args.attention, "frames": args.frames,
                    "reps": args.reps, "environment": fingerprint()}

    engines = {
        "off": FasterEngine(base, model_dir, record=False),
        "layers": FasterEngine(base, model_dir, record=True),
        "sublayers": FasterEngine(replace(base, probes="sublayers"), model_dir, record=True),
    }
    for mode, e in engines.items():
        e.load()
        ms_per_frame(e, 8, record=mode != "off")  # capture the graphs and warm up
    samples: dict[str, list[float]] = {m: [] for m in MODES}
    steps: dict[str, list[int]] = {m: [] for m in MODES}
    for _ in range(args.reps):
        for mode in MODES:
            ms, n = ms_per_frame(engines[mode], args.frames, record=mode != "off")
            samples[mode].append(ms)
            steps[mode].append(n)
    med = {m: statistics.median(samples[m]) for m in MODES}
    result["ms_per_frame"] = med
    result["samples_ms_per_frame"] = samples
    result["decode_steps"] = steps
    result["overhead_pct"] = {m: 100 * (med[m] / med["off"] - 1) for m in ("layers", "sublayers")}
    result["sublayers_vs_layers_pct"] = 100 * (med["sublayers"] / med["layers"] - 1)
    result["goals"] = {"layers_pct_max": 1.0, "sublayers_pct_max": 2.0,
                       "layers_met": result["overhead_pct"]["layers"] <= 1.0,
                       "sublayers_met": result["overhead_pct"]["sublayers"] <= 2.0}

    # Memory and correctness: the sub-layer engine forced on its own free-running codes, inside the
    # graphs, against a graphs-off engine with sub-layer probes on the same codes.
    sub = engines["sublayers"]
    free = sub.run(PROMPT, Decoding(max_frames=min(args.frames, 64)))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base_dev = torch.cuda.memory_allocated()
    graphs = sub.run(PROMPT, Decoding(max_frames=free.n_frames), force=free)
    result["sublayer_trace"] = {
        "frames": graphs.n_frames,
        "device_peak_extra_mib": (torch.cuda.max_memory_allocated() - base_dev) / 2**20,
        "talker_sub_shape": list(graphs.talker_sub.shape), "pred_sub_shape": list(graphs.pred_sub.shape),
        "sub_mib_per_frame_fp32_host": (graphs.talker_sub.numel() + graphs.pred_sub.numel()) * 4 / 2**20 / max(graphs.n_frames, 1),
        "layer_mib_per_frame_fp32_host": (graphs.talker_hidden.numel() + graphs.pred_hidden.numel()) * 4 / 2**20 / max(graphs.n_frames, 1),
    }
    for e in engines.values():
        e.close()
    eager = FasterEngine(replace(base, probes="sublayers"), model_dir, cuda_graphs=False, record=True)
    eager.load()
    ref = eager.run(PROMPT, Decoding(max_frames=free.n_frames), force=free)
    eager.close()
    result["graph_vs_eager"] = {
        "codes_equal": bool(torch.equal(graphs.codes, ref.codes)),
        "talker_sub_max_abs": float((graphs.talker_sub - ref.talker_sub).abs().max()),
        "pred_sub_max_abs": float((graphs.pred_sub - ref.pred_sub).abs().max()),
        "talker_hidden_max_abs": float((graphs.talker_hidden - ref.talker_hidden).abs().max()),
        "talker_sub_rel_l2": float((graphs.talker_sub - ref.talker_sub).norm() / ref.talker_sub.norm()),
        "pred_sub_rel_l2": float((graphs.pred_sub - ref.pred_sub).norm() / ref.pred_sub.norm()),
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "bench_sublayer_gpu.json"
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("environment", "samples_ms_per_frame")}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
