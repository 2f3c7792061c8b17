"""What a run prints at its end, readable at 80 columns.

One table row per prompt with short stable labels (``talk s1 L0``, ``pred f0.s10 L1``) and
numbers, a hints line under each failing prompt, the voice-clone and batch lines of the modes
that ran, the run's where / why / audio lines (the same as the report's first screen) and a
closing line in pytest's style: ``2 passed, 1 failed in 24 s``.
"""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from parity.report.overview import LOW_AGREEMENT, flip_label, hints_of, overview, short_where
from parity.results import Summary


def _num(v, spec: str = ".2g") -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return format(v, spec)


_fmt = _num


def side_label(side: dict | None) -> str:
    """'reference fp32/sdpa/dynamic' from a side's description."""
    s = side or {}
    dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(str(s.get("dtype")), s.get("dtype"))
    return f"{s.get('engine')} {dtype}/{s.get('attention')}/{s.get('cache')}"


def closing_line(summary: Summary, seconds: float | None = None) -> tuple[str, str]:
    """('2 passed, 1 failed in 24 s', style) in pytest's manner."""
    counts = summary.counts
    passed, not_run = counts["passed"], counts["not_run"]
    failed = counts["ran"] - passed
    parts = [f"{failed} failed"] if failed else []
    parts += [f"{passed} passed"] if passed or not summary.prompts else []
    parts += [f"{not_run} not run"] if not_run else []
    text = ", ".join(parts) + (f" in {seconds:.0f} s" if seconds is not None else "")
    style = "green" if summary.passed else ("red" if failed or summary.failure else "yellow")
    return text, style


def hint_lines(summary: Summary, verbose: bool = False) -> list[str]:
    """'id: hint: ...' under the table: the first hint of each failing prompt (or a line saying
    none matched); with ``verbose`` every hint of every prompt."""
    lines = []
    for p in summary.prompts:
        if not p.ran or p.comparison is None:
            continue
        hints = hints_of(p)
        if verbose:
            lines += [f"{p.id}: hint: {h['text']}" for h in hints]
        elif not p.passed:
            more = f" (+{len(hints) - 1} more in report.html)" if len(hints) > 1 else ""
            text = hints[0]["text"] if hints else "no hint matches the error's signature"
            lines.append(f"{p.id}: hint: {text}{more}")
    return lines


PASS_TIMES = ("reference_s", "forced_s", "free_s", "second_arrangement_s", "replay_s")  # engine passes, per prompt
AUDIO_TIMES = ("reference_audio_s", "candidate_audio_s")  # the engines' codecs decoding codes to audio


def _setup_parts(parts) -> str:
    """' (preflight 1.2, scorers 0.8)': the setup stages of 0.1 s or more, largest first."""
    if not isinstance(parts, dict):
        return ""
    big = sorted(((float(v), str(k)) for k, v in parts.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0.1), reverse=True)
    shown = ", ".join(f"{name.removesuffix('_s').replace('_', ' ')} {v:.1f}" for v, name in big[:4])
    return f" ({shown})" if shown else ""


def time_line(summary: Summary) -> str | None:
    """Where the run's time went, from ``tool_time`` and the prompts' timings: 'time: 2.0 s
    before the run, setup 5.0 s, both sides 7.0 s (engines 5.9 s: loads 1.0, passes 4.6, audio
    decoding 0.3), 0.5 s waiting for the last results'. None for a run that did not record it."""
    tool = summary.extra.get("tool_time")
    if not isinstance(tool, dict) or not isinstance(tool.get("sides_s"), (int, float)):
        return None
    timings = [p.timing for p in summary.prompts if isinstance(p.timing, dict)]
    # A reference from the cache took no engine time in this run.
    passes = sum(float(t[k]) for t in timings for k in PASS_TIMES
                 if isinstance(t.get(k), (int, float)) and not (k == "reference_s" and t.get("reference_cached")))
    audio = sum(float(t[k]) for t in timings for k in AUDIO_TIMES if isinstance(t.get(k), (int, float)))
    # --devices: each worker loads its own engines and they run side by side, so the engines' time
    # is a sum over workers and can exceed the span of both sides.
    workers = summary.extra.get("engine_load_s_per_worker")
    per_load = list(workers.values()) if isinstance(workers, dict) else [summary.extra.get("engine_load_s")]
    loads = sum(float(v) for d in per_load if isinstance(d, dict) for v in d.values() if isinstance(v, (int, float)))
    n = len(workers) if isinstance(workers, dict) else 0
    summed = f", summed over {n} worker{'s' if n > 1 else ''}" if n else ""
    sec = {k: float(v) for k, v in tool.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    head = f"{sec['process_age_s']:.1f} s before the run, " if "process_age_s" in sec else ""
    return (f"time: {head}setup {sec.get('setup_s', 0.0):.1f} s{_setup_parts(tool.get('setup_parts'))}, both sides {sec['sides_s']:.1f} s (engines "
            f"{loads + passes + audio:.1f} s{summed}: loads {loads:.1f}, passes {passes:.1f}, audio decoding {audio:.1f}), "
            f"{sec.get('drain_s', 0.0):.1f} s waiting for the last results")


def print_summary(summary: Summary, console: Console, seconds: float | None = None, bisect: dict | None = None,
                  verbose: bool = False, footer: list[str] | tuple[str, ...] = ()) -> None:
    """The per-prompt table, hints of failing prompts (of every prompt, all of them, when
    ``verbose``), the modes' lines, the run overview, the ``footer`` lines and the closing line."""
    sides = summary.sides or {}
    model = summary.extra.get("model") or summary.recipe.get("model") or "-"
    console.print(f"reference  {side_label(sides.get('reference'))}", markup=False, highlight=False)
    console.print(f"candidate  {side_label(sides.get('candidate'))}   model {model}", markup=False, highlight=False)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), show_edge=False, collapse_padding=True)
    for col, justify in (("prompt", "left"), ("diverges at", "left"), ("rel L2", "right"), ("first flip", "left"),
                         ("margin", "right"), ("agree", "right"), ("verdict", "left")):
        label = col in ("diverges at", "first flip", "margin")  # short labels: never broken across lines
        table.add_column(col, justify=justify, overflow="fold", no_wrap=label)
    for p in summary.prompts:
        if not p.ran or p.comparison is None:
            reason = p.extra.get("reason")
            table.add_row(p.id, p.status + (f": {reason}" if reason else ""), "", "", "", "",
                          Text("failed", "red") if p.status == "failed" else Text("not run", "yellow"))
            continue
        c = p.comparison
        first, flip = c.first_divergence, c.first_flip
        agreement = c.free_run.agreement if c.free_run else None
        if p.passed:
            verdict = Text("pass", "green")
            if agreement is not None and agreement < LOW_AGREEMENT:
                verdict.append(" !", "bold yellow")
        else:
            # Gate names as words ("hidden within tolerance"): a narrow column wraps between them, never mid-word.
            verdict = Text("FAIL ", "red").append(", ".join(g.name.replace("_", " ") for g in p.failed_gates()))
        rel = ("inf" if first.nonfinite else first.rel_l2) if first else c.max_rel_l2
        margin = "-" if flip is None else f"{_num(flip.cand_margin)} {flip_label(flip)}"
        table.add_row(p.id, short_where(first) if first else "none", _num(rel),
                      short_where(flip) if flip else "none", margin, _num(agreement, ".1%"), verdict)
    console.print(table)
    console.print(f"tolerance rel L2 {_num(summary.tolerance, 'g')} · talk s<step>, pred f<frame>.s<sub-step>, "
                  "L<layer> · flip: first teacher-forced token flip; margin: its logit margin, tie = within 3x the "
                  "noise floor, sampler = not what the reference's sampler picks · agree: free-running codes equal",
                  style="dim", markup=False, highlight=False)
    for line in hint_lines(summary, verbose):
        console.print(line, markup=False, highlight=False)
    for line in sublayer_lines(summary):
        console.print(line, markup=False, highlight=False)
    print_modes(summary, console)
    o = overview(summary, bisect)
    if o.where:
        console.print("where: " + "; ".join(f"{n}/{o.ran} at {place}" for place, n in o.where_short[:3])
                      + (f"; {o.within}/{o.ran} within tolerance" if o.within else ""), markup=False, highlight=False)
    if o.why:
        console.print(f"why: {o.why}", markup=False, highlight=False)
    audio = [x for x in (o.mos_short, o.audible_short) if x]
    if audio:
        console.print("audio: " + "; ".join(audio), markup=False, highlight=False)
    for w in o.warnings_short:
        console.print(f"warning: {w}", style="yellow", markup=False, highlight=False)
    if o.low_agreement:
        console.print(f"! passes, but free-running codes agree on under {LOW_AGREEMENT:.0%} of frames: "
                      f"{', '.join(o.low_agreement)}", style="yellow", markup=False, highlight=False)
    if summary.failure:
        console.print(f"run failed: {summary.failure}", style="red", markup=False, highlight=False)
    for line in footer:  # paths: left whole for copying
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    text, style = closing_line(summary, seconds)
    console.rule(Text(text, style=f"bold {style}"), style=style)


def sublayer_lines(summary) -> list[str]:
    """probes = "sublayers": per prompt, the op that adds the error in the first diverging layer
    and that layer's replay verdict."""
    lines = []
    for p in summary.prompts:
        c = p.comparison if p.ran else None
        if c is not None and c.sublayer is not None:
            lines.append(f"{p.id}: sub-layer: {c.sublayer.text}")
        if c is not None and c.replay is not None:
            lines.append(f"{p.id}: replay: {c.replay.text}")
    return lines


def print_modes(summary: Summary, console: Console) -> None:
    """Voice cloning: how each side encoded the reference clip; batching: the per-row answer."""
    for p in summary.prompts:
        clip = p.extra.get("reference_clip") or (p.comparison.extra.get("reference_clip") if p.comparison else None)
        if not clip:
            continue
        text = f"{p.id}: reference clip ({clip['mode']})"
        if clip["mode"] == "icl":
            text += " codes " + ("identical" if clip.get("codes_equal") else f"differ from frame {clip['first_code_diff']['frame']} "
                                 f"(agreement {_fmt(clip.get('code_agreement'), '.1%')})")
        text += f", speaker embedding rel L2 {_fmt(clip.get('speaker_rel_l2'))}"
        console.print(text, markup=False, highlight=False)
    batch = summary.extra.get("batch")
    if not batch:
        return
    table = Table(title=f"batch of {batch['size']}: each row vs the batch-1 reference", box=box.SIMPLE_HEAD,
                  pad_edge=False, show_edge=False, collapse_padding=True)
    for col in ("prompt", "row", "pad", "max", "prefill", "1st div", "at prefill", "other", "vs other", "dep"):
        table.add_column(col, overflow="fold")
    yes_no = {True: "yes", False: "no", None: "-"}
    for r in batch["rows"]:
        table.add_row(r["prompt"], str(r["row"]), str(r["pad"]), _fmt(r.get("max_rel_l2"), ".2g"), _fmt(r["prefill_rel_l2"], ".2g"),
                      _fmt(r["first_divergence_step"], "d"), yes_no[r["enters_at_prefill"]],
                      f"{_fmt(r['other_row'], 'd')}/{_fmt(r['other_pad'], 'd')}", _fmt(r["vs_other_rel_l2"], ".2g"),
                      yes_no[r["depends_on_mates"]])
    console.print(table)
    console.print("max / prefill: largest rel L2 vs batch 1 (all points / the prefill); 1st div: first divergent step; "
                  "other: row/pad in a second arrangement (another position, other batch-mates where the file allows); "
                  "dep: the row changed between the two", style="dim", markup=False, highlight=False)
    console.print(f"batch: {batch['verdict']}", markup=False, highlight=False)
