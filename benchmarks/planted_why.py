"""The planted "why" suite as a table: for each planted divergence on the tiny model (a hook on
the candidate side of an otherwise identical fp32 pair; cases in tests/planted.py), is the first
divergence at the planted point (localisation), is the first hint of the right class with the
required others present and the excluded ones absent (hint), and is the first teacher-forced
flip labelled right (flip label)? Writes reports/planted_why.json and prints the table.

    python benchmarks/planted_why.py [--only NAME,...]

CPU only, about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated case names")
    ap.add_argument("--out", default=str(ROOT / "reports" / "planted_why.json"))
    args = ap.parse_args()

    import planted
    from parity.engines.reference import ReferenceEngine
    from parity.models import ensure_builtin
    from parity.prompts import Prompt
    from parity.recipe import Side
    from parity.strictjson import dumps

    only = {n for n in args.only.split(",") if n}
    cases = [c for c in planted.CASES if not only or c.name in only]
    engine = ReferenceEngine(Side(dtype="float32", attention="sdpa", device="cpu"), ensure_builtin("tiny"))
    engine.load()
    prompt = Prompt(id="p0", text="Hello world, this is a test.", speaker="vivian", language="english", line=1)
    cache: dict = {}
    rows = []
    t0 = time.perf_counter()
    for case in cases:
        out = planted.run_case(engine, prompt, case, cache)
        row = planted.judge(case, out)
        row["what"] = case.what
        row["hints"] = [h["text"] for h in out["comparison"]["hints"]]
        rows.append(row)
        mark = lambda ok: "ok" if ok else "WRONG"  # noqa: E731
        print(f"{case.name:28s} loc {mark(row['localisation']):5s} hint {mark(row['hint']):5s} flip {mark(row['flip']):5s} "
              f"gates {mark(row['gates']):5s} {row['got']['classes']}", flush=True)
    totals = {k: sum(int(r[k]) for r in rows) for k in ("localisation", "hint", "flip", "gates", "flip_old_rule")}
    report = {"cases": len(rows), "right": totals, "seconds": round(time.perf_counter() - t0, 1),
              "model": "random:tiny (fp32, sdpa, CPU)", "tolerance": planted.TOL, "frames": planted.FRAMES, "rows": rows}
    if not only:
        Path(args.out).write_text(dumps(report, indent=1) + "\n")
    print()
    print("| what | right / total |")
    print("|---|---|")
    for k in ("localisation", "hint", "flip", "gates", "flip_old_rule"):
        label = {"flip": "flip label", "gates": "gates (verdict)",
                 "flip_old_rule": "flip label by the old rule (3x the divergence's own logit noise)"}.get(k, k)
        print(f"| {label} | {totals[k]} / {len(rows)} |")
    return 0 if all(totals[k] == len(rows) for k in totals if k != "flip_old_rule") else 1


if __name__ == "__main__":
    raise SystemExit(main())
