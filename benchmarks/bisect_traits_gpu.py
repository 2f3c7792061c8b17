"""``parity bisect`` over faster-qwen3-tts's engine traits on a GPU: wall time, run count, verdicts.

Runs the real command line, once per recipe, and keeps what a user would see::

    python benchmarks/bisect_traits_gpu.py --out reports/bisect-traits-gpu            # both recipes
    python benchmarks/bisect_traits_gpu.py --out reports/bisect-traits-gpu --recipes faster-qwen3-tts
    python benchmarks/bisect_traits_gpu.py --out reports/bisect-traits-gpu --recipes faster-qwen3-tts-eager

(one recipe per command where a command may run 10 minutes at most: the summary keeps the
entries of recipes run before and replaces those run again).

For each recipe (default ``faster-qwen3-tts`` and ``faster-qwen3-tts-eager``, 0.6B dimensions,
bf16, CUDA graphs over a StaticCache of 2048) it writes ``OUT/<recipe>/bisect.json`` (parity's
own output), ``OUT/<recipe>/console.txt`` (stdout and stderr of the command) and, for all of
them, ``OUT/bench_bisect_traits_gpu.json``: the command, exit status, wall time, run and load
counts, culprits, whether the proof held, which traits were searched and which not (and why),
the explained/unexplained verdict, and the environment. Nothing here judges the numbers; the
verdicts are parity's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES = ("faster-qwen3-tts", "faster-qwen3-tts-eager")


def _stamp_lines(stream, log, t0: float) -> None:
    """Copy ``stream`` into ``log`` line by line, each prefixed with the elapsed seconds."""
    for line in stream:
        log.write(f"[{time.perf_counter() - t0:7.1f}s] {line}")
        log.flush()


def run_one(name: str, prompts: str, steps: int, out: Path, timeout: float | None = None) -> dict:
    """One ``parity bisect`` through the CLI: its console text, exit status and wall time.

    The console (stdout, then stderr with parity's progress log lines) streams into
    ``console.txt`` while the command runs, so a run stopped by ``timeout`` (or by the machine's
    limit) still leaves how far it got."""
    target = out / name
    target.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "parity.cli", "bisect", prompts, "--recipe", f"recipes/{name}.toml",
               "--steps", str(steps), "--out", str(target), "-v"]
    env = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
    console = target / "console.txt"
    t0 = time.perf_counter()
    with console.open("w", encoding="utf-8") as log:
        log.write(f"$ python {' '.join(command[1:])}\n")
        log.flush()
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        # Each console line is kept with the seconds since the start, so a stopped run shows where its time went.
        reader = threading.Thread(target=_stamp_lines, args=(proc.stdout, log, t0), daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = None
        reader.join(timeout=5)
    wall = time.perf_counter() - t0
    entry: dict = {"recipe": name, "command": "python " + " ".join(command[1:]), "exit": code,
                   "wall_s": round(wall, 2)}
    if code is None:
        lines = console.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        entry["error"] = f"stopped after {timeout:g} s (--timeout); last console line: {lines[-1] if lines else ''}"
        return entry
    path = target / "bisect.json"
    if not path.exists():
        lines = console.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        entry["error"] = lines[-1] if lines else "no bisect.json"
        return entry
    result = json.loads(path.read_text(encoding="utf-8"))["bisect"]
    entry.update({
        "verdict": result.get("verdict"), "culprits": result.get("culprits"),
        "proof_holds": (result.get("proof") or {}).get("holds"),
        "candidate_first_divergence": (result.get("candidate_run") or {}).get("first_divergence"),
        "factors": [f["name"] for f in result.get("factors", [])],
        "traits_searched": [t["trait"] for t in result.get("traits", []) if t["state"] == "active"],
        "traits_not_searched": {t["trait"]: t["state"] for t in result.get("traits", []) if t["state"] != "active"},
        "explained_by_traits": result.get("explained_by_traits"),
        "unexplained": (result.get("unexplained") or {}).get("text"),
        "counts": result.get("counts"),
        "alone": {k: {"diverges": v["diverges"], "at": v.get("first_divergence")} for k, v in (result.get("alone") or {}).items()},
        "removed": {k: {"diverges": v["diverges"], "at": v.get("first_divergence")} for k, v in (result.get("removed") or {}).items()},
    })
    return entry


def environment() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    for dist in ("transformers", "qwen-tts-hf", "faster-qwen3-tts"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[dist] = None
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="Directory for bisect.json, console.txt per recipe and the summary JSON.")
    parser.add_argument("--prompts", default="recipes/prompts/en_zh_18.jsonl")
    parser.add_argument("--steps", type=int, default=4, help="Teacher-forced frames per bisect run (the divergence on these recipes enters at talker step 0 or 1).")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="Comma-separated recipe names under recipes/.")
    parser.add_argument("--timeout", type=float, default=None, help="Stop a recipe's bisect after this many seconds (its console so far is kept).")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    # The built-in checkpoint is built (or found) first and timed apart, so it is not part of a bisect's wall time.
    from parity.models import ensure_builtin

    t0 = time.perf_counter()
    ensure_builtin("0.6b")
    build_s = round(time.perf_counter() - t0, 1)
    print(json.dumps({"checkpoint random:0.6b ready after s": build_s}), flush=True)
    path = args.out / "bench_bisect_traits_gpu.json"
    earlier = json.loads(path.read_text(encoding="utf-8"))["recipes"] if path.exists() else []
    entries = []
    for name in [r.strip() for r in args.recipes.split(",") if r.strip()]:
        entries.append(run_one(name, args.prompts, args.steps, args.out.resolve(), args.timeout) | {"prompts": args.prompts, "steps": args.steps})
        print(json.dumps({k: entries[-1].get(k) for k in ("recipe", "exit", "wall_s", "verdict")}), flush=True)
        # Written after each recipe, so a command stopped during the next one keeps this one's entry.
        done = {e["recipe"] for e in entries}
        summary = {"benchmark": "parity bisect over faster-qwen3-tts engine traits", "prompts": args.prompts,
                   "steps": args.steps, "checkpoint_ready_s": build_s, "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "environment": environment(), "recipes": [e for e in earlier if e["recipe"] not in done] + entries}
        path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out / 'bench_bisect_traits_gpu.json'}")


if __name__ == "__main__":
    main()
