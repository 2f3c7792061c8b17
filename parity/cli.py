"""The ``parity`` command line: thin wiring, each command calls one library function."""

from __future__ import annotations

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

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Numerical-parity diagnostics for fast TTS engines.")
console = Console(stderr=False)
err_console = Console(stderr=True)

PromptsArg = Annotated[Path, typer.Argument(help="Prompt file: one prompt per line, or JSONL with 'text'.")]
RecipeOpt = Annotated[Optional[Path], typer.Option("--recipe", "-r", help="Recipe TOML (default: the built-in smoke settings).")]
ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="Hub id, checkpoint directory, random:tiny or random:0.6b.")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="Run directory (default: runs/<recipe>-<time>).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe field: section.key=value (repeatable).")]


def _recipe(recipe_path, model, sets, max_frames=None, device=None):
    from parity.recipe import apply_overrides, load_recipe, parse_override

    recipe = load_recipe(recipe_path)
    overrides = [parse_override(s) for s in sets or []]
    if model:
        overrides.append(("model", model))
    if max_frames is not None:
        overrides.append(("decoding.max_frames", max_frames))
    if device:
        overrides += [("reference.device", device), ("candidate.device", device)]
    return apply_overrides(recipe, overrides) if overrides else recipe


def _progress_bar():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    # No auto-refresh thread: on a 2-core machine it starves torch's OpenMP workers (measured 4x slower).
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err_console, transient=True, auto_refresh=False,
    )


@app.command()
def run(
    prompts: PromptsArg,
    recipe: RecipeOpt = None,
    model: ModelOpt = None,
    out: OutOpt = None,
    set_: SetOpt = None,
    max_frames: Annotated[Optional[int], typer.Option("--max-frames", help="Frames to decode at most.")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="auto, cpu or cuda for both sides.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite a non-empty --out.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run in --out.")] = False,
) -> None:
    """Run reference and candidate on every prompt and report where they first diverge."""
    from parity.report.console import print_summary
    from parity.run import Run

    rec = _recipe(recipe, model, set_, max_frames, device)
    out = out or Path("runs") / f"{rec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    command = "parity " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    with _progress_bar() as bar:
        tasks: dict[str, int] = {}

        def progress(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(f"{phase} side", total=total)
            bar.update(tasks[phase], completed=done)
            bar.refresh()

        summary = Run(prompts, rec, out, command, progress).execute(force=force, resume=resume)
    print_summary(summary, console)
    console.print(f"wrote {out}/summary.json, junit.xml, report.html")
    raise typer.Exit(0 if summary["passed"] else 1)


@app.command()
def bisect(
    prompts: PromptsArg,
    recipe: RecipeOpt = None,
    factors: Annotated[Optional[str], typer.Option("--factors", help="Comma-separated settings to bisect over: side fields (dtype, attention, cache, tf32, ...) or variant specs (rmsnorm_lowp@talker). Default: every setting that differs.")] = None,
    steps: Annotated[int, typer.Option("--steps", help="Teacher-forced frames per probe run.")] = 8,
    out: OutOpt = None,
    model: ModelOpt = None,
    set_: SetOpt = None,
    device: Annotated[Optional[str], typer.Option("--device", help="auto, cpu or cuda for both sides.")] = None,
) -> None:
    """Find the minimal set of settings (and the first layer) that makes the candidate diverge, and prove it."""
    from parity.bisect import bisect as run_bisect
    from parity.bisect import exit_code, render

    rec = _recipe(recipe, model, set_, None, device)
    names = [f.strip() for f in factors.split(",") if f.strip()] if factors is not None else None
    out = out or Path("runs") / f"bisect-{time.strftime('%Y%m%d-%H%M%S')}"

    def progress(text: str) -> None:
        if err_console.is_terminal:
            err_console.print(text, markup=False, highlight=False)

    result = run_bisect(prompts, rec, names, steps, out, progress)
    render(result, console)
    console.print(f"wrote {out}/bisect.json")
    raise typer.Exit(exit_code(result))


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="A run directory written by parity run.")]) -> None:
    """Re-render report.html (and junit.xml) from a saved run."""
    import json

    from parity.errors import BadInput
    from parity.report import html, junit

    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise BadInput(f"'{run_dir}' has no summary.json; pass a directory written by parity run")
    try:
        summary = json.loads(summary_path.read_text())
    except json.JSONDecodeError as e:
        raise BadInput(f"'{summary_path}' is not valid JSON (line {e.lineno}); re-run parity run") from None
    junit.write(summary, run_dir / "junit.xml")
    html.write(summary, run_dir, run_dir / "report.html")
    console.print(f"wrote {run_dir}/report.html")


@app.command()
def env() -> None:
    """Print the environment fingerprint that reports carry."""
    from rich.table import Table

    from parity.env import fingerprint

    table = Table(show_header=False)
    for k, v in fingerprint().items():
        table.add_row(k, str(v))
    console.print(table)


def main() -> None:
    """Entry point: known errors become one line on stderr and their exit code."""
    from parity.errors import ParityError

    try:
        # Without standalone mode click returns (rather than raises) a command's typer.Exit code.
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except ParityError as e:
        err_console.print(f"parity: error: {e}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err_console.print("parity: interrupted; finished prompts are saved, rerun with --resume", markup=False)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:  # click usage errors and the like
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(2)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(130)
        raise


if __name__ == "__main__":
    main()
