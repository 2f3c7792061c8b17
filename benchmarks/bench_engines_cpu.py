"""CPU benchmark of the smoke run and of the reference-trace cache.

    python benchmarks/bench_engines_cpu.py --out reports/bench_engines_cpu.json [--before-tree /path/to/old/checkout]

Measures, each in a fresh process as a user runs it:

1. the smoke run (``parity run recipes/prompts/smoke.txt``, the README command) on an empty
   reference cache: wall time and CPU time (user + system of the child), median of ``--reps``;
   with ``--before-tree`` the same command from another checkout (e.g. main before this change)
   is run alternately with it, so both see the same machine load;
2. the cache's win: right after each smoke run, a second run with only the candidate changed
   (``--set candidate.attention=sdpa``), which reuses the reference's traces; the ratio
   second/first of wall and of CPU time, per pair and the median.

Wall time depends on what else runs on the machine; CPU time much less. The load average
before and after is recorded, so a reader can tell a quiet run from a shared one.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMOKE = ["run", "recipes/prompts/smoke.txt"]


def _child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed_run(tree: Path, cache: Path, out: Path, extra: list[str] = ()) -> dict:
    """One ``parity run`` from ``tree`` in a fresh process: wall, CPU, exit code."""
    env = {**os.environ, "PARITY_CACHE": str(cache), "PYTHONPATH": str(tree)}
    cpu0, t0 = _child_cpu(), time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "parity.cli", *SMOKE, "--out", str(out), *extra],
                          cwd=tree, env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, _child_cpu() - cpu0
    if proc.returncode not in (0, 1):
        raise SystemExit(f"parity run failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "exit_code": proc.returncode,
            "reference_cache": summary.get("reference_cache"), "cpu_threads": summary.get("cpu_threads")}


def fresh_cache(root: Path, checkpoint_from: Path | None) -> Path:
    """An empty cache holding only the built-in checkpoint (built once, not timed)."""
    cache = Path(tempfile.mkdtemp(dir=root, prefix="cache-"))
    if checkpoint_from is not None:
        for built in checkpoint_from.glob("random-tiny-*"):
            shutil.copytree(built, cache / built.name)
    return cache


def _median(rows: list[dict], key: str) -> float:
    return round(statistics.median(r[key] for r in rows), 3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--before-tree", type=Path, help="another checkout to time the same smoke run from (alternated)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="parity-bench-"))
    try:
        # Build the built-in checkpoint once, outside the timings.
        seed_cache = root / "seed"
        subprocess.run([sys.executable, "-c", "from parity.models import ensure_builtin; ensure_builtin('tiny')"],
                       env={**os.environ, "PARITY_CACHE": str(seed_cache), "PYTHONPATH": str(REPO)}, check=True)
        result: dict = {
            "what": "smoke run wall and CPU time (cold reference cache), and a second run with only the candidate "
                    "changed (warm cache) as a ratio to the first; fresh process each",
            "command": "parity " + " ".join(SMOKE),
            "machine": {"cpus": os.cpu_count(), "load_average_before": os.getloadavg()},
        }
        before, pairs = [], []
        for _ in range(args.reps):
            if args.before_tree:
                before.append(timed_run(args.before_tree, fresh_cache(root, seed_cache), Path(tempfile.mkdtemp(dir=root)) / "run"))
            cache = fresh_cache(root, seed_cache)
            # The first run on an empty reference cache is the smoke run as a new user runs it.
            first = timed_run(REPO, cache, Path(tempfile.mkdtemp(dir=root)) / "run")
            second = timed_run(REPO, cache, Path(tempfile.mkdtemp(dir=root)) / "run", ["--set", "candidate.attention=sdpa"])
            pairs.append({"first": first, "second": second, "wall_ratio": round(second["wall_s"] / first["wall_s"], 3),
                          "cpu_ratio": round(second["cpu_s"] / first["cpu_s"], 3)})
            smoke = [p["first"] for p in pairs]
            result["smoke"] = {"runs": smoke, "median_wall_s": _median(smoke, "wall_s"), "median_cpu_s": _median(smoke, "cpu_s")}
            if before:
                result["smoke_before"] = {"tree": str(args.before_tree), "runs": before, "median_wall_s": _median(before, "wall_s"),
                                          "median_cpu_s": _median(before, "cpu_s")}
            result["second_run_candidate_changed"] = {
                "pairs": pairs,
                "median_wall_ratio": round(statistics.median(p["wall_ratio"] for p in pairs), 3),
                "median_cpu_ratio": round(statistics.median(p["cpu_ratio"] for p in pairs), 3),
            }
            result["machine"]["load_average_after"] = os.getloadavg()
            result["reps_done"] = len(pairs)
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")  # after every rep: a slow machine still leaves numbers
            print(json.dumps(pairs[-1]), flush=True)
        print(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
