"""Batched decoding as a divergence source: the side setting ``batch = N``.

A side with ``batch = N`` decodes every prompt as one row of a left-padded batch of N prompts of the
same file (as ``qwen_tts`` and faster-qwen3-tts pad a batch), and each row is compared against the
other side's batch-1 trace as usual (teacher-forced on its own reference codes). Batching changes
the numerics through the padded prefill (masked positions, shifted rows) and batched GEMMs, so a
row's result can depend on what it was batched with.

Arrangements: prompts in file order are cut into consecutive batches of N; the last batch is
filled up with prompts from the start of the file (their rows are dropped), so every row sits in a
batch of exactly N. To tell whether a row's result is a function of its batch-mates, each row is
run teacher-forced a second time in another arrangement (the list rotated by N // 2 + 1 and each
batch reversed): its position changes and, when the file has more than N prompts, so do its mates
and its padding. A row that is bit-identical in both does not depend on its batch-mates.
"""

from __future__ import annotations

import math
from typing import Any

from parity.errors import BadInput
from parity.prompts import Prompt
from parity.recipe import Decoding
from parity.trace import Trace

MAX_BATCH = 64


def arrangement(n_prompts: int, size: int, second: bool = False) -> list[tuple[list[int], int]]:
    """Batches of prompt indices, each exactly ``size`` rows, with the number of real rows (the
    rest are fillers taken from the start of the order). ``second``: the other arrangement (the
    order rotated by size // 2 + 1, each batch's real rows reversed)."""
    order = list(range(n_prompts))
    if second and n_prompts:
        shift = (size // 2 + 1) % n_prompts
        order = order[shift:] + order[:shift]
    batches = []
    for start in range(0, n_prompts, size):
        real = order[start:start + size]
        fill = [order[k % n_prompts] for k in range(size - len(real))]
        batches.append(((real[::-1] if second else real) + fill, len(real)))
    return batches


def run_batched(engine: Any, prompts: list[Prompt], decoding: Decoding, size: int, forces: dict[str, Trace] | None = None,
                record: bool = True, second: bool = False) -> dict[str, Trace]:
    """Run every prompt as a row of a batch of ``size`` (teacher-forced on ``forces[id]`` when
    given); returns each prompt's row trace. ``meta['batch']`` of each says where the row sat."""
    if not hasattr(engine, "run_batch"):
        raise BadInput(f"the {engine.name} engine decodes one prompt at a time; batch = {size} needs an engine that decodes "
                       "batches (reference, faster-qwen3-tts-batch)")
    out: dict[str, Trace] = {}
    for k, (batch, n_real) in enumerate(arrangement(len(prompts), size, second)):
        rows = [prompts[i] for i in batch]
        traces = engine.run_batch(rows, decoding, [forces[p.id] for p in rows] if forces else None, record)
        for p, trace in zip(rows[:n_real], traces[:n_real]):
            if "batch" in trace.meta:
                trace.meta["batch"].update(index=k, arrangement="second" if second else "first", fillers=size - n_real)
            out[p.id] = trace
    return out


def _max_rel_l2(a: Trace, b: Trace) -> float | None:
    """Largest relative L2 error between two recorded traces of the same row (None if unrecorded)."""
    from parity import compare

    if a.talker_hidden.numel() == 0 or b.talker_hidden.numel() == 0:
        return None
    points = compare.point_frame(a, b, 1.0)
    return float(points["rel_l2"].max()) if len(points) else None


def prefill_rel_l2(cand: Trace, ref: Trace) -> float | None:
    """Largest relative L2 error over the talker's layers at the prefill (step 0)."""
    if cand.talker_hidden.numel() == 0 or ref.talker_hidden.numel() == 0:
        return None
    a, b = cand.talker_hidden[0].double(), ref.talker_hidden[0].double()
    norms = b.norm(dim=-1).clamp_min(1e-30)
    return float(((a - b).norm(dim=-1) / norms).max())


def row_report(forced: Trace, ref: Trace, other: Trace | None, comparison: dict) -> dict | None:
    """Where one prompt's row sat, how far it is from the batch-1 reference at the prefill, whether
    its divergence enters there, and whether it changed when decoded among other batch-mates."""
    info = forced.meta.get("batch")
    if not info:
        return None
    first = comparison.get("first_divergence")
    report = {
        "size": info["size"], "row": info["row"], "pad": info["pad"], "padded_len": info["padded_len"],
        "prefill_len": forced.meta.get("prefill_len"),
        "mates": [m for m in info["mates"] if m != forced.meta.get("prompt_id")],
        "prefill_rel_l2": prefill_rel_l2(forced, ref),
        "max_rel_l2": comparison.get("max_rel_l2"),
        "first_divergence_step": None if first is None else first.get("step"),
        "enters_at_prefill": None if first is None else (first.get("component") == "talker" and first.get("step") == 0),
    }
    if other is not None and other.meta.get("batch"):
        o = other.meta["batch"]
        diff = _max_rel_l2(other, forced)
        same = diff == 0.0 and bool((other.talker_tokens == forced.talker_tokens).all()) if diff is not None else None
        report["other_arrangement"] = {
            "row": o["row"], "pad": o["pad"], "mates": [m for m in o["mates"] if m != forced.meta.get("prompt_id")],
            "max_rel_l2_vs_first": diff, "identical": same,
        }
        report["depends_on_mates"] = None if same is None else not same
    return report


def _pearson(xs: list[float], ys: list[float]) -> float | None:
    n = len(xs)
    if n < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy)


def summarize_rows(results: list[dict]) -> dict | None:
    """The run-level answer over every row: how many rows depend on their batch-mates, how many
    diverge from the prefill on, and the prefill error next to each row's padding."""
    rows = [(r["id"], r.get("batch") or (r.get("comparison") or {}).get("batch")) for r in results if r.get("status") == "ok"]
    rows = [(pid, b) for pid, b in rows if b]
    if not rows:
        return None
    table = [{"prompt": pid, "row": b["row"], "pad": b["pad"], "prefill_len": b["prefill_len"],
              "prefill_rel_l2": b["prefill_rel_l2"], "max_rel_l2": b.get("max_rel_l2"),
              "first_divergence_step": b["first_divergence_step"],
              "enters_at_prefill": b["enters_at_prefill"], "depends_on_mates": b.get("depends_on_mates"),
              "other_pad": (b.get("other_arrangement") or {}).get("pad"),
              "other_row": (b.get("other_arrangement") or {}).get("row"),
              "vs_other_rel_l2": (b.get("other_arrangement") or {}).get("max_rel_l2_vs_first")} for pid, b in rows]
    depends = [t for t in table if t["depends_on_mates"]]
    known = [t for t in table if t["depends_on_mates"] is not None]
    at_prefill = [t for t in table if t["enters_at_prefill"]]
    diverged = [t for t in table if t["first_divergence_step"] is not None]
    pairs = [(t["pad"], t["prefill_rel_l2"]) for t in table if t["prefill_rel_l2"] is not None]
    corr = _pearson([float(p) for p, _ in pairs], [float(e) for _, e in pairs])
    size = rows[0][1]["size"]
    verdict = [f"batch of {size}: {len(depends)} of {len(known)} rows changed when decoded among other batch-mates or at another position"]
    # Which change made the difference: rows whose padding changed vs rows that only moved.
    repadded = [t for t in known if t["other_pad"] != t["pad"]]
    moved = [t for t in known if t["other_pad"] == t["pad"]]
    if repadded:
        verdict.append(f"{sum(bool(t['depends_on_mates']) for t in repadded)} of {len(repadded)} rows whose padding changed "
                       "changed (" + ", ".join(f"{t['prompt']} pad {t['pad']}->{t['other_pad']}" for t in repadded) + ")")
    if moved:
        verdict.append(f"{sum(bool(t['depends_on_mates']) for t in moved)} of {len(moved)} rows with the same padding at another "
                       "position or among other mates changed")
    verdict.append(f"{len(diverged)} of {len(table)} rows diverge from the batch-1 reference"
                   + (f", {len(at_prefill)} of them from the prefill on" if diverged else ""))
    if corr is not None:
        verdict.append(f"prefill error vs padding length: Pearson r = {corr:.2f} over {len(pairs)} rows")
    return {"size": size, "rows": table, "rows_depending_on_mates": len(depends), "rows_checked": len(known),
            "rows_diverging": len(diverged), "rows_entering_at_prefill": len(at_prefill),
            "pad_prefill_correlation": corr, "verdict": "; ".join(verdict)}
