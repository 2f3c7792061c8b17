"""report.html: one self-contained file rendered from a Jinja2 template (autoescaped).

``render`` reads summary.json's content plus, from the run directory, the compared points
(heatmaps, added error), the traces' chosen tokens (token timeline) and the WAVs (A/B players).
Everything is inline: CSS, SVG charts with PNG heatmaps as data URIs, a few lines of optional
JavaScript, and the audio while it fits the size budget (see ``parity.report.audio``). The
report stays under ``SIZE_LIMIT`` bytes: heatmaps are binned more coarsely if needed, then audio
that does not fit is linked by relative path instead of embedded.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from jinja2 import Environment, PackageLoader

from parity.audio_align import CODEC_FRAME_RATE
from parity.gates import where
from parity.report import audio, plots, rundata
from parity.report.console import time_line
from parity.report.overview import bisect_why, mos_scorer, overview, short_where
from parity.results import BisectOutcome, Summary
from parity.report.step_summary import gate_table, write_step_summary

SIZE_LIMIT = 2_000_000  # bytes of report.html (<= 2 MB at 18 prompts x 32 frames with all audio; 18 x 500 stays within it too)
_MARGIN = 64_000  # slack for the markup around embedded audio


@functools.lru_cache(maxsize=1)
def _env() -> Environment:
    """One Jinja environment per process: a report renders twice (sizing, then final) and the
    template compiles once."""
    env = Environment(loader=PackageLoader("parity", "report/templates"), autoescape=True,
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = _num
    env.filters["show"] = show
    env.filters["pct"] = lambda v: "-" if v is None else f"{v:.1%}"
    return env


GLOSSARY = {  # settings and fingerprint keys that need a word of explanation
    "taps": "the fast engine records each layer's output inside its CUDA graphs (hooks installed before capture)",
    "cuda_graphs": "the fast engine replays captured CUDA graphs instead of launching each kernel",
    "cache": "KV cache: dynamic (grows per token, like generate) or static:N (preallocated N positions, padded with a mask)",
    "variants": "divergence sources applied to this side (see the README's Variants section)",
    "tf32": "TensorFloat-32 matmuls on NVIDIA GPUs (10-bit mantissa in fp32 matmuls)",
}


def _num(v, spec: str = ".3g") -> str:
    """A number for a table cell: '-' for missing, strings ('inf') kept."""
    if v is None:
        return "-"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    return format(v, spec)


def show(v) -> str:
    """A setting or fingerprint value as text, the same before and after a JSON round trip."""
    if isinstance(v, (list, tuple)):
        return ", ".join(show(x) for x in v) if v else "-"
    if isinstance(v, dict):
        return json.dumps(v, default=str, ensure_ascii=False, sort_keys=True)
    return "-" if v is None else str(v)


def _seconds(frame) -> float | None:
    return None if frame is None else float(frame) / CODEC_FRAME_RATE


def _score(side) -> float | None:
    """One number for a side's MOS entry: its OVRL (DNSMOS) or MOS/UTMOS, else the first number."""
    if isinstance(side, (int, float)) and not isinstance(side, bool):
        return float(side)
    if isinstance(side, dict):
        for key in ("ovrl", "mos", "utmos", "score"):
            if isinstance(side.get(key), (int, float)):
                return float(side[key])
        for v in side.values():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return float(v)
    return None


def mos_cells(mos: dict | None) -> dict | None:
    """MOS of both sides and their delta (candidate - reference) for the table."""
    if not isinstance(mos, dict):
        return None
    ref, cand = _score(mos.get("reference")), _score(mos.get("candidate"))
    delta = _score(mos.get("delta"))
    if delta is None and ref is not None and cand is not None:
        delta = cand - ref
    return {"reference": ref, "candidate": cand, "delta": delta}


def flip_text(flip: dict | None, short: bool = False) -> str:
    """The first teacher-forced flip: 'predictor frame 3 sub-step 6: 112→40, margin 0.02 (ref rank 1)',
    or in short 'predictor frame 3 sub-step 6 · 112→40 · Δ0.02', or 'none'."""
    if not flip:
        return "none"
    place = where({**flip, "point": ""}).strip()
    tokens = f"{flip.get('ref_token')}→{flip.get('cand_token')}"
    if short:
        return f"{place} · {tokens} · Δ{_num(flip.get('cand_margin'), '.2g')}"
    text = f"{place}: {tokens}, margin {_num(flip.get('cand_margin'))}"
    if flip.get("ref_rank_in_cand") is not None:
        text += f" (ref rank {flip['ref_rank_in_cand']})"
    return text


def tables(obj) -> list[dict]:
    """A JSON-ish value (a bisect result, whatever its exact shape) as simple tables:
    a list of records is one table; a dict gives a key/value table plus one table per list of
    records inside it."""
    def cell(v) -> str:
        if isinstance(v, float):
            return _num(v, ".4g")
        if isinstance(v, (dict, list)):
            return json.dumps(v, default=str, ensure_ascii=False)
        return "-" if v is None else str(v)

    def records(title: str, rows: list) -> dict:
        cols: list[str] = []
        for r in rows:
            cols += [k for k in r if k not in cols]
        return {"title": title, "columns": cols, "rows": [[cell(r.get(c)) for c in cols] for r in rows]}

    if isinstance(obj, list) and obj and all(isinstance(r, dict) for r in obj):
        return [records("", obj)]
    if isinstance(obj, dict):
        out = []
        scalars = {k: v for k, v in obj.items() if not (isinstance(v, list) and v and all(isinstance(r, dict) for r in v))}
        if scalars:
            out.append({"title": "", "columns": ["", ""], "rows": [[str(k), cell(v)] for k, v in scalars.items()]})
        out += [records(str(k), v) for k, v in obj.items() if k not in scalars]
        return out
    if obj is None:
        return []
    return [{"title": "", "columns": [""], "rows": [[cell(obj)]]}]


def bisect_view(result: dict | None) -> dict | None:
    """A bisect result (``parity bisect``'s bisect.json) as a verdict line, its evidence and
    plain tables: one row per setting, one per layer bisect."""
    if not isinstance(result, dict):
        return None
    def cell(o: dict | None) -> dict:
        if not isinstance(o, dict):
            return {"text": "-", "cls": ""}
        out = BisectOutcome.from_json(o)
        first = out.first_divergence
        if out.diverges and first is not None:
            text = f"diverges at {short_where(first)} ({'NaN/inf' if first.nonfinite else _num(first.rel_l2, '.2g')})"
        else:
            text = f"within tolerance (max {'NaN/inf' if out.nonfinite else _num(out.max_rel_l2, '.2g')})"
        return {"text": f"{text} · run {out.run}", "cls": "fail" if out.diverges else "pass"}

    culprits = set(result.get("culprits") or [])
    rows = [{"setting": str(f.get("describe") or f.get("name")).replace(" -> ", " → "), "reload": "yes" if f.get("load_time") else "no",
             "alone": cell((result.get("alone") or {}).get(f.get("name"))),
             "removed": cell((result.get("removed") or {}).get(f.get("name"))),
             "culprit": f.get("name") in culprits} for f in result.get("factors") or [] if isinstance(f, dict)]
    layers = [{"factor": e.get("factor"), "first": "outside the layers" if (e.get("first_layer") or {}).get("layer") is None
               else f"{(e.get('first_layer') or {}).get('component')} layer {(e.get('first_layer') or {}).get('layer')}",
               "note": e.get("note"), "runs": ", ".join(str(r.get("run")) for r in e.get("runs") or [])}
              for e in result.get("layers") or [] if isinstance(e, dict)]
    verdict, evidence = bisect_why(result) if result.get("verdict") else ("bisect: no verdict", [])
    counts = result.get("counts") or {}
    facts = []
    if result.get("steps") is not None:
        facts.append(f"{result['steps']} teacher-forced frames per run")
    if result.get("tolerance") is not None:
        facts.append(f"tolerance rel L2 {_num(result['tolerance'], 'g')}")
    if counts.get("runs") is not None:
        facts.append(f"{counts['runs']} runs (+{counts.get('reference_runs', 0)} reference)")
    if counts.get("loads") is not None:
        facts.append(f"{counts['loads']} model loads")
    if isinstance(counts.get("seconds"), (int, float)):
        facts.append(f"{counts['seconds']:.1f} s")
    candidate = cell(result.get("candidate_run")) if result.get("candidate_run") else None
    return {"verdict": verdict.removeprefix("bisect: "), "evidence": evidence, "rows": rows, "layers": layers,
            "facts": "; ".join(facts), "candidate": candidate, "held": result.get("held_at_reference") or [],
            "holds": (result.get("proof") or {}).get("holds")}


_RUN_ONLY = {"--max-frames": 1, "--mos": 1, "--utmos-checkpoint": 1, "--force": 0, "--resume": 0,
             "--json": 0, "-v": 0, "--verbose": 0, "-q": 0, "--quiet": 0}


def bisect_command(summary: dict, run_dir: Path) -> str:
    """The one command that bisects this run's divergence and adds the result to this report:
    the run's own command with ``run`` -> ``bisect``, run-only options dropped and ``--out`` the
    run directory."""
    import shlex

    try:
        words = shlex.split(str(summary.get("command") or ""))
    except ValueError:
        words = []
    if len(words) < 3 or words[1] != "run":
        prompts = summary.get("prompts_file") or "PROMPTS"
        return f"parity bisect {shlex.quote(str(prompts))} --recipe RECIPE.toml --out {shlex.quote(str(run_dir))}"
    out, i, rest = str(run_dir), 2, []
    while i < len(words):
        w = words[i]
        name = w.split("=", 1)[0]
        if name in ("--out", "-o"):
            out = w.split("=", 1)[1] if "=" in w else (words[i + 1] if i + 1 < len(words) else out)
            i += 1 if "=" in w else 2
            continue
        if name in _RUN_ONLY:
            i += 1 + (_RUN_ONLY[name] if "=" not in w else 0)
            continue
        rest.append(w)
        i += 1
    return " ".join(["parity", "bisect", *(shlex.quote(w) for w in rest), "--out", shlex.quote(out)])


def _settings(sides: dict) -> dict:
    """Both sides' settings as rows (key, values per side, differs?)."""
    keys: list[str] = []
    # Before any side has loaded, a failed run has only its recipe here, whose values are not all
    # tables (name, model, ...): only table-valued entries are sides.
    tables_only = {r: s for r, s in sides.items() if isinstance(s, dict)} if isinstance(sides, dict) else {}
    roles = list(tables_only)
    for s in tables_only.values():
        keys += [str(k) for k in s if str(k) not in keys]
    rows = [{"key": k, "values": [show(tables_only[r].get(k)) for r in roles],
             "differs": len({show(tables_only[r].get(k)) for r in roles}) > 1} for k in keys]
    return {"roles": roles, "rows": rows}


def _prompt_view(p: dict, index: int, run_dir: Path) -> dict:
    """Everything one prompt's section shows; heatmaps are drawn later (their binning depends on
    the size budget), from the grids kept here."""
    view = {"p": p, "anchor": f"prompt-{index}", "mos": mos_cells(p.get("mos")), "charts": {}, "notes": [], "grids": [],
            "scorer": mos_scorer(p.get("mos"))}
    if p.get("status") != "ok":
        return view
    c = p.get("comparison") or {}
    first = c.get("first_divergence")
    view["first"] = first
    view["first_where"] = where(first) if first else None
    view["flip"] = flip_text(c.get("first_flip"))
    view["flip_short"] = flip_text(c.get("first_flip"), short=True)
    points = rundata.load_points(run_dir, p["id"])
    charts = view["charts"]
    if points is None:
        view["notes"].append("points/%s.csv.gz is missing or unreadable: no heatmaps" % p["id"])
    else:
        view["grids"] = [g for g in (plots.heatmap_grid(points, comp) for comp in ("talker", "predictor")) if g]
        for comp in ("talker", "predictor"):
            charts[f"{comp}_bars"] = plots.added_bars(points, comp, first)
    tokens = rundata.load_tokens(run_dir, p["id"])
    if tokens is None:
        view["notes"].append("traces are missing: no token timeline")
    else:
        charts["tokens"] = plots.token_timeline(tokens.ref_cb0, tokens.cand_cb0, tokens.forced_cb0_flip,
                                                tokens.forced_pred_flips, c.get("first_flip"), tokens.pred_substeps)
    markers = []
    if first:
        markers.append(("first divergence", _seconds(first["step"]), plots.COLORS["marker"]))
    if c.get("first_flip"):
        markers.append(("first forced flip", _seconds(c["first_flip"]["step"]), plots.COLORS["forced"]))
    if (c.get("free_run") or {}).get("first_diff_frame") is not None:
        markers.append(("codes differ", _seconds(c["free_run"]["first_diff_frame"]), plots.COLORS["flip"]))
    stop = c.get("stop") or {}
    if stop.get("collapse"):
        markers.append(("stop prob collapses", _seconds(stop["collapse"]["step"]), plots.COLORS["flip"]))
    if stop.get("runaway"):
        markers.append(("runaway (reference stops here)", _seconds(stop["runaway"]["reference_frames"]), plots.COLORS["flip"]))
    if (c.get("sampler") or {}).get("first"):
        markers.append(("sampler differs", _seconds(c["sampler"]["first"]["step"]), plots.COLORS["forced"]))
    if isinstance(p.get("audible_from_s"), (int, float)):
        markers.append(("audible", float(p["audible_from_s"]), "#000000"))
    view["markers"] = sorted(markers, key=lambda m: m[1])
    view["seek"] = _seconds(first["step"]) if first else (min(m[1] for m in markers) if markers else None)
    return view


def _draw_heatmaps(view: dict, scale: plots.Scale, max_cols: int) -> None:
    for g in view["grids"]:
        view["charts"][f"{g.component}_map"] = plots.heatmap(g, scale, view.get("first"), max_cols, f"{g.component} relative L2")


def _with_audio(view: dict, run_dir: Path, embed: bool) -> dict:
    p = view["p"]
    if p.get("status") != "ok":
        return view
    clips = audio.clips(run_dir, p, embed)
    durations = [c.duration_s for c in clips if c.duration_s]
    frames = (p.get("comparison") or {}).get("ref_frames") or 0
    duration = max(durations, default=frames / CODEC_FRAME_RATE)
    return {**view, "clips": clips,
            "time_axis": plots.time_axis(duration, view.get("markers", [])) if duration else None}


def _render(summary: dict, run_dir: Path, views: list[dict], embed: dict[str, bool], scale: plots.Scale,
            max_cols: int) -> str:
    prompts = summary.get("prompts", [])
    bisect = summary.get("bisect") or rundata.load_bisect(run_dir)
    bisect_result = bisect if isinstance(bisect, dict) and ("verdict" in bisect or "factors" in bisect) else None
    views = [_with_audio(v, run_dir, embed.get(v["p"]["id"], False)) for v in views]
    with_audio = [v for v in views if any(c.src for c in v.get("clips", []))]
    settings = _settings(summary.get("sides") or (summary.get("recipe") or {}))
    typed = Summary.from_json(summary)
    return _env().get_template("report.html.j2").render(
        s=summary,
        o=overview(typed, bisect_result),
        time_line=time_line(typed),
        gates=gate_table(summary),
        settings=settings,
        differs=[r for r in settings["rows"] if r["differs"]],
        prompts=views,
        has_mos=any(isinstance(p.get("mos"), dict) for p in prompts),
        has_audible=any(p.get("audible_from_s") is not None for p in prompts),
        bisect=bisect_view(bisect_result),
        bisect_tables=tables(bisect) if bisect and bisect_result is None else [],
        linked=[v["p"]["id"] for v in with_audio if any(c.src and not c.embedded for c in v["clips"])],
        glossary=GLOSSARY,
        bisect_command=bisect_command(summary, run_dir),
        colorbar=plots.colorbar(scale),
        scale=scale,
        frame_rate=CODEC_FRAME_RATE,
        embedded=sum(embed.values()),
        tables=tables,
        max_cols=max_cols,
    )


def render(summary: dict, run_dir: Path, size_limit: int = SIZE_LIMIT) -> str:
    """Render the report for a run directory's summary, within ``size_limit`` bytes when the
    charts allow it (audio is embedded only into the room the rest leaves)."""
    run_dir = Path(run_dir)
    scale = plots.Scale(summary.get("tolerance") or 1e-2)
    prompts = summary.get("prompts", [])
    views = [_prompt_view(p, i, run_dir) for i, p in enumerate(prompts)]
    max_cols = plots.MAX_COLS
    while True:
        for v in views:
            _draw_heatmaps(v, scale, max_cols)
        bare = _render(summary, run_dir, views, {}, scale, max_cols)
        size = len(bare.encode("utf-8"))
        if size <= size_limit or max_cols <= 25:
            break
        max_cols = max(25, max_cols // 2)
    embed = audio.plan(run_dir, [v["p"] for v in views if v["p"].get("status") == "ok"], size_limit - size - _MARGIN)
    if not any(embed.values()):
        return bare
    return _render(summary, run_dir, views, embed, scale, max_cols)


def write(summary: Summary | dict, run_dir: Path, path: Path) -> None:
    """Write report.html atomically; also append the GitHub job summary when running there."""
    if isinstance(summary, Summary):
        summary = summary.to_json()  # the template reads the records' JSON form (same names)
    from parity.outdir import atomic_write_text

    atomic_write_text(Path(path), render(summary, Path(run_dir)))
    write_step_summary(summary)
