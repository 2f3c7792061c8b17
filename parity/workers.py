"""``--devices``: one worker process per device on one host, pulling prompts from one queue.

The parent (``parity run``) owns the run directory, its lock and the queue of prompts still to
run; it loads no model. Each worker is a fresh process (``multiprocessing``, start method
``spawn``, so no CUDA state is inherited) that loads its own engines once, keeps them resident,
and asks the parent for a prompt whenever it is idle; the parent answers with the next prompt id of
the queue or with "stop". So a fast device takes more prompts than a slow one, and the order the
prompts are handed out is the file's. Parent and worker talk over one ``multiprocessing.Pipe``
each: no lock is shared, so a worker that dies at any moment cannot block the others.

Every worker writes its prompts' traces, audio, points and sealed results straight into the run
directory (file names are per prompt, so workers never write the same file); the parent writes
``run.json`` and, at the end, ``summary.json``, ``junit.xml`` and ``report.html`` from the results
on disk, exactly as a run in one process does.

A worker that dies (killed, segfault, out of memory) or whose engine raises keeps everything it
finished; the prompt it was running is marked ``failed`` with the reason, the other workers go on
with the queue, and the run ends with exit 3 (``--resume`` runs the failed and unrun prompts).
A CUDA worker sees only its own GPU (``CUDA_VISIBLE_DEVICES``) and runs the sides on ``cuda``.
"""

from __future__ import annotations

import os
import signal
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from parity.errors import BadInput, EngineFailure

ALL = "all"


def parse_devices(text: str, cuda_count: int) -> list[str]:
    """``cuda:0,cuda:1`` / ``all`` / ``cpu,cpu`` -> one device string per worker (``cpu`` or
    ``cuda:K``). A device named twice gets two workers. Mixing CPU and CUDA workers is refused:
    their results would not be comparable in one suite."""
    fix = "pass e.g. --devices cuda:0,cuda:1, --devices all (every visible GPU) or --devices cpu,cpu"
    value = (text or "").strip().lower()
    if value == ALL:
        if cuda_count < 1:
            raise BadInput(f"--devices all: no CUDA GPU is visible; {fix}")
        return [f"cuda:{k}" for k in range(cuda_count)]
    devices = [d.strip() for d in value.split(",")]
    out = []
    for d in devices:
        if d == "cpu":
            out.append("cpu")
        elif d == "cuda" or (d.startswith("cuda:") and d[5:].isdigit()):
            k = int(d[5:]) if d != "cuda" else 0
            if k >= cuda_count:
                seen = f"{cuda_count} GPU(s) are visible" + (f" (cuda:0-cuda:{cuda_count - 1})" if cuda_count else "")
                raise BadInput(f"--devices {text!r}: {d} does not exist, {seen}; {fix}")
            out.append(f"cuda:{k}")
        else:
            raise BadInput(f"--devices {text!r}: {d!r} is not a device; {fix}")
    if len({d.split(':')[0] for d in out}) > 1:
        raise BadInput(f"--devices {text!r} mixes CPU and CUDA workers, whose results are not one suite; "
                       "run them as two runs (or shards) instead")
    return out


def device_kind(devices: list[str]) -> str:
    """The recipe device every worker's sides run on: ``cpu`` or ``cuda``."""
    return "cuda" if devices[0].startswith("cuda") else "cpu"


@dataclass
class WorkerJob:
    """What a worker needs to run prompts into the parent's run directory."""

    index: int
    device: str
    prompts_path: str
    prompts: list  # the run's prompts (parity.prompts.Prompt), as the parent read them (a pipe reads once)
    recipe: object  # parity.recipe.Recipe (its module imports no torch: CUDA_VISIBLE_DEVICES is set first)
    out: str
    command: str
    recipe_digest: str
    meta: dict
    refresh_reference: bool
    visible: str | None  # the value CUDA_VISIBLE_DEVICES gets in the worker (None: leave it)
    cpu_workers: int = 1  # how many CPU workers share this host's cores


@dataclass
class _Worker:
    index: int
    device: str
    process: object
    conn: object
    assigned: list[str] = field(default_factory=list)  # handed out, not yet reported finished
    finished: list[str] = field(default_factory=list)
    status: str = "running"  # running / finished / died / stopped (the run was interrupted)
    failure: str | None = None
    exit_code: int | None = None
    info: dict = field(default_factory=dict)


def _visible(device: str) -> str | None:
    """CUDA_VISIBLE_DEVICES for a worker on ``device``: the K-th GPU the parent sees."""
    if not device.startswith("cuda"):
        return None
    k = int(device.split(":")[1])
    parent = os.environ.get("CUDA_VISIBLE_DEVICES")
    if parent is None or not parent.strip():
        return str(k)
    ids = [x.strip() for x in parent.split(",") if x.strip()]
    return ids[k] if k < len(ids) else str(k)


def run_on_devices(runner, todo: list, meta: dict, all_prompts: list) -> None:
    """Run ``todo`` (prompts) on ``runner.devices``, one worker process each, into ``runner.out``.
    Returns when the queue is empty and every worker has stopped; raises BadInput (a worker
    refused its input, exit 2) or EngineFailure (a worker died or its engine failed, exit 3)
    after the others finished. Prompts a dead worker was running go into ``runner.failed``."""
    import multiprocessing as mp
    from multiprocessing.connection import wait

    from parity.outputs import write_json

    if not todo:
        return
    ctx = mp.get_context("spawn")
    queue = deque(p.id for p in todo)
    workers: list[_Worker] = []
    meta["devices"] = list(runner.devices)
    devices = runner.devices[:len(todo)]  # no worker without a prompt to run
    try:
        for i, device in enumerate(devices):
            job = WorkerJob(i, device, str(runner.prompts_path), list(all_prompts), runner.recipe, str(runner.out),
                            runner.command, runner.recipe_digest or "", _worker_meta(meta), runner.refresh_reference,
                            _visible(device), sum(d == "cpu" for d in devices))
            parent_end, child_end = ctx.Pipe(duplex=True)
            process = ctx.Process(target=worker_main, args=(job, child_end), name=f"parity-worker-{i}", daemon=True)
            process.start()
            child_end.close()  # so a dead worker's pipe reads as end-of-file here
            workers.append(_Worker(i, device, process, parent_end))
        total, done = len(todo), 0
        live = {w.conn: w for w in workers}
        while live:
            for conn in wait(list(live)):
                w = live[conn]
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    _ended(w)
                    del live[conn]
                    continue
                kind = message[0]
                if kind in ("want", "exit"):  # ("want", finished ids, sides, load seconds) / ("exit", finished ids, info)
                    for pid in message[1]:
                        w.assigned.remove(pid)
                        w.finished.append(pid)
                        done += 1
                        runner.progress("prompts", done, total)
                if kind == "want":
                    if len(message) > 3 and message[3]:  # known as soon as loaded, so a worker that dies later keeps them
                        w.info["load_s"] = dict(message[3])
                    for role, described in (message[2] or {}).items():
                        meta.setdefault("sides", {}).setdefault(role, described)
                    next_id = queue.popleft() if queue else None
                    if next_id is not None:
                        w.assigned.append(next_id)
                    _send(w, next_id)
                elif kind == "error":  # ("error", exit code, one line): the worker exits next
                    w.exit_code, w.failure = message[1], message[2]
                elif kind == "exit":
                    w.info = {**w.info, **message[2]}
    except BaseException:
        for w in workers:  # Ctrl-C / SIGTERM: stop every worker; finished prompts stay on disk
            if w.process.is_alive():
                w.process.terminate()
        for w in workers:
            w.process.join(10)
            if w.status == "running":
                w.status = "stopped"
        raise
    finally:
        for w in workers:
            w.conn.close()
        _record(runner, meta, workers)
        write_json(runner.out / "run.json", meta)
    _raise_for(workers, len(queue))


def _send(w: _Worker, prompt_id: str | None) -> None:
    try:
        w.conn.send(prompt_id)
    except (BrokenPipeError, OSError):  # it died; the end-of-file that follows records it
        pass


def _ended(w: _Worker) -> None:
    """A worker's pipe closed: it stopped after "stop", or it died."""
    w.process.join(30)
    code = w.process.exitcode
    if code == 0 and not w.assigned and w.failure is None:
        w.status = "finished"
        return
    w.status = "died"
    w.exit_code = w.exit_code if w.exit_code is not None else code
    if w.failure is None:
        w.failure = (f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 and -code in signal.valid_signals()
                     else f"exited with status {code}")


def _worker_meta(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k not in ("sides",)} | {"sides": {}}


def _record(runner, meta: dict, workers: list[_Worker]) -> None:
    """The workers' part of run.json and summary.json, and the prompts the dead ones were running."""
    from parity.results import Merge, MergePart

    parts = []
    for w in workers:
        lost = []
        for pid in w.assigned:  # a result on disk is finished, even if the worker died before saying so
            (w.finished if (Path(runner.out) / "results" / f"{pid}.json").is_file() else lost).append(pid)
        w.assigned = lost
        if w.status == "died":
            for pid in lost:
                runner.failed[pid] = f"worker {w.index} ({w.device}, pid {w.process.pid}) {w.failure} while running it"
        parts.append(MergePart(w.index, w.status, list(w.finished), w.device, w.failure, w.process.pid,
                               lost if w.status == "died" else []))
    meta["merge"] = Merge("workers", len(workers), parts, meta.get("prompts_digest", "")).to_json()
    peaks: dict[str, dict] = {}
    cache = {"hits": 0, "misses": 0, "refreshed": 0, "rebuilt": 0}
    for w in workers:
        for role, peak in (w.info.get("peak") or {}).items():
            if role not in peaks or peak.get("bytes", 0) > peaks[role].get("bytes", 0):
                peaks[role] = dict(peak)
        for key in cache:
            cache[key] += int((w.info.get("cache") or {}).get(key) or 0)
        for role, seconds in (w.info.get("load_s") or {}).items():
            meta.setdefault("engine_load_s_per_worker", {}).setdefault(str(w.index), {})[role] = seconds
    runner.peak = peaks
    if runner.cache is not None:  # the parent's own cache object ran nothing: report the workers'
        runner.cache.hits, runner.cache.misses = cache["hits"], cache["misses"]
        runner.cache.refreshed = cache["refreshed"]


def _raise_for(workers: list[_Worker], unrun: int) -> None:
    dead = [w for w in workers if w.status == "died"]
    if not dead:
        return
    w = dead[0]
    what = f"worker {w.index} ({w.device}) {w.failure}" + (f" while running prompt {', '.join(w.assigned)}" if w.assigned else "")
    more = f" (and {len(dead) - 1} more worker(s))" if len(dead) > 1 else ""
    left = f"; {unrun} prompt(s) were never started" if unrun else ""
    if w.exit_code == 2:
        raise BadInput(f"{w.failure}{more}")
    raise EngineFailure(f"{what}{more}{left}")


# --- inside a worker process -------------------------------------------------------------------


def worker_main(job: WorkerJob, conn) -> None:
    """A worker process: load the engines once, then run the prompts the parent hands out."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent stops us
    if job.visible is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = job.visible  # before torch initialises CUDA
    runner = None
    try:
        runner, engines, prompts, model_dir, fault = _prepare(job)
        meta = dict(job.meta)
        conn.send(("want", [], {}))
        while True:
            prompt_id = conn.recv()
            if prompt_id is None:
                break
            # The engine passes run here; the prompt's scoring, judging and writing go to the run's
            # prompt worker (parity.background) and overlap the next prompt's passes. A prompt is
            # reported finished once that job is done (its result is on disk).
            runner._run_sides([prompts[prompt_id]], engines, meta, list(prompts.values()), model_dir, fault)
            conn.send(("want", runner.worker.finished(), meta.get("sides") or {}, dict(runner.host.load_seconds)))
        runner.worker.close()
        runner.host.close_all()
        cache = runner.cache.summary() if runner.cache is not None else None
        info = {"peak": runner.host.peak, "cache": cache, "load_s": dict(runner.host.load_seconds)}
        conn.send(("exit", runner.worker.finished(), info))
    except BaseException as e:  # report in one line, then exit: the parent marks the prompt failed
        from parity.engines.lifecycle import one_line

        code = 2 if isinstance(e, BadInput) else 3
        if runner is not None:  # the prompts whose engine passes finished still get their results
            try:
                runner.worker.close()
            except BaseException:  # noqa: BLE001 - the first failure is the one reported
                pass
        try:
            conn.send(("error", code, one_line(e) if code == 3 else str(e)))
        except (OSError, ValueError):
            pass
        conn.close()
        sys.stdout.flush()
        os._exit(code)
    conn.close()


def _prepare(job: WorkerJob):
    """This worker's Run on the shared directory, with engines that stay loaded between prompts."""
    from parity import scoring
    from parity.engines.lifecycle import THREADS_ENV, cpu_threads
    from parity.models import resolve_model
    from parity.recipe import apply_overrides
    from parity.run import FAULT_ENV, Run, parse_fault

    recipe = job.recipe
    device = "cuda" if job.device.startswith("cuda") else "cpu"
    sides = ["reference", "candidate"] + (["truth"] if recipe.truth is not None else [])
    recipe = apply_overrides(recipe, [(f"{role}.device", device) for role in sides])
    from parity.report import audio as report_audio

    report_audio.AHEAD_CHARS = 0  # the parent writes the report: clips encoded here would be thrown away
    runner = Run(Path(job.prompts_path), recipe, Path(job.out), job.command, refresh_reference=job.refresh_reference)
    runner.recipe_digest = job.recipe_digest
    runner.worker_info = {"index": job.index, "device": job.device, "pid": os.getpid()}
    runner.worker = _tracking_worker()
    prompts = {p.id: p for p in job.prompts}
    model_dir = resolve_model(recipe.model, recipe.model_seed)
    fault = parse_fault(os.environ.get(FAULT_ENV))
    if device == "cpu" and not os.environ.get(THREADS_ENV):
        # N CPU workers share the cores: each gets its share, unless the model is small enough
        # for one thread (see parity.engines.lifecycle.cpu_threads) or PARITY_CPU_THREADS is set.
        os.environ[THREADS_ENV] = str(cpu_threads(model_dir) or max(1, (os.cpu_count() or 1) // job.cpu_workers))
    runner.host = _resident_host()(recipe, model_dir, list(prompts.values()), runner.prompts_path)
    runner.host.preflight()
    runner.scorers = scoring.load_scorers(recipe.mos.scorers, recipe.mos.utmos_checkpoint)
    engines = {role: runner.host.make(getattr(recipe, role), role) for role in ("reference", "candidate")}
    runner.cache = runner._reference_cache(model_dir, fault)
    runner.peak = runner.host.peak
    return runner, engines, prompts, model_dir, fault


def _tracking_worker():
    """The run's prompt worker (parity.background.PromptWorker), also telling which prompts'
    result jobs have finished since it was last asked."""
    from parity.background import PromptWorker

    class TrackingWorker(PromptWorker):
        def __init__(self) -> None:
            super().__init__()
            self._results: dict[str, object] = {}  # prompt id -> its _finish_prompt job

        def submit(self, fn, *args, **kwargs):
            future = super().submit(fn, *args, **kwargs)
            if getattr(fn, "__name__", "") == "_finish_prompt":
                self._results[args[0].id] = future
            return future

        def finished(self) -> list[str]:
            """Prompt ids whose result job ended since the last call; a failed job raises here."""
            out = []
            for pid, future in list(self._results.items()):
                if future.done():
                    future.result()  # a job's failure is this worker's failure
                    out.append(pid)
                    del self._results[pid]
            return out

    return TrackingWorker()


def _resident_host():
    from parity.engines.lifecycle import EngineHost

    class ResidentHost(EngineHost):
        """An EngineHost whose engines stay loaded between prompts (one load per side per worker);
        :meth:`close_all` releases them at the end."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.resident: dict = {}

        def load(self, engine, role):
            if role not in self.resident:
                self.resident[role] = super().load(engine, role)
            return self.resident[role]

        def release(self, engine, role) -> None:
            pass  # kept for the next prompt

        def loaded(self, side, role):
            from contextlib import nullcontext

            if role in self.resident:
                return nullcontext(self.resident[role])
            return nullcontext(self.load(self.make(side, role), role))

        def close_all(self) -> None:
            for role, engine in list(self.resident.items()):
                EngineHost.release(self, engine, role)
            self.resident.clear()

    return ResidentHost

