"""The ``parity`` command line: thin wiring, each command calls one library function."""

from __future__ import annotations

import errno
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(add_completion=True, help="Numerical-parity diagnostics for fast TTS engines.",
                  context_settings={"help_option_names": ["-h", "--help"]})
console = Console(stderr=False)
err_console = Console(stderr=True)
VERBOSITY = {"level": 0}  # -q: -1, default 0, -v: 1 (set by the root and by each command)

PromptsArg = Annotated[Path, typer.Argument(help="Prompt file: text, one prompt per line; or JSONL with 'text' (.jsonl, or --format jsonl).")]
RecipeOpt = Annotated[Optional[Path], typer.Option("--recipe", "-r", help="Recipe TOML (default: the built-in smoke settings).")]
ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="Hub id, checkpoint directory, or a built-in: random:tiny, random:0.6b, random:tiny-base, random:0.6b-base, random:tiny-design.")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="Run directory (default: runs/<recipe>-<time>).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", metavar="SECTION.KEY=VALUE", help="Override a recipe field: section.key=value (repeatable).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (no table); progress stays on stderr.")]
VerboseOpt = Annotated[int, typer.Option("--verbose", "-v", count=True, show_default=False, help="More detail: every prompt's hints, progress as log lines.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Only the closing line (and errors).")]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("parity")
    except PackageNotFoundError:
        return "unknown"


def _verbosity(verbose: int, quiet: bool) -> int:
    """Set and return the verbosity: options given to a command add to those given to the root."""
    if quiet:
        VERBOSITY["level"] = -1
    elif verbose:
        VERBOSITY["level"] = max(VERBOSITY["level"], 0) + verbose
    return VERBOSITY["level"]


@app.callback(invoke_without_command=True)
def root(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", is_eager=True, help="Print parity's version and exit.")] = False,
    verbose: VerboseOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Numerical-parity diagnostics for fast TTS engines: run, bisect, report, env."""
    if version:
        console.print(f"parity {_version()}", markup=False, highlight=False)
        raise typer.Exit(0)
    _verbosity(verbose, quiet)
    if ctx.invoked_subcommand is None:  # bare `parity`: the usage, not an error message
        console.print(ctx.get_help(), markup=False, highlight=False)
        raise typer.Exit(2)
FormatOpt = Annotated[Optional[str], typer.Option("--format", help="Prompt file format: text or jsonl (default: by extension, .jsonl is JSONL).")]


def _recipe(recipe_path, model, sets, max_frames=None, device=None, mos=None, utmos_checkpoint=None, probes=None):
    from parity.recipe import apply_overrides, load_recipe, parse_override

    recipe = load_recipe(recipe_path)
    overrides = [parse_override(s) for s in sets or []]
    if model:
        overrides.append(("model", model))
    if max_frames is not None:
        _check_max_frames(max_frames)
        overrides.append(("decoding.max_frames", max_frames))
    if device:
        overrides += [("reference.device", device), ("candidate.device", device)]
    if mos is not None:  # "" or "none" switches scoring off
        overrides.append(("mos.scorers", "" if mos.lower() == "none" else mos))
    if utmos_checkpoint:
        overrides.append(("mos.utmos_checkpoint", utmos_checkpoint))
    if probes:
        overrides.append(("probes", probes))
    return apply_overrides(recipe, overrides) if overrides else recipe


def _check_max_frames(max_frames: int | None) -> None:
    """--max-frames out of range, named by the option the user typed (the recipe's own bound)."""
    if max_frames is not None and not 1 <= max_frames <= 100000:
        from parity.errors import BadInput

        raise BadInput(f"--max-frames must be between 1 and 100000, got {max_frames}")


def default_out(recipe_name: str) -> Path:
    """runs/<recipe>-<time>: the recipe name becomes one safe path component, never a path."""
    import re

    safe = re.sub(r"[^A-Za-z0-9._-]", "_", recipe_name)[:64].lstrip(".") or "run"
    return Path("runs") / f"{safe}-{time.strftime('%Y%m%d-%H%M%S')}"


@app.command()
def run(
    prompts: PromptsArg,
    recipe: RecipeOpt = None,
    model: ModelOpt = None,
    out: OutOpt = None,
    set_: SetOpt = None,
    max_frames: Annotated[Optional[int], typer.Option("--max-frames", help="Frames to decode at most (1-100000).")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="auto, cpu or cuda for both sides.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite a non-empty --out.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run in --out.")] = False,
    mos: Annotated[Optional[str], typer.Option("--mos", help="Scorers for both sides' audio: dnsmos, utmos, dnsmos,utmos or none.")] = None,
    utmos_checkpoint: Annotated[Optional[str], typer.Option("--utmos-checkpoint", help="Local UTMOS22-strong checkpoint (file or SpeechMOS clone).")] = None,
    json_out: JsonOpt = False,
    verbose: VerboseOpt = 0,
    quiet: QuietOpt = False,
    refresh_reference: Annotated[bool, typer.Option("--refresh-reference", help="Run the reference again instead of reusing its cached traces (and re-cache them).")] = False,
    prompt_format: FormatOpt = None,
    probes: Annotated[Optional[str], typer.Option("--probes", help="layers (default) or sublayers: also probe each op inside every decoder layer and replay the first diverging layer across sides.")] = None,
    shard: Annotated[Optional[str], typer.Option("--shard", help="Run only slice K of N of the prompt file (K/N, 1-based; balanced by prompt length), or 'auto': from PARITY_SHARD, SLURM_ARRAY_TASK_ID/COUNT or CI_NODE_INDEX/TOTAL. PARITY_SHARD=K/N applies without it too. Combine shards with parity merge.")] = None,
    devices: Annotated[Optional[str], typer.Option("--devices", help="One worker process per device, pulling prompts from one queue: cuda:0,cuda:1, all (every visible GPU) or cpu,cpu.")] = None,
) -> None:
    """Run reference and candidate on every prompt and report where they first diverge."""
    import signal
    import threading

    from parity import mistakes
    from parity.shard import resolve_shard
    from parity.stackcheck import require_stack

    level = _verbosity(verbose, quiet)
    mistakes.check_prompts_not_recipe(prompts)  # the cheap checks first: nothing heavy is imported yet
    _check_max_frames(max_frames)
    shard_spec = resolve_shard(shard, os.environ)  # bad K/N: one line, exit 2, before anything loads
    if not force:  # --force with --resume is refused by the run with its own message
        mistakes.check_resume_target(out, resume)
    require_stack()  # before anything imports qwen_tts: a broken install is one line, exit 2
    worker_devices = _devices(devices, device)
    if worker_devices:
        from parity.workers import device_kind

        device = device_kind(worker_devices)
    rec = _recipe(recipe, model, set_, max_frames, device, mos, utmos_checkpoint, probes)
    mistakes.check_cuda({"reference": rec.reference, "candidate": rec.candidate, "truth": rec.truth})
    out = out or default_out(rec.name)
    from parity.run import Interrupted

    def on_sigterm(signum, frame):  # CI cancellation: stop like Ctrl-C, keep what finished
        raise Interrupted("SIGTERM", 143)

    in_main_thread = threading.current_thread() is threading.main_thread()  # signal() works only there
    previous_handler = signal.signal(signal.SIGTERM, on_sigterm) if in_main_thread else None
    try:
        _run(prompts, rec, out, force, resume, json_out, level, refresh_reference, prompt_format, shard_spec,
             worker_devices)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_handler)


def _devices(devices: str | None, device: str | None) -> list[str] | None:
    """--devices as one device per worker, or None; refused together with --device."""
    if devices is None:
        return None
    from parity.errors import BadInput

    if device is not None:
        raise BadInput("--devices and --device exclude each other: --devices names every worker's device; pass one")
    import torch

    from parity.workers import parse_devices

    return parse_devices(devices, torch.cuda.device_count())


def _run(prompts: Path, rec, out: Path, force: bool, resume: bool, json_out: bool, level: int,
         refresh_reference: bool = False, prompt_format: str | None = None, shard=None,
         devices: list[str] | None = None) -> None:
    from parity.capture import engine_output_to
    from parity.report.console import closing_line, print_summary
    from parity.report.progress import Progress
    from parity.run import Run

    command = "parity " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    progress = Progress(live=False if level > 0 else None, quiet=level < 0)
    runner = Run(prompts, rec, out, command, progress, refresh_reference)
    runner.prompt_format = prompt_format
    runner.shard, runner.devices = shard, devices
    runner.freeze_heap = True  # this process runs one command
    try:
        with engine_output_to(lambda: out):
            summary = runner.execute(force=force, resume=resume)
    except KeyboardInterrupt as e:  # typer would swallow it into a bare exit 130
        raise _Stopped(e) from None
    finally:
        progress.close()
    seconds = progress.elapsed()
    if json_out:
        _print_json({"run_dir": str(out), "seconds": round(seconds, 1), **summary.to_json()})
    elif level < 0:
        text, style = closing_line(summary, seconds)
        console.print(text, style=style, markup=False, highlight=False)
    else:
        from parity.report.rundata import load_bisect

        footer = merge_lines(summary)
        if summary.shard is not None:
            footer.append(f"shard {summary.shard.label}: {len(summary.prompts)} of {summary.shard.total_prompts} prompts "
                          "(merge the shards with: parity merge OUT SHARD_DIR...)")
        footer.append(_cache_line(summary.extra.get("reference_cache") or {}))
        if level > 0:
            from parity.report.console import time_line

            footer += [line for line in [time_line(summary)] if line]
        footer.append(f"wrote {out}/report.html, summary.json, junit.xml")
        print_summary(summary, console, seconds, load_bisect(out), verbose=level > 0, footer=footer)
    raise typer.Exit(0 if summary.passed else 1)


def _cache_line(info: dict) -> str:
    """One console line on where the reference's traces came from."""
    if "off" in info:
        return f"reference cache: off ({info['off']})"
    hits, misses = info.get("hits", 0), info.get("misses", 0)
    if info.get("refreshed"):
        return f"reference cache: --refresh-reference: {info['refreshed']} prompts run again and stored ({info.get('dir')})"
    rebuilt = f", {info['rebuilt']} corrupt entr{'y' if info['rebuilt'] == 1 else 'ies'} rebuilt" if info.get("rebuilt") else ""
    return f"reference cache: {hits} of {hits + misses} prompts reused, {misses} run and stored{rebuilt} ({info.get('dir')})"


def _print_json(data) -> None:
    """Machine-readable output: one JSON document on stdout (strict: NaN/inf become null)."""
    import json
    import math

    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    sys.stdout.write(json.dumps(clean(data), default=str, allow_nan=False) + "\n")
    sys.stdout.flush()


@app.command()
def bisect(
    prompts: PromptsArg,
    recipe: RecipeOpt = None,
    factors: Annotated[Optional[str], typer.Option("--factors", help="Comma-separated settings to bisect over: side fields (dtype, attention, cache, tf32, ...), variant specs (rmsnorm_lowp@talker) or engine traits (faster.decode_mask; naming the engine or one of its traits searches all of them). Default: every setting that differs.")] = None,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Teacher-forced frames per probe run (>= 1).")] = 8,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Where bisect.json goes; a run directory gets the bisect added to its report.html.")] = None,
    model: ModelOpt = None,
    set_: SetOpt = None,
    device: Annotated[Optional[str], typer.Option("--device", help="auto, cpu or cuda for both sides.")] = None,
    json_out: JsonOpt = False,
    verbose: VerboseOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Find the minimal set of settings (and the first layer) that makes the candidate diverge, and prove it.

    With --out a run directory (written by parity run), its report.html is re-rendered with the bisect in it."""
    from parity import mistakes
    from parity.bisect import bisect as run_bisect
    from parity.bisect import exit_code, render
    from parity.capture import engine_output_to
    from parity.stackcheck import require_stack

    level = _verbosity(verbose, quiet)
    mistakes.check_prompts_not_recipe(prompts)
    require_stack()
    rec = _recipe(recipe, model, set_, None, device)
    mistakes.check_cuda({"reference": rec.reference, "candidate": rec.candidate})
    names = [f.strip() for f in factors.split(",") if f.strip()] if factors is not None else None
    out = out or Path("runs") / f"bisect-{time.strftime('%Y%m%d-%H%M%S')}"
    t0 = time.perf_counter()

    def progress(text: str) -> None:
        if level < 0:
            return
        if err_console.is_terminal and level == 0:
            err_console.print(text, markup=False, highlight=False)
        else:
            sys.stderr.write(f"parity: [{time.perf_counter() - t0:7.1f} s] {text}\n")
            sys.stderr.flush()

    with engine_output_to(lambda: out):
        result = run_bisect(prompts, rec, names, steps, out, progress)
    report = _add_bisect_to_run(out)
    if json_out:
        _print_json({"bisect_json": str(out / "bisect.json"), "report": str(report) if report else None, "bisect": result})
    elif level < 0:
        console.print(f"bisect: {result.get('verdict')}", markup=False, highlight=False)
    else:
        render(result, console)
        console.print(f"wrote {out}/bisect.json" + (f"; added it to {report}" if report else ""), markup=False, highlight=False)
    raise typer.Exit(exit_code(result))


def _add_bisect_to_run(out: Path) -> Path | None:
    """When --out is a run directory, re-render its report.html (and junit.xml) with the bisect."""
    import json

    summary_path = out / "summary.json"
    if not summary_path.is_file():
        return None
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        _check_summary(summary, summary_path)
    except Exception:  # not a run we can re-render: the bisect.json stands on its own
        return None
    from parity.report import html

    html.write(summary, out, out / "report.html")
    return out / "report.html"


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="A run directory written by parity run.")]) -> None:
    """Re-render report.html (and junit.xml) from a saved run."""
    from parity.errors import BadInput
    from parity.reanalysis import read_summary
    from parity.report import html, junit
    from parity.readback import FIX

    summary = read_summary(run_dir)
    try:
        junit.write(summary, run_dir / "junit.xml")
        html.write(summary, run_dir, run_dir / "report.html")
    except BadInput:
        raise
    except (OSError, MemoryError):
        raise
    except Exception as e:  # content the checks above let through but the renderer cannot use
        raise BadInput(f"'{run_dir}' holds data the report cannot use ({type(e).__name__}: "
                       f"{' '.join(str(e).split())[:120]}); {FIX}") from None
    console.print(f"wrote {run_dir}/report.html")


@app.command(name="compare")
def compare_cmd(
    runs: Annotated[list[Path], typer.Argument(help="RUN_DIR to re-analyse, or RUN_A RUN_B: two candidate runs against the same reference.")],
    recipe: Annotated[Optional[Path], typer.Option("--recipe", "-r", help="Recipe whose tolerances, gates and MOS gates to apply (its engine settings must match the run's).")] = None,
    set_: SetOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Where to write (default: <last RUN>/compare).")] = None,
) -> None:
    """Re-analyse a saved run without loading any model, or compare two runs made against the same reference."""
    from parity.errors import BadInput

    if len(runs) not in (1, 2):
        raise BadInput(f"parity compare takes one run directory (re-analyse it) or two (RUN_A RUN_B), got {len(runs)}")
    target = out or runs[-1] / "compare"
    if len(runs) == 1:
        from parity.reanalysis import reanalyse
        from parity.report.console import print_summary

        summary = reanalyse(runs[0], recipe, set_ or [], target)
        print_summary(summary, console, footer=[f"wrote {target}/summary.json, junit.xml, report.html"])
        raise typer.Exit(0 if summary.passed else 1)
    from parity.versus import compare_runs, print_changes, write_changes

    changes = compare_runs(runs[0], runs[1], recipe, set_ or [])
    print_changes(changes, console)
    write_changes(changes, target)
    console.print(f"wrote {target}/compare.json")
    raise typer.Exit(1 if changes.regressed else 0)


@app.command()
def merge(
    out: Annotated[Path, typer.Argument(help="Run directory to write the merged suite into (same rules as parity run --out).")],
    shard_dirs: Annotated[list[Path], typer.Argument(help="Run directories written by parity run --shard K/N (read only).")],
    force: Annotated[bool, typer.Option("--force", help="Overwrite an OUT that holds an earlier parity run or merge.")] = False,
    link: Annotated[bool, typer.Option("--link", help="Hard-link the shards' files into OUT instead of copying them (same file system; the files are then shared).")] = False,
) -> None:
    """Merge --shard K/N run directories into one run (summary.json, junit.xml, report.html); a missing shard's prompts are not_run."""
    from parity.merge import merge_shards
    from parity.report.console import print_summary

    command = "parity " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    summary = merge_shards(out, shard_dirs, force, command, link)
    print_summary(summary, console, footer=merge_lines(summary) + [f"wrote {out}/report.html, summary.json, junit.xml"])
    raise typer.Exit(0 if summary.passed else 1)


def merge_lines(summary) -> list[str]:
    """Console lines on how a run was assembled from shards or workers, and what is missing."""
    m = summary.merge
    if m is None:
        return []
    lines = []
    for part in m.parts:
        name = f"shard {part.index}/{m.count}" if m.kind == "shards" else f"worker {part.index} ({part.source})"
        if part.status == "missing":
            lines.append(f"{name}: missing; its prompts are not_run")
        elif part.status == "died":
            at = f" while running {', '.join(part.in_flight)} (marked failed)" if part.in_flight else ""
            lines.append(f"{name}: {part.failure}{at}; {len(part.prompts)} prompt(s) it finished are kept")
        else:
            where = f" from {part.source}" if m.kind == "shards" else ""
            stopped = " (stopped: the run was interrupted)" if part.status == "stopped" else ""
            lines.append(f"{name}: {len(part.prompts)} prompt(s){where}{stopped}" + (f"; {part.failure}" if part.failure else ""))
    c = summary.counts
    if c["not_run"]:
        failed = c.get("failed", 0)
        lines.append(f"{c['not_run']} of {c['prompts']} prompts have no verdict ({failed} failed, {c['not_run'] - failed} not run)")
    return lines


@app.command()
def engines() -> None:
    """List the engines a recipe can name: built-ins and those added through the 'parity.engines' entry points."""
    from rich.table import Table

    from parity.engines.registry import ENTRY_POINT_GROUP, entries

    table = Table(title=f"engines (add one with a '{ENTRY_POINT_GROUP}' entry point; see docs/engines.md)")
    for col in ("name", "class", "from"):
        table.add_column(col, overflow="fold")
    for e in entries():
        table.add_row(e.name, e.target, e.source + (" - shadowed by the built-in, not used" if e.shadowed else ""))
    console.print(table)


@app.command(name="traits")
def traits_cmd(
    recipe: Annotated[Optional[Path], typer.Argument(help="Recipe whose two sides to list traits for (default: the built-in smoke recipe).")] = None,
    set_: SetOpt = None,
) -> None:
    """List the engine traits of a recipe's two engines: what each computes differently from the reference, the
    directions it supports (reference + trait, candidate - trait) and whether parity bisect searches it."""
    from parity.traits import listing

    rec = _recipe(recipe, None, set_)
    rows = listing(rec.reference, rec.candidate)
    if not rows:
        engines = " nor the ".join(dict.fromkeys((rec.reference.engine, rec.candidate.engine)))
        console.print(f"no traits: the {engines} engine declares none")
        return
    console.print(f"engine traits: {rec.reference.label()} vs {rec.candidate.label()}", markup=False, highlight=False)
    for r in rows:
        state = "searched by parity bisect" if r["state"] == "active" else r["state"]
        needs = f"; needs {', '.join(r['requires'])}" if r["requires"] else ""
        console.print(f"{r['trait']} [{', '.join(r['directions'])}] {state}\n    {r['summary']}\n"
                      f"    realised by {r['realised_by']}{needs}", markup=False, highlight=False)


cache_app = typer.Typer(no_args_is_help=True, help="The reference-trace cache ($PARITY_CACHE/reference-traces).")
app.add_typer(cache_app, name="cache")


@cache_app.command("list")
def cache_list() -> None:
    """List cached reference traces, most recently used first."""
    from rich.table import Table

    from parity.refcache import cache_dir, entries

    rows = entries()
    table = Table(title=f"reference cache: {cache_dir()}")
    for col in ("key", "status", "prompt", "reference side", "frames", "size", "last used"):
        table.add_column(col, overflow="fold")
    for e in rows:
        table.add_row(e.key[:12], "ok" if e.ok else "corrupt", e.prompt, e.side, str(e.frames or "?"),
                      f"{e.bytes / 1024:.0f} KiB", time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used)))
    console.print(table)
    total = sum(e.bytes for e in rows)
    console.print(f"{len(rows)} entries, {total / 1024 / 1024:.1f} MiB", markup=False, highlight=False)


@cache_app.command("prune")
def cache_prune(
    older_than: Annotated[Optional[str], typer.Option("--older-than", help="Remove entries not used for this long: 30m, 12h, 7d, 2w.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Remove every entry.")] = False,
) -> None:
    """Remove cached reference traces (corrupt or partial ones always go)."""
    from parity.errors import BadInput
    from parity.refcache import cache_dir, parse_age, prune

    if older_than is None and not all_:
        raise BadInput("parity cache prune needs --older-than AGE (e.g. 7d) or --all")
    if older_than is not None and all_:
        raise BadInput("--older-than and --all exclude each other; pass one")
    result = prune(parse_age(older_than) if older_than else None, all_)
    console.print(f"removed {result['removed']} entries ({result['freed_bytes'] / 1024 / 1024:.1f} MiB), kept {result['kept']} "
                  f"in {cache_dir()}", markup=False, highlight=False)



def _check_summary(summary, path: Path) -> None:
    """A summary.json read back from disk (see parity.readback)."""
    from parity.readback import check_summary

    check_summary(summary, path)


@app.command()
def env(json_out: JsonOpt = False) -> None:
    """Print the install self-check and the environment fingerprint that reports carry."""
    from rich.table import Table

    from parity.stackcheck import check_stack

    problems = check_stack()
    if json_out:
        from dataclasses import asdict, is_dataclass

        data = {"stack_ok": not problems, "problems": [p.line() for p in problems], "version": _version()}
        if not problems:
            from parity.env import fingerprint

            data["fingerprint"] = fingerprint()
        _print_json({**data, "details": [asdict(p) for p in problems if is_dataclass(p)]})
        raise typer.Exit(2 if problems else 0)
    console.print(f"stack check: {'ok' if not problems else f'{len(problems)} problem(s)'}", markup=False, highlight=False)
    for problem in problems:
        console.print(f"  {problem.line()}", markup=False, highlight=False, soft_wrap=True)
    if not problems:  # importing torch from a broken stack may itself fail
        from parity.env import fingerprint

        table = Table(show_header=False)
        for k, v in fingerprint().items():
            table.add_row(k, str(v))
        console.print(table)
    if problems:
        from parity.errors import BadInput

        raise BadInput(problems[0].line())


def main() -> None:
    """Entry point: known errors become one line on stderr and their exit code."""
    _tolerant_streams()
    try:
        _main()
    except SystemExit:
        _flush_stdout()
        raise
    except OSError as e:  # a write to stdout failed inside a command (rich flushes as it prints)
        # Writes into files are mapped to their own errors earlier; a stream write has no filename.
        if e.filename is None and e.errno in (errno.ENOSPC, errno.EPIPE, errno.EIO, errno.EDQUOT, errno.EBADF):
            _stdout_broken(e)
        raise
    _flush_stdout()


def _tolerant_streams() -> None:
    """A terminal or pipe that cannot encode a character (PYTHONIOENCODING=ascii) gets a
    replacement character instead of a UnicodeEncodeError traceback."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="replace")
        except (AttributeError, ValueError, OSError):
            pass


def _flush_stdout() -> None:
    """Flush stdout now; if it cannot be written (``> /dev/full``, a closed pipe) say so in one line
    and exit 2 instead of Python's multi-line "Exception ignored" at shutdown."""
    try:
        sys.stdout.flush()
    except OSError as e:
        _stdout_broken(e)


def _stdout_broken(e: OSError) -> None:
    """One line on stderr and exit 2 for an unwritable stdout."""
    try:  # nothing more may go to the broken stream, not even at interpreter exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    err_console.print(f"parity: error: cannot write to standard output ({e.strerror or e}); "
                      "redirect it to a writable file", markup=False, highlight=False, soft_wrap=True)
    sys.exit(2)


def _main() -> None:
    from parity.errors import ParityError

    try:
        # Without standalone mode click returns (rather than raises) a command's typer.Exit code.
        code = _command()(standalone_mode=False, prog_name="parity")
        if code == 130:  # typer's answer to a KeyboardInterrupt outside a run
            _interrupted(KeyboardInterrupt())
        sys.exit(code if isinstance(code, int) else 0)
    except _Stopped as e:
        _interrupted(e.interrupt)
    except ParityError as e:
        message = " ".join(str(e).splitlines())  # the contract: one line on stderr
        err_console.print(f"parity: error: {message}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt as e:
        _interrupted(e)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:  # usage errors (typer vendors click: its classes, not click's) and the like
        usage_errors, aborts = _click_exception_types()
        if isinstance(e, usage_errors):  # one line, like every bad input
            ctx = getattr(e, "ctx", None)
            hint = f"; see parity {ctx.info_name if ctx.parent is not None else ''} --help".replace("  ", " ") if ctx else ""
            message = " ".join(e.format_message().split())
            err_console.print(f"parity: error: {message}{hint}", markup=False, highlight=False, soft_wrap=True)
            sys.exit(2)
        if isinstance(e, aborts):  # click turns KeyboardInterrupt into Abort
            cause = e.__cause__ or e.__context__
            _interrupted(cause if isinstance(cause, KeyboardInterrupt) else KeyboardInterrupt())
        raise


def _command():
    """The click command behind ``app``, with on/off flags shown without a ``<bool>`` metavar."""
    command = typer.main.get_command(app)

    def tidy(cmd) -> None:
        import typer._click as click

        ctx = click.Context(cmd, info_name="parity", help_option_names=["-h", "--help"])
        help_option = cmd.get_help_option(ctx)
        for param in [*cmd.params, *([help_option] if help_option is not None else [])]:
            if getattr(param, "is_flag", False) or getattr(param, "count", False):
                param.metavar = ""
        for sub in getattr(cmd, "commands", {}).values():
            tidy(sub)

    tidy(command)
    return command


def _click_exception_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(usage-error classes, abort classes) of typer's vendored click and of click itself."""
    usage: list[type] = []
    aborts: list[type] = [typer.Abort]
    try:
        from typer._click.exceptions import ClickException

        usage.append(ClickException)
    except ImportError:
        pass
    try:
        import click

        usage.append(click.exceptions.ClickException)
        aborts.append(click.exceptions.Abort)
    except ImportError:
        pass
    return tuple(usage), tuple(aborts)


class _Stopped(Exception):
    """A run stopped by Ctrl-C or SIGTERM (carried past typer, which turns KeyboardInterrupt into exit 130)."""

    def __init__(self, interrupt: KeyboardInterrupt):
        super().__init__(str(interrupt))
        self.interrupt = interrupt


def _interrupted(e: KeyboardInterrupt) -> None:
    """Ctrl-C (exit 130) or SIGTERM (143): one line; the run has already written its partial summary."""
    what = getattr(e, "signal_name", "SIGINT")
    err_console.print(f"parity: interrupted ({what}); finished prompts are kept, rerun with --resume to continue",
                      markup=False, highlight=False, soft_wrap=True)
    sys.exit(getattr(e, "exit_code", 130))


if __name__ == "__main__":
    main()
