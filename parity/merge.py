"""``parity merge OUT SHARD_DIR...``: the run directories of ``--shard K/N`` runs as one run.

The shards must be one suite: the same recipe (model included), the same prompt file (the digest
of its prompts and the same assignment of prompts to shards), the same number of shards and the
same environment class (:func:`environment_class`); anything else is refused with one line
(exit 2) before OUT is touched. A shard given twice is refused too.

OUT follows ``parity run --out``'s rules (``parity.outdir``): it is locked while written, gets the
run marker, and ``--force`` deletes only what an earlier parity run or merge wrote there. The
shard directories are read only: each finished prompt's traces, audio, points and result are
copied into OUT (``--link`` makes hard links instead: no extra disk, the files are then shared),
each result's seal is checked against its shard's recipe and traces and sealed again for OUT.
So OUT is a complete run directory: ``parity report``, ``parity compare`` and ``parity run
--resume`` (with the full prompt file and the same recipe: it runs what is missing) work on it.

The verdicts are the shards' own (the same judging code ran on each prompt); summary.json,
junit.xml and report.html are rendered by the same code as a run's. A prompt of a shard that was
not given is ``not_run`` with the reason, and the merged run does not pass: in the summary
(``merge.missing``, ``failure``), on the console, in the report and in junit.xml (skipped cases).
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from parity import digest, limits, outdir, readback
from parity.errors import BadInput
from parity.results import Merge, MergePart, PromptResult, Shard, Summary

# Fingerprint keys that can change what an engine computes; hosts that agree on these are one
# environment class (host names, kernel versions, driver versions and thread counts may differ).
CLASS_KEYS = ("parity", "torch", "torch_cuda", "cudnn", "transformers", "qwen_tts", "faster_qwen3_tts", "gpu",
              "gpu_capability", "tf32_matmul", "tf32_cudnn", "float32_matmul_precision", "sdpa_flash",
              "sdpa_mem_efficient", "sdpa_math", "sdpa_cudnn")
TRACE_ROLES = ("reference", "candidate.forced", "candidate.free", "truth")
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass
class ShardRun:
    """One shard directory as read: its summary, run.json and shard record."""

    path: Path
    summary: Summary
    meta: dict
    shard: Shard


def environment_class(env: dict) -> dict:
    """The parts of an environment fingerprint that must agree between shards of one suite:
    Python major.minor, the numeric stack's versions, the GPU model (``cpu`` without one) and the
    numeric flags."""
    out = {k: env.get(k) for k in CLASS_KEYS}
    out["python"] = ".".join(str(env.get("python") or "").split(".")[:2])
    if not env.get("gpu"):
        out["gpu"] = "cpu"
    return out


def read_shard(path: Path) -> ShardRun:
    """A shard run directory, checked (one-line BadInput when it is not one)."""
    from parity.reanalysis import read_run, read_summary

    path = Path(path)
    if not path.is_dir():
        raise BadInput(f"'{path}' is not a directory; pass the run directories written by parity run --shard K/N")
    outdir.check_not_locked(path)  # a shard still running has no final summary yet
    summary = read_summary(path)
    meta, _ = read_run(path)
    if summary.shard is None or not isinstance(meta.get("shard"), dict):
        raise BadInput(f"'{path}' is not a shard run (its summary.json has no shard record); pass directories "
                       "written by parity run --shard K/N")
    s = summary.shard
    ok = 1 <= s.index <= s.count and len(s.assignment) == s.total_prompts and all(
        isinstance(a, dict) and isinstance(a.get("id"), str) and _ID_RE.fullmatch(a["id"])
        and isinstance(a.get("shard"), int) and 1 <= a["shard"] <= s.count for a in s.assignment)
    if not ok:
        raise BadInput(f"'{path}/summary.json': its shard record is damaged (shard {s.index}/{s.count}, "
                       f"{len(s.assignment)} prompts assigned of {s.total_prompts}); re-run that shard")
    return ShardRun(path, summary, meta, s)


def check_one_suite(shards: list[ShardRun]) -> None:
    """Refuse (one line, exit 2) shards that are not slices of one suite, or a shard given twice."""
    from parity.run import _first_difference

    first = shards[0]
    seen: dict[int, Path] = {}
    for s in shards:
        if s.shard.index in seen:
            raise BadInput(f"'{seen[s.shard.index]}' and '{s.path}' are both shard {s.shard.label}; pass each shard once")
        seen[s.shard.index] = s.path
        if s is first:
            continue
        where = f"'{s.path}' (shard {s.shard.label}) and '{first.path}' (shard {first.shard.label})"
        if s.shard.count != first.shard.count:
            raise BadInput(f"{where} split the suite into different numbers of shards; merge the shards of one split")
        if s.shard.prompts_digest != first.shard.prompts_digest or s.shard.assignment != first.shard.assignment:
            raise BadInput(f"{where} ran different prompt files ({s.shard.prompts_file!r} vs {first.shard.prompts_file!r}: "
                           "their prompts differ); merge shards of one prompt file")
        diff = _first_difference(first.summary.recipe, s.summary.recipe)
        if diff:
            raise BadInput(f"{where} ran different recipes ({diff}); merge shards of one recipe")
        a, b = (environment_class(x.summary.extra.get("environment") or {}) for x in (first, s))
        diff = _first_difference(a, b)
        if diff:
            raise BadInput(f"{where} ran in different environments ({diff}); run every shard on the same stack and "
                           "kind of device")


def _check_out(out: Path, inputs: list[Path]) -> None:
    """OUT must not be a shard directory or hold one: merging never touches its inputs."""
    target = out.resolve()
    for d in inputs:
        src = d.resolve()
        if target == src or target in src.parents:
            raise BadInput(f"OUT '{out}' is (or contains) the shard directory '{d}', which merge only reads; "
                           "pass a new directory")


def _check_out_rules(out: Path, force: bool) -> None:
    """run --out's rules, in merge's words: new or empty, or --force on an earlier parity run
    (only what parity wrote there is deleted); never a directory a live run holds."""
    try:
        if out.exists() and not out.is_dir():
            raise BadInput(f"OUT '{out}' exists and is not a directory; choose another path")
        entries = [e for e in (os.listdir(out) if out.is_dir() else []) if e != outdir.LOCK_NAME]
    except OSError as e:
        raise BadInput(f"OUT '{out}' cannot be read ({e.strerror}); choose another directory") from None
    outdir.check_not_locked(out)
    if entries and not force:
        raise BadInput(f"OUT '{out}' is not empty; pass --force to replace an earlier parity run or merge there, "
                       "or choose a new directory")
    if entries:
        outdir.force_plan(out)  # refuses a directory parity's marker does not claim


def _prompt_files(run_dir: Path, prompt_id: str) -> list[str]:
    """A finished prompt's files in a run directory, relative to it (results/ excluded)."""
    names = [f"traces/{prompt_id}.{role}.{ext}" for role in TRACE_ROLES for ext in ("safetensors", "json")]
    names += [f"points/{prompt_id}.csv.gz", f"points/{prompt_id}.measured.json"]
    audio = re.compile(re.escape(prompt_id) + r"\.(reference|candidate)(\.seed\d+)?\.wav")
    try:
        names += [f"audio/{n}" for n in sorted(os.listdir(run_dir / "audio")) if audio.fullmatch(n)]
    except OSError:
        pass
    return [n for n in names if (run_dir / n).is_file() and not (run_dir / n).is_symlink()]


def _transfer(src: Path, dst: Path, link: bool) -> None:
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass  # another file system, or links not allowed: copy
    outdir.atomic_write_with(dst, lambda tmp: shutil.copyfile(src, tmp))


def _sealed_result(s: ShardRun, prompt_id: str) -> dict:
    """A shard's results/<id>.json, checked and its seal verified against the shard's recipe."""
    path = s.path / "results" / f"{prompt_id}.json"
    result = limits.read_json(path, "result")
    readback.check_result(result, f"'{path}'")
    shard_recipe = digest.recipe_digest(s.meta.get("recipe"), str(s.meta.get("prompts_digest")))
    if result.get("id") != prompt_id or not digest.verify(result, s.path, shard_recipe):
        raise BadInput(f"'{path}' does not match its traces and recipe (its digest differs: edited by hand or from "
                       "another run); re-run that shard")
    return result


def merge_shards(out: Path, shard_dirs: list[Path], force: bool = False, command: str = "",
                 link: bool = False) -> Summary:
    """Merge shard run directories into ``out`` (see the module docstring); returns the summary."""
    from parity.run import make_out_dir, prepare_out_dir, write_run_outputs
    from parity.outputs import write_json
    import json

    out = Path(out)
    if not shard_dirs:
        raise BadInput("parity merge needs OUT and at least one shard directory: parity merge OUT SHARD_DIR...")
    shards = [read_shard(Path(d)) for d in shard_dirs]
    check_one_suite(shards)
    _check_out(out, [s.path for s in shards])
    _check_out_rules(out, force)
    first = shards[0]
    count = first.shard.count
    by_index = {s.shard.index: s for s in shards}
    meta = _merged_meta(shards, command)
    recipe_id = digest.recipe_digest(meta["recipe"], meta["prompts_digest"])
    make_out_dir(out)
    with outdir.RunLock(out, command):
        prepare_out_dir(out, force, False)
        write_json(out / "run.json", meta)
        results: list[PromptResult] = []
        finished: dict[int, list[str]] = {k: [] for k in by_index}
        for entry in first.shard.assignment:
            pid, k = entry["id"], entry["shard"]
            base = PromptResult(pid, str(entry.get("text") or ""), entry.get("line"), "not_run", False)
            s = by_index.get(k)
            if s is None:
                base.extra["reason"] = f"shard {k}/{count} was not merged"
                results.append(base)
                continue
            own = s.summary.prompt(pid)
            if own is None or not own.ran:
                if own is not None and own.status == "failed":
                    base.status = "failed"
                reason = (own.extra.get("reason") if own is not None else None) or (
                    f"shard {k}/{count} stopped: {s.summary.failure}" if s.summary.failure else f"shard {k}/{count} did not run it")
                base.extra["reason"] = reason
                results.append(base)
                continue
            data = _sealed_result(s, pid)
            for name in _prompt_files(s.path, pid):
                _transfer(s.path / name, out / name, link)
            data[digest.KEY] = digest.seal(data, out, recipe_id)  # sealed to OUT's recipe and prompts
            write_json(out / "results" / f"{pid}.json", data)
            results.append(PromptResult.from_json(json.loads(json.dumps({k2: v for k2, v in data.items() if k2 != digest.KEY}))))
            finished[k].append(pid)
        parts = []
        for k in range(1, count + 1):
            s = by_index.get(k)
            if s is None:
                parts.append(MergePart(k, "missing"))
            else:
                parts.append(MergePart(k, "merged", finished[k], str(s.path), s.summary.failure))
        meta["merge"] = Merge("shards", count, parts, first.shard.prompts_digest).to_json()
        write_json(out / "run.json", meta)
        failure = _failure(shards, count, results)
        summary, output_failure = write_run_outputs(out, results, meta, failure, _peak(shards))
    if output_failure is not None:
        from parity.errors import EngineFailure

        raise EngineFailure(f"writing the merged outputs failed ({output_failure}); `parity report {out}` writes them again")
    return summary


def _failure(shards: list[ShardRun], count: int, results: list[PromptResult]) -> str | None:
    """One line on what keeps the merged suite from being whole: missing shards, failed shards."""
    present = {s.shard.index for s in shards}
    missing = [k for k in range(1, count + 1) if k not in present]
    parts = []
    if missing:
        unrun = sum(1 for r in results if r.extra.get("reason", "").endswith("was not merged"))
        labels = ", ".join(f"{k}/{count}" for k in missing)
        parts.append(f"{len(missing)} of {count} shards missing ({labels}): {unrun} prompt(s) not_run")
    for s in sorted(shards, key=lambda s: s.shard.index):
        if s.summary.failure:
            parts.append(f"shard {s.shard.label}: {s.summary.failure}")
    return "; ".join(parts) or None


def _peak(shards: list[ShardRun]) -> dict:
    """Per side, the largest peak memory any shard saw."""
    peaks: dict[str, dict] = {}
    for s in shards:
        for role, peak in (s.summary.peak_memory or {}).items():
            if isinstance(peak, dict) and (role not in peaks or (peak.get("bytes") or 0) > (peaks[role].get("bytes") or 0)):
                peaks[role] = dict(peak)
    return peaks


def _merged_meta(shards: list[ShardRun], command: str) -> dict:
    """run.json of the merged run: the first shard's, for the whole prompt file."""
    first = min(shards, key=lambda s: s.shard.index)
    meta = {k: v for k, v in first.meta.items() if k not in ("shard", "merge", "test_fault", "test_fault_at", "engine_load_s")}
    meta["command"] = command
    meta["prompts_file"] = first.shard.prompts_file
    meta["prompts_digest"] = first.shard.prompts_digest
    starts = [str(s.meta.get("started")) for s in shards if s.meta.get("started")]
    if starts:
        meta["started"] = min(starts)
    cache = {"hits": 0, "misses": 0}
    for s in shards:
        for key in cache:
            cache[key] += int(((s.summary.extra.get("reference_cache") or {}).get(key)) or 0)
    meta["reference_cache"] = {**(first.summary.extra.get("reference_cache") or {}), **cache}
    meta["engine_load_s_per_shard"] = {s.shard.label: s.summary.extra.get("engine_load_s") or {} for s in shards}
    return meta
