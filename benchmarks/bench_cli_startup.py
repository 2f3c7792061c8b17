"""How fast the CLI answers when nothing needs a model: --help, --version, -h of a command, a
usage error (a typo'd flag), and the costly-mistake refusals. Goal: each under 1 s.

Each case runs as a fresh ``python -m parity.cli`` process (what a user waits for), N times;
the median and the worst wall time are written as JSON, with the median CPU time (user + system)
of the process, which a busy machine inflates far less than the wall time, and the same for a
bare ``python -c pass`` as the floor.

    python benchmarks/bench_cli_startup.py --out reports/bench_cli_startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOAL_S = 1.0


def cases(tmp: Path) -> dict[str, list[str]]:
    return {
        "--help": ["--help"],
        "--version": ["--version"],
        "run -h": ["run", "-h"],
        "bare parity (usage)": [],
        "typo'd flag": ["run", "recipes/prompts/smoke.txt", "--max-frame", "3"],
        "--max-frames 0": ["run", "recipes/prompts/smoke.txt", "--max-frames", "0"],
        "recipe passed as PROMPTS": ["run", "recipes/smoke.toml"],
        "--resume on a new directory": ["run", "recipes/prompts/smoke.txt", "--resume", "--out", str(tmp / "new")],
    }


def time_one(args: list[str], module: bool = True) -> tuple[float, float, int]:
    """(wall s, CPU s, exit code) of one fresh process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "parity.cli", *args] if module else [sys.executable, *args]
    proc = subprocess.run(cmd, capture_output=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {name: [time_one(args) for _ in range(a.repeat)] for name, args in cases(Path(tmp)).items()}
        runs["floor: python -c pass"] = [time_one(["-c", "pass"], module=False) for _ in range(a.repeat)]
        for name, samples in runs.items():
            walls, cpus, codes = zip(*samples)
            results[name] = {"median_s": round(statistics.median(walls), 3), "max_s": round(max(walls), 3),
                             "median_cpu_s": round(statistics.median(cpus), 3), "exit_code": codes[0],
                             "under_goal": statistics.median(walls) < GOAL_S}
            print(f"{name:32s} median {results[name]['median_s']:.3f} s  max {results[name]['max_s']:.3f} s  "
                  f"cpu {results[name]['median_cpu_s']:.3f} s  exit {codes[0]}")
    report = {"goal_s": GOAL_S, "repeat": a.repeat, "python": platform.python_version(), "cpus": os.cpu_count(),
              "load_avg_1min": os.getloadavg()[0], "cases": results}
    if a.out:
        a.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
