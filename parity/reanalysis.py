"""``parity compare RUN``: judge a saved run again (other tolerances, gates or MOS gates) from
its measurements, without loading any engine or model.

What a re-analysis may change is what the analyse stage reads: ``[tolerances]``, ``[gates]``
and the MOS gates (``mos.min_mean_delta``, ``mos.min_worst_delta``, ``mos.audible_db``).
Anything the engines or scorers used (model, sides, decoding, trace storage, scorers, seeds)
would need a new run, so a recipe or ``--set`` that changes it is refused (exit 2).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from parity.errors import BadInput
from parity.recipe import Recipe, apply_overrides, from_dict, load_recipe, parse_override
from parity.results import Summary

# Recipe fields that only the analyse stage reads.
ANALYSIS_FIELDS = ("tolerances", "gates", "mos.min_mean_delta", "mos.min_worst_delta", "mos.audible_db", "name")


def read_summary(run_dir: Path) -> Summary:
    """A run directory's summary.json as a record; BadInput (one line) when it is not one. Its
    prompt ids name files under the run directory, so they must be ids parity could have written."""
    from parity.prompts import _ID_RE

    from parity.readback import read_summary as read_checked

    path = Path(run_dir) / "summary.json"
    data = read_checked(run_dir)  # size, type, encoding and field checks (one line, exit 2)
    for p in data["prompts"]:
        if not isinstance(p.get("id"), str) or not _ID_RE.fullmatch(p["id"]):
            raise BadInput(f"'{path}': prompt id {p.get('id')!r} is not a valid id (A-Z a-z 0-9 . _ -); re-run parity run")
    try:
        return Summary.from_json(data)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise BadInput(f"'{path}' does not have the layout of a parity summary ({type(e).__name__}: {e}); re-run parity run") from None


def read_run(run_dir: Path) -> tuple[dict, Recipe]:
    """run.json of a run directory and the recipe it ran with."""
    path = Path(run_dir) / "run.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        assert isinstance(meta, dict) and isinstance(meta.get("recipe"), dict)
    except FileNotFoundError:
        raise BadInput(f"'{run_dir}' has no run.json; pass a directory written by parity run") from None
    except (OSError, ValueError, AssertionError):
        raise BadInput(f"'{path}' is unreadable or not a parity run.json; re-run parity run") from None
    data = {k: v for k, v in meta["recipe"].items() if v is not None}
    return meta, from_dict(data, str(path))


def _flat(recipe: Recipe) -> dict[str, object]:
    """Every recipe field as 'section.key' -> value."""
    out: dict[str, object] = {}
    for key, value in asdict(recipe).items():
        if isinstance(value, dict) and key != "tolerances":
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def analysis_recipe(saved: Recipe, recipe_path: Path | None, sets: list[str], where: str) -> Recipe:
    """The recipe to re-judge with: the saved one, or ``recipe_path``, plus ``--set`` overrides;
    refused when it changes a field the engines used."""
    recipe = load_recipe(recipe_path) if recipe_path is not None else saved
    overrides = [parse_override(s) for s in sets]
    if overrides:
        recipe = apply_overrides(recipe, overrides)
    old, new = _flat(saved), _flat(recipe)
    for key in sorted(set(old) | set(new)):
        if any(key == f or key.startswith(f + ".") for f in ANALYSIS_FIELDS):
            continue
        if old.get(key) != new.get(key):
            raise BadInput(f"{key} changes from {old.get(key)!r} to {new.get(key)!r}, which needs a new parity run of {where}; "
                           "parity compare changes only tolerances, gates and the MOS gates")
    return recipe


def check_out(out: Path) -> None:
    """--out may be new, empty or an earlier re-analysis, never a parity run (its own summary)."""
    if (out / "run.json").exists():
        raise BadInput(f"--out '{out}' holds a parity run, whose summary.json would be overwritten; pass another directory")
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out '{out}' exists and is not a directory; choose another path")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInput(f"--out '{out}' cannot be created ({e.strerror}); choose a writable directory") from None


def reanalyse(run_dir: Path, recipe_path: Path | None = None, sets: list[str] | None = None, out: Path | None = None) -> Summary:
    """Judge a saved run again and, with ``out``, write summary.json, junit.xml and report.html there."""
    from parity.analysis import analyse_run

    run_dir = Path(run_dir)
    saved = read_summary(run_dir)
    meta, saved_recipe = read_run(run_dir)
    recipe = analysis_recipe(saved_recipe, recipe_path, list(sets or []), f"'{run_dir}'")
    summary = analyse_run(run_dir, recipe, saved, meta)
    if out is not None:
        from parity.outputs import write_outputs

        check_out(Path(out))
        write_outputs(summary, Path(out), run_dir)
    return summary
