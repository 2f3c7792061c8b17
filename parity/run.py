"""``parity run``: both sides on every prompt, compared, scored and written out.

Data flow: recipe + prompts -> the reference runs each prompt with probes on (its traces are
kept) -> the candidate runs teacher-forced on the reference's codes (probes on) and free-running
(for audio and token agreement) -> compare -> gates -> summary.json, junit.xml, report.html.
Each finished prompt's result is written at once (atomically), so a run that dies keeps them.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np

from parity import compare, gates as gates_mod
from parity.engines.base import Engine, make_engine
from parity.env import fingerprint
from parity.errors import BadInput, EngineFailure
from parity.models import resolve_model
from parity.prompts import Prompt, load_prompts
from parity.recipe import Recipe
from parity.trace import Trace

Progress = Callable[[str, int, int], None]  # (phase, done, total)


def write_json(path: Path, data) -> None:
    """Write JSON atomically: a killed run never leaves a half-written file behind."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str, ensure_ascii=False))
    os.replace(tmp, path)


def write_wav(path: Path, wav: np.ndarray, sr: int) -> None:
    import soundfile as sf

    tmp = path.with_name(f".{path.name}.tmp.wav")
    sf.write(str(tmp), np.clip(wav, -1, 1), sr, subtype="PCM_16")
    os.replace(tmp, path)


def prepare_out_dir(out: Path, force: bool, resume: bool) -> None:
    """Refuse to mix a new run into an old one unless asked (--force wipes, --resume continues)."""
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out '{out}' exists and is not a directory; choose another path")
    if out.exists() and any(out.iterdir()) and not resume:
        if not force:
            raise BadInput(f"--out '{out}' is not empty; pass --force to overwrite or --resume to continue it")
        shutil.rmtree(out)
    try:
        for sub in ("traces", "audio", "points", "results"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise BadInput(f"--out '{out}' is not writable ({e.strerror}); choose a writable directory") from None


class Run:
    """One ``parity run`` invocation."""

    def __init__(self, prompts_path: Path, recipe: Recipe, out: Path, command: str = "", progress: Progress | None = None):
        self.prompts_path = Path(prompts_path)
        self.recipe = recipe
        self.out = Path(out)
        self.command = command
        self.progress = progress or (lambda phase, done, total: None)
        self.tol = recipe.tolerance()

    def execute(self, force: bool = False, resume: bool = False) -> dict:
        """Run everything; returns the summary (also written to summary.json)."""
        prompts = load_prompts(self.prompts_path)
        prepare_out_dir(self.out, force, resume)
        model_dir = resolve_model(self.recipe.model, self.recipe.model_seed)
        todo = [p for p in prompts if not (resume and (self.out / "results" / f"{p.id}.json").is_file())]
        meta = {
            "command": self.command, "prompts_file": str(self.prompts_path), "model": self.recipe.model,
            "model_dir": str(model_dir), "recipe": self.recipe.to_dict(), "tolerance": self.tol,
            "environment": fingerprint(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json(self.out / "run.json", meta)
        failure: Exception | None = None
        try:
            self._run_sides(todo, model_dir, meta)
        except (BadInput, KeyboardInterrupt):
            raise
        except Exception as e:  # engine crash or OOM: keep what finished, mark the rest
            failure = e
        summary = self.write_summary(prompts, meta, failure)
        if failure is not None:
            raise EngineFailure(f"engine failed: {type(failure).__name__}: {str(failure).splitlines()[0] if str(failure) else ''}; "
                                f"finished prompts are saved in {self.out}, rerun with --resume") from failure
        return summary

    def _run_sides(self, prompts: list[Prompt], model_dir, meta: dict) -> None:
        if not prompts:
            return
        ref_traces: dict[str, Trace] = {}
        engine = self._load(self.recipe.reference, model_dir, "reference")
        meta["sides"] = {"reference": engine.describe()}
        try:
            for i, p in enumerate(prompts):
                t0 = time.perf_counter()
                trace = engine.run(p, self.recipe.decoding)
                trace.meta["seconds"] = time.perf_counter() - t0
                trace.save(self.out / "traces", f"{p.id}.reference")
                write_wav(self.out / "audio" / f"{p.id}.reference.wav", *engine.decode_audio(trace.codes))
                ref_traces[p.id] = trace
                self.progress("reference", i + 1, len(prompts))
        finally:
            engine.close()
        engine = self._load(self.recipe.candidate, model_dir, "candidate")
        meta["sides"]["candidate"] = engine.describe()
        write_json(self.out / "run.json", meta)
        try:
            for i, p in enumerate(prompts):
                ref = ref_traces[p.id]
                t0 = time.perf_counter()
                forced = engine.run(p, self.recipe.decoding, force=ref)
                t1 = time.perf_counter()
                free = engine.run(p, self.recipe.decoding, record=False)
                t2 = time.perf_counter()
                forced.save(self.out / "traces", f"{p.id}.candidate.forced")
                free.save(self.out / "traces", f"{p.id}.candidate.free")
                write_wav(self.out / "audio" / f"{p.id}.candidate.wav", *engine.decode_audio(free.codes))
                self._finish_prompt(p, ref, forced, free, {"reference_s": ref.meta["seconds"], "forced_s": t1 - t0, "free_s": t2 - t1})
                self.progress("candidate", i + 1, len(prompts))
        finally:
            engine.close()

    def _load(self, side, model_dir, role: str) -> Engine:
        engine = make_engine(side, model_dir)
        engine.load()
        return engine

    def _finish_prompt(self, p: Prompt, ref: Trace, forced: Trace, free: Trace, timing: dict) -> None:
        points = compare.point_frame(forced, ref, self.tol)
        points.drop(columns=["finite"]).to_csv(self.out / "points" / f"{p.id}.csv.gz", index=False)
        comparison = compare.summarize(points, forced, ref, free, self.tol)
        gate_results = gates_mod.evaluate(self.recipe.gates, comparison)
        result = {
            "id": p.id, "text": p.text, "line": p.line, "speaker": p.speaker, "language": p.language,
            "status": "ok", "comparison": comparison, "gates": [asdict(g) for g in gate_results],
            "passed": all(g.passed for g in gate_results), "timing": timing,
            "audio": {"reference": f"audio/{p.id}.reference.wav", "candidate": f"audio/{p.id}.candidate.wav"},
        }
        write_json(self.out / "results" / f"{p.id}.json", result)

    def write_summary(self, prompts: list[Prompt], meta: dict, failure: Exception | None = None) -> dict:
        """Assemble summary.json (+ junit.xml, report.html) from the per-prompt results on disk."""
        from parity.report import html, junit

        results = []
        for p in prompts:
            path = self.out / "results" / f"{p.id}.json"
            if path.is_file():
                results.append(json.loads(path.read_text()))
            else:
                results.append({"id": p.id, "text": p.text, "line": p.line, "status": "not_run", "gates": [], "passed": False})
        ran = [r for r in results if r["status"] == "ok"]
        summary = {
            **meta,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "failure": None if failure is None else f"{type(failure).__name__}: {failure}",
            "prompts": results,
            "counts": {"prompts": len(results), "ran": len(ran), "passed": sum(r["passed"] for r in ran)},
            "passed": failure is None and len(ran) == len(results) and all(r["passed"] for r in ran),
        }
        write_json(self.out / "summary.json", summary)
        junit.write(summary, self.out / "junit.xml")
        html.write(summary, self.out, self.out / "report.html")
        return summary
