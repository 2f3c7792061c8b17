"""The files a summary is rendered into: summary.json, junit.xml and report.html (the report
stage, shared by ``parity run``, ``parity compare`` and ``parity report``)."""

from __future__ import annotations

from pathlib import Path

from parity import strictjson
from parity.results import Summary


def write_json(path: Path, data) -> None:
    """Write strict JSON atomically: a killed process never leaves a half-written file behind, and
    no bare NaN/Infinity is ever written."""
    from parity.outdir import atomic_write_text

    atomic_write_text(path, strictjson.dumps(data, indent=1, ensure_ascii=False))


def write_outputs(summary: Summary, out: Path, run_dir: Path | None = None) -> None:
    """summary.json, junit.xml and report.html of ``summary`` into ``out`` (``run_dir``: where the
    run's traces, points and audio are, when that is not ``out``)."""
    from parity.report import html, junit

    write_json(out / "summary.json", summary.to_json())
    junit.write(summary, out / "junit.xml")
    html.write(summary, run_dir or out, out / "report.html")
