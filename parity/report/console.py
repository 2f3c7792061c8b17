"""The rich console table printed at the end of a run."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from parity.gates import where


def _fmt(v, spec=".3g") -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return format(v, spec)


def print_summary(summary: dict, console: Console) -> None:
    """Per prompt: where the candidate first diverges, the first flip, agreement, verdict."""
    sides = summary.get("sides", {})
    title = " vs ".join(f"{role}: {s.get('engine')} {s.get('dtype')}/{s.get('attention')}/{s.get('cache')}" for role, s in sides.items())
    table = Table(
        title=f"parity: {title}",
        caption=f"tolerance rel L2 {summary['tolerance']:g}; first flip: teacher-forced step[.sub-step], "
        "logit margin Δ, 'tie' = the reference's own margin is within 3x the noise floor (tolerance x logit RMS), "
        "'sampler' = not what the reference's sampler picks from the same logits",
    )
    for col in ("prompt", "first divergence", "rel L2", "first flip", "agree", "frames", "verdict"):
        table.add_column(col, overflow="fold")
    for p in summary["prompts"]:
        if p["status"] != "ok":
            table.add_row(p["id"], p["status"], "", "", "", "", "[yellow]not run[/]")
            continue
        c = p["comparison"]
        first = c["first_divergence"]
        flip = c["first_flip"]
        flip_text = "-" if flip is None else (
            f"{flip['component']} {flip['step']}" + (f".{flip['substep']}" if flip["substep"] >= 0 else "")
            + f" Δ{_fmt(flip['cand_margin'], '.2g')} " + (flip.get("label") or ("tie" if flip["near_tie"] else "real"))
        )
        free = c.get("free_run", {})
        verdict = "[green]pass[/]" if p["passed"] else "[red]FAIL[/] " + ", ".join(g["name"] for g in p["gates"] if not g["passed"])
        table.add_row(
            p["id"], "-" if first is None else where(first), _fmt(first["rel_l2"] if first else c["max_rel_l2"]),
            flip_text, _fmt(free.get("agreement"), ".1%"),
            f"{c['ref_frames']}/{c['ref_frames'] + c.get('length_diff', 0)}", verdict,
        )
    console.print(table)
    for line in hint_lines(summary):
        console.print(line, highlight=False, markup=False)


def hint_lines(summary: dict) -> list[str]:
    """One line per failing prompt: its first hint (and how many more there are)."""
    lines = []
    for p in summary["prompts"]:
        if p.get("status") != "ok" or p.get("passed"):
            continue
        hints = (p.get("comparison") or {}).get("hints") or []
        if hints:
            more = f" (+{len(hints) - 1} more in report.html)" if len(hints) > 1 else ""
            lines.append(f"{p['id']}: hint: {hints[0]['text']}{more}")
    return lines
