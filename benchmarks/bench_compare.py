"""`parity compare` of the smoke run on the CPU: wall time of re-analysing a saved run (fresh
process each time, as a user runs it), next to the run's own wall time, and proof that nothing
heavy was imported (no engine module, no qwen_tts, no scorer).

    python benchmarks/bench_compare.py --out reports/bench_compare_cpu.json
    python benchmarks/bench_compare.py --run runs/smoke --out ...   # reuse a finished smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("parity.engines.reference", "parity.engines.faster", "qwen_tts", "faster_qwen3_tts", "transformers",
         "parity.models", "speechmos", "onnxruntime", "utmos")

# Runs `parity compare` through the CLI entry point and lists the heavy modules it imported.
_PROBE = """
import runpy, sys
sys.argv = ['parity', 'compare', sys.argv[1], '--out', sys.argv[2]]
try:
    runpy.run_module('parity.cli', run_name='__main__')
except SystemExit as e:
    code = e.code
heavy = {heavy!r}
print('HEAVY', sorted(m for m in sys.modules if m.startswith(heavy)), 'EXIT', code)
"""


# The same work in one process, split into imports, judging (traces -> results) and writing outputs.
_SPLIT = """
import json, sys, time
from pathlib import Path
t0 = time.perf_counter()
from parity.analysis import analyse_run
from parity.outputs import write_outputs
from parity.reanalysis import analysis_recipe, read_run, read_summary
import parity.compare, parity.report.html
t1 = time.perf_counter()
run, out = Path(sys.argv[1]), Path(sys.argv[2])
saved = read_summary(run)
meta, recipe = read_run(run)
summary = analyse_run(run, analysis_recipe(recipe, None, [], str(run)), saved, meta)
t2 = time.perf_counter()
out.mkdir(parents=True, exist_ok=True)
write_outputs(summary, out, run)
t3 = time.perf_counter()
print(json.dumps({"imports_s": t1 - t0, "judge_s": t2 - t1, "write_outputs_s": t3 - t2}))
"""


def timed(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "COLUMNS": "100"})
    return time.perf_counter() - t0, proc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, help="a finished smoke run directory (default: make one)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    result: dict = {"cpu_count": os.cpu_count(), "load_average_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run
        if run is None:
            run = Path(tmp) / "smoke"
            wall, proc = timed([sys.executable, "-m", "parity.cli", "run", "recipes/prompts/smoke.txt", "--out", str(run)])
            result["run_wall_s"] = wall
            result["run_exit_code"] = proc.returncode
        walls = []
        for k in range(args.reps):
            wall, proc = timed([sys.executable, "-c", _PROBE.format(heavy=HEAVY), str(run), f"{tmp}/compare{k}"])
            walls.append(wall)
            result["compare_output"] = proc.stdout.strip().splitlines()[-1]
        _, proc = timed([sys.executable, "-c", _SPLIT, str(run), f"{tmp}/split"])
        result["split_in_process"] = json.loads(proc.stdout.strip().splitlines()[-1])
        own = json.loads((run / "summary.json").read_text())
        again = json.loads((Path(tmp) / "compare0" / "summary.json").read_text())
        keys = ("prompts", "counts", "passed", "tolerance", "failure")
        result.update({
            "compare_wall_s": walls, "compare_median_wall_s": statistics.median(walls),
            "same_as_run_summary": all(own[k] == again[k] for k in keys),
            "prompts": len(own["prompts"]),
        })
        if "run_wall_s" in result:
            result["compare_to_run_ratio"] = result["compare_median_wall_s"] / result["run_wall_s"]
    result["load_average_after"] = os.getloadavg()  # other work on the machine slows both numbers alike
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
