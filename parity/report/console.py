"""The rich console table printed at the end of a run."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from parity.results import Summary


def _fmt(v, spec=".3g") -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return format(v, spec)


def print_summary(summary: Summary, console: Console) -> None:
    """Per prompt: where the candidate first diverges, the first flip, agreement, verdict."""
    title = " vs ".join(f"{role}: {s.get('engine')} {s.get('dtype')}/{s.get('attention')}/{s.get('cache')}"
                        for role, s in summary.sides.items())
    table = Table(
        title=f"parity: {title}",
        caption=f"tolerance rel L2 {summary.tolerance:g}; first flip: teacher-forced step[.sub-step], "
        "logit margin Δ, 'tie' = the reference's own margin is within 3x the noise floor (tolerance x logit RMS), "
        "'sampler' = not what the reference's sampler picks from the same logits",
    )
    for col in ("prompt", "first divergence", "rel L2", "first flip", "agree", "frames", "verdict"):
        table.add_column(col, overflow="fold")
    for p in summary.prompts:
        if not p.ran or p.comparison is None:
            reason = p.extra.get("reason")
            table.add_row(p.id, p.status + (f": {reason}" if reason else ""), "", "", "", "",
                          "[red]failed[/]" if p.status == "failed" else "[yellow]not run[/]")
            continue
        c = p.comparison
        first, flip = c.first_divergence, c.first_flip
        flip_text = "-" if flip is None else (
            f"{flip.component} {flip.step}" + (f".{flip.substep}" if flip.substep >= 0 else "")
            + f" Δ{_fmt(flip.cand_margin, '.2g')} " + (flip.label or ("tie" if flip.near_tie else "real"))
        )
        rel = ("inf" if first.nonfinite else first.rel_l2) if first else c.max_rel_l2
        verdict = "[green]pass[/]" if p.passed else "[red]FAIL[/] " + ", ".join(g.name for g in p.failed_gates())
        table.add_row(
            p.id, "-" if first is None else first.where(), _fmt(rel), flip_text,
            _fmt(c.free_run.agreement if c.free_run else None, ".1%"),
            f"{c.ref_frames}/{c.ref_frames + (c.length_diff or 0)}", verdict,
        )
    console.print(table)
    for line in hint_lines(summary):
        console.print(line, highlight=False, markup=False)
    print_modes(summary, console)


def print_modes(summary, console: Console) -> None:
    """Voice cloning: how each side encoded the reference clip; batching: the per-row answer."""
    summary = summary.to_json() if hasattr(summary, "to_json") else summary
    for p in summary.get("prompts", []):
        clip = p.get("reference_clip") or (p.get("comparison") or {}).get("reference_clip")
        if not clip:
            continue
        text = f"{p['id']}: reference clip ({clip['mode']})"
        if clip["mode"] == "icl":
            text += " codes " + ("identical" if clip.get("codes_equal") else f"differ from frame {clip['first_code_diff']['frame']} "
                                 f"(agreement {_fmt(clip.get('code_agreement'), '.1%')})")
        text += f", speaker embedding rel L2 {_fmt(clip.get('speaker_rel_l2'))}"
        console.print(text, markup=False, highlight=False)
    batch = summary.get("batch")
    if not batch:
        return
    table = Table(title=f"batch of {batch['size']}: each row vs the batch-1 reference",
                  caption="max / prefill: largest rel L2 vs batch 1 (all points / the prefill); 1st div: first "
                          "divergent step; other: row/pad in a second arrangement (another position, other "
                          "batch-mates where the file allows); dep: the row changed between the two")
    for col in ("prompt", "row", "pad", "max", "prefill", "1st div", "at prefill", "other", "vs other", "dep"):
        table.add_column(col, overflow="fold")
    yes_no = {True: "yes", False: "no", None: "-"}
    for r in batch["rows"]:
        table.add_row(r["prompt"], str(r["row"]), str(r["pad"]), _fmt(r.get("max_rel_l2"), ".2g"), _fmt(r["prefill_rel_l2"], ".2g"),
                      _fmt(r["first_divergence_step"], "d"), yes_no[r["enters_at_prefill"]],
                      f"{_fmt(r['other_row'], 'd')}/{_fmt(r['other_pad'], 'd')}", _fmt(r["vs_other_rel_l2"], ".2g"),
                      yes_no[r["depends_on_mates"]])
    console.print(table)
    console.print(f"batch: {batch['verdict']}", markup=False, highlight=False)


def hint_lines(summary) -> list[str]:
    """One line per failing prompt: its first hint (and how many more there are)."""
    lines = []
    for p in summary.prompts:
        if not p.ran or p.passed or p.comparison is None:
            continue
        hints = p.comparison.hints or []
        if hints:
            more = f" (+{len(hints) - 1} more in report.html)" if len(hints) > 1 else ""
            text = hints[0]["text"] if isinstance(hints[0], dict) else str(hints[0])
            lines.append(f"{p.id}: hint: {text}{more}")
    return lines
