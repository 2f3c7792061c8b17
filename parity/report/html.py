"""report.html: one self-contained file rendered from a Jinja2 template (autoescaped)."""

from __future__ import annotations

import os
from pathlib import Path

from jinja2 import Environment, PackageLoader, select_autoescape


def _env() -> Environment:
    return Environment(loader=PackageLoader("parity", "report/templates"), autoescape=select_autoescape(["html"]))


def render(summary: dict, run_dir: Path) -> str:
    """Render the report for a run directory's summary."""
    return _env().get_template("report.html.j2").render(s=summary)


def write(summary: dict, run_dir: Path, path: Path) -> None:
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    tmp.write_text(render(summary, Path(run_dir)), encoding="utf-8")
    os.replace(tmp, path)
