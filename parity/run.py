"""``parity run``: both sides on every prompt, compared, scored and written out.

Data flow: recipe + prompts -> the reference runs each prompt with probes on (its traces are
kept) -> the candidate runs teacher-forced on the reference's codes (probes on) and free-running
(for audio and token agreement) -> compare -> gates -> summary.json, junit.xml, report.html.
Each finished prompt's result is written at once (atomically), so a run that dies keeps them.

Failure handling (DESIGN section 2, exit codes): everything that can be checked before loading a
model is (prompts, recipe, --out, speakers/languages, prompt length, strict checkpoint weights:
``parity.preflight``) and is a ``BadInput`` (exit 2) before anything is written. Once prompts run,
an engine exception or out-of-memory stops the run (exit 3), Ctrl-C stops it (exit 130); either
way ``summary.json`` is written with the finished prompts and the rest marked ``not_run``, and
``--resume`` continues it. A reference-side fault still lets the candidate finish the prompts
whose reference trace is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from parity import analysis, scoring
from parity.background import PromptWorker
from parity.analysis import first_nonfinite_point  # noqa: F401  (its old home)
from parity.engines.base import Engine
from parity.engines.lifecycle import EngineHost, one_line as _one_line
from parity import digest, faults, limits, outdir, readback
from parity.env import fingerprint
from parity.errors import BadInput, EngineFailure
from parity.models import resolve_model
from parity.preflight import local_checkpoint
from parity.prompts import Prompt, load_prompts
from parity.outputs import write_json
from parity.recipe import Recipe
from parity.report import audio as report_audio
from parity.results import PromptResult, Summary
from parity.trace import Trace

Progress = Callable[..., None]  # (phase, done, total, prompt id)

# What `parity run` writes into --out; --force deletes a directory only if it holds a run.json or
# nothing but these (plus our own hidden temporary files), never an unrelated non-empty directory.
RUN_ENTRIES = frozenset({"run.json", "summary.json", "report.html", "junit.xml", "traces", "audio", "points", "results"})


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT, exit 130) or SIGTERM (exit 143): the run stops and keeps what finished."""

    def __init__(self, signal_name: str = "SIGINT", exit_code: int = 130):
        super().__init__(signal_name)
        self.signal_name = signal_name
        self.exit_code = exit_code


def write_wav(path: Path, wav: np.ndarray, sr: int) -> None:
    """Write a 16-bit WAV atomically; NaN/inf samples are written as silence / full scale (callers
    report them first with :func:`first_nonfinite_sample`)."""
    import soundfile as sf

    wav = np.nan_to_num(np.asarray(wav, dtype=np.float32), nan=0.0, posinf=1.0, neginf=-1.0)
    outdir.atomic_write_with(path, lambda tmp: sf.write(str(tmp), np.clip(wav, -1, 1), sr, subtype="PCM_16", format="WAV"))


def check_out_dir(out: Path, force: bool, resume: bool) -> dict | None:
    """Decide whether --out may be used, without changing anything. Returns the run.json of the run
    to resume (``--resume`` on a non-empty directory), else None. A directory another live parity
    run holds is refused; ``--force`` is refused on a directory without parity's run marker."""
    if force and resume:
        raise BadInput("--force and --resume exclude each other: --force starts over, --resume continues; pass one")
    try:
        if out.exists() and not out.is_dir():
            raise BadInput(f"--out '{out}' exists and is not a directory; choose another path")
        entries = sorted(os.listdir(out)) if out.is_dir() else []
    except OSError as e:
        raise BadInput(f"--out '{out}' cannot be read ({e.strerror}); choose another directory") from None
    outdir.check_not_locked(out)
    entries = [e for e in entries if e != outdir.LOCK_NAME]
    if not entries:
        return None
    run_json = out / "run.json"
    if resume:
        if not run_json.is_file():
            raise BadInput(f"--out '{out}' has no run.json, so it is not a parity run to resume; pass the directory of an "
                           "interrupted run, or --force to start over")
        try:
            previous = limits.read_json(run_json, "run.json")
        except BadInput as e:
            reason = str(e).split(";")[0].replace(f"run.json '{run_json}' ", "")
            raise BadInput(f"'{run_json}' is unreadable ({reason}), so the run cannot be resumed; pass --force to start over") from None
        if not isinstance(previous, dict):
            raise BadInput(f"'{run_json}' is unreadable (not a JSON object), so the run cannot be resumed; pass --force to start over")
        return previous
    if not force:
        raise BadInput(f"--out '{out}' is not empty; pass --force to overwrite or --resume to continue it")
    outdir.force_plan(out)  # refuses a directory parity's marker does not claim
    return None


def prepare_out_dir(out: Path, force: bool, resume: bool) -> None:
    """Create --out (with --force deleting exactly what an earlier run wrote, with --resume keeping
    it) and record parity's entries in the run marker; refuse what is unsafe. Call with the lock held."""
    check_out_dir(out, force, resume)
    try:
        if force and out.is_dir():
            outdir.wipe(out)
        outdir.write_marker(out, RUN_ENTRIES if resume else [e for e in RUN_ENTRIES if not (out / e).exists()])
        for sub in ("traces", "audio", "points", "results"):
            (out / sub).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if outdir.is_no_space(e):
            raise outdir.OutOfSpace(f"--out '{out}': no space left ({e.strerror}); free some disk space") from None
        raise BadInput(f"--out '{out}' is not writable ({e.strerror}); choose a writable directory") from None


def make_out_dir(out: Path) -> None:
    """Create --out (and its parents) so it can be locked; BadInput when that is impossible."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInput(f"--out '{out}' is not writable ({e.strerror}); choose a writable directory") from None


def prompts_digest(prompts: list[Prompt]) -> str:
    """Identity of a prompt list for --resume (line numbers excluded: comments may move them)."""
    rows = [[p.id, p.text, p.speaker, p.language, p.instruct, p.ref_audio, p.ref_text] for p in prompts]
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()


def _first_difference(old, new, prefix: str = "") -> str | None:
    """The first dotted key where two JSON-like values differ, with both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            found = _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return None if old == new else f"{prefix.rstrip('.')} {old!r} -> {new!r}"


def check_resumable(previous: dict, current: dict, out: Path) -> None:
    """--resume only continues the same run: same recipe (model included) and same prompts."""
    diff = _first_difference(previous.get("recipe"), current["recipe"])
    if diff:
        raise BadInput(f"--resume: '{out}' was started with another recipe ({diff}); "
                       "resume with the same recipe and options, or pass --force to start over")
    old_shard, new_shard = (_shard_label(m) for m in (previous, current))
    if old_shard != new_shard:
        raise BadInput(f"--resume: '{out}' holds {'shard ' + old_shard if old_shard else 'a run of the whole file'}, "
                       f"not {'shard ' + new_shard if new_shard else 'the whole file'}; resume with "
                       f"{'--shard ' + old_shard if old_shard else 'no --shard'}, or pass --force to start over")
    if previous.get("prompts_digest") != current["prompts_digest"]:
        raise BadInput(f"--resume: '{out}' was started with other prompts (from {previous.get('prompts_file')!r}); "
                       "resume with the same prompt file, or pass --force to start over")


def _shard_label(meta: dict) -> str | None:
    shard = meta.get("shard")
    return f"{shard.get('index')}/{shard.get('count')}" if isinstance(shard, dict) else None


def first_nonfinite_sample(wav: np.ndarray, sr: int) -> dict | None:
    """Where a waveform first holds NaN/inf (sample index and seconds), or None."""
    bad = np.flatnonzero(~np.isfinite(np.asarray(wav)))
    if not len(bad):
        return None
    return {"sample": int(bad[0]), "seconds": round(int(bad[0]) / sr, 4), "count": int(len(bad))}


# --- TEST HOOK -------------------------------------------------------------------------------
# PARITY_FAULT="SIDE:K:KIND" (tests only) wraps SIDE's real engine (reference or candidate) so that
# it fails on the prompt with index K (0-based, in prompt-file order). KIND: raise (RuntimeError),
# oom (torch.OutOfMemoryError), hang (sleeps, for Ctrl-C tests), nan (NaN in that prompt's
# recorded hidden states and audio). Unset, it does nothing; the run records it in run.json.
FAULT_ENV = "PARITY_FAULT"
FAULT_KINDS = ("raise", "oom", "hang", "nan")


def parse_fault(value: str | None) -> tuple[str, int, str] | None:
    """Parse the test hook's value (see FAULT_ENV)."""
    if not value:
        return None
    parts = value.split(":")
    if len(parts) != 3 or parts[0] not in ("reference", "candidate") or not parts[1].isdigit() or parts[2] not in FAULT_KINDS:
        raise BadInput(f"{FAULT_ENV}={value!r} must be SIDE:K:KIND with SIDE reference|candidate, K a prompt index, "
                       f"KIND one of {', '.join(FAULT_KINDS)}; unset it for normal runs")
    return parts[0], int(parts[1]), parts[2]


class FaultInjector:
    """TEST HOOK: a real engine that fails on one prompt as PARITY_FAULT says."""

    def __init__(self, engine: Engine, index: dict[str, int], k: int, kind: str):
        self._engine, self._index, self._k, self._kind = engine, index, k, kind
        self._armed = False

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def run(self, prompt: Prompt, decoding, force: Trace | None = None, record: bool = True) -> Trace:
        self._armed = self._index.get(prompt.id) == self._k
        if self._armed and self._kind == "raise":
            raise RuntimeError(f"fault injected at prompt {self._k} by {FAULT_ENV}")
        if self._armed and self._kind == "oom":
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected at prompt {self._k} by {FAULT_ENV})")
        if self._armed and self._kind == "hang":
            time.sleep(3600)
        trace = self._engine.run(prompt, decoding, force=force, record=record)
        if self._armed and self._kind == "nan" and trace.talker_hidden.numel():
            s = min(1, trace.n_steps - 1)
            trace.talker_hidden, trace.talker_logits = trace.talker_hidden.clone(), trace.talker_logits.clone()
            trace.talker_hidden[s, 2:] = float("nan")  # from the second decoder layer's output on
            trace.talker_logits[s] = float("nan")
        return trace

    def decode_audio(self, codes):
        wav, sr = self._engine.decode_audio(codes)
        if self._armed and self._kind == "nan" and len(wav):
            wav = wav.copy()
            wav[len(wav) // 2 :] = np.nan
        return wav, sr
# --- end of TEST HOOK ------------------------------------------------------------------------


class Run:
    """One ``parity run`` invocation."""

    def __init__(self, prompts_path: Path, recipe: Recipe, out: Path, command: str = "", progress: Progress | None = None,
                 refresh_reference: bool = False):
        self.prompts_path = Path(prompts_path)
        self.recipe = recipe
        self.out = Path(out)
        self.command = command
        self.progress = progress or (lambda *event: None)
        self.tol = recipe.tolerance()
        self.refresh_reference = refresh_reference
        self.cache = None  # parity.refcache.ReferenceCache, when the reference can be cached
        self.freeze_heap = False  # the CLI sets it: see EngineHost
        self.prompt_format: str | None = None  # "text" | "jsonl" | None (by extension)
        self.recipe_digest: str | None = None  # set by execute; seals each result to its recipe and traces
        self.worker = PromptWorker()  # MOS scoring and judging, overlapping the engines (parity.background)
        self.ref_scores: dict[str, Future] = {}  # reference clips' scoring jobs, by prompt id
        self.shard = None  # parity.shard.ShardSpec: run only that slice of the prompt file
        self.devices: list[str] | None = None  # --devices: one worker process per entry (parity.workers)
        self.failed: dict[str, str] = {}  # prompt id -> why it failed (a worker died while running it)
        self.worker_info: dict | None = None  # set inside a --devices worker process: recorded in each result

    def execute(self, force: bool = False, resume: bool = False) -> Summary:
        """Run everything; returns the summary (also written to summary.json).

        Raises BadInput (exit 2) for bad input, found before anything is written where possible;
        EngineFailure (exit 3) when an engine fails mid-run; Interrupted/KeyboardInterrupt on
        Ctrl-C. Mid-run, summary.json is written first in every case.
        """
        self.clock = {"started": time.perf_counter(), "process_age_s": _process_age(), "setup_parts": {}}
        self._lap_at = self.clock["started"]
        fault = parse_fault(os.environ.get(FAULT_ENV))
        faults.check()
        if (self.shard is not None or self.devices) and self.recipe.candidate.batch > 1:
            what = "--shard" if self.shard is not None else "--devices"
            raise BadInput(f"{what} with candidate.batch = {self.recipe.candidate.batch}: a batched row depends on its "
                           f"batch-mates, which {what} would change; run a batched recipe in one piece")
        prompts = load_prompts(self.prompts_path, fmt=self.prompt_format)
        shard_meta = None
        if self.shard is not None:
            from parity import shard

            shard.check_fits(self.shard, prompts, str(self.prompts_path))
            shard_meta = shard.shard_record(self.shard, prompts, str(self.prompts_path), prompts_digest(prompts))
            prompts = shard.select(prompts, self.shard)
        from parity.refclip import check_prompts

        check_prompts(prompts, None, self.prompts_path)  # reference clips, before anything else (again with the model type in preflight)
        previous = check_out_dir(self.out, force, resume)
        self._lap("prompts_s")
        model_dir = resolve_model(self.recipe.model, self.recipe.model_seed)
        self._lap("checkpoint_s")
        meta = {
            "command": self.command, "prompts_file": str(self.prompts_path), "prompts_digest": prompts_digest(prompts),
            "model": self.recipe.model, "model_dir": str(model_dir),
            "recipe": json.loads(json.dumps(self.recipe.to_dict(), default=str)), "tolerance": self.tol,
            "environment": fingerprint(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "sides": dict((previous or {}).get("sides") or {}),
        }
        if not isinstance(meta["sides"], dict) or not all(isinstance(v, dict) for v in meta["sides"].values()):
            meta["sides"] = {}
        if shard_meta is not None:
            meta["shard"] = shard_meta
        if fault:
            meta["test_fault"] = os.environ[FAULT_ENV]
        if os.environ.get(faults.ENV):
            meta["test_fault_at"] = os.environ[faults.ENV]
        if previous is not None:
            check_resumable(previous, meta, self.out)
        self._lap("environment_s")
        self.host = EngineHost(self.recipe, model_dir, prompts, self.prompts_path, freeze_heap=self.freeze_heap)
        self.host.preflight()
        self._lap("preflight_s")
        # Scorers load before any engine, so a missing UTMOS checkpoint is refused up front.
        self.scorers = scoring.load_scorers(self.recipe.mos.scorers, self.recipe.mos.utmos_checkpoint)
        self._lap("scorers_s")
        engines = {role: self.host.make(getattr(self.recipe, role), role) for role in ("reference", "candidate")}
        self._lap("engines_made_s")
        self.recipe_digest = digest.recipe_digest(meta["recipe"], meta["prompts_digest"])
        make_out_dir(self.out)
        with outdir.RunLock(self.out, self.command):
            return self._execute_locked(prompts, meta, engines, model_dir, fault, force, resume)

    def _execute_locked(self, prompts: list[Prompt], meta: dict, engines: dict[str, Engine], model_dir, fault,
                        force: bool, resume: bool) -> Summary:
        """The part of a run that writes into --out (the lock is held). From here on every failure
        ends the same way: summary.json with the finished prompts, then the failure's exit code."""
        prepare_out_dir(self.out, force, resume)
        todo = [p for p in prompts if not (resume and self._finished(p))]
        self.cache = self._reference_cache(model_dir, fault)
        self._lap("reference_cache_s")
        meta["reference_cache"] = {"dir": str(self.cache.root)} if self.cache else {"off": self._cache_off_reason(model_dir, fault)}
        meta["cpu_threads"] = torch.get_num_threads()
        self.peak = self.host.peak
        failure: BaseException | None = None
        self.worker = PromptWorker()
        sides_started = time.perf_counter()
        try:
            write_json(self.out / "run.json", meta)
            faults.point("before_load")
            if self.devices:
                from parity.workers import run_on_devices

                run_on_devices(self, todo, meta, prompts)
            else:
                self._run_sides(todo, engines, meta, prompts, model_dir, fault)
        except (Exception, KeyboardInterrupt) as e:  # keep what finished, mark the rest, then report
            failure = e
        drain_started = time.perf_counter()
        try:
            self.worker.close()  # every prompt whose passes finished gets its result before the summary
        except (Exception, KeyboardInterrupt) as e:
            failure = failure or e
        meta["tool_time"] = {  # where this run's wall time went, up to writing the outputs
            "process_age_s": self.clock["process_age_s"],  # before the run began: interpreter, imports, command line
            "setup_s": round(sides_started - self.clock["started"], 3),  # prompts, checkpoint, preflight, scorers
            "setup_parts": self.clock["setup_parts"],  # setup_s by stage, in order
            "sides_s": round(drain_started - sides_started, 3),  # both sides' loads and passes, and what the main thread did around them
            "drain_s": round(time.perf_counter() - drain_started, 3),  # waiting for the prompt worker's last jobs
        }
        if self.cache is not None:
            meta["reference_cache"].update(self.cache.summary())
        meta["engine_load_s"] = dict(self.host.load_seconds)
        summary = self.write_summary(prompts, meta, failure)
        writing = failure is None and self.output_failure is not None
        failure = failure or self.output_failure
        if isinstance(failure, (BadInput, KeyboardInterrupt)):
            raise failure
        saved = f"{summary.counts['ran']} of {len(prompts)} prompts finished and are saved in {self.out}"
        if writing and not outdir.is_no_space(failure) and not isinstance(failure, outdir.OutOfSpace):
            missing = ", ".join(summary.extra.get("missing_outputs") or []) or "an output"
            raise EngineFailure(f"writing {missing} failed: {_one_line(failure)}; {saved}; `parity report {self.out}` "
                                "writes the report again")
        if isinstance(failure, outdir.OutOfSpace) or outdir.is_no_space(failure):
            # The count and the way out first: a long path in the cause may be shortened on the console.
            raise outdir.OutOfSpace(f"disk full or not writable; {saved}; free some space and rerun with --resume "
                                    f"({_one_line(failure)})") from None
        if failure is not None:
            raise EngineFailure(f"engine failed: {_one_line(failure)}; {saved}; rerun with --resume") from failure
        return summary

    def _lap(self, name: str) -> None:
        """Record the seconds since the previous lap of setup under ``name``."""
        now = time.perf_counter()
        self.clock["setup_parts"][name] = round(now - self._lap_at, 3)
        self._lap_at = now

    def _cache_off_reason(self, model_dir, fault) -> str:
        if fault and fault[0] == "reference":
            return f"{FAULT_ENV} targets the reference"
        if local_checkpoint(model_dir) is None:
            return "the checkpoint is not downloaded yet (its weights digest is unknown)"
        return "PARITY_REFERENCE_CACHE=off"

    def _reference_cache(self, model_dir, fault):
        """The reference-trace cache for this run, or None: off for a test fault on the reference,
        for a hub id not downloaded yet (nothing to digest) and with PARITY_REFERENCE_CACHE=off."""
        from parity.engines.registry import available
        from parity.refcache import ReferenceCache, cache_dir

        directory = local_checkpoint(model_dir)
        if (fault and fault[0] == "reference") or directory is None or os.environ.get("PARITY_REFERENCE_CACHE") == "off":
            return None
        side = self.recipe.reference
        if not str(side.device).startswith("cuda"):
            self.host.set_cpu_threads()  # the thread count is part of the key
        seeds = self.recipe.mos.seeds if self.recipe.mos.scorers else 1
        return ReferenceCache(cache_dir(), directory, side, self.recipe.decoding, seeds, available()[side.engine].target)

    def _finished(self, p: Prompt) -> bool:
        """A prompt a previous run finished: a readable result and all its traces and audio."""
        files = [f"traces/{p.id}.{n}.{ext}" for n in ("reference", "candidate.forced", "candidate.free") for ext in ("safetensors", "json")]
        files += [f"audio/{p.id}.reference.wav", f"audio/{p.id}.candidate.wav", f"points/{p.id}.csv.gz", f"points/{p.id}.measured.json"]
        # Files first: a prompt with a trace missing runs again (its result's digest, which covers
        # the traces, could not match and must not make the resume fail).
        return all((self.out / f).is_file() for f in files) and self._read_result(p) is not None

    def _read_result(self, p: Prompt) -> dict | None:
        """results/<id>.json if it is a complete result of this prompt, else None. A result whose
        digest does not match its traces and this run's recipe is refused (BadInput): it was
        edited or does not belong here."""
        path = self.out / "results" / f"{p.id}.json"
        try:
            result = limits.read_json(path, "result")
        except BadInput:  # missing, truncated or unreadable: the prompt runs again
            return None
        ok = isinstance(result, dict) and result.get("id") == p.id and result.get("status") == "ok"
        if not ok:
            return None
        readback.check_result(result, f"'{path}'")
        recipe_id = self.recipe_digest
        if recipe_id is not None and not digest.verify(result, self.out, recipe_id):
            raise BadInput(f"'{path}' does not match its traces and recipe (its digest differs: edited by hand or from "
                           f"another run); delete it to recompute that prompt, or pass --force to start over")
        return result

    def _reference_side(self, prompts: list[Prompt], engine: Engine, meta: dict, all_prompts: list[Prompt], fault,
                        index: dict[str, int]) -> tuple[dict[str, Trace], dict[str, list], Exception | None]:
        """The reference over all prompts, from the cache where it holds them. The model loads
        only on the first prompt the cache lacks. Returns (traces, audio, the failure if any)."""
        ref_traces: dict[str, Trace] = {}
        ref_audio: dict[str, list[tuple[np.ndarray, int]]] = {}
        loaded: Engine | None = None
        try:
            for i, p in enumerate(prompts):
                hit = None
                if self.cache is not None and self.refresh_reference:
                    self.cache.refreshed += 1
                elif self.cache is not None:
                    hit = self.cache.get(p)
                if hit is not None:
                    trace, clips = hit.trace, hit.audio
                    meta["sides"].setdefault("reference", hit.describe)
                else:
                    if loaded is None:  # a load failure is not a prompt's: it propagates
                        loaded = self._load(engine, "reference", fault, index)
                        meta["sides"]["reference"] = loaded.describe()
                    try:
                        t0 = time.perf_counter()
                        trace = loaded.run(p, self.recipe.decoding)
                        trace.meta["seconds"] = time.perf_counter() - t0
                        t0 = time.perf_counter()
                        wav, sr = loaded.decode_audio(trace.codes)
                        trace.meta["audio_seconds"] = time.perf_counter() - t0
                        clips = [(wav, sr)] + self._extra_seeds(loaded, p, "reference")
                    except BadInput as e:
                        raise self._at(p, e) from None
                    except Exception as e:  # finish the prompts before it on the candidate side, then fail
                        return ref_traces, ref_audio, e
                    trace.meta["reference_cache"] = {"hit": False}
                self.worker.submit(self._store_reference, p, trace, clips, None if hit is not None else loaded.describe())
                ref_traces[p.id], ref_audio[p.id] = trace, clips
                if getattr(self, "scorers", None):  # scored on the worker while the next prompt decodes
                    self.ref_scores[p.id] = self.worker.submit(scoring.score_clips, self.scorers, clips)
                self.progress("reference", i + 1, len(prompts), p.id)
                faults.point("between")
        finally:
            if loaded is not None:
                self._release(loaded, "reference")
        return ref_traces, ref_audio, None

    def _store_reference(self, p: Prompt, trace: Trace, clips: list[tuple[np.ndarray, int]], describe: dict | None) -> None:
        """On the prompt worker: store a reference trace run now (``describe`` given) in the cache,
        then write its trace and audio into the run directory."""
        if describe is not None and self.cache is not None:
            trace.meta["reference_cache"]["key"] = self.cache.put(p, trace, clips, describe)
        trace.meta["audio_nonfinite"] = first_nonfinite_sample(*clips[0])
        trace.save(self.out / "traces", f"{p.id}.reference", tokens_only=self.recipe.traces == "tokens")
        write_wav(self.out / "audio" / f"{p.id}.reference.wav", *clips[0])
        report_audio.encode_ahead(self.out / "audio" / f"{p.id}.reference.wav")
        for k, (wav, sr) in enumerate(clips[1:], start=1):
            write_wav(self.out / "audio" / f"{p.id}.reference.seed{k}.wav", wav, sr)

    def _run_sides(self, prompts: list[Prompt], engines: dict[str, Engine], meta: dict, all_prompts: list[Prompt],
                   model_dir, fault) -> None:
        """The reference over all prompts, then the candidate over those the reference finished."""
        if not prompts:
            return
        index = {p.id: i for i, p in enumerate(all_prompts)}
        ref_traces, ref_audio, ref_failure = self._reference_side(prompts, engines["reference"], meta, all_prompts, fault, index)
        done = [p for p in prompts if p.id in ref_traces]
        truth_traces = self._run_truth(done, ref_traces, meta) if self.recipe.truth is not None and done else {}
        if done:
            engine = self._load(engines["candidate"], "candidate", fault, index)
            meta["sides"]["candidate"] = engine.describe()
            if self.worker_info is None:  # --devices: the parent alone writes run.json (workers share the directory)
                write_json(self.out / "run.json", meta)
            self.replay_reference: Engine | None = None  # loaded on the first layer replay (probes = "sublayers")
            try:
                batched = self._run_batched(engine, done, ref_traces)
                for i, p in enumerate(done):
                    ref = ref_traces.pop(p.id)
                    t0 = time.perf_counter()
                    try:
                        if batched is not None:  # decoded above, as rows of batches
                            forced, free = batched["forced"][p.id], batched["free"][p.id]
                        else:
                            forced = engine.run(p, self.recipe.decoding, force=ref)
                        t1 = time.perf_counter()
                        if batched is None:
                            free = engine.run(p, self.recipe.decoding, record=False)
                    except BadInput as e:
                        raise self._at(p, e) from None
                    t2 = time.perf_counter()
                    replayed = self._replay(p, ref, forced, engine) if self.recipe.probes == "sublayers" and batched is None else None
                    t3 = time.perf_counter()
                    wav, sr = engine.decode_audio(free.codes)
                    t4 = time.perf_counter()
                    cand_audio = [(wav, sr)] + self._extra_seeds(engine, p, "candidate")
                    free.meta["audio_nonfinite"] = first_nonfinite_sample(wav, sr)
                    cached = bool((ref.meta.get("reference_cache") or {}).get("hit"))
                    # *_audio_s: the engine's codec decoding its codes to a waveform (engine work, not parity's).
                    timing = {"reference_s": ref.meta["seconds"], "forced_s": t1 - t0, "free_s": t2 - t1,
                              "reference_audio_s": 0.0 if cached else float(ref.meta.get("audio_seconds", 0.0)),
                              "candidate_audio_s": t4 - t3, "reference_cached": cached}
                    if replayed is not None:
                        timing["replay_s"] = t3 - t2
                    if batched is not None:
                        timing.update(batched["timing"])
                    self.worker.submit(self._finish_prompt, p, ref, forced, free, timing, truth_traces.pop(p.id, None),
                                       ref_audio.pop(p.id), cand_audio,
                                       batch_other=batched["other"].get(p.id) if batched is not None else None,
                                       ref_scores=self.ref_scores.pop(p.id, None), replayed=replayed)
                    self.progress("candidate", i + 1, len(done), p.id)
            finally:
                self._release(engine, "candidate")
                if self.replay_reference is not None:
                    self.host.release(self.replay_reference, "replay")
        if ref_failure is not None:
            raise ref_failure

    def _replay(self, p: Prompt, ref: Trace, forced: Trace, candidate: Engine) -> dict | None:
        """Layer replay of the prompt's first diverging layer (parity.replay), None when no layer
        is over tolerance. The reference engine is loaded again for it on first use (its traces
        may have come from the cache) and kept until the candidate side is done."""
        from parity import compare, replay, sublayers

        at = sublayers.first_layer_over(compare.point_frame(forced, ref, self.tol))
        if at is None or not replay.supported(candidate):
            return None
        if self.replay_reference is None:
            self.replay_reference = self.host.load(self.host.make(self.recipe.reference, "reference"), "replay")
        reference = self.replay_reference if replay.supported(self.replay_reference) else None
        return replay.measure(candidate, reference, p, self.recipe.decoding, ref, forced, at)

    def _run_batched(self, engine: Engine, prompts: list[Prompt], ref_traces: dict[str, Trace]) -> dict | None:
        """With ``batch = N`` on the candidate: every prompt as a row of a batch of N, teacher-forced
        on its own batch-1 reference trace, once more in a second arrangement (other position and
        batch-mates: does the row depend on them?), and free-running. None without batching."""
        from parity import batching

        size = self.recipe.candidate.batch
        if size <= 1:
            return None
        decoding = self.recipe.decoding
        forces = {p.id: ref_traces[p.id] for p in prompts}
        t0 = time.perf_counter()
        try:
            forced = batching.run_batched(engine, prompts, decoding, size, forces=forces)
            t1 = time.perf_counter()
            other = batching.run_batched(engine, prompts, decoding, size, forces=forces, second=True)
            t2 = time.perf_counter()
            free = batching.run_batched(engine, prompts, decoding, size, record=False)
        except BadInput as e:
            raise BadInput(f"{self.prompts_path}: batch = {size}: {e}") from None
        t3 = time.perf_counter()
        n = max(len(prompts), 1)
        timing = {"forced_s": (t1 - t0) / n, "second_arrangement_s": (t2 - t1) / n, "free_s": (t3 - t2) / n, "per_prompt_share_of_batches": True}
        return {"forced": forced, "other": other, "free": free, "timing": timing}

    def _extra_seeds(self, engine: Engine, p: Prompt, role: str) -> list[tuple[np.ndarray, int]]:
        """Free-running audio for seeds decoding.seed + 1 .. + (mos.seeds - 1), when sampling
        (greedy decoding gives the same audio for every seed). The caller writes each WAV under audio/."""
        decoding = self.recipe.decoding
        if not decoding.do_sample:
            return []
        clips = []
        for k in range(1, self.recipe.mos.seeds):
            trace = engine.run(p, replace(decoding, seed=decoding.seed + k), record=False)
            wav, sr = engine.decode_audio(trace.codes)
            if role != "reference":
                write_wav(self.out / "audio" / f"{p.id}.{role}.seed{k}.wav", wav, sr)
            clips.append((wav, sr))
        return clips

    def _at(self, p: Prompt, e: BadInput) -> BadInput:
        """A mid-run BadInput from an engine, with the prompt it is about."""
        where = f"{self.prompts_path}:{p.line}: prompt {p.id}"
        return e if str(e).startswith(str(self.prompts_path)) else BadInput(f"{where}: {e}")

    def _load(self, engine: Engine, role: str, fault, index: dict[str, int]) -> Engine:
        """Load one side through the shared lifecycle (exit 2 for a checkpoint that does not
        load, 3 for OOM); wrap it in the test hook's fault injector when PARITY_FAULT names it."""
        faults.point("load")
        engine = self.host.load(engine, role)
        if fault and fault[0] == role:
            return FaultInjector(engine, index, fault[1], fault[2])  # type: ignore[return-value]
        return engine

    def _release(self, engine: Engine, role: str) -> None:
        """Free a side's model before the next loads, and note its peak memory."""
        self.host.release(engine._engine if isinstance(engine, FaultInjector) else engine, role)

    def _run_truth(self, prompts: list[Prompt], ref_traces: dict[str, Trace], meta: dict) -> dict[str, Trace]:
        """The recipe's optional [truth] side, teacher-forced on the reference's codes like the candidate."""
        traces: dict[str, Trace] = {}
        with self.host.loaded(self.recipe.truth, "truth") as engine:
            meta["sides"]["truth"] = engine.describe()
            for p in prompts:
                traces[p.id] = engine.run(p, self.recipe.decoding, force=ref_traces[p.id])
                traces[p.id].save(self.out / "traces", f"{p.id}.truth", tokens_only=self.recipe.traces == "tokens")
        return traces

    def _finish_prompt(self, p: Prompt, ref: Trace, forced: Trace, free: Trace, timing: dict, truth: Trace | None = None,
                       ref_audio: list[tuple[np.ndarray, int]] | None = None,
                       cand_audio: list[tuple[np.ndarray, int]] | None = None, batch_other: Trace | None = None,
                       ref_scores: Future | None = None, replayed: dict | None = None) -> None:
        """Save the candidate's traces and audio, score both sides' audio, save what execute measured outside the traces
        (points/<id>.measured.json), then judge the prompt with the same function ``parity
        compare`` uses on the saved traces, and write points/<id>.csv.gz and results/<id>.json.
        Voice cloning and batching add ``reference_clip`` (both sides' clip encodings compared)
        and ``batch`` (where this row sat and what that did) to the result. Runs on the prompt
        worker (parity.background), after the reference clips' scoring job ``ref_scores``."""
        forced.save(self.out / "traces", f"{p.id}.candidate.forced", tokens_only=self.recipe.traces == "tokens")
        free.save(self.out / "traces", f"{p.id}.candidate.free")
        if cand_audio:
            write_wav(self.out / "audio" / f"{p.id}.candidate.wav", *cand_audio[0])
            report_audio.encode_ahead(self.out / "audio" / f"{p.id}.candidate.wav")
        t0 = time.perf_counter()
        mos_result = scoring.score_pairs(getattr(self, "scorers", {}), ref_audio or [], cand_audio or [],
                                         ref_scores=ref_scores.result() if ref_scores is not None else None)
        timing = {**timing, "scoring_s": time.perf_counter() - t0}
        ref_wav, sr = (ref_audio or [(None, 24000)])[0]
        cand_wav = (cand_audio or [(None, sr)])[0][0]
        prompt = {"id": p.id, "text": p.text, "line": p.line, "speaker": p.speaker, "language": p.language}
        audio = {"reference": f"audio/{p.id}.reference.wav", "candidate": f"audio/{p.id}.candidate.wav"} if ref_audio and cand_audio else {}
        nonfinite_audio = {"reference": ref.meta.get("audio_nonfinite"), "candidate": free.meta.get("audio_nonfinite")}
        measured = analysis.measure_audio(prompt, timing, mos_result, audio, nonfinite_audio, ref_wav, cand_wav, sr)
        if batch_other is not None or forced.meta.get("batch"):
            # Where this row sat in its batch and what a second arrangement did: the second
            # arrangement's trace is not kept, so its report is a measurement, saved with the rest.
            from parity import batching

            _, judged = analysis.comparison(analysis.PromptTraces(ref, forced, free, truth), self.tol, self.recipe)
            measured.extra["batch"] = batching.row_report(forced, ref, batch_other, judged.to_json())
        if replayed is not None:  # measured with both engines; judged (at any tolerance) by analysis.judge
            measured.extra["replay"] = replayed
        analysis.save_measured(self.out, p.id, measured)
        points, result = analysis.judge(analysis.PromptTraces(ref, forced, free, truth), measured, self.recipe)
        outdir.atomic_write_with(self.out / "points" / f"{p.id}.csv.gz",
                                 lambda tmp: points.drop(columns=["finite"]).to_csv(tmp, index=False, compression="gzip"))
        data = result.to_json()
        if self.worker_info is not None:
            data["worker"] = dict(self.worker_info)
        data[digest.KEY] = digest.seal(data, self.out, self.recipe_digest or "")  # ties it to its traces and recipe
        write_json(self.out / "results" / f"{p.id}.json", data)

    def write_summary(self, prompts: list[Prompt], meta: dict, failure: BaseException | None = None) -> Summary:
        """Assemble summary.json (+ junit.xml, report.html) from the per-prompt results on disk.
        Prompts without a complete result are listed with status ``not_run``.

        Never raises: a failure while writing junit.xml or report.html (a full disk, a signal) is
        recorded in the summary and kept in ``self.output_failure``. summary.json is written last,
        with signals held off, and says ``passed`` only when every output it lists exists."""
        self.output_failure: BaseException | None = None
        results = []
        for p in prompts:
            try:
                result = self._read_result(p)
            except BadInput as e:
                result, self.output_failure = None, self.output_failure or e
            if result:  # the digest seals results/<id>.json to its traces; the summary does not repeat it
                result = {k: v for k, v in result.items() if k != digest.KEY}
                results.append(PromptResult.from_json(result))
            elif p.id in self.failed:
                results.append(PromptResult(p.id, p.text, p.line, "failed", False, extra={"reason": self.failed[p.id]}))
            else:
                results.append(PromptResult(p.id, p.text, p.line, "not_run", False))
        summary, output_failure = write_run_outputs(self.out, results, meta, _failure_text(failure), getattr(self, "peak", {}))
        self.output_failure = self.output_failure or output_failure
        return summary


def _process_age() -> float | None:
    """Seconds since this process started (Linux: /proc), None where that cannot be read."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return round(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 3)
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def write_run_outputs(out: Path, results: list[PromptResult], meta: dict, failure: str | None,
                      peak: dict) -> tuple[Summary, BaseException | None]:
    """The summary of a run directory's results, rendered: junit.xml and report.html, then
    summary.json last (with signals held off), shared by ``parity run`` and ``parity merge``.

    Never raises: a failure while writing an output is recorded in the summary (which then does
    not pass) and returned."""
    from parity.report import html, junit

    out = Path(out)
    output_failure: BaseException | None = None
    summary = analysis.summarize(results, {**meta, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, failure, peak)
    from parity.batching import summarize_rows

    batch = summarize_rows([r.to_json() for r in results])
    if batch is not None:
        summary.extra["batch"] = batch
    summary.extra["outputs"] = list(OUTPUTS)
    for name in OUTPUTS[1:]:  # an old report must not stand in for this run's
        try:
            (out / name).unlink(missing_ok=True)
        except OSError:
            pass

    def report() -> None:
        faults.point("report")
        html.write(summary, out, out / "report.html")

    for name, write in (("junit.xml", lambda: junit.write(summary, out / "junit.xml")), ("report.html", report)):
        try:
            write()
        except (Exception, KeyboardInterrupt) as e:
            output_failure = output_failure or e
            if summary.failure is None:
                summary.failure = f"writing {name} failed: {_failure_text(e)}"
    missing = [name for name in OUTPUTS[1:] if not (out / name).is_file()]
    if missing or output_failure is not None:
        summary.passed = False
        summary.extra["missing_outputs"] = missing
    try:
        with _signals_held():
            write_json(out / "summary.json", summary.to_json())
    except (Exception, KeyboardInterrupt) as e:
        output_failure = output_failure or e
    return summary, output_failure


OUTPUTS = ("summary.json", "junit.xml", "report.html")


def _failure_text(failure: BaseException | None) -> str | None:
    if failure is None:
        return None
    if isinstance(failure, KeyboardInterrupt):
        return f"interrupted by {getattr(failure, 'signal_name', 'SIGINT')}"
    return _one_line(failure)


class _signals_held:
    """Hold SIGINT/SIGTERM off for a short critical write (delivered right after); a no-op off the
    main thread or where the platform lacks it."""

    def __enter__(self):
        import signal
        import threading

        self._mask = None
        if hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread():
            self._mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        return self

    def __exit__(self, *exc):
        import signal

        if self._mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
