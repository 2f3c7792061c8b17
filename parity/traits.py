"""Engine traits: the named ways an engine's fast path computes differently from the reference.

An engine declares its traits (``Engine.traits``, a list of :class:`Trait`). Each trait can be
*applied to the reference* (the reference engine computes that one thing the fast engine's way:
"reference + trait"), *removed from the candidate* (the fast engine computes that one thing the
reference's way: "candidate - trait"), or both, as the engine's code allows. A side names them in
its ``traits`` list::

    [reference]
    traits = ["faster.decode_mask"]        # reference + the faster engine's decode mask
    [candidate]
    engine = "faster"
    traits = ["-faster.sampler"]           # faster-qwen3-tts with the reference's sampler

A trait realised by a side setting (``field``, e.g. the faster engine's static cache is the
``cache`` setting) is written as that setting instead. Applying and removing undo exactly
(:class:`parity.variants.Applied`), so a loaded engine changes its traits in place.

``parity bisect`` replaces the opaque ``engine`` factor with these traits (``parity.bisect``);
``parity traits RECIPE`` lists them.
"""

from __future__ import annotations

from dataclasses import dataclass, field as dataclass_field, replace
from typing import TYPE_CHECKING, Callable

from parity.errors import BadInput

if TYPE_CHECKING:
    from parity.recipe import Side
    from parity.variants import Applied

# The opaque rest of an engine that its traits do not describe (a bisect factor).
ENGINE_REST = "engine"


@dataclass(frozen=True)
class Trait:
    """One way an engine computes differently from the reference.

    ``apply(reference_engine, applied)`` makes a reference-family engine compute this the owner
    engine's way (None: cannot be applied). ``removable``: the owner engine can compute this the
    reference's way (it implements the removal of a set of its traits in ``remove_traits``).
    ``field``: realised by this side setting (the reference gets the candidate's value, the
    candidate the reference's), not by the ``traits`` list. ``requires``: traits a configuration
    that has this one must also have (e.g. a CUDA graph captured around the engine's own mask).
    ``active(reference, candidate)`` returns None when the trait is a real difference between the
    two sides, else why it is not (e.g. CUDA graphs on a CPU)."""

    engine: str
    name: str
    summary: str
    apply: Callable[[object, "Applied"], None] | None = None
    removable: bool = True
    field: str | None = None
    requires: tuple[str, ...] = ()
    active: Callable[["Side", "Side"], str | None] = dataclass_field(default=lambda ref, cand: None, compare=False)

    @property
    def qualified(self) -> str:
        """``engine.name``, the trait's name everywhere outside its engine."""
        return f"{self.engine}.{self.name}"

    @property
    def directions(self) -> list[str]:
        """'reference + trait' and/or 'candidate - trait'."""
        out = []
        if self.apply is not None or self.field:
            out.append("reference + trait")
        if self.removable or self.field:
            out.append("candidate - trait")
        return out


def engine_traits(engine: str) -> list[Trait]:
    """The traits engine ``engine`` declares (imports its class through the registry)."""
    from parity.engines.registry import engine_class

    return list(getattr(engine_class(engine), "traits", None) or [])


def find(qualified: str) -> Trait:
    """The trait called ``engine.name``, or BadInput naming the ones that engine declares."""
    engine, dot, name = qualified.partition(".")
    if not dot or not engine or not name:
        raise BadInput(f"trait '{qualified}' is not ENGINE.NAME (e.g. faster.decode_mask); `parity traits RECIPE` lists them")
    from parity.engines.registry import check_name

    check_name(engine, f"trait '{qualified}'")
    traits = {t.name: t for t in engine_traits(engine)}
    if name not in traits:
        declared = ", ".join(t.qualified for t in traits.values()) or "none"
        raise BadInput(f"the {engine} engine declares no trait '{name}'; it declares: {declared}")
    return traits[name]


@dataclass(frozen=True)
class TraitUse:
    """One entry of a side's ``traits`` list: a trait applied (``+``, the default) or removed (``-``)."""

    trait: Trait
    removed: bool

    def __str__(self) -> str:
        return ("-" if self.removed else "") + self.trait.qualified


def parse(text: str) -> TraitUse:
    """``[+|-]engine.name`` -> a TraitUse (the trait must exist)."""
    text = text.strip()
    removed = text.startswith("-")
    return TraitUse(find(text.lstrip("+-")), removed)


def check_side(side: "Side", where: str) -> tuple[str, ...]:
    """Validate a side's ``traits`` list against its engine; returns it in canonical form.
    A side removes only its own engine's traits and applies only other engines' traits, and only
    in the directions those traits support."""
    from parity.engines.registry import variant_family

    out: list[str] = []
    for text in side.traits:
        try:
            use = parse(text)
        except BadInput as e:
            raise BadInput(f"{where}: {e}") from None
        t = use.trait
        if t.field:
            raise BadInput(f"{where}: trait '{t.qualified}' is the '{t.field}' setting; set {t.field} on this side instead")
        if use.removed:
            if t.engine != side.engine:
                raise BadInput(f"{where}: '-{t.qualified}' removes a trait of the {t.engine} engine, but this side runs "
                               f"the {side.engine} engine; remove it from a {t.engine} side, or apply it here without '-'")
            if not t.removable:
                raise BadInput(f"{where}: the {t.engine} engine cannot run without its trait '{t.name}' (directions: "
                               f"{', '.join(t.directions)})")
        else:
            if t.engine == side.engine:
                raise BadInput(f"{where}: '{t.qualified}' is already part of the {side.engine} engine; write '-{t.qualified}' to remove it")
            if t.apply is None:
                raise BadInput(f"{where}: trait '{t.qualified}' cannot be applied to another engine (directions: "
                               f"{', '.join(t.directions)}); remove it from the {t.engine} side instead")
            if variant_family(side.engine) != "reference":
                raise BadInput(f"{where}: trait '{t.qualified}' applies to an engine that drives a qwen_tts talker like "
                               f"the reference does; the {side.engine} engine does not")
        key = str(use)
        if key in out or key.lstrip("-") in (o.lstrip("-") for o in out):
            raise BadInput(f"{where}: trait '{t.qualified}' is given twice")
        out.append(key)
    return tuple(out)


def apply_side_traits(engine, side: "Side", applied: "Applied | None" = None) -> "Applied":
    """Apply the ``+`` entries of ``side.traits`` to a loaded reference-family engine; undo with
    ``.undo()``. (Removals are the owner engine's business: its ``remove_traits``.)"""
    from parity.variants import Applied

    applied = applied or Applied()
    try:
        for text in side.traits:
            use = parse(text)
            if not use.removed:
                use.trait.apply(engine, applied)
    except BaseException:
        applied.undo()
        raise
    return applied


def removed_traits(side: "Side") -> set[str]:
    """Short names of the traits a side removes from its own engine (``-engine.name`` entries)."""
    out = set()
    for text in side.traits:
        engine, _, name = text.lstrip("-").partition(".")
        if text.startswith("-") and engine == side.engine:
            out.add(name)
    return out


# -- between two sides (bisect, the listing) ------------------------------------------------

@dataclass
class TraitSet:
    """The candidate engine's traits as they stand between a reference and a candidate side."""

    engine: str
    active: list[Trait]
    inactive: dict[str, str]  # qualified name -> why it is not a difference here


def between(reference: "Side", candidate: "Side") -> TraitSet | None:
    """The candidate engine's traits when the two sides run different engines and the candidate's
    engine declares any; else None. A trait is inactive when it is no difference between these two
    sides (its ``active`` says why), or when either side already names it in ``traits``."""
    if reference.engine == candidate.engine:
        return None
    traits = engine_traits(candidate.engine)
    if not traits:
        return None
    named = {t.lstrip("+-") for t in reference.traits + candidate.traits}
    active, inactive = [], {}
    for t in traits:
        why = t.active(reference, candidate)
        if why is None and t.field and getattr(reference, t.field) == getattr(candidate, t.field):
            why = f"both sides have {t.field} = {getattr(candidate, t.field)}"
        if why is None and t.qualified in named:
            why = "named in a side's traits list (held as the recipe sets it)"
        if why is None:
            active.append(t)
        else:
            inactive[t.qualified] = why
    return TraitSet(candidate.engine, active, inactive)


def closure(names: set[str], traits: list[Trait]) -> set[str]:
    """``names`` (qualified trait names and possibly ENGINE_REST) with everything they require:
    each trait's ``requires``; a trait that cannot be applied to the reference requires the
    candidate engine itself (ENGINE_REST); and the candidate engine requires every trait it cannot
    run without. Requirements on traits that are not active are ignored."""
    by_name = {t.qualified: t for t in traits}
    out = set(names)
    while True:
        more = set()
        for n in out:
            t = by_name.get(n)
            if t is None:
                continue
            more |= {f"{t.engine}.{r}" for r in t.requires if f"{t.engine}.{r}" in by_name}
            if t.apply is None and not t.field:
                more.add(ENGINE_REST)
        if ENGINE_REST in out:
            more |= {t.qualified for t in traits if not (t.removable or t.field)}
        if more <= out:
            return out
        out |= more


def realize(reference: "Side", candidate: "Side", on: set[str], traits: list[Trait]) -> "Side":
    """The side that computes the configuration where exactly the traits in ``on`` (qualified
    names; closed under :func:`closure`) are the candidate engine's: the candidate engine with
    every other trait removed when ENGINE_REST is in ``on``, else the reference engine with the
    ``on`` traits applied. Field traits set their field either way. Other side fields are the
    reference's; the caller switches them."""
    base = candidate if ENGINE_REST in on else reference
    side = replace(reference, engine=base.engine, traits=tuple(reference.traits) if base is reference else tuple(candidate.traits))
    entries = list(side.traits)
    for t in traits:
        has = t.qualified in on
        if t.field:
            side = replace(side, **{t.field: getattr(candidate if has else reference, t.field)})
        elif ENGINE_REST in on and not has:
            entries.append(f"-{t.qualified}")
        elif ENGINE_REST not in on and has:
            entries.append(t.qualified)
    return replace(side, traits=tuple(entries))


def listing(reference: "Side", candidate: "Side") -> list[dict]:
    """Every trait of both sides' engines, for ``parity traits``: name, engine, summary, the
    directions it supports, what it requires, and whether it is a difference between these sides."""
    rows = []
    pair = between(reference, candidate)
    seen = set()
    for engine in dict.fromkeys((candidate.engine, reference.engine)):
        for t in engine_traits(engine):
            if t.qualified in seen:
                continue
            seen.add(t.qualified)
            state = "not a difference (same engine on both sides)"
            if pair is not None and t.engine == pair.engine:
                state = "active" if t in pair.active else f"inactive: {pair.inactive.get(t.qualified, '')}"
            rows.append({
                "trait": t.qualified, "summary": t.summary, "directions": t.directions,
                "realised_by": f"the '{t.field}' setting" if t.field else "the side's traits list",
                "requires": [f"{t.engine}.{r}" for r in t.requires] + ([ENGINE_REST] if t.apply is None and not t.field else []),
                "state": state,
            })
    return rows
