"""The smoke run on this machine: wall time and peak memory of the README's main command, and the
cost of probing on the CPU reference (probes on vs off, same process, alternated).

    python benchmarks/bench_smoke.py --out reports/bench_smoke_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def smoke_wall(reps: int) -> dict:
    """Run `parity run recipes/prompts/smoke.txt` as a user would (fresh process each time)."""
    walls, rc = [], None
    for _ in range(reps):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "parity.cli", "run", "recipes/prompts/smoke.txt", "--out", f"{tmp}/run"],
                                  cwd=REPO, capture_output=True, text=True)
            walls.append(time.perf_counter() - t0)
            rc = proc.returncode
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"wall_s": walls, "median_wall_s": statistics.median(walls), "exit_code": rc, "peak_rss_mib": peak_kib / 1024}


def probe_overhead(frames: int, reps: int) -> dict:
    """Reference engine on random:tiny, fp32: the same prompt with probes on and off, alternated."""
    from parity.engines.reference import ReferenceEngine
    from parity.models import ensure_builtin
    from parity.prompts import Prompt
    from parity.recipe import Decoding, Side

    engine = ReferenceEngine(Side(), ensure_builtin("tiny"))
    engine.load()
    prompt = Prompt(id="bench", text="The quick brown fox jumps over the lazy dog.", line=1)
    decoding = Decoding(max_frames=frames)
    engine.run(prompt, decoding)  # warm up
    on, off = [], []
    for _ in range(reps):
        for record, bucket in ((True, on), (False, off)):
            t0 = time.perf_counter()
            engine.run(prompt, decoding, record=record)
            bucket.append((time.perf_counter() - t0) * 1000 / frames)
    return {"frames": frames, "ms_per_frame_probes_on": statistics.median(on), "ms_per_frame_probes_off": statistics.median(off),
            "ratio_on_off": statistics.median(on) / statistics.median(off), "samples_on": on, "samples_off": off}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    result = {
        "what": "smoke run wall time and peak RSS (README command, fresh process), CPU reference probe overhead",
        "machine": {"cpus": os.cpu_count(), "load_average_before": os.getloadavg()},
        "smoke": smoke_wall(args.reps),
        "probe_overhead_cpu_tiny": probe_overhead(frames=24, reps=5),
    }
    result["machine"]["load_average_after"] = os.getloadavg()
    print(json.dumps({k: v for k, v in result.items()}, indent=1))
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
