"""What a run prints at its end, readable at 80 columns.

One table row per prompt with short stable labels (``talk s1 L0``, ``pred f0.s10 L1``) and
numbers, a hints line under each failing prompt, the run's where / why / does-it-matter lines
(the same as the report's first screen) and a closing line in pytest's style:
``2 passed, 1 failed in 24 s``.
"""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from parity.report.overview import LOW_AGREEMENT, hints_of, overview, short_where


def _num(v, spec: str = ".2g") -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return format(v, spec)


def side_label(side: dict | None) -> str:
    """'reference fp32/sdpa/dynamic' from a side's description."""
    s = side or {}
    dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(str(s.get("dtype")), s.get("dtype"))
    return f"{s.get('engine')} {dtype}/{s.get('attention')}/{s.get('cache')}"


def closing_line(summary: dict, seconds: float | None = None) -> tuple[str, str]:
    """('2 passed, 1 failed in 24 s', style) in pytest's manner."""
    counts = summary.get("counts") or {}
    prompts = summary.get("prompts") or []
    passed = sum(1 for p in prompts if p.get("status") == "ok" and p.get("passed"))
    failed = sum(1 for p in prompts if p.get("status") == "ok" and not p.get("passed"))
    not_run = counts.get("not_run", len(prompts) - passed - failed)
    parts = [f"{failed} failed"] if failed else []
    parts += [f"{passed} passed"] if passed or not prompts else []
    parts += [f"{not_run} not run"] if not_run else []
    text = ", ".join(parts) + (f" in {seconds:.0f} s" if seconds is not None else "")
    style = "green" if summary.get("passed") else ("red" if failed or summary.get("failure") else "yellow")
    return text, style


def print_summary(summary: dict, console: Console, seconds: float | None = None, bisect: dict | None = None,
                  verbose: bool = False) -> None:
    """The per-prompt table, hints of failing prompts (of every prompt, all of them, when
    ``verbose``), the run overview and the closing line."""
    sides = summary.get("sides") or {}
    ref, cand = sides.get("reference"), sides.get("candidate")
    console.print(f"reference  {side_label(ref)}", markup=False, highlight=False)
    console.print(f"candidate  {side_label(cand)}   model {summary.get('model') or '-'}", markup=False, highlight=False)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), show_edge=False, collapse_padding=True)
    for col, justify in (("prompt", "left"), ("diverges at", "left"), ("rel L2", "right"), ("first flip", "left"),
                         ("margin", "right"), ("agree", "right"), ("verdict", "left")):
        label = col in ("diverges at", "first flip")  # short labels: never broken across lines
        table.add_column(col, justify=justify, overflow="fold", no_wrap=label, min_width=14 if label else None)
    notes: list[tuple[str, str]] = []
    for p in summary.get("prompts") or []:
        if p.get("status") != "ok":
            table.add_row(p["id"], p.get("status", "-"), "", "", "", "", Text("not run", "yellow"))
            continue
        c = p.get("comparison") or {}
        first, flip = c.get("first_divergence"), c.get("first_flip")
        agreement = (c.get("free_run") or {}).get("agreement")
        if p.get("passed"):
            verdict = Text("pass", "green")
            if isinstance(agreement, (int, float)) and agreement < LOW_AGREEMENT:
                verdict.append(" !", "bold yellow")
        else:
            verdict = Text("FAIL ", "red").append(",".join(g["name"] for g in p.get("gates", []) if not g["passed"]))
        label = (flip or {}).get("label") or ("tie" if (flip or {}).get("near_tie") else "real")
        margin = "-" if not flip else f"{_num(flip.get('cand_margin'))} {label}"
        table.add_row(p["id"], short_where(first) if first else "none",
                      _num(first["rel_l2"] if first else c.get("max_rel_l2")), short_where(flip) if flip else "none",
                      margin, _num(agreement, ".1%"), verdict)
        if verbose:
            notes += [(p["id"], h["text"].removeprefix("hint: ") + (f" ({h['evidence']})" if h.get("evidence") else ""))
                      for h in hints_of(p)]
        elif not p.get("passed"):
            hints = hints_of(p)
            text = hints[0]["text"] if hints else "no hint matches the error's signature"
            notes.append((p["id"], text.removeprefix("hint: ")))
    console.print(table)
    console.print(f"tolerance rel L2 {_num(summary.get('tolerance'), 'g')} · talk s<step>, pred f<frame>.s<sub-step>, "
                  "L<layer> · flip: first teacher-forced token flip; margin: its logit margin, tie = within 3x the "
                  "logit noise · agree: free-running codes equal", style="dim", markup=False, highlight=False)
    for pid, text in notes:
        console.print(f"{pid}: hint: {text}", markup=False, highlight=False)
    o = overview(summary, bisect)
    if o.where:
        console.print("where: " + "; ".join(f"{n}/{o.ran} at {place}" for place, n in o.where_short[:3])
                      + (f"; {o.within}/{o.ran} within tolerance" if o.within else ""), markup=False, highlight=False)
    if o.why:
        console.print(f"why: {o.why.removeprefix('hint: ')}", markup=False, highlight=False)
    audio = [x for x in (o.mos_short, o.audible_short) if x]
    if audio:
        console.print("audio: " + "; ".join(audio), markup=False, highlight=False)
    for w in o.warnings_short:
        console.print(f"warning: {w}", style="yellow", markup=False, highlight=False)
    if o.low_agreement:
        console.print(f"! passes, but free-running codes agree on under {LOW_AGREEMENT:.0%} of frames: "
                      f"{', '.join(o.low_agreement)}", style="yellow", markup=False, highlight=False)
    if summary.get("failure"):
        console.print(f"run failed: {summary['failure']}", style="red", markup=False, highlight=False)
    text, style = closing_line(summary, seconds)
    console.rule(Text(text, style=f"bold {style}"), style=style)
