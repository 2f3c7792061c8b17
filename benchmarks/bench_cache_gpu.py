"""GPU benchmark of the reference-trace cache and of parity's own overhead (run by hand on an H200).

    python benchmarks/bench_cache_gpu.py --out reports/bench_cache_gpu.json [--before-tree /path/to/main]

1. Builds the random:0.6b checkpoint once (not timed).
2. First run: ``parity run recipes/prompts/en_zh_18.jsonl --recipe recipes/faster-qwen3-tts.toml``
   (18 prompts x 32 frames) on an empty reference cache.
3. Second run: the same with only the candidate changed (``--set candidate.attention=eager``),
   which reuses the cached reference traces. Reported: wall(second) / wall(first); goal <= 0.35.
4. For each run, the tool's overhead: wall minus the engines' own time, where the engines' time
   is the model loads plus every reference (not cached), teacher-forced and free-running pass,
   as ``summary.json`` records them; as a share of wall (goal <= 15% on the first run).
   Also kept: the engines' codec decoding (``codec_decode_s``, counted as tool overhead above, as
   before, and as engine work in ``tool_overhead_share_with_codec_as_engine``), and parity's own
   clock (``tool_time``: before the run, setup, both sides, waiting for the prompt worker; the
   rest, ``outputs_and_exit_s``, is writing summary/junit/report and the process exiting).
5. The engines' own start-up, for scale: a bare process importing torch, transformers, qwen_tts
   and faster_qwen3_tts (what running either engine without parity also pays), fastest of 2.
6. With ``--before-tree``, the first run again from that checkout (e.g. main before the cache),
   for the overhead before.
Each run is a fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARGS = ["run", "recipes/prompts/en_zh_18.jsonl", "--recipe", "recipes/faster-qwen3-tts.toml"]


def timed(tree: Path, cache: Path, out: Path, extra: list[str] = (), profile: Path | None = None) -> dict:
    env = {**os.environ, "PARITY_CACHE": str(cache), "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")])}
    prof = ["-m", "cProfile", "-o", str(profile)] if profile else []
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *prof, "-m", "parity.cli", *ARGS, "--out", str(out), *extra], cwd=tree, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 1):
        raise SystemExit(f"parity run failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    s = json.loads((out / "summary.json").read_text())
    prompts = [p for p in s["prompts"] if p.get("status") == "ok"]
    reference = sum(p["timing"]["reference_s"] for p in prompts if not p["timing"].get("reference_cached"))
    forced = sum(p["timing"]["forced_s"] for p in prompts)
    free = sum(p["timing"]["free_s"] for p in prompts)
    loads = sum((s.get("engine_load_s") or {}).values())
    scoring = sum(p["timing"].get("scoring_s", 0.0) for p in prompts)  # on the prompt worker: overlaps the engines
    # The engines' codecs decoding codes to audio (recorded from 2026-12-03 on; absent before).
    audio = sum(p["timing"].get("reference_audio_s", 0.0) + p["timing"].get("candidate_audio_s", 0.0) for p in prompts)
    engines = reference + forced + free + loads
    tool = s.get("tool_time") or {}
    known = sum(v for v in tool.values() if isinstance(v, (int, float)))
    return {"wall_s": round(wall, 2), "engines_s": round(engines, 2), "reference_s": round(reference, 2),
            "forced_s": round(forced, 2), "free_s": round(free, 2), "loads_s": round(loads, 2),
            "codec_decode_s": round(audio, 2),
            "tool_overhead_s": round(wall - engines, 2),
            "tool_overhead_share_with_codec_as_engine": round((wall - engines - audio) / wall, 3),
            # Where the wall time went: parity's own clock (summary.json tool_time); the rest is
            # writing summary/junit/report and the process exiting.
            "tool_time": tool, "outputs_and_exit_s": round(wall - known, 2) if tool else None,
            "main_thread_besides_engines_s": round(tool["sides_s"] - engines - audio, 2) if tool else None,
            "scoring_s_on_worker": round(scoring, 2), "tool_overhead_share": round((wall - engines) / wall, 3),
            "reference_cache": s.get("reference_cache"), "exit_code": proc.returncode,
            "report_html_bytes": (out / "report.html").stat().st_size}


def engine_imports_s() -> float:
    """Seconds a bare process takes to import the engines' stack (the fastest of 2)."""
    code = "import torch, transformers, qwen_tts, faster_qwen3_tts"
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return round(min(times), 2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--before-tree", type=Path)
    ap.add_argument("--profile", type=Path, help="also run the second run once more under cProfile; top functions to this file")
    ap.add_argument("--keep", type=Path, help="copy each run's directory here, without its traces (summary, results, report)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="parity-gpu-bench-"))
    try:
        cache = root / "cache"
        subprocess.run([sys.executable, "-c", "from parity.models import ensure_builtin; ensure_builtin('0.6b')"],
                       env={**os.environ, "PARITY_CACHE": str(cache),
                            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}, check=True, cwd=REPO)
        first = timed(REPO, cache, root / "first")
        second = timed(REPO, cache, root / "second", ["--set", "candidate.attention=eager"])
        if args.keep:
            for name in ("first", "second"):
                shutil.copytree(root / name, args.keep / name, ignore=shutil.ignore_patterns("traces"), dirs_exist_ok=True)
        imports = engine_imports_s()
        for run in (first, second):
            run["tool_overhead_share_beyond_engine_imports"] = round((run["tool_overhead_s"] - imports) / run["wall_s"], 3)
        result = {
            "engine_stack_import_s": imports,
            "what": "en_zh_18 x 32 frames, faster-qwen3-tts.toml: first run (empty reference cache) vs a second run with "
                    "only the candidate changed (cached reference); tool overhead = wall - (model loads + engine passes)",
            "first": first, "second_candidate_changed": second,
            "second_over_first_wall": round(second["wall_s"] / first["wall_s"], 3),
            "goals": {"second_over_first_wall": 0.35, "tool_overhead_share": 0.15},
        }
        if args.profile:
            stats_file = root / "second.prof"
            timed(REPO, cache, root / "profiled", ["--set", "candidate.attention=eager"], profile=stats_file)
            import io
            import pstats

            text = io.StringIO()
            pstats.Stats(str(stats_file), stream=text).sort_stats("cumulative").print_stats(60)
            args.profile.write_text(text.getvalue())
        if args.before_tree:
            before_cache = root / "before-cache"
            shutil.copytree(cache, before_cache, ignore=shutil.ignore_patterns("reference-traces"))
            result["before"] = timed(args.before_tree, before_cache, root / "before")
        try:
            import torch

            result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        except ImportError:
            pass
        print(json.dumps(result, indent=1))
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
