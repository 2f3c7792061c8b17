"""The run at a glance: where the sides part, why, and whether it matters.

Pure functions over the run's :class:`~parity.results.Summary` record (and a bisect result, when
there is one); the HTML report's first screen and the console's closing lines both print what
these return, so the two always say the same thing.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field

from parity.results import BisectOutcome, Flip, Point, PromptResult, Summary

LOW_AGREEMENT = 0.5  # free-running token agreement under this is flagged next to a "pass"

SCORERS = {  # what each MOS scorer is, in words, for the "does it matter" line
    "dnsmos": "DNSMOS (Microsoft's P.835 model via speechmos; OVRL, 1-5)",
    "utmos": "UTMOS22-strong (1-5)",
}


def short_where(point: Point | Flip | None) -> str:
    """A short stable label for a compared point or a flip: 'talk s1 L0', 'talk s0 emb',
    'pred f0.s10 L1' (a flip has no point: 'pred f0.s10')."""
    if point is None:
        return "-"
    name = getattr(point, "point", "")
    tag = {"embed": "emb"}.get(name, name)
    if name.startswith("layer") and name[5:].isdigit():
        tag = "L" + name[5:]
    at = f"talk s{point.step}" if point.component == "talker" else f"pred f{point.step}.s{point.substep}"
    return f"{at} {tag}".rstrip()


def hints_of(prompt: PromptResult) -> list[dict]:
    """A prompt's hints (dicts with ``text``, ``class`` and ``evidence``); plain strings are wrapped."""
    raw = prompt.comparison.hints if prompt.comparison is not None else []
    return [h if isinstance(h, dict) else {"text": str(h)} for h in raw or [] if (h.get("text") if isinstance(h, dict) else h)]


def flip_label(flip: Flip) -> str:
    """'tie', 'real' or 'sampler': how a teacher-forced flip was judged."""
    return str(flip.label or ("tie" if flip.near_tie else "real"))


def mos_scorer(mos: dict | None) -> str | None:
    """'DNSMOS (...)' for a prompt's MOS entry, or None."""
    if not isinstance(mos, dict) or not mos.get("scorer"):
        return None
    return SCORERS.get(str(mos["scorer"]), str(mos["scorer"]))


@dataclass
class Overview:
    """What the first screen says. Every list holds ready-to-print sentences."""

    ran: int = 0
    total: int = 0
    where: list[tuple[str, int]] = field(default_factory=list)  # (place, prompts), most common first
    where_short: list[tuple[str, int]] = field(default_factory=list)
    within: int = 0  # prompts with no point over tolerance
    why: str | None = None
    why_evidence: list[str] = field(default_factory=list)
    why_source: str = ""  # "bisect", "hint" or ""
    flips: str | None = None
    agreement: str | None = None
    low_agreement: list[str] = field(default_factory=list)  # ids that pass with agreement under LOW_AGREEMENT
    audible: str | None = None
    audible_short: str | None = None
    mos: str | None = None
    mos_short: str | None = None
    warnings: list[str] = field(default_factory=list)
    warnings_short: list[str] = field(default_factory=list)


def _pct(v: float) -> str:
    return f"{v:.1%}"


def bisect_why(bisect: dict) -> tuple[str, list[str]]:
    """The bisect verdict (of ``parity bisect``'s result) and the runs that prove it."""
    evidence = []
    proof = bisect.get("proof") or {}
    if proof.get("culprits_alone"):
        alone = BisectOutcome.from_json(proof["culprits_alone"])
        evidence.append(f"the culprits alone on the reference: {alone.text()} (run {alone.run})")
    if proof.get("candidate_without_is_reference"):
        evidence.append("the candidate without them is the reference itself")
    elif proof.get("candidate_without"):
        without = BisectOutcome.from_json(proof["candidate_without"])
        evidence.append(f"the candidate without them: {without.text()} (run {without.run})")
    if proof.get("elsewhere"):
        evidence.append(proof["elsewhere"])
    for entry in bisect.get("layers") or []:
        evidence.append(f"{entry.get('factor')}: {entry.get('note')}")
    return f"bisect: {bisect.get('verdict', 'no verdict')}", evidence


def _leading_hint(ok: list[PromptResult]) -> tuple[str, list[str]] | None:
    """The hint class most prompts share, with one prompt's sentence and the count."""
    counted: Counter = Counter()
    example: dict[str, tuple[str, dict]] = {}
    for p in ok:
        seen = set()
        for h in hints_of(p):
            key = str(h.get("class") or h["text"])
            if key in seen:
                continue
            seen.add(key)
            counted[key] += 1
            example.setdefault(key, (p.id, h))
    if not counted:
        return None
    key, n = counted.most_common(1)[0]
    pid, h = example[key]
    evidence = h.get("evidence")
    measured = [f"{pid}'s evidence: " + ", ".join(f"{k.replace('_', ' ')} {_evidence(v)}" for k, v in evidence.items())] \
        if isinstance(evidence, dict) and evidence else []
    return f"{h['text']} ({n}/{len(ok)} prompts; the numbers are {pid}'s)", measured


def _evidence(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def overview(summary: Summary, bisect: dict | None = None) -> Overview:
    """Summarise a run across its prompts (see the module docstring)."""
    ok = [p for p in summary.prompts if p.ran and p.comparison is not None]
    o = Overview(ran=len(ok), total=len(summary.prompts))
    places: Counter = Counter()
    short: Counter = Counter()
    for p in ok:
        first = p.comparison.first_divergence
        if first is None:
            o.within += 1
        else:
            places[first.where()] += 1
            short[short_where(first)] += 1
    o.where = places.most_common()
    o.where_short = short.most_common()

    if bisect and bisect.get("verdict"):
        o.why, o.why_evidence = bisect_why(bisect)
        o.why_source = "bisect"
    elif (lead := _leading_hint(ok)) is not None:
        o.why, o.why_evidence = lead
        o.why_source = "hint"

    flips = [p.comparison.first_flip for p in ok if p.comparison.first_flip is not None]
    if flips:
        labels = Counter(flip_label(f) for f in flips)
        words = {"tie": "near-ties (the reference itself was nearly undecided)", "real": "real",
                 "sampler": "the sampler's doing (not what the reference's sampler picks from the same logits)"}
        o.flips = (f"{len(flips)}/{len(ok)} prompts have a teacher-forced token flip: "
                   + ", ".join(f"{n} {words.get(k, k)}" for k, n in labels.most_common()))

    agreements = [(p, p.comparison.free_run.agreement if p.comparison.free_run else None) for p in ok]
    values = [a for _, a in agreements if a is not None]
    if values:
        o.agreement = (f"free-running codes agree on {_pct(statistics.median(values))} of frames (median; "
                       f"range {_pct(min(values))}-{_pct(max(values))})")
        o.low_agreement = [p.id for p, a in agreements if a is not None and a < LOW_AGREEMENT and p.passed]

    heard = [p.audible_from_s for p in ok if p.audible_from_s is not None]
    threshold = next((p.audible_threshold_db for p in ok if p.audible_threshold_db is not None), None)
    with_audio = [p for p in ok if p.audio.get("reference") and p.audio.get("candidate")]
    if heard:
        o.audible_short = f"audible from {min(heard):.2f} s ({len(heard)}/{len(ok)} prompts)"
        o.audible = (f"audibly different on {len(heard)}/{len(ok)} prompts, from {min(heard):.2f} s at the earliest"
                     + (f" (first 80 ms segment over {threshold:g} dB log-mel distance)" if threshold is not None else ""))
    elif ok and not with_audio:
        o.audible = o.audible_short = "audible-from not measured: the run has no audio of both sides"
    elif ok:
        limit = f"{threshold:g} dB" if threshold is not None else "the threshold"
        o.audible_short = f"audible from: none (no 80 ms segment over {limit} log-mel)"
        o.audible = (f"audible-from is empty on every prompt: no 80 ms segment of the two sides' audio differs by more "
                     f"than {limit} of log-mel distance ([mos] audible_db), even where the codes differ")

    mos = [p.mos for p in ok if isinstance(p.mos, dict) and isinstance(p.mos.get("delta"), (int, float))]
    if mos:
        deltas = [m["delta"] for m in mos]
        worst = [m.get("worst_delta", m["delta"]) for m in mos]
        scorer = mos_scorer(mos[0]) or "MOS"
        metric = str(mos[0].get("metric") or "").upper()
        short_name = str(mos[0].get("scorer")).upper() if mos[0].get("scorer") else "MOS"
        o.mos_short = (f"ΔMOS {statistics.mean(deltas):+.3f} mean, worst {min(worst):+.3f} "
                       f"({short_name}{' ' + metric if metric else ''})")
        o.mos = (f"{scorer}{' ' + metric if metric and metric not in scorer else ''}: candidate - reference "
                 f"{statistics.mean(deltas):+.3f} mean over {len(deltas)} prompts, worst {min(worst):+.3f}")
    elif ok:
        o.mos = o.mos_short = "MOS not scored (--mos none or every clip failed)"

    model = str(summary.extra.get("model") or summary.recipe.get("model") or "")
    if model.startswith("random:"):
        o.warnings.append(f"model {model} has random weights: its audio is noise, so the audio lines and MOS mean "
                          "nothing; only the numerical comparison does")
        o.warnings_short.append(f"{model} has random weights: its audio and MOS mean nothing")
    return o
