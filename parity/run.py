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

import gc
import hashlib
import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from parity import compare, digest, faults, gates as gates_mod, limits, outdir, readback, scoring
from parity.engines.base import Engine, make_engine
from parity.env import fingerprint
from parity.errors import BadInput, EngineFailure
from parity.models import resolve_model
from parity.preflight import check_loaded_checkpoint, preflight
from parity.prompts import Prompt, load_prompts
from parity.recipe import Recipe
from parity.trace import Trace

Progress = Callable[[str, int, int], None]  # (phase, done, total)

# What `parity run` writes into --out; --force deletes a directory only if it holds a run.json or
# nothing but these (plus our own hidden temporary files), never an unrelated non-empty directory.
RUN_ENTRIES = frozenset({"run.json", "summary.json", "report.html", "junit.xml", "traces", "audio", "points", "results"})


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT, exit 130) or SIGTERM (exit 143): the run stops and keeps what finished."""

    def __init__(self, signal_name: str = "SIGINT", exit_code: int = 130):
        super().__init__(signal_name)
        self.signal_name = signal_name
        self.exit_code = exit_code


def write_json(path: Path, data) -> None:
    """Write JSON atomically: a killed run never leaves a half-written file behind."""
    outdir.atomic_write_json(path, data)


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
    if previous.get("prompts_digest") != current["prompts_digest"]:
        raise BadInput(f"--resume: '{out}' was started with other prompts (from {previous.get('prompts_file')!r}); "
                       "resume with the same prompt file, or pass --force to start over")


def first_nonfinite_point(trace: Trace) -> dict | None:
    """The first NaN/inf point of a recorded trace in execution order (talker step s: embed,
    layers, logits; then the predictor sub-steps of frame s), named as compare.py names points."""
    if trace.talker_hidden.numel() == 0:
        return None
    t_bad = ~torch.isfinite(trace.talker_hidden).all(-1)  # [S, L+1]
    tl_bad = ~torch.isfinite(trace.talker_logits).all(-1)  # [S]
    has_pred = trace.pred_hidden.numel() > 0
    p_bad = ~torch.isfinite(trace.pred_hidden).all(-1) if has_pred else None  # [F, 15, P+1]
    pl_bad = ~torch.isfinite(trace.pred_logits).all(-1) if has_pred else None  # [F, 15]

    def point(component: str, step: int, sub: int, bad_layers: torch.Tensor) -> dict:
        hits = bad_layers.nonzero()
        p = int(hits[0, 0]) if len(hits) else len(bad_layers)  # len() = the logits point
        name = "embed" if p == 0 else ("logits" if p == len(bad_layers) else f"layer{p - 1}")
        return {"component": component, "step": step, "substep": sub, "layer": p - 1, "point": name}

    for s in range(t_bad.shape[0]):
        if bool(t_bad[s].any() or tl_bad[s]):
            return point("talker", s, -1, t_bad[s])
        if has_pred and s < p_bad.shape[0]:
            for j in range(p_bad.shape[1]):
                if bool(p_bad[s, j].any() or pl_bad[s, j]):
                    return point("predictor", s, j, p_bad[s, j])
    return None


def first_nonfinite_sample(wav: np.ndarray, sr: int) -> dict | None:
    """Where a waveform first holds NaN/inf (sample index and seconds), or None."""
    bad = np.flatnonzero(~np.isfinite(np.asarray(wav)))
    if not len(bad):
        return None
    return {"sample": int(bad[0]), "seconds": round(int(bad[0]) / sr, 4), "count": int(len(bad))}


def peak_memory(device: str) -> dict:
    """Peak memory so far: CUDA max_memory_allocated on a GPU (reset per side), else the process's
    peak resident set size (cumulative over the process: the later side includes the earlier)."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return {"device": device, "kind": "cuda_max_memory_allocated", "bytes": int(torch.cuda.max_memory_allocated())}
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    scale = 1 if os.uname().sysname == "Darwin" else 1024
    return {"device": "cpu", "kind": "process_peak_rss", "bytes": int(rss * scale)}


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


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _is_checkpoint_error(e: Exception) -> bool:
    """Exceptions from from_pretrained that mean a bad or unreachable checkpoint, not an engine bug."""
    if isinstance(e, (OSError, ValueError, KeyError)) or type(e).__name__ == "SafetensorError":
        return True
    return isinstance(e, RuntimeError) and any(m in str(e) for m in ("size mismatch", "ignore_mismatched_sizes", "Error(s) in loading"))


class Run:
    """One ``parity run`` invocation."""

    def __init__(self, prompts_path: Path, recipe: Recipe, out: Path, command: str = "", progress: Progress | None = None):
        self.prompts_path = Path(prompts_path)
        self.recipe = recipe
        self.out = Path(out)
        self.command = command
        self.progress = progress or (lambda phase, done, total: None)
        self.tol = recipe.tolerance()
        self.prompt_format: str | None = None  # "text" | "jsonl" | None (by extension)
        self.recipe_digest: str | None = None  # set by execute; seals each result to its recipe and traces

    def execute(self, force: bool = False, resume: bool = False) -> dict:
        """Run everything; returns the summary (also written to summary.json).

        Raises BadInput (exit 2) for bad input, found before anything is written where possible;
        EngineFailure (exit 3) when an engine fails mid-run; Interrupted/KeyboardInterrupt on
        Ctrl-C. Mid-run, summary.json is written first in every case.
        """
        fault = parse_fault(os.environ.get(FAULT_ENV))
        faults.check()
        prompts = load_prompts(self.prompts_path, fmt=self.prompt_format)
        previous = check_out_dir(self.out, force, resume)
        model_dir = resolve_model(self.recipe.model, self.recipe.model_seed)
        meta = {
            "command": self.command, "prompts_file": str(self.prompts_path), "prompts_digest": prompts_digest(prompts),
            "model": self.recipe.model, "model_dir": str(model_dir),
            "recipe": json.loads(json.dumps(self.recipe.to_dict(), default=str)), "tolerance": self.tol,
            "environment": fingerprint(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "sides": dict((previous or {}).get("sides") or {}),
        }
        if not isinstance(meta["sides"], dict) or not all(isinstance(v, dict) for v in meta["sides"].values()):
            meta["sides"] = {}
        if fault:
            meta["test_fault"] = os.environ[FAULT_ENV]
        if os.environ.get(faults.ENV):
            meta["test_fault_at"] = os.environ[faults.ENV]
        if previous is not None:
            check_resumable(previous, meta, self.out)
        self._checked = preflight(prompts, self.recipe, model_dir, self.prompts_path)
        # Scorers load before any engine, so a missing UTMOS checkpoint is refused up front.
        self.scorers = scoring.load_scorers(self.recipe.mos.scorers, self.recipe.mos.utmos_checkpoint)
        engines = {role: self._make(getattr(self.recipe, role), model_dir, role) for role in ("reference", "candidate")}
        self.recipe_digest = digest.recipe_digest(meta["recipe"], meta["prompts_digest"])
        make_out_dir(self.out)
        with outdir.RunLock(self.out, self.command):
            return self._execute_locked(prompts, meta, engines, model_dir, fault, force, resume)

    def _execute_locked(self, prompts: list[Prompt], meta: dict, engines: dict[str, Engine], model_dir, fault,
                        force: bool, resume: bool) -> dict:
        """The part of a run that writes into --out (the lock is held). From here on every failure
        ends the same way: summary.json with the finished prompts, then the failure's exit code."""
        prepare_out_dir(self.out, force, resume)
        todo = [p for p in prompts if not (resume and self._finished(p))]
        self.peak: dict[str, dict] = {}
        failure: BaseException | None = None
        try:
            write_json(self.out / "run.json", meta)
            faults.point("before_load")
            self._run_sides(todo, engines, meta, prompts, model_dir, fault)
        except (Exception, KeyboardInterrupt) as e:  # keep what finished, mark the rest, then report
            failure = e
        summary = self.write_summary(prompts, meta, failure)
        writing = failure is None and self.output_failure is not None
        failure = failure or self.output_failure
        if isinstance(failure, (BadInput, KeyboardInterrupt)):
            raise failure
        saved = f"{summary['counts']['ran']} of {len(prompts)} prompts finished and are saved in {self.out}"
        if writing and not outdir.is_no_space(failure) and not isinstance(failure, outdir.OutOfSpace):
            missing = ", ".join(summary.get("missing_outputs") or []) or "an output"
            raise EngineFailure(f"writing {missing} failed: {_one_line(failure)}; {saved}; `parity report {self.out}` "
                                "writes the report again")
        if isinstance(failure, outdir.OutOfSpace) or outdir.is_no_space(failure):
            raise outdir.OutOfSpace(f"disk full or not writable: {_one_line(failure)}; {saved}; free some space and "
                                    "rerun with --resume") from None
        if failure is not None:
            raise EngineFailure(f"engine failed: {_one_line(failure)}; {saved}; rerun with --resume") from failure
        return summary

    def _make(self, side, model_dir, role: str) -> Engine:
        """Instantiate (not load) an engine, so an unusable side is refused before any work."""
        try:
            return make_engine(side, model_dir)
        except ImportError as e:
            raise BadInput(f"[{role}] engine '{side.engine}' is not available ({_one_line(e)}); install it or pick another engine") from None

    def _finished(self, p: Prompt) -> bool:
        """A prompt a previous run finished: a readable result and all its traces and audio."""
        files = [f"traces/{p.id}.{n}.{ext}" for n in ("reference", "candidate.forced", "candidate.free") for ext in ("safetensors", "json")]
        files += [f"audio/{p.id}.reference.wav", f"audio/{p.id}.candidate.wav", f"points/{p.id}.csv.gz"]
        return self._read_result(p) is not None and all((self.out / f).is_file() for f in files)

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

    def _run_sides(self, prompts: list[Prompt], engines: dict[str, Engine], meta: dict, all_prompts: list[Prompt],
                   model_dir, fault) -> None:
        """The reference over all prompts, then the candidate over those the reference finished."""
        if not prompts:
            return
        index = {p.id: i for i, p in enumerate(all_prompts)}
        ref_traces: dict[str, Trace] = {}
        ref_audio: dict[str, list[tuple[np.ndarray, int]]] = {}
        ref_failure: Exception | None = None
        engine = self._load(engines["reference"], "reference", model_dir, all_prompts, fault, index)
        meta["sides"]["reference"] = engine.describe()
        try:
            for i, p in enumerate(prompts):
                try:
                    t0 = time.perf_counter()
                    trace = engine.run(p, self.recipe.decoding)
                    trace.meta["seconds"] = time.perf_counter() - t0
                    wav, sr = engine.decode_audio(trace.codes)
                    ref_audio[p.id] = [(wav, sr)] + self._extra_seeds(engine, p, "reference")
                except BadInput as e:
                    raise self._at(p, e) from None
                except Exception as e:  # finish the prompts before it on the candidate side, then fail
                    ref_failure = e
                    break
                trace.meta["audio_nonfinite"] = first_nonfinite_sample(wav, sr)
                trace.save(self.out / "traces", f"{p.id}.reference", tokens_only=self.recipe.traces == "tokens")
                write_wav(self.out / "audio" / f"{p.id}.reference.wav", wav, sr)
                ref_traces[p.id] = trace
                self.progress("reference", i + 1, len(prompts))
                faults.point("between")
        finally:
            self._release(engine, "reference")
        done = [p for p in prompts if p.id in ref_traces]
        truth_traces = self._run_truth(done, ref_traces, model_dir, meta) if self.recipe.truth is not None and done else {}
        if done:
            engine = self._load(engines["candidate"], "candidate", model_dir, all_prompts, fault, index)
            meta["sides"]["candidate"] = engine.describe()
            write_json(self.out / "run.json", meta)
            try:
                for i, p in enumerate(done):
                    ref = ref_traces.pop(p.id)
                    t0 = time.perf_counter()
                    try:
                        forced = engine.run(p, self.recipe.decoding, force=ref)
                        t1 = time.perf_counter()
                        free = engine.run(p, self.recipe.decoding, record=False)
                    except BadInput as e:
                        raise self._at(p, e) from None
                    t2 = time.perf_counter()
                    wav, sr = engine.decode_audio(free.codes)
                    cand_audio = [(wav, sr)] + self._extra_seeds(engine, p, "candidate")
                    free.meta["audio_nonfinite"] = first_nonfinite_sample(wav, sr)
                    forced.save(self.out / "traces", f"{p.id}.candidate.forced", tokens_only=self.recipe.traces == "tokens")
                    free.save(self.out / "traces", f"{p.id}.candidate.free")
                    write_wav(self.out / "audio" / f"{p.id}.candidate.wav", wav, sr)
                    self._finish_prompt(p, ref, forced, free, {"reference_s": ref.meta["seconds"], "forced_s": t1 - t0, "free_s": t2 - t1},
                                        truth_traces.pop(p.id, None), ref_audio.pop(p.id), cand_audio)
                    self.progress("candidate", i + 1, len(done))
            finally:
                self._release(engine, "candidate")
        if ref_failure is not None:
            raise ref_failure

    def _extra_seeds(self, engine: Engine, p: Prompt, role: str) -> list[tuple[np.ndarray, int]]:
        """Free-running audio for seeds decoding.seed + 1 .. + (mos.seeds - 1), when sampling
        (greedy decoding gives the same audio for every seed). Each WAV is kept under audio/."""
        decoding = self.recipe.decoding
        if not decoding.do_sample:
            return []
        clips = []
        for k in range(1, self.recipe.mos.seeds):
            trace = engine.run(p, replace(decoding, seed=decoding.seed + k), record=False)
            wav, sr = engine.decode_audio(trace.codes)
            write_wav(self.out / "audio" / f"{p.id}.{role}.seed{k}.wav", wav, sr)
            clips.append((wav, sr))
        return clips

    def _at(self, p: Prompt, e: BadInput) -> BadInput:
        """A mid-run BadInput from an engine, with the prompt it is about."""
        where = f"{self.prompts_path}:{p.line}: prompt {p.id}"
        return e if str(e).startswith(str(self.prompts_path)) else BadInput(f"{where}: {e}")

    def _load(self, engine: Engine, role: str, model_dir, prompts: list[Prompt], fault, index: dict[str, int]) -> Engine:
        """Load one side; a checkpoint that does not load is bad input (exit 2), OOM is exit 3."""
        device = str(getattr(engine, "device", "cpu"))
        if device.startswith("cuda") and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        try:
            faults.point("load")
            engine.load()
        except BaseException as e:
            engine.close()  # free whatever a half-done load allocated
            if isinstance(e, (BadInput, KeyboardInterrupt, torch.OutOfMemoryError, MemoryError)) or not _is_checkpoint_error(e):
                raise
            raise BadInput(f"[{role}] model '{self.recipe.model}' does not load ({_one_line(e)}); "
                           "check the checkpoint (parity run --model DIR|HUB_ID|random:tiny)") from None
        if not self._checked:  # a hub id: its files exist only now
            self._checked = True
            check_loaded_checkpoint(model_dir, prompts, self.recipe, self.prompts_path)
        if fault and fault[0] == role:
            return FaultInjector(engine, index, fault[1], fault[2])  # type: ignore[return-value]
        return engine

    def _release(self, engine: Engine, role: str) -> None:
        """Free a side's model before the next loads, and note its peak memory."""
        device = str(getattr(engine, "device", "cpu"))
        engine.close()
        gc.collect()
        self.peak[role] = peak_memory(device)

    def _run_truth(self, prompts: list[Prompt], ref_traces: dict[str, Trace], model_dir, meta: dict) -> dict[str, Trace]:
        """The recipe's optional [truth] side, teacher-forced on the reference's codes like the candidate."""
        engine = make_engine(self.recipe.truth, model_dir)
        engine.load()
        meta["sides"]["truth"] = engine.describe()
        traces: dict[str, Trace] = {}
        try:
            for p in prompts:
                traces[p.id] = engine.run(p, self.recipe.decoding, force=ref_traces[p.id])
                traces[p.id].save(self.out / "traces", f"{p.id}.truth", tokens_only=self.recipe.traces == "tokens")
        finally:
            self._release(engine, "truth")
        return traces

    def _finish_prompt(self, p: Prompt, ref: Trace, forced: Trace, free: Trace, timing: dict, truth: Trace | None = None,
                       ref_audio: list[tuple[np.ndarray, int]] | None = None,
                       cand_audio: list[tuple[np.ndarray, int]] | None = None) -> None:
        points = compare.point_frame(forced, ref, self.tol)
        outdir.atomic_write_with(self.out / "points" / f"{p.id}.csv.gz",
                                 lambda tmp: points.drop(columns=["finite"]).to_csv(tmp, index=False, compression="gzip"))
        comparison = compare.summarize(points, forced, ref, free, self.tol)
        if truth is not None:  # which side is further from the truth: "different" vs "worse"
            comparison["truth"] = compare.compare_truth(forced, ref, truth, self.tol)
        # compare.py flags NaN/inf on the candidate's hidden states; the reference's and both
        # waveforms are checked here, and the no_nonfinite gate covers them too.
        comparison["first_nonfinite_reference"] = first_nonfinite_point(ref)
        comparison["nonfinite_audio"] = {"reference": ref.meta.get("audio_nonfinite"), "candidate": free.meta.get("audio_nonfinite")}
        mos_result = scoring.score_pairs(getattr(self, "scorers", {}), ref_audio or [], cand_audio or [])
        audio_timing = {}
        if ref_audio and cand_audio:
            audio_timing = scoring.audio_timing(ref_audio[0][0], cand_audio[0][0], ref_audio[0][1], comparison, self.recipe.mos.audible_db)
        gate_results = gates_mod.evaluate(self.recipe.gates, comparison, self.recipe.mos, mos_result)
        extra = [f"reference {gates_mod.where(comparison['first_nonfinite_reference'])}"] if comparison["first_nonfinite_reference"] else []
        extra += [f"{side} audio at {bad['seconds']} s" for side, bad in comparison["nonfinite_audio"].items() if bad]
        for g in gate_results:
            if g.name == "no_nonfinite" and extra:
                g.detail = ("" if g.passed else g.detail + "; ") + "NaN/inf in " + ", ".join(extra)
                g.passed = False
        result = {
            "id": p.id, "text": p.text, "line": p.line, "speaker": p.speaker, "language": p.language,
            "status": "ok", "comparison": comparison, "gates": [asdict(g) for g in gate_results],
            "passed": all(g.passed for g in gate_results), "timing": timing,
            "audio": {"reference": f"audio/{p.id}.reference.wav", "candidate": f"audio/{p.id}.candidate.wav"},
            # Codebook-0 sequences (free-running), small enough to keep for token timelines.
            "codebook0": {"reference": ref.codes[:, 0].tolist(), "candidate": free.codes[:, 0].tolist()},
            "mos": mos_result,
            **audio_timing,
        }
        result[digest.KEY] = digest.seal(result, self.out, self.recipe_digest or "")
        write_json(self.out / "results" / f"{p.id}.json", result)

    def write_summary(self, prompts: list[Prompt], meta: dict, failure: BaseException | None = None) -> dict:
        """Assemble summary.json (+ junit.xml, report.html) from the per-prompt results on disk.
        Prompts without a complete result are listed with status ``not_run``.

        Never raises: a failure while writing junit.xml or report.html (a full disk, a signal) is
        recorded in the summary and kept in ``self.output_failure``. summary.json is written last,
        with signals held off, and says ``passed`` only when every output it lists exists."""
        from parity.report import html, junit

        self.output_failure: BaseException | None = None
        results = []
        for p in prompts:
            try:
                result = self._read_result(p)
            except BadInput as e:
                result, self.output_failure = None, self.output_failure or e
            results.append(result or {"id": p.id, "text": p.text, "line": p.line, "status": "not_run", "gates": [], "passed": False})
        ran = [r for r in results if r["status"] == "ok"]
        summary = {
            **meta,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "failure": _failure_text(failure),
            "prompts": results,
            "counts": {"prompts": len(results), "ran": len(ran), "passed": sum(bool(r.get("passed")) for r in ran),
                       "not_run": len(results) - len(ran)},
            "passed": failure is None and len(ran) == len(results) and all(r.get("passed") is True for r in ran),
            "peak_memory": getattr(self, "peak", {}),
            "outputs": list(OUTPUTS),
        }
        for name in OUTPUTS[1:]:  # an old report must not stand in for this run's
            try:
                (self.out / name).unlink(missing_ok=True)
            except OSError:
                pass

        def report() -> None:
            faults.point("report")
            html.write(summary, self.out, self.out / "report.html")

        for name, write in (("junit.xml", lambda: junit.write(summary, self.out / "junit.xml")), ("report.html", report)):
            try:
                write()
            except (Exception, KeyboardInterrupt) as e:
                self.output_failure = self.output_failure or e
                if summary["failure"] is None:
                    summary["failure"] = f"writing {name} failed: {_failure_text(e)}"
        missing = [name for name in OUTPUTS[1:] if not (self.out / name).is_file()]
        if missing or self.output_failure is not None:
            summary["passed"] = False
            summary["missing_outputs"] = missing
        try:
            with _signals_held():
                write_json(self.out / "summary.json", summary)
        except (Exception, KeyboardInterrupt) as e:
            self.output_failure = self.output_failure or e
        return summary


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
