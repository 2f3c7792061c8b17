"""Scale-out benchmark: one suite run in one piece against the same suite split over processes.

CPU (runs anywhere; ``random:tiny``)::

    python benchmarks/shard_scaling.py cpu --out reports/bench_shard_cpu.json
    # committed: ... cpu --first 8 --frames 8 (the first 8 prompts of en_zh_18, 8 frames)

  on the same prompt file, each a fresh process, the reference cache off (every configuration
  runs both sides):
  - ``one_run_2_cores``: ``parity run`` with ``PARITY_CPU_THREADS=2``;
  - ``two_shards_1_core``: ``--shard 1/2`` and ``--shard 2/2`` started together, each with
    ``PARITY_CPU_THREADS=1``, then ``parity merge`` (timed: from the start of the shards to the
    end of the merge);
  - ``devices_cpu_cpu``: one ``parity run --devices cpu,cpu`` (two worker processes, one thread
    each, one queue).
  Ratios are wall(one run x 2 cores) / wall(configuration): above 1 the split is faster. The
  merged verdicts are checked against the one-piece run's.

GPU (needs 2 GPUs of one host; the en_zh_18 recipe at 0.6B dimensions)::

    python benchmarks/shard_scaling.py gpu --out reports/bench_shard_gpu.json

  - ``one_gpu``: ``parity run recipes/prompts/en_zh_18.jsonl --recipe recipes/faster-qwen3-tts.toml``
    on cuda:0;
  - ``two_gpus_devices``: the same with ``--devices cuda:0,cuda:1``;
  - ``two_gpus_shards``: ``--shard 1/2`` on GPU 0 and ``--shard 2/2`` on GPU 1
    (``CUDA_VISIBLE_DEVICES``) in parallel, then ``parity merge``.
  Goal: wall(one_gpu) / wall(two_gpus_devices) >= 1.8. The random:0.6b checkpoint is built before
  anything is timed.

Each configuration records its wall time, exit code, the load average around it, and whether
its verdicts equal the one-piece run's. Measurements on a machine shared with other work are
noisy: the load averages are in the JSON so the reader can judge.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _env(extra: dict | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "PARITY_REFERENCE_CACHE": "off", "PYTHONUNBUFFERED": "1"}
    return {**env, **(extra or {})}


def _parity(args: list[str], extra_env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "parity.cli", *args], cwd=REPO, env=_env(extra_env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(procs: list[subprocess.Popen]) -> list[int]:
    codes = []
    for p in procs:
        _, err = p.communicate()
        if p.returncode not in (0, 1):
            raise SystemExit(f"parity failed ({p.returncode}): {err.strip()[-800:]}")
        codes.append(p.returncode)
    return codes


def _verdicts(out: Path) -> dict:
    """Every prompt's whole verdict (its numbers included), not when or by which process it ran."""
    s = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    return {p["id"]: {k: v for k, v in p.items() if k not in ("timing", "worker")} for p in s["prompts"]}


def _pass_fail(out: Path) -> dict:
    """Per prompt: status, verdict and each gate's pass/fail (what CI acts on)."""
    s = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    return {p["id"]: (p["status"], p["passed"], [(g["name"], g["passed"]) for g in p.get("gates", [])]) for p in s["prompts"]}


def _timed(name: str, steps: list[list[tuple[list[str], dict | None]]], out: Path) -> dict:
    """Run ``steps`` (each a list of commands started together) one after another; wall of all."""
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    codes = []
    for group in steps:
        codes += _finish([_parity(args, env) for args, env in group])
    wall = time.perf_counter() - t0
    print(f"{name}: {wall:.1f} s", file=sys.stderr)
    return {"wall_s": round(wall, 2), "exit_codes": codes, "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()], "out": str(out)}


def _prompt_file(args, work: Path) -> str:
    """The prompt file, or its first ``--first N`` prompt lines (a shorter suite on a slow machine)."""
    if not args.first:
        return args.prompts
    lines = [line for line in (REPO / args.prompts).read_text(encoding="utf-8").splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    path = work / ("prompts" + Path(args.prompts).suffix)
    path.write_text("\n".join(lines[: args.first]) + "\n", encoding="utf-8")
    return str(path)


def cpu(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="shard-bench-"))
    prompts = _prompt_file(args, work)
    run = ["run", prompts, "--max-frames", str(args.frames), "--mos", "none"]
    results = {}
    one = work / "one"
    results["one_run_2_cores"] = _timed("one run x 2 cores", [[(run + ["--out", str(one)], {"PARITY_CPU_THREADS": "2"})]], one)
    single = work / "single"
    results["one_run_1_core"] = _timed("one run x 1 core", [[(run + ["--out", str(single)], {"PARITY_CPU_THREADS": "1"})]], single)
    merged = work / "merged"
    shards = [(run + ["--out", str(work / f"s{k}"), "--shard", f"{k}/2"], {"PARITY_CPU_THREADS": "1"}) for k in (1, 2)]
    results["two_shards_1_core"] = _timed("2 shards x 1 core + merge", [shards, [(["merge", str(merged), str(work / "s1"), str(work / "s2")], None)]], merged)
    dev = work / "devices"
    results["devices_cpu_cpu"] = _timed("--devices cpu,cpu", [[(run + ["--out", str(dev), "--devices", "cpu,cpu"], {"PARITY_CPU_THREADS": "1"})]], dev)
    # Torch's CPU kernels reduce in another order with another thread count, so only the 1-thread
    # run can be identical to the 1-thread shards and workers; the 2-thread run must agree in pass/fail.
    for key in ("one_run_1_core", "two_shards_1_core", "devices_cpu_cpu"):
        out = Path(results[key]["out"])
        results[key]["pass_fail_equal_one_run_2_cores"] = _pass_fail(out) == _pass_fail(one)
        if key != "one_run_1_core":
            results[key]["verdicts_identical_to_one_run_1_core"] = _verdicts(out) == _verdicts(single)
            results[key]["speedup_vs_one_run_1_core"] = round(results["one_run_1_core"]["wall_s"] / results[key]["wall_s"], 3)
        results[key]["speedup_vs_one_run_2_cores"] = round(results["one_run_2_cores"]["wall_s"] / results[key]["wall_s"], 3)
    return {"kind": "cpu", "model": "random:tiny", "prompts": args.prompts, "first_prompts": args.first or None,
            "max_frames": args.frames, "cpu_count": os.cpu_count(),
            "configurations": results}


def gpu(args) -> dict:
    from parity.models import ensure_builtin

    ensure_builtin("0.6b")  # built once, not timed
    work = Path(tempfile.mkdtemp(prefix="shard-bench-gpu-"))
    run = ["run", args.prompts, "--recipe", args.recipe]
    results = {}
    one = work / "one"
    results["one_gpu"] = _timed("1 GPU", [[(run + ["--out", str(one)], {"CUDA_VISIBLE_DEVICES": "0"})]], one)
    dev = work / "devices"
    results["two_gpus_devices"] = _timed("--devices cuda:0,cuda:1", [[(run + ["--out", str(dev), "--devices", "cuda:0,cuda:1"], None)]], dev)
    merged = work / "merged"
    shards = [(run + ["--out", str(work / f"s{k}"), "--shard", f"{k}/2"], {"CUDA_VISIBLE_DEVICES": str(k - 1)}) for k in (1, 2)]
    results["two_gpus_shards"] = _timed("2 shards on 2 GPUs + merge", [shards, [(["merge", str(merged), str(work / "s1"), str(work / "s2")], None)]], merged)
    base = _verdicts(one)
    for key in ("two_gpus_devices", "two_gpus_shards"):
        results[key]["verdicts_equal_one_run"] = _verdicts(Path(results[key]["out"])) == base
        results[key]["speedup_vs_one_gpu"] = round(results["one_gpu"]["wall_s"] / results[key]["wall_s"], 3)
    import torch

    return {"kind": "gpu", "recipe": args.recipe, "prompts": args.prompts, "gpus": torch.cuda.device_count(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "goal_speedup_2_gpus": 1.8,
            "configurations": results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kind", choices=("cpu", "gpu"))
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--prompts", default="recipes/prompts/en_zh_18.jsonl")
    ap.add_argument("--recipe", default="recipes/faster-qwen3-tts.toml", help="gpu only")
    ap.add_argument("--frames", type=int, default=16, help="cpu only: --max-frames")
    ap.add_argument("--first", type=int, default=0, help="cpu only: run only the first N prompts of the file")
    args = ap.parse_args()
    data = cpu(args) if args.kind == "cpu" else gpu(args)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    data.update({"commit": commit, "command": " ".join(["python", "benchmarks/shard_scaling.py", *sys.argv[1:]]),
                 "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
