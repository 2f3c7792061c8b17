"""``parity compare RUN_A RUN_B``: two candidate runs made against the same reference (say before
and after a fix to the fast engine), prompt by prompt: what got better and what got worse.

Both runs are judged again from their measurements under one set of analysis settings (B's
tolerances, gates and MOS gates, or ``--recipe``/``--set``), so a changed tolerance cannot pass
for an improvement. Per prompt it compares the first divergence (later is better), the largest
relative L2 and the NaN/inf count, the error each layer adds, free-running token agreement and
the MOS delta. The runs must share the reference: every common prompt's reference trace must be
byte-identical, else exit 2. Exit 1 when B fails a gate that A passed on some prompt (a
regression), else 0; worse numbers alone are reported, not failed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from parity.errors import BadInput
from parity.results import SCHEMA_VERSION, Divergence, PromptResult

LAYER_RATIO = 1.5  # a layer's mean added error counts as changed beyond this factor either way
_ORDER = {"talker": 0, "predictor": 1}


def _position(d: Divergence | None) -> tuple:
    """Execution order of a first divergence; no divergence sorts after every point."""
    if d is None:
        return (float("inf"),)
    return (d.step, _ORDER.get(d.component, 2), d.substep, d.layer)


def _trend(a, b, higher_is_better: bool, eps: float = 0.0) -> str:
    if a is None or b is None:
        return "same" if a == b else "n/a"
    if abs(a - b) <= eps:
        return "same"
    return "better" if (b > a) == higher_is_better else "worse"


@dataclass
class PromptChange:
    """One prompt in both runs, and which way each measure moved from A to B."""

    id: str
    a: dict
    b: dict
    changes: dict  # measure -> better / worse / same / n/a
    layers_worse: list[str] = field(default_factory=list)  # 'talker layer7' whose added error grew > LAYER_RATIO x
    layers_better: list[str] = field(default_factory=list)
    regressions: list[str] = field(default_factory=list)  # gates A passed and B fails
    fixed: list[str] = field(default_factory=list)  # gates A failed and B passes

    def to_json(self) -> dict:
        return {"id": self.id, "a": self.a, "b": self.b, "changes": self.changes, "layers_worse": self.layers_worse,
                "layers_better": self.layers_better, "regressions": self.regressions, "fixed": self.fixed}


@dataclass
class RunChanges:
    """Everything ``compare.json`` holds."""

    run_a: str
    run_b: str
    reference_digest: str
    analysis: dict  # the tolerance, gates and MOS gates both were judged with
    prompts: list[PromptChange]
    only_in_a: list[str]
    only_in_b: list[str]

    @property
    def regressed(self) -> bool:
        return any(p.regressions for p in self.prompts)

    def counts(self) -> dict:
        out: dict[str, dict[str, int]] = {}
        for p in self.prompts:
            for measure, trend in p.changes.items():
                out.setdefault(measure, {"better": 0, "worse": 0, "same": 0, "n/a": 0})[trend] += 1
        return out

    def to_json(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "kind": "parity-compare", "run_a": self.run_a, "run_b": self.run_b,
                "reference_digest": self.reference_digest, "analysis": self.analysis, "regressed": self.regressed,
                "counts": self.counts(), "prompts": [p.to_json() for p in self.prompts],
                "only_in_a": self.only_in_a, "only_in_b": self.only_in_b}


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def reference_digest(run_a: Path, run_b: Path, ids: list[str]) -> str:
    """One digest over the common prompts' reference traces; BadInput when the runs' differ."""
    h = hashlib.sha256()
    for pid in ids:
        digests = []
        for run in (run_a, run_b):
            path = run / "traces" / f"{pid}.reference.safetensors"
            if not path.is_file():
                raise BadInput(f"'{path}' is missing, so '{run}' cannot be checked against the other run's reference; "
                               "compare runs whose traces/ are complete")
            digests.append(_digest(path))
        if digests[0] != digests[1]:
            raise BadInput(f"'{run_a}' and '{run_b}' were not made against the same reference (prompt {pid}'s reference "
                           "trace differs); compare two runs of one reference (same model, reference side, decoding, prompts)")
        h.update(digests[0].encode())
    return h.hexdigest()


def _facts(r: PromptResult) -> dict:
    """The measures of one prompt's result that compare.json shows."""
    c = r.comparison
    first = c.first_divergence if c else None
    mos = r.mos or {}
    return {
        "passed": r.passed, "failed_gates": [g.name for g in r.failed_gates()],
        "first_divergence": first.to_json() if first else None, "first_divergence_at": first.where() if first else None,
        "max_rel_l2": c.max_rel_l2 if c else None, "nonfinite_points": c.nonfinite_points if c else None,
        "agreement": c.free_run.agreement if c and c.free_run else None,
        "mos_delta": mos.get("delta") if isinstance(mos.get("delta"), (int, float)) else None,
    }


def _layers(a: PromptResult, b: PromptResult) -> tuple[list[str], list[str]]:
    def table(r: PromptResult) -> dict:
        return {(e.component, e.layer): e.mean_added_rel_l2 for e in (r.comparison.added_per_layer if r.comparison else [])}

    ta, tb = table(a), table(b)
    worse, better = [], []
    for key in ta:
        va, vb = ta.get(key), tb.get(key)
        if va is None or vb is None or (va <= 0 and vb <= 0):
            continue
        name = f"{key[0]} {'embed' if key[1] < 0 else f'layer{key[1]}'}"
        if vb > LAYER_RATIO * max(va, 0) and vb > 0:
            worse.append(name)
        elif va > LAYER_RATIO * max(vb, 0) and va > 0:
            better.append(name)
    return worse, better


def prompt_change(a: PromptResult, b: PromptResult) -> PromptChange:
    """Which way each measure moved on one prompt from run A to run B."""
    fa, fb = _facts(a), _facts(b)
    da = a.comparison.first_divergence if a.comparison else None
    db = b.comparison.first_divergence if b.comparison else None
    pa, pb = _position(da), _position(db)
    changes = {
        "first_divergence": "same" if pa == pb else ("better" if pb > pa else "worse"),
        "max_rel_l2": _trend(fa["max_rel_l2"], fb["max_rel_l2"], higher_is_better=False),
        "nonfinite_points": _trend(fa["nonfinite_points"], fb["nonfinite_points"], higher_is_better=False),
        "agreement": _trend(fa["agreement"], fb["agreement"], higher_is_better=True),
        "mos_delta": _trend(fa["mos_delta"], fb["mos_delta"], higher_is_better=True, eps=1e-9),
    }
    worse, better = _layers(a, b)
    changes["layers"] = "worse" if worse and not better else ("better" if better and not worse else ("mixed" if worse else "same"))
    gates_a = {g.name: g.passed for g in a.gates}
    gates_b = {g.name: g.passed for g in b.gates}
    regressions = [n for n, ok in gates_b.items() if not ok and gates_a.get(n, False)]
    fixed = [n for n, ok in gates_b.items() if ok and gates_a.get(n) is False]
    if a.ran and not b.ran:
        regressions.append("run")
    return PromptChange(a.id, fa, fb, changes, worse, better, regressions, fixed)


def compare_runs(run_a: Path, run_b: Path, recipe_path: Path | None = None, sets: list[str] | None = None) -> RunChanges:
    """Judge both runs under B's analysis settings (or ``recipe_path``/``sets``) and compare them."""
    from parity.analysis import analyse_run
    from parity.reanalysis import analysis_recipe, read_run, read_summary

    run_a, run_b = Path(run_a), Path(run_b)
    saved_a, saved_b = read_summary(run_a), read_summary(run_b)
    meta_a, recipe_a = read_run(run_a)
    meta_b, recipe_b = read_run(run_b)
    judge_b = analysis_recipe(recipe_b, recipe_path, list(sets or []), f"'{run_b}'")
    # A keeps its own engine settings and takes B's analysis settings.
    judge_a = replace(recipe_a, tolerances=judge_b.tolerances, gates=judge_b.gates,
                      mos=replace(recipe_a.mos, min_mean_delta=judge_b.mos.min_mean_delta,
                                  min_worst_delta=judge_b.mos.min_worst_delta, audible_db=judge_b.mos.audible_db))
    ids_a = [p.id for p in saved_a.prompts]
    ids_b = {p.id for p in saved_b.prompts}
    common = [i for i in ids_a if i in ids_b]
    if not common:
        raise BadInput(f"'{run_a}' and '{run_b}' have no prompt in common; compare two runs of the same prompts")
    for pid in common:
        ta, tb = saved_a.prompt(pid).text, saved_b.prompt(pid).text
        if ta != tb:
            raise BadInput(f"prompt {pid} has another text in '{run_b}' than in '{run_a}'; compare two runs of the same prompts")
    digest = reference_digest(run_a, run_b, [i for i in common if saved_a.prompt(i).ran and saved_b.prompt(i).ran])
    sa, sb = analyse_run(run_a, judge_a, saved_a, meta_a), analyse_run(run_b, judge_b, saved_b, meta_b)
    prompts = [prompt_change(sa.prompt(i), sb.prompt(i)) for i in common]
    analysis = {"tolerance_a": judge_a.tolerance(), "tolerance_b": judge_b.tolerance(), "tolerances": judge_b.tolerances,
                "gates": json.loads(json.dumps(judge_b.to_dict()["gates"])),
                "mos": {k: getattr(judge_b.mos, k) for k in ("min_mean_delta", "min_worst_delta", "audible_db")}}
    return RunChanges(str(run_a), str(run_b), digest, analysis, prompts,
                      [i for i in ids_a if i not in ids_b], [p.id for p in saved_b.prompts if p.id not in set(ids_a)])


def write_changes(changes: RunChanges, out: Path) -> None:
    """compare.json into ``out`` (atomically)."""
    from parity.reanalysis import check_out

    check_out(Path(out))
    path = Path(out) / "compare.json"
    tmp = path.with_name(".compare.json.tmp")
    tmp.write_text(json.dumps(changes.to_json(), indent=1, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def _num(v, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec)


_STYLE = {"better": "[green]better[/]", "worse": "[red]worse[/]", "same": "same", "mixed": "[yellow]mixed[/]", "n/a": "-"}


def print_changes(changes: RunChanges, console: Console) -> None:
    """One row per prompt: each measure in A -> B and which way it moved."""
    table = Table(title=f"parity compare: A = {changes.run_a}  B = {changes.run_b}",
                  caption=f"same reference (digest {changes.reference_digest[:12]}); both judged at tolerance "
                          f"{changes.analysis['tolerance_b']:g}; exit 1 when B fails a gate A passed")
    for col in ("prompt", "first divergence A -> B", "max rel L2", "layers", "agree", "MOS Δ", "gates"):
        table.add_column(col, overflow="fold")
    for p in changes.prompts:
        a, b, c = p.a, p.b, p.changes
        gates = ("[red]regressed: " + ", ".join(p.regressions) + "[/]") if p.regressions else (
            ("[green]fixed: " + ", ".join(p.fixed) + "[/]") if p.fixed else ("pass" if b["passed"] else "fail (as in A)"))
        table.add_row(
            p.id,
            f"{a['first_divergence_at'] or 'none'} -> {b['first_divergence_at'] or 'none'} {_STYLE[c['first_divergence']]}",
            f"{_num(a['max_rel_l2'])} -> {_num(b['max_rel_l2'])} {_STYLE[c['max_rel_l2']]}",
            _STYLE[c["layers"]] + (f" ({len(p.layers_worse)} up, {len(p.layers_better)} down)" if c["layers"] != "same" else ""),
            f"{_num(a['agreement'], '.1%')} -> {_num(b['agreement'], '.1%')} {_STYLE[c['agreement']]}",
            f"{_num(a['mos_delta'], '+.2f')} -> {_num(b['mos_delta'], '+.2f')} {_STYLE[c['mos_delta']]}",
            gates,
        )
    console.print(table)
    if changes.only_in_a or changes.only_in_b:
        console.print(f"not compared: {len(changes.only_in_a)} prompt(s) only in A, {len(changes.only_in_b)} only in B",
                      markup=False, highlight=False)
