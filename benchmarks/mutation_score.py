"""Record the mutation score of the analysis core from a finished ``mutmut run`` (README,
"Development"): killed / survived / equivalent per module, written to reports/mutation_score.json.

Run from the repository root after ``mutmut run``; it reads mutmut's own records under mutants/.
Mutants of the signature hints and of the tie/real flip rule are counted apart as ``out_of_scope``:
that code is being rewritten with tests of its own on planted divergences. Of parity/analysis.py and
parity/results.py only the pure core is in scope (``IN_SCOPE_ONLY``): the first NaN/inf point, the
comparison record of two traces, and the JSON reading/writing of the records the gates read. Survivors judged equivalent are listed in
EQUIVALENT with the reason; each entry names the mutant and the exact mutated line, and the entry
is reported as stale (and not applied) when the line no longer matches.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

MODULES = ("parity/compare.py", "parity/gates.py", "parity/analysis.py", "parity/results.py")
# Modules of which only the pure analysis core is in scope (functions, or Class.method): the rest
# reads and writes run directories or assembles whole-run summaries, tested end to end in tests/.
IN_SCOPE_ONLY = {
    "parity.analysis": {"first_nonfinite_point", "comparison", "compare_traces"},
    "parity.results": {"finite_or_none", "_known", "_opt", "Point.where", "Point.to_json", "Point.from_json",
                       "Divergence.to_json", "Divergence.from_json", "Agreement.to_json", "Agreement.from_json",
                       "Comparison.to_json", "Comparison.from_json"},
}
# Tested elsewhere and being rewritten: the signature hints and the flip label (tie/real).
OUT_OF_SCOPE_FUNCTIONS = {"parity.compare": {"signature_hints", "_hint", "_where"}}
# A mutant whose original line matches is out of scope: the tie rule and the hints call.
OUT_OF_SCOPE_LINES = {"parity.compare": [re.compile(r"ref_margin <= 3 \* noise|signature_hints\(")]}

# mutant name -> (the mutated line, stripped, as in mutants/; why no test can tell it apart)
EQUIVALENT: dict[str, tuple[str, str]] = {
    "parity.compare.x__flip_at__mutmut_23": (
        "top2 = torch.topk(r, 3).values",
        "only the first two of the top-k values are read; they are the same for k=2 and k=3 (every vocabulary has more than 2 tokens)"),
    "parity.compare.x__py__mutmut_13": (
        "return v if math.isfinite(v) else (None if math.isnan(v) else (\"inf\" if v >= 0 else \"-inf\"))",
        "the value is +inf or -inf here (finite and NaN returned before), so v > 0, v >= 0 and v > 1 agree"),
    "parity.compare.x__py__mutmut_14": (
        "return v if math.isfinite(v) else (None if math.isnan(v) else (\"inf\" if v > 1 else \"-inf\"))",
        "the value is +inf or -inf here (finite and NaN returned before), so v > 0, v >= 0 and v > 1 agree"),
    "parity.compare.x__rows__mutmut_2": (
        "if hidden_c.numel() == 1:",
        "the early return is a shortcut: an empty input yields the same empty frame through the general path, and a hidden tensor of exactly one element cannot occur (at least embed + one layer, each of width > 1)"),
    "parity.compare.x__rows__mutmut_39": (
        "idx = np.indices(tuple(lead)).reshape(len(lead), -2)",
        "numpy's reshape takes any negative size as 'infer this dimension', so -2 is -1"),
    "parity.compare.x_compare_truth__mutmut_127": (
        "\"cand_err_max\": _py(df[\"cand_err\"].replace([np.inf], None).max()),",
        "pandas stores None as NaN in a float column, so replacing inf by None or by NaN gives the same maximum"),
    "parity.compare.x_compare_truth__mutmut_136": (
        "\"ref_err_max\": _py(df[\"ref_err\"].replace([np.inf], None).max()),",
        "pandas stores None as NaN in a float column, so replacing inf by None or by NaN gives the same maximum"),
    "parity.compare.x_compare_truth__mutmut_6": (
        "multiplier = truth_multiplier(str(cand.meta.get(\"side\", {}).get(\"dtype\", None)))",
        "any dtype string other than bfloat16/float16 gets the same 2x, so the default's spelling cannot matter"),
    "parity.compare.x_compare_truth__mutmut_8": (
        "multiplier = truth_multiplier(str(cand.meta.get(\"side\", {}).get(\"dtype\", )))",
        "any dtype string other than bfloat16/float16 gets the same 2x, so the default's spelling cannot matter"),
    "parity.compare.x_compare_truth__mutmut_17": (
        "multiplier = truth_multiplier(str(cand.meta.get(\"side\", {}).get(\"dtype\", \"XXfloat32XX\")))",
        "any dtype string other than bfloat16/float16 gets the same 2x, so the default's spelling cannot matter"),
    "parity.compare.x_compare_truth__mutmut_18": (
        "multiplier = truth_multiplier(str(cand.meta.get(\"side\", {}).get(\"dtype\", \"FLOAT32\")))",
        "any dtype string other than bfloat16/float16 gets the same 2x, so the default's spelling cannot matter"),
    "parity.compare.x_compare_truth__mutmut_34": (
        "c = point_frame(cand, truth, None)[keys + [\"rel_l2\"]].rename(columns={\"rel_l2\": \"cand_err\"})",
        "the tolerance only sets point_frame's 'over' column, which compare_truth drops (it keeps rel_l2)"),
    "parity.compare.x_compare_truth__mutmut_49": (
        "r = point_frame(ref, truth, None)[keys + [\"rel_l2\"]].rename(columns={\"rel_l2\": \"ref_err\"})",
        "the tolerance only sets point_frame's 'over' column, which compare_truth drops (it keeps rel_l2)"),
    "parity.compare.x_compare_truth__mutmut_62": (
        "df = c.merge(r, on=None, how=\"inner\", sort=False)",
        "the defaults of DataFrame.merge: on=None joins on the common columns, which are exactly the keys (the error columns are renamed apart), how='inner' and sort=False are the defaults"),
    "parity.compare.x_compare_truth__mutmut_64": (
        "df = c.merge(r, on=keys, how=\"inner\", sort=None)",
        "the defaults of DataFrame.merge: on=None joins on the common columns, which are exactly the keys (the error columns are renamed apart), how='inner' and sort=False are the defaults"),
    "parity.compare.x_compare_truth__mutmut_66": (
        "df = c.merge(r, how=\"inner\", sort=False)",
        "the defaults of DataFrame.merge: on=None joins on the common columns, which are exactly the keys (the error columns are renamed apart), how='inner' and sort=False are the defaults"),
    "parity.compare.x_compare_truth__mutmut_67": (
        "df = c.merge(r, on=keys, sort=False)",
        "the defaults of DataFrame.merge: on=None joins on the common columns, which are exactly the keys (the error columns are renamed apart), how='inner' and sort=False are the defaults"),
    "parity.compare.x_compare_truth__mutmut_68": (
        "df = c.merge(r, on=keys, how=\"inner\", )",
        "the defaults of DataFrame.merge: on=None joins on the common columns, which are exactly the keys (the error columns are renamed apart), how='inner' and sort=False are the defaults"),
    "parity.compare.x_first_flip__mutmut_16": (
        "talker_allowed = _allowed_mask(ref, ref.talker_logits.shape[+1])",
        "talker_logits is [steps, vocab]: shape[1] is shape[-1]"),
    "parity.compare.x_summarize__mutmut_70": (
        ".rename(columns={\"added\": \"mean_added_rel_l2\"}).to_dict(orient=\"RECORDS\")",
        "pandas reads to_dict's orient case-insensitively"),
    "parity.compare.x_summarize__mutmut_84": (
        "\"max_rel_l2\": _py(points[\"rel_l2\"].replace([np.inf], np.nan).max()) if (len(points)) or True else None,",
        "the guard is a shortcut: the maximum of an empty column is NaN, which _py turns into the same None"),
    "parity.compare.x_summarize__mutmut_87": (
        "\"max_rel_l2\": _py(points[\"rel_l2\"].replace([np.inf], None).max()) if len(points) else None,",
        "pandas stores None as NaN in a float column, so replacing inf by None or by NaN gives the same maximum"),
    "parity.compare.x__rows__mutmut_101": (
        "df = pd.concat(frames, ignore_index=True).sort_values([\"step\", \"substep\", \"layer\"], kind=\"XXstableXX\")",
        "sort keys here are unique per row (step, sub-step, layer), so a stable sort and any other give the same order, and pandas ignores `kind` for a sort on several columns anyway"),
    "parity.compare.x__rows__mutmut_102": (
        "df = pd.concat(frames, ignore_index=True).sort_values([\"step\", \"substep\", \"layer\"], kind=\"STABLE\")",
        "sort keys here are unique per row (step, sub-step, layer), so a stable sort and any other give the same order, and pandas ignores `kind` for a sort on several columns anyway"),
    "parity.compare.x__rows__mutmut_48": (
        "sub = idx[1] if len(lead) == 2 else np.full_like(None, -1)",
        "np.full_like(None, -1) is a 0-d array that broadcasts to the same column of -1"),
    "parity.compare.x__rows__mutmut_87": (
        "df = pd.concat(frames, ignore_index=True).sort_values([\"step\", \"substep\", \"layer\"], kind=None)",
        "sort keys here are unique per row (step, sub-step, layer), so a stable sort and any other give the same order, and pandas ignores `kind` for a sort on several columns anyway"),
    "parity.compare.x__rows__mutmut_89": (
        "df = pd.concat(frames, ignore_index=True).sort_values([\"step\", \"substep\", \"layer\"], )",
        "sort keys here are unique per row (step, sub-step, layer), so a stable sort and any other give the same order, and pandas ignores `kind` for a sort on several columns anyway"),
    "parity.compare.x__rows__mutmut_91": (
        "df = pd.concat(frames, ignore_index=None).sort_values([\"step\", \"substep\", \"layer\"], kind=\"stable\")",
        "the index is rebuilt afterwards (reset_index / a new concat), and the arithmetic on it pairs rows of the same frame, so keeping the original index labels changes nothing visible"),
    "parity.compare.x__rows__mutmut_94": (
        "df = pd.concat(frames, ignore_index=False).sort_values([\"step\", \"substep\", \"layer\"], kind=\"stable\")",
        "the index is rebuilt afterwards (reset_index / a new concat), and the arithmetic on it pairs rows of the same frame, so keeping the original index labels changes nothing visible"),
    "parity.compare.x_point_frame__mutmut_43": (
        "df = pd.concat([part for part in (talker, pred) if len(part)] or [talker], ignore_index=None)",
        "the index is rebuilt afterwards (reset_index / a new concat), and the arithmetic on it pairs rows of the same frame, so keeping the original index labels changes nothing visible"),
    "parity.compare.x_point_frame__mutmut_45": (
        "df = pd.concat([part for part in (talker, pred) if len(part)] or [talker], )",
        "the index is rebuilt afterwards (reset_index / a new concat), and the arithmetic on it pairs rows of the same frame, so keeping the original index labels changes nothing visible"),
    "parity.compare.x_point_frame__mutmut_47": (
        "df = pd.concat([part for part in (talker, pred) if len(part)] or [talker], ignore_index=False)",
        "the index is rebuilt afterwards (reset_index / a new concat), and the arithmetic on it pairs rows of the same frame, so keeping the original index labels changes nothing visible"),
    "parity.compare.x_point_frame__mutmut_48": (
        "df[\"order\"] = None",
        "the talker's sub-step is -1 and the predictor's are 0..14, so sorting on sub-step already puts a talker step before its frame's predictor points: the order column only restates that, whatever values or NaN it holds"),
    "parity.compare.x_point_frame__mutmut_56": (
        "df[\"order\"] = df[\"component\"].map({\"talker\": 1, \"predictor\": 1})",
        "the talker's sub-step is -1 and the predictor's are 0..14, so sorting on sub-step already puts a talker step before its frame's predictor points: the order column only restates that, whatever values or NaN it holds"),
    "parity.compare.x_point_frame__mutmut_57": (
        "df[\"order\"] = df[\"component\"].map({\"talker\": 0, \"XXpredictorXX\": 1})",
        "the talker's sub-step is -1 and the predictor's are 0..14, so sorting on sub-step already puts a talker step before its frame's predictor points: the order column only restates that, whatever values or NaN it holds"),
    "parity.compare.x_point_frame__mutmut_58": (
        "df[\"order\"] = df[\"component\"].map({\"talker\": 0, \"PREDICTOR\": 1})",
        "the talker's sub-step is -1 and the predictor's are 0..14, so sorting on sub-step already puts a talker step before its frame's predictor points: the order column only restates that, whatever values or NaN it holds"),
    "parity.compare.x_point_frame__mutmut_59": (
        "df[\"order\"] = df[\"component\"].map({\"talker\": 0, \"predictor\": 2})",
        "the talker's sub-step is -1 and the predictor's are 0..14, so sorting on sub-step already puts a talker step before its frame's predictor points: the order column only restates that, whatever values or NaN it holds"),
    "parity.compare.x_point_frame__mutmut_63": (
        "df = df.sort_values([\"step\", \"order\", \"substep\", \"layer\"], kind=None).reset_index(drop=True)",
        "sort keys here are unique per row (step, sub-step, layer), so a stable sort and any other give the same order, and pandas ignores `kind` for a sort on several columns anyway"),
    "parity.compare.x_point_frame__mutmut_65": (
        "df = df.sort_values([\"step\", \"order\", \"substep\", \"layer\"], ).reset_index(drop=True)",
        "sort keys here are unique per row (step, sub-step, layer), so a stable sort and any other give the same order, and pandas ignores `kind` for a sort on several columns anyway"),
    "parity.compare.x_point_frame__mutmut_74": (
        "df = df.sort_values([\"step\", \"order\", \"substep\", \"layer\"], kind=\"XXstableXX\").reset_index(drop=True)",
        "sort keys here are unique per row (step, sub-step, layer), so a stable sort and any other give the same order, and pandas ignores `kind` for a sort on several columns anyway"),
    "parity.compare.x_point_frame__mutmut_75": (
        "df = df.sort_values([\"step\", \"order\", \"substep\", \"layer\"], kind=\"STABLE\").reset_index(drop=True)",
        "sort keys here are unique per row (step, sub-step, layer), so a stable sort and any other give the same order, and pandas ignores `kind` for a sort on several columns anyway"),
    "parity.compare.x__rows__mutmut_111": (
        "df = pd.concat(frames, ignore_index=True).sort_values([\"step\", \"substep\", \"layer\"], kind=None)",
        "sort on several columns: the keys (step, sub-step, layer) are unique per row, so every sort kind gives the same order (and pandas ignores `kind` for a sort on several columns)"),
    "parity.compare.x__rows__mutmut_113": (
        "df = pd.concat(frames, ignore_index=True).sort_values([\"step\", \"substep\", \"layer\"], )",
        "sort on several columns: the keys (step, sub-step, layer) are unique per row, so every sort kind gives the same order (and pandas ignores `kind` for a sort on several columns)"),
    "parity.compare.x__rows__mutmut_125": (
        "df = pd.concat(frames, ignore_index=True).sort_values([\"step\", \"substep\", \"layer\"], kind=\"XXstableXX\")",
        "sort on several columns: the keys (step, sub-step, layer) are unique per row, so every sort kind gives the same order (and pandas ignores `kind` for a sort on several columns)"),
    "parity.compare.x__rows__mutmut_126": (
        "df = pd.concat(frames, ignore_index=True).sort_values([\"step\", \"substep\", \"layer\"], kind=\"STABLE\")",
        "sort on several columns: the keys (step, sub-step, layer) are unique per row, so every sort kind gives the same order (and pandas ignores `kind` for a sort on several columns)"),
    "parity.compare.x__rows__mutmut_115": (
        "df = pd.concat(frames, ignore_index=None).sort_values([\"step\", \"substep\", \"layer\"], kind=\"stable\")",
        "the index is dropped later (point_frame concatenates with ignore_index and resets it); inside _rows the shifted column keeps the same index in the same order, so the subtraction pairs the same rows"),
    "parity.compare.x__rows__mutmut_117": (
        "df = pd.concat(frames, ).sort_values([\"step\", \"substep\", \"layer\"], kind=\"stable\")",
        "the index is dropped later (point_frame concatenates with ignore_index and resets it); inside _rows the shifted column keeps the same index in the same order, so the subtraction pairs the same rows"),
    "parity.compare.x__rows__mutmut_118": (
        "df = pd.concat(frames, ignore_index=False).sort_values([\"step\", \"substep\", \"layer\"], kind=\"stable\")",
        "the index is dropped later (point_frame concatenates with ignore_index and resets it); inside _rows the shifted column keeps the same index in the same order, so the subtraction pairs the same rows"),
    "parity.compare.x__rows__mutmut_59": (
        "idx = np.indices(tuple(lead)).reshape(len(lead), -2)",
        "numpy's reshape takes any negative size as 'infer this dimension', so -2 is -1"),
    "parity.compare.x__rows__mutmut_68": (
        "sub = idx[1] if len(lead) == 2 else np.full_like(None, -1)",
        "np.full_like(None, -1) is the scalar -1, which the DataFrame broadcasts to the same column of -1"),
    "parity.compare.x__rows__mutmut_3": (
        "if logits_c.numel() == 1 or logits_r.numel() == 0:",
        "a logits tensor ends in the vocabulary (more than 2 tokens), so it never has exactly one element"),
    "parity.compare.x__rows__mutmut_5": (
        "if logits_c.numel() == 0 or logits_r.numel() == 1:",
        "a logits tensor ends in the vocabulary (more than 2 tokens), so it never has exactly one element"),
    "parity.compare.x__rows__mutmut_17": (
        "with_hidden = hidden_c.numel() > 1 and hidden_r.numel() > 0 and hidden_c.shape[-2] == hidden_r.shape[-2]",
        "recorded hidden states have at least two points (embed + a layer), so never exactly one element"),
    "parity.compare.x__rows__mutmut_19": (
        "with_hidden = hidden_c.numel() > 0 and hidden_r.numel() > 1 and hidden_c.shape[-2] == hidden_r.shape[-2]",
        "recorded hidden states have at least two points (embed + a layer), so never exactly one element"),
    "parity.analysis.x_first_nonfinite_point__mutmut_13": (
        "tl_bad = ~torch.isfinite(trace.talker_logits).all(+1)  # [S]",
        "talker logits are 2-D [steps, vocabulary], so axis +1 is axis -1"),
    "parity.analysis.x_first_nonfinite_point__mutmut_16": (
        "has_pred = trace.pred_hidden.numel() >= 0",
        "with no predictor frames the loop's own guard (s < frames = 0) already skips the predictor, so has_pred only saves work"),
    "parity.analysis.x_first_nonfinite_point__mutmut_20": (
        "p_bad = ~torch.isfinite(trace.pred_hidden).all(-1) if (has_pred) or True else None  # [F, 15, P+1]",
        "the mask of an empty predictor is empty and is only read under `has_pred and ...`; computing it anyway changes nothing"),
    "parity.analysis.x_first_nonfinite_point__mutmut_28": (
        "pl_bad = ~torch.isfinite(trace.pred_logits).all(-1) if (has_pred) or True else None  # [F, 15]",
        "the mask of an empty predictor is empty and is only read under `has_pred and ...`; computing it anyway changes nothing"),
}

def status_of(code) -> str:
    """mutmut's own wording of a mutant's exit code (killed, survived, no tests, timeout, ...)."""
    from mutmut.stats import status_by_exit_code

    return status_by_exit_code[code]


def mutant_diffs(mutated: str, spans: dict[str, list[int]]) -> dict[str, tuple[list[str], list[str]]]:
    """(original lines, mutated lines) of each mutant against its function's original (from
    mutmut's spans)."""
    lines = mutated.splitlines()
    text = {name: lines[a - 1:b] for name, (a, b) in spans.items()}
    out = {}
    for name, body in text.items():
        if "__mutmut_orig" in name or not re.search(r"__mutmut_\d+$", name):
            continue
        orig = text.get(re.sub(r"__mutmut_\d+$", "__mutmut_orig", name))
        if orig is None:
            continue
        strip = lambda src: [re.sub(r"__mutmut_(orig|\d+)", "", s) for s in src]  # noqa: E731
        diff = list(difflib.unified_diff(strip(orig), strip(body), lineterm="", n=0))
        out[name] = ([d[1:].strip() for d in diff if d.startswith("-") and not d.startswith("---")],
                     [d[1:].strip() for d in diff if d.startswith("+") and not d.startswith("+++")])
    return out


def function_of(key: str) -> str:
    """'parity.compare.x__metrics__mutmut_3' -> '_metrics'; 'parity.results.xǁPointǁwhere__mutmut_1'
    -> 'Point.where'."""
    short = key.rsplit(".", 1)[1]
    short = re.sub(r"__mutmut_\d+$", "", short)
    if short.startswith("xǁ"):
        return ".".join(short[2:].split("ǁ"))
    return short[2:] if short.startswith("x_") else short


def in_scope(module: str, func: str) -> bool:
    """Whether a function ('name' or 'Class.method') of ``module`` is counted."""
    if module in IN_SCOPE_ONLY:
        return func in IN_SCOPE_ONLY[module]
    return func not in OUT_OF_SCOPE_FUNCTIONS.get(module, set())


def in_scope_patterns() -> list[str]:
    """mutmut name patterns for every in-scope function and method of MODULES."""
    patterns = []
    for path in MODULES:
        module = path[:-3].replace("/", ".")
        for node in ast.parse(Path(path).read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and in_scope(module, node.name):
                patterns.append(f"{module}.x_{node.name}__mutmut_*")
            elif isinstance(node, ast.ClassDef):
                for m in node.body:
                    if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef)) and in_scope(module, f"{node.name}.{m.name}"):
                        patterns.append(f"{module}.xǁ{node.name}ǁ{m.name}__mutmut_*")
    return patterns


def run_mutmut(children: int) -> tuple[float, str]:
    """A fresh ``mutmut run`` over the in-scope functions; returns (seconds, command)."""
    shutil.rmtree("mutants", ignore_errors=True)
    cmd = ["mutmut", "run", "--max-children", str(children), *in_scope_patterns()]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0, " ".join(cmd[:4]) + " <in-scope functions>"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mutants", default="mutants", help="mutmut's working directory")
    ap.add_argument("--out", default="reports/mutation_score.json")
    ap.add_argument("--run", action="store_true", help="run mutmut first (fresh, in-scope functions only)")
    ap.add_argument("--max-children", type=int, default=2, help="mutmut workers (--run)")
    ap.add_argument("--seconds", type=float, help="without --run: the wall time of the mutmut run found, to record")
    args = ap.parse_args()
    if args.run:
        seconds, command = run_mutmut(args.max_children)
    else:
        seconds, command = args.seconds, f"mutmut run --max-children {args.max_children} <in-scope functions>"
    root = Path(args.mutants)
    report: dict = {"tool": "mutmut 3.8.1", "command": command, "tests": "tests/unit (only)",
                    "seconds": None if seconds is None else round(seconds, 1), "patterns": in_scope_patterns(), "modules": {}, "equivalent": [], "stale_equivalents": [],
                    "survivors": []}
    totals = {"killed": 0, "survived": 0, "equivalent": 0, "out_of_scope": 0, "other": 0}
    for path in MODULES:
        module = path[:-3].replace("/", ".")
        meta = json.loads((root / f"{path}.meta").read_text())
        spans = json.loads((root / f"{path}.spans").read_text())["spans"]
        diffs = mutant_diffs((root / path).read_text(), spans)
        counts = {"killed": 0, "survived": 0, "equivalent": 0, "out_of_scope": 0, "other": 0}
        for key, code in sorted(meta["exit_code_by_key"].items()):
            status = status_of(code)
            short = key.rsplit(".", 1)[1]
            original, changed = diffs.get(short, ([], []))
            func = function_of(key)
            if not in_scope(module, func) or any(
                    p.search(line) for p in OUT_OF_SCOPE_LINES.get(module, []) for line in original):
                counts["out_of_scope"] += 1
                continue
            if status in ("killed", "timeout"):
                counts["killed"] += 1
            elif status in ("survived", "no tests"):  # a mutant no test runs is not killed
                equiv = EQUIVALENT.get(key)
                if equiv and equiv[0] in changed:  # still the same mutation
                    counts["equivalent"] += 1
                    report["equivalent"].append({"mutant": key, "line": equiv[0], "reason": equiv[1]})
                else:
                    if equiv:
                        report["stale_equivalents"].append(key)
                    counts["survived"] += 1
                    report["survivors"].append({"mutant": key, "original": original, "mutated": changed})
            else:
                counts["other"] += 1
                report["survivors"].append({"mutant": key, "status": status, "original": original, "mutated": changed})
        judged = counts["killed"] + counts["survived"]
        counts["score"] = round(counts["killed"] / judged, 4) if judged else None
        # The same with every equivalent counted as a survivor: the score before any judgement.
        everything = judged + counts["equivalent"]
        counts["score_counting_equivalents_as_survivors"] = round(counts["killed"] / everything, 4) if everything else None
        report["modules"][module] = counts
        for k in totals:
            totals[k] += counts[k]
    judged = totals["killed"] + totals["survived"]
    totals["score"] = round(totals["killed"] / judged, 4) if judged else None
    everything = judged + totals["equivalent"]
    totals["score_counting_equivalents_as_survivors"] = round(totals["killed"] / everything, 4) if everything else None
    report["total"] = totals
    report["goal"] = ">= 0.85 of non-equivalent, in-scope mutants killed"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    for m, c in report["modules"].items():
        print(f"{m}: killed {c['killed']}, survived {c['survived']}, equivalent {c['equivalent']}, "
              f"out of scope {c['out_of_scope']}, score {c['score']}")
    print(f"total: score {totals['score']} ({totals['killed']} of {judged} non-equivalent; "
          f"{totals['score_counting_equivalents_as_survivors']} counting the equivalents as survivors); written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
