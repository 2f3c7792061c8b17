"""The run at a glance: where the sides part, why, and whether it matters.

Pure functions over summary.json's content (and a bisect result, when there is one); the HTML
report's first screen and the console's closing lines both print what these return, so the two
always say the same thing.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field

from parity.gates import where

LOW_AGREEMENT = 0.5  # free-running token agreement under this is flagged next to a "pass"

SCORERS = {  # what each MOS scorer is, in words, for the "does it matter" line
    "dnsmos": "DNSMOS (Microsoft's P.835 model via speechmos; OVRL, 1-5)",
    "utmos": "UTMOS22-strong (1-5)",
}


def short_where(point: dict | None) -> str:
    """A short stable label for a compared point: 'talk s1 L0', 'talk s0 emb', 'pred f0.s10 L1'."""
    if not point:
        return "-"
    name = str(point.get("point", ""))
    tag = {"embed": "emb"}.get(name, name)
    if name.startswith("layer") and name[5:].isdigit():
        tag = "L" + name[5:]
    if point.get("component") == "talker":
        return f"talk s{point.get('step')} {tag}"
    return f"pred f{point.get('step')}.s{point.get('substep')} {tag}"


def hints_of(prompt: dict) -> list[dict]:
    """A prompt's hints as dicts with 'text' (and maybe 'evidence', 'signature'), wherever the
    summary keeps them (the prompt's own ``hints`` or its comparison's); plain strings are wrapped."""
    raw = prompt.get("hints")
    if raw is None:
        raw = (prompt.get("comparison") or {}).get("hints")
    out = []
    for h in raw or []:
        if isinstance(h, dict) and h.get("text"):
            out.append(h)
        elif isinstance(h, str) and h:
            out.append({"text": h})
    return out


def mos_scorer(mos: dict | None) -> str | None:
    """'DNSMOS (...) OVRL' for a prompt's MOS entry, or None."""
    if not isinstance(mos, dict) or not mos.get("scorer"):
        return None
    name = SCORERS.get(str(mos["scorer"]), str(mos["scorer"]))
    return name


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
    """The bisect verdict and the runs that prove it."""
    from parity.bisect import Outcome

    evidence = []
    proof = bisect.get("proof") or {}
    alone = proof.get("culprits_alone")
    if alone:
        evidence.append(f"the culprits alone on the reference: {Outcome(**alone).text()} (run {alone.get('run')})")
    if proof.get("candidate_without_is_reference"):
        evidence.append("the candidate without them is the reference itself")
    elif proof.get("candidate_without"):
        w = proof["candidate_without"]
        evidence.append(f"the candidate without them: {Outcome(**w).text()} (run {w.get('run')})")
    for entry in bisect.get("layers") or []:
        evidence.append(f"{entry.get('factor')}: {entry.get('note')}")
    return f"bisect: {bisect.get('verdict', 'no verdict')}", evidence


def overview(summary: dict, bisect: dict | None = None) -> Overview:
    """Summarise a run across its prompts (see the module docstring)."""
    prompts = summary.get("prompts") or []
    ok = [p for p in prompts if p.get("status") == "ok"]
    o = Overview(ran=len(ok), total=len(prompts))
    places: Counter = Counter()
    short: Counter = Counter()
    for p in ok:
        first = (p.get("comparison") or {}).get("first_divergence")
        if first is None:
            o.within += 1
        else:
            places[where(first)] += 1
            short[short_where(first)] += 1
    o.where = places.most_common()
    o.where_short = short.most_common()

    if bisect and bisect.get("verdict"):
        o.why, o.why_evidence = bisect_why(bisect)
        o.why_source = "bisect"
    else:
        counted: Counter = Counter()
        example: dict[str, dict] = {}
        for p in ok:
            for h in hints_of(p):
                key = str(h.get("signature") or h["text"])
                counted[key] += 1
                example.setdefault(key, h)
        if counted:
            key, n = counted.most_common(1)[0]
            h = example[key]
            o.why = f"{h['text']} ({n}/{len(ok)} prompts)"
            o.why_evidence = [str(h["evidence"])] if h.get("evidence") else []
            o.why_source = "hint"

    flips = [(p.get("comparison") or {}).get("first_flip") for p in ok]
    flips = [f for f in flips if f]
    if flips:
        labels = Counter(f.get("label") or ("tie" if f.get("near_tie") else "real") for f in flips)
        words = {"tie": "near-ties (the reference itself was nearly undecided)", "real": "real",
                 "sampler": "the sampler's doing (not what the reference's sampler picks from the same logits)"}
        o.flips = (f"{len(flips)}/{len(ok)} prompts have a teacher-forced token flip: "
                   + ", ".join(f"{n} {words.get(k, k)}" for k, n in labels.most_common()))

    agreements = [(p["id"], (p.get("comparison") or {}).get("free_run", {}).get("agreement")) for p in ok]
    values = [a for _, a in agreements if isinstance(a, (int, float))]
    if values:
        o.agreement = (f"free-running codes agree on {_pct(statistics.median(values))} of frames (median; "
                       f"range {_pct(min(values))}-{_pct(max(values))})")
        o.low_agreement = [pid for (pid, a), p in zip(agreements, ok)
                           if isinstance(a, (int, float)) and a < LOW_AGREEMENT and p.get("passed")]

    audible = [p.get("audible_from_s") for p in ok]
    heard = [a for a in audible if isinstance(a, (int, float))]
    threshold = next((p.get("audible_threshold_db") for p in ok if p.get("audible_threshold_db") is not None), None)
    with_audio = [p for p in ok if (p.get("audio") or {}).get("reference") and (p.get("audio") or {}).get("candidate")]
    if heard:
        o.audible_short = f"audible from {min(heard):.2f} s ({len(heard)}/{len(ok)} prompts)"
        o.audible = (f"audibly different on {len(heard)}/{len(ok)} prompts, from {min(heard):.2f} s at the earliest "
                     f"(first 80 ms segment over {threshold:g} dB log-mel distance)" if threshold is not None else
                     f"audibly different on {len(heard)}/{len(ok)} prompts, from {min(heard):.2f} s at the earliest")
    elif ok and not with_audio:
        o.audible = o.audible_short = "audible-from not measured: the run has no audio of both sides"
    elif ok:
        limit = f"{threshold:g} dB" if threshold is not None else "the threshold"
        o.audible_short = f"audible from: none (no 80 ms segment over {limit} log-mel)"
        o.audible = (f"audible-from is empty on every prompt: no 80 ms segment of the two sides' audio differs by more "
                     f"than {limit} of log-mel distance ([mos] audible_db), even where the codes differ")

    mos = [p.get("mos") for p in ok if isinstance(p.get("mos"), dict)]
    deltas = [m["delta"] for m in mos if isinstance(m.get("delta"), (int, float))]
    if deltas:
        scorer = mos_scorer(mos[0]) or "MOS"
        metric = str(mos[0].get("metric") or "").upper()
        worst = [m.get("worst_delta", m["delta"]) for m in mos if isinstance(m.get("delta"), (int, float))]
        short_name = str(mos[0].get("scorer")).upper() if mos[0].get("scorer") else "MOS"
        o.mos_short = (f"ΔMOS {statistics.mean(deltas):+.3f} mean, worst {min(worst):+.3f} "
                       f"({short_name}{' ' + metric if metric else ''})")
        o.mos = (f"{scorer}{' ' + metric if metric and metric not in scorer else ''}: candidate - reference "
                 f"{statistics.mean(deltas):+.3f} mean over {len(deltas)} prompts, worst {min(worst):+.3f}")
    elif ok:
        o.mos = o.mos_short = "MOS not scored (--mos none or every clip failed)"

    model = str(summary.get("model") or (summary.get("recipe") or {}).get("model") or "")
    if model.startswith("random:"):
        o.warnings.append(f"model {model} has random weights: its audio is noise, so the audio lines and MOS mean "
                          "nothing; only the numerical comparison does")
        o.warnings_short.append(f"{model} has random weights: its audio and MOS mean nothing")
    return o
