"""The files a summary is rendered into: summary.json, junit.xml and report.html (the report
stage, shared by ``parity run``, ``parity compare`` and ``parity report``)."""

from __future__ import annotations

from pathlib import Path

from parity.results import Summary


def write_json(path: Path, data) -> None:
    """Write strict JSON atomically (no half-written file, never a bare NaN/Infinity)."""
    from parity.outdir import atomic_write_json

    atomic_write_json(path, data)


def write_outputs(summary: Summary, out: Path, run_dir: Path | None = None) -> None:
    """summary.json, junit.xml and report.html of ``summary`` into ``out`` (``run_dir``: where the
    run's traces, points and audio are, when that is not ``out``)."""
    from parity.report import html, junit

    write_json(out / "summary.json", summary.to_json())
    junit.write(summary, out / "junit.xml")
    html.write(summary, run_dir or out, out / "report.html")
