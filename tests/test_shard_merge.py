"""Scale-out on real runs (random:tiny, CPU): ``--shard K/N`` + ``parity merge`` against the same
suite run in one piece, a mismatched or missing shard, and ``--devices cpu,cpu`` with a worker
process killed mid-run."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMMON = ["--max-frames", "4", "--mos", "none"]
PROMPTS = [
    "Hello world, this is a test.",
    "A second prompt, a little longer than the first one.",
    "Third.",
    "其实我真的有发现，我是一个特别善于观察别人情绪的人。",
    "Please call Stella and ask her to bring these things.",
]


def error_lines(stderr: str) -> list[str]:
    """stderr without the progress log lines ("parity: [  12.3 s] ...") a run writes there off a terminal."""
    return [ln for ln in stderr.strip("\n").splitlines() if not ln.startswith("parity: [")]


def parity(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", **(env or {})}
    return subprocess.run([sys.executable, "-m", "parity.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=900, **kw)


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def verdicts(summary: dict) -> dict:
    """Everything a prompt's verdict says (not when, where or by which process it ran)."""
    return {p["id"]: {k: v for k, v in p.items() if k not in ("timing", "worker")} for p in summary["prompts"]}


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def suite(tmp_path_factory, tiny_dir):
    """The suite in one piece, and as 3 shards."""
    root = tmp_path_factory.mktemp("suite")
    prompts = root / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    whole = parity("run", str(prompts), "--out", str(root / "whole"), *COMMON)
    assert whole.returncode in (0, 1), whole.stderr
    shards = []
    for k in (1, 2, 3):
        # shard 2 takes its index from the environment, as a CI matrix job would
        args = ["--shard", f"{k}/3"] if k != 2 else []
        proc = parity("run", str(prompts), "--out", str(root / f"s{k}"), *COMMON, *args,
                      env={"PARITY_SHARD": "2/3"} if k == 2 else None)
        assert proc.returncode in (0, 1), proc.stderr
        shards.append(root / f"s{k}")
    return {"root": root, "prompts": prompts, "whole": root / "whole", "shards": shards}


def test_each_shard_is_a_run_of_its_slice(suite):
    seen = []
    for k, d in enumerate(suite["shards"], start=1):
        s = load(d / "summary.json")
        assert s["shard"]["index"] == k and s["shard"]["count"] == 3 and s["shard"]["total_prompts"] == len(PROMPTS)
        assert s["shard"]["source"] == ("PARITY_SHARD=" if k == 2 else "--shard")
        mine = [a["id"] for a in s["shard"]["assignment"] if a["shard"] == k]
        assert [p["id"] for p in s["prompts"]] == mine and mine
        seen += mine
    assert sorted(seen) == [f"p{i:03d}" for i in range(len(PROMPTS))]
    digests = {load(d / "summary.json")["shard"]["prompts_digest"] for d in suite["shards"]}
    assert digests == {load(suite["whole"] / "run.json")["prompts_digest"]}  # the whole file's digest


def test_merge_of_three_shards_equals_the_unsharded_run(suite, tmp_path):
    before = {d: tree_digest(d) for d in suite["shards"]}
    out = tmp_path / "merged"
    proc = parity("merge", str(out), *map(str, suite["shards"]))
    whole, merged = load(suite["whole"] / "summary.json"), load(out / "summary.json")
    assert proc.returncode == (0 if whole["passed"] else 1), proc.stderr
    assert proc.stderr == ""
    assert verdicts(merged) == verdicts(whole)
    assert [p["id"] for p in merged["prompts"]] == [p["id"] for p in whole["prompts"]]
    for key in ("counts", "passed", "failure", "tolerance", "recipe"):
        assert merged[key] == whole[key], key
    assert merged["merge"]["kind"] == "shards" and merged["merge"]["missing"] == []
    assert {d: tree_digest(d) for d in suite["shards"]} == before  # the shards are read only
    # A complete run directory: the report re-renders and re-analysis reproduces the verdicts.
    assert parity("report", str(out)).returncode == 0
    again = parity("compare", str(out), "--out", str(tmp_path / "again"))
    assert again.returncode == proc.returncode, again.stderr
    assert verdicts(load(tmp_path / "again" / "summary.json")) == verdicts(whole)
    import jsonschema

    jsonschema.Draft202012Validator(load(REPO / "parity" / "schema" / "summary.schema.json")).validate(merged)
    jsonschema.Draft202012Validator(load(REPO / "parity" / "schema" / "summary.schema.json")).validate(
        load(suite["shards"][0] / "summary.json"))


def test_a_missing_shard_is_not_run_everywhere(suite, tmp_path):
    out = tmp_path / "partial"
    proc = parity("merge", str(out), str(suite["shards"][0]), str(suite["shards"][2]))
    assert proc.returncode == 1, proc.stderr
    s = load(out / "summary.json")
    lost = [a["id"] for a in s["prompts"] if a["status"] != "ok"]
    expected = [a["id"] for a in load(suite["shards"][1] / "summary.json")["shard"]["assignment"] if a["shard"] == 2]
    assert lost == expected and lost
    assert len(s["prompts"]) == len(PROMPTS) and s["counts"]["not_run"] == len(lost) and not s["passed"]
    assert all(p["status"] == "not_run" and p["reason"] == "shard 2/3 was not merged" for p in s["prompts"] if p["id"] in lost)
    assert s["merge"]["missing"] == [2] and "1 of 3 shards missing (2/3)" in s["failure"]
    assert "shard 2/3: missing" in proc.stdout  # console
    junit = (out / "junit.xml").read_text(encoding="utf-8")
    for pid in lost:
        assert f'classname="parity.{pid}" name="run"' in junit
    assert junit.count("shard 2/3 was not merged") == len(lost)
    report = (out / "report.html").read_text(encoding="utf-8")
    assert "shard 2/3 was not merged" in report and "missing" in report


def test_a_mismatched_shard_is_refused(suite, tmp_path):
    other = tmp_path / "other"  # shard 2/3 of the same file under another recipe
    proc = parity("run", str(suite["prompts"]), "--out", str(other), "--max-frames", "3", "--mos", "none", "--shard", "2/3")
    assert proc.returncode in (0, 1), proc.stderr
    out = tmp_path / "m"
    proc = parity("merge", str(out), str(suite["shards"][0]), str(other), str(suite["shards"][2]))
    assert proc.returncode == 2 and len(error_lines(proc.stderr)) == 1
    assert "different recipes" in proc.stderr and "decoding.max_frames 4 -> 3" in proc.stderr
    assert not out.exists() or not any(out.iterdir())

    # another environment class (another torch) in a copy of a shard
    import shutil

    moved = tmp_path / "s3-elsewhere"
    shutil.copytree(suite["shards"][2], moved)
    s = load(moved / "summary.json")
    s["environment"]["torch"] = "2.10.0"
    (moved / "summary.json").write_text(json.dumps(s), encoding="utf-8")
    proc = parity("merge", str(out), *map(str, suite["shards"][:2]), str(moved))
    assert proc.returncode == 2 and "different environments (torch" in proc.stderr
    assert len(error_lines(proc.stderr)) == 1

    proc = parity("merge", str(out), str(suite["shards"][0]), str(suite["shards"][0]))
    assert proc.returncode == 2 and "both shard 1/3" in proc.stderr
    proc = parity("merge", str(out), str(suite["whole"]))
    assert proc.returncode == 2 and "not a shard run" in proc.stderr
    proc = parity("merge", str(suite["shards"][0]), str(suite["shards"][0]))
    assert proc.returncode == 2 and "only reads" in proc.stderr


def test_a_killed_worker_loses_nothing_finished(suite, tmp_path):
    """--devices cpu,cpu; as soon as one worker has finished a prompt it is killed (SIGKILL)
    while it runs its next one. Everything finished stays, its prompt is failed, the other worker
    runs the rest; --resume then completes the suite with the verdicts of the one-piece run."""
    out = tmp_path / "devices"
    cmd = [sys.executable, "-m", "parity.cli", "run", str(suite["prompts"]), "--out", str(out), *COMMON,
           "--devices", "cpu,cpu"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim, kept, deadline = None, {}, time.time() + 600
    while victim is None and time.time() < deadline and proc.poll() is None:
        for f in sorted((out / "results").glob("*.json")) if (out / "results").is_dir() else []:
            try:
                victim = load(f)["worker"]
            except (ValueError, OSError):
                continue
            break
        time.sleep(0.05)
    assert victim is not None, "no prompt finished"
    os.kill(victim["pid"], signal.SIGKILL)
    kept = {f.name: f.read_bytes() for f in (out / "results").glob("*.json")}
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 3, stderr
    assert len(error_lines(stderr)) == 1 and "killed by SIGKILL" in stderr
    s = load(out / "summary.json")
    by_id = {p["id"]: p for p in s["prompts"]}
    for name, data in kept.items():  # nothing finished before the kill is lost or changed
        assert (out / "results" / name).read_bytes() == data
        assert by_id[name[:-5]]["status"] == "ok"
    failed = [p for p in s["prompts"] if p["status"] == "failed"]
    assert len(failed) == 1 and "killed by SIGKILL while running it" in failed[0]["reason"]
    assert f"pid {victim['pid']}" in failed[0]["reason"]
    assert all(p["status"] == "ok" for p in s["prompts"] if p is not failed[0])  # the other worker ran the rest
    part = s["merge"]["parts"][victim["index"]]
    assert part["status"] == "died" and part["in_flight"] == [failed[0]["id"]] and part["prompts"]
    assert s["counts"] == {"prompts": len(PROMPTS), "ran": len(PROMPTS) - 1, "passed": s["counts"]["passed"],
                           "not_run": 1, "failed": 1}
    whole = verdicts(load(suite["whole"] / "summary.json"))
    assert {k: v for k, v in verdicts(s).items() if k != failed[0]["id"]} == {k: v for k, v in whole.items() if k != failed[0]["id"]}

    resumed = parity("run", str(suite["prompts"]), "--out", str(out), *COMMON, "--devices", "cpu,cpu", "--resume")
    assert resumed.returncode in (0, 1), resumed.stderr
    assert verdicts(load(out / "summary.json")) == whole


def test_an_out_of_memory_worker_marks_its_prompt_failed(suite, tmp_path):
    """The engine of the worker that gets prompt 2 runs out of memory (the PARITY_FAULT test hook
    around the real engine): that prompt is failed with the reason (a junit error), the other
    worker runs every other prompt, exit 3 with one line."""
    out = tmp_path / "oom"
    proc = parity("run", str(suite["prompts"]), "--out", str(out), *COMMON, "--devices", "cpu,cpu",
                  env={"PARITY_FAULT": "candidate:2:oom"})
    assert proc.returncode == 3 and len(error_lines(proc.stderr)) == 1, proc.stderr
    assert "OutOfMemoryError" in proc.stderr and "p002" in proc.stderr
    s = load(out / "summary.json")
    assert [p["status"] for p in s["prompts"]] == ["ok", "ok", "failed", "ok", "ok"]
    assert "OutOfMemoryError" in s["prompts"][2]["reason"]
    junit = (out / "junit.xml").read_text(encoding="utf-8")
    assert 'classname="parity.p002" name="run"' in junit and "prompt not run (failed: worker" in junit
    # Where the time went: the engines' time is the workers' summed (they ran side by side).
    from parity.report.console import time_line
    from parity.results import Summary

    line = time_line(Summary.from_json(s))
    loads = sum(v for w in s["engine_load_s_per_worker"].values() for v in w.values())
    workers = len(s["engine_load_s_per_worker"])  # the worker that ran out of memory had loaded too
    assert workers == 2 and loads > 0
    assert f"summed over {workers} worker{'s' if workers > 1 else ''}:" in line and f"loads {loads:.1f}" in line
