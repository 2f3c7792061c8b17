"""The GitHub Actions job summary: a short Markdown verdict appended to ``$GITHUB_STEP_SUMMARY``.

Written whenever report.html is (``html.write`` calls :func:`write_step_summary`), so both
``parity run`` and ``parity report DIR`` add it. Outside GitHub Actions the variable is unset and
nothing is written. User text (prompt ids, the command, details) is escaped so that it can
neither break the table nor inject HTML into the summary page.
"""

from __future__ import annotations

import os
from pathlib import Path

from parity.gates import where

ENV = "GITHUB_STEP_SUMMARY"
MAX_ROWS = 50  # a job summary is capped at 1 MiB; the full table lives in report.html


def _md(text: object) -> str:
    """Text made safe for a Markdown table cell (no HTML, no cell breaks, no line breaks, no
    emphasis or links; underscores stay, GitHub does not emphasise inside words)."""
    s = str(text)
    for a, b in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ("|", "&#124;"), ("`", "&#96;"),
                 ("*", "\\*"), ("[", "\\["), ("]", "\\]")):
        s = s.replace(a, b)
    return " ".join(s.split())


def _num(v, spec: str = ".3g") -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return _md(v)
    return format(v, spec)


def gate_table(summary: dict) -> list[dict]:
    """Per gate: how many prompts it was checked on, how many passed, and the failing ids."""
    gates: dict[str, dict] = {}
    for p in summary.get("prompts", []):
        for g in p.get("gates", []):
            row = gates.setdefault(g["name"], {"name": g["name"], "checked": 0, "passed": 0, "failed": []})
            row["checked"] += 1
            row["passed"] += bool(g["passed"])
            if not g["passed"]:
                row["failed"].append(p["id"])
    return list(gates.values())


def markdown(summary: dict) -> str:
    """The Markdown block for one run."""
    counts = summary.get("counts", {})
    ok = summary.get("passed")
    name = (summary.get("recipe") or {}).get("name", "run")
    lines = [f"### parity ({_md(name)}): {'✅ PASS' if ok else '❌ FAIL'}", ""]
    lines.append(f"{counts.get('passed', 0)}/{counts.get('prompts', 0)} prompts pass, "
                 f"{counts.get('ran', 0)} ran; tolerance rel L2 {_num(summary.get('tolerance'), 'g')}.")
    if summary.get("failure"):
        lines.append(f"\n**Run failed:** {_md(summary['failure'])}")
    gates = gate_table(summary)
    if gates:
        lines += ["", "| gate | passed | failing prompts |", "|---|---|---|"]
        for g in gates:
            failing = ", ".join(_md(i) for i in g["failed"][:10]) + (" ..." if len(g["failed"]) > 10 else "")
            lines.append(f"| {_md(g['name'])} | {g['passed']}/{g['checked']} | {failing or '-'} |")
    prompts = summary.get("prompts", [])
    lines += ["", "| prompt | first divergence | max rel L2 | first flip | cb agreement | verdict |",
              "|---|---|---|---|---|---|"]
    for p in prompts[:MAX_ROWS]:
        if p.get("status") != "ok":
            lines.append(f"| {_md(p['id'])} | {_md(p.get('status'))} | | | | not run |")
            continue
        c = p.get("comparison", {})
        first = c.get("first_divergence")
        flip = c.get("first_flip")
        flip_s = "-" if not flip else (
            f"{flip['component']} {flip['step']}" + (f".{flip['substep']}" if flip.get("substep", -1) >= 0 else "")
            + (" (tie)" if flip.get("near_tie") else ""))
        verdict = "pass" if p.get("passed") else "**FAIL** " + ", ".join(
            _md(g["name"]) for g in p.get("gates", []) if not g["passed"])
        lines.append(f"| {_md(p['id'])} | {_md(where(first)) if first else 'none'} | {_num(c.get('max_rel_l2'))} | "
                     f"{_md(flip_s)} | {_num((c.get('free_run') or {}).get('agreement'), '.1%')} | {verdict} |")
    if len(prompts) > MAX_ROWS:
        lines.append(f"\n{len(prompts) - MAX_ROWS} more prompts in report.html.")
    if summary.get("command"):
        lines += ["", "Re-run:", "", "```", str(summary["command"]).replace("```", "'''"), "```"]
    return "\n".join(lines) + "\n\n"


def write_step_summary(summary: dict) -> Path | None:
    """Append the Markdown summary to ``$GITHUB_STEP_SUMMARY`` when set; return the path written."""
    target = os.environ.get(ENV)
    if not target:
        return None
    path = Path(target)
    try:
        with path.open("a", encoding="utf-8") as f:
            f.write(markdown(summary))
    except OSError:  # a summary is a courtesy: never fail the run over it
        return None
    return path
