"""The files a summary is rendered into: summary.json, junit.xml and report.html (the report
stage, shared by ``parity run``, ``parity compare`` and ``parity report``)."""

from __future__ import annotations

import os
from pathlib import Path

from parity import strictjson
from parity.results import Summary


def write_json(path: Path, data) -> None:
    """Write JSON atomically: a killed process never leaves a half-written file behind."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(strictjson.dumps(data, indent=1, ensure_ascii=False))  # never a bare NaN/Infinity
    os.replace(tmp, path)


def write_outputs(summary: Summary, out: Path, run_dir: Path | None = None) -> None:
    """summary.json, junit.xml and report.html of ``summary`` into ``out`` (``run_dir``: where the
    run's traces, points and audio are, when that is not ``out``)."""
    from parity.report import html, junit

    write_json(out / "summary.json", summary.to_json())
    junit.write(summary, out / "junit.xml")
    html.write(summary, run_dir or out, out / "report.html")
