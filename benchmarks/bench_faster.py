"""Faster-engine benchmark (needs a CUDA GPU): probe overhead inside the graphs, speed against
the reference, and host/device memory of a long prompt with probes on.

    python benchmarks/bench_faster.py --model random:0.6b --frames 200 --long-frames 1000 --out reports/bench_faster_gpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from parity.engines.faster import FasterEngine
from parity.engines.reference import ReferenceEngine
from parity.env import fingerprint
from parity.models import resolve_model
from parity.prompts import Prompt
from parity.recipe import Decoding, Side

PROMPT = Prompt(id="bench", text="The quick brown fox jumps over the lazy dog near the riverbank.", speaker="vivian", language="english")


def rss_mib() -> float:
    """Current resident memory of this process (not the peak, which model loading dominates)."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def faster_ms_per_frame(engine: FasterEngine, frames: int, record: bool) -> float:
    trace = engine.run(PROMPT, Decoding(max_frames=frames), record=record)
    t = trace.meta["timing"]
    return t["decode_s"] * 1000 / max(t["steps"], 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="random:0.6b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--long-frames", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    model_dir = resolve_model(args.model)
    side = Side(engine="faster", dtype=args.dtype, attention="sdpa", cache="static:2048", device="cuda")
    result: dict = {"model": args.model, "dtype": args.dtype, "frames": args.frames, "environment": fingerprint()}

    # Probe overhead: the same engine captured with taps and without, alternated to share drift.
    with_taps = FasterEngine(side, model_dir, record=True)
    with_taps.load()
    no_taps = FasterEngine(side, model_dir, record=False)
    no_taps.load()
    for e in (with_taps, no_taps):  # capture + warm
        faster_ms_per_frame(e, 8, record=e.with_taps)
    on, off = [], []
    for _ in range(args.reps):
        on.append(faster_ms_per_frame(with_taps, args.frames, record=True))
        off.append(faster_ms_per_frame(no_taps, args.frames, record=False))
    result["faster_ms_per_frame_probes_on"] = statistics.median(on)
    result["faster_ms_per_frame_probes_off"] = statistics.median(off)
    result["probe_overhead_pct"] = 100 * (statistics.median(on) / statistics.median(off) - 1)
    result["samples_on"], result["samples_off"] = on, off
    no_taps.close()

    # Memory for a long prompt with probes on (full per-point tensors kept).
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base_dev = torch.cuda.memory_allocated()
    rss_before = rss_mib()
    t0 = time.perf_counter()
    long = with_taps.run(PROMPT, Decoding(max_frames=args.long_frames), record=True)
    result["long_prompt"] = {
        "frames": long.n_frames, "seconds": time.perf_counter() - t0,
        "device_peak_extra_mib": (torch.cuda.max_memory_allocated() - base_dev) / 2**20,
        "host_rss_growth_mib": rss_mib() - rss_before,
        "trace_bytes_mib": sum(t.numel() * t.element_size() for t in (long.talker_hidden, long.pred_hidden, long.pred_logits, long.talker_logits)) / 2**20,
    }
    del long
    with_taps.close()

    # Reference (HF generate path via parity's loop) without and with probes.
    ref_side = Side(engine="reference", dtype=args.dtype, attention="sdpa", cache="dynamic", device="cuda")
    ref = ReferenceEngine(ref_side, model_dir)
    ref.load()
    for _ in range(2):  # warm kernels and allocator before timing
        ref.run(PROMPT, Decoding(max_frames=8), record=False)
    ref_frames = min(args.frames, 100)
    for record in (False, True):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        tr = ref.run(PROMPT, Decoding(max_frames=ref_frames), record=record)
        torch.cuda.synchronize()
        key = "reference_ms_per_frame_probes_" + ("on" if record else "off")
        result[key] = (time.perf_counter() - t0) * 1000 / max(tr.n_frames, 1)
    ref.close()
    result["speedup_faster_probes_on_vs_reference"] = result["reference_ms_per_frame_probes_off"] / result["faster_ms_per_frame_probes_on"]
    print(json.dumps({k: v for k, v in result.items() if k != "environment"}, indent=1))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
