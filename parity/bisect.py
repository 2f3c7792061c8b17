"""``parity bisect``: which settings (and which layers) make the candidate diverge, with proof.

The reference and the candidate differ in a set of *settings*: the side fields that differ
(``dtype``, ``attention``, ``cache``, ``tf32``, ...) and the variants only one side has. A
*configuration* is the reference with a subset S of those settings switched to the candidate's
value; it *diverges* when, run teacher-forced for K frames on the reference's codes, some point
is over the recipe's tolerance (``first_divergence``, NaN/inf included). The reference trace is
computed once; models are loaded once per distinct load-time setting (engine, dtype, device) and
every other setting is changed on the loaded model (``engine.reconfigure``).

Runs, in order (n settings; every configuration is run at most once unless it is a proof run):

1. the whole candidate (if it does not diverge there is nothing to explain);
2. each setting applied alone to the reference (n runs);
3. the culprit search: delta debugging (Zeller's ddmin) for a 1-minimal diverging subset, answered
   from step 2 when one setting alone diverges; repeated on what is left while the candidate
   without the culprits found so far still diverges, so independent culprits are all found;
4. the proof, both *run*, not inferred: the candidate without the culprits (run when the search
   ends, it is what ends it) must be within tolerance, and the culprits alone, re-run, must diverge;
5. each setting removed alone from the candidate (n runs, minus those already run);
6. per-layer bisect for culprits that can be restricted to layers: apply the culprit to the
   first k decoder layers (talker, then predictor) and binary-search the smallest k that
   diverges: the first layer where it matters.

With one culprit among n settings that is 1 + n + 2 + (n - 1) = 2n + 2 runs (18 for 8 settings),
plus 1 + ceil(log2 L) for the layer bisect over L layers.

**Engine traits.** When the two sides run different engines and the candidate's engine declares
traits (``parity.traits``), the opaque ``engine`` setting is split: each active trait is a setting
of its own, and ``engine`` stays as one more setting that stands for the rest of the candidate
engine (what its traits do not describe). A configuration with ``engine`` is the candidate engine
with the traits it lacks removed; without ``engine`` it is the reference engine with its traits
applied. Configurations are closed under what traits require (a CUDA graph needs the engine and
the cache and mask it was captured around), so every one can be run. ``engine`` is a culprit only
when no combination of traits reproduces the divergence; the result then says what stays
unexplained (``unexplained``), with the run of the candidate engine stripped of every trait.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable

from parity import traits as engine_traits
from parity.errors import BadInput
from parity.recipe import Recipe, Side
from parity.results import BisectOutcome, BisectTrait

FIELDS = ("engine", "dtype", "device", "attention", "cache", "tf32", "batch")
ENGINE = engine_traits.ENGINE_REST  # with traits: the rest of the candidate engine
LOAD_FIELDS = ("engine", "dtype", "device")  # need a freshly loaded model; the rest change in place


# -- settings ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Factor:
    """One setting in which the candidate differs from the reference."""

    name: str  # a side field ("dtype") or a canonical variant spec ("rmsnorm_lowp@talker")
    kind: str  # "field", "variant" (the candidate adds it) or "variant_removed" (only the reference has it)
    reference: Any
    candidate: Any
    load_time: bool
    per_layer: bool = False

    def describe(self) -> str:
        if self.kind == "field":
            return f"{self.name}: {self.reference} -> {self.candidate}"
        if self.kind == "engine":
            return f"engine: {self.reference} -> {self.candidate} (the rest: what its traits do not describe)"
        if self.kind == "trait":
            return f"trait {self.name}"
        return f"+{self.name}" if self.kind == "variant" else f"-{self.name} (reference's)"


def find_factors(ref: Side, cand: Side, only: Iterable[str] | None = None) -> tuple[list[Factor], list[Factor]]:
    """The settings that differ, in a stable order (fields, then variants), restricted to ``only``
    when given (names: side fields or variant specs; a variant the candidate lacks is added to it).
    Returns (factors to bisect, differences held at the reference's value)."""
    from parity.variants import get_variant, parse

    diffs = [
        Factor(f, "field", getattr(ref, f), getattr(cand, f), f in LOAD_FIELDS)
        for f in FIELDS if getattr(ref, f) != getattr(cand, f)
    ]
    pair = engine_traits.between(ref, cand)
    aliases: dict[str, str] = {}  # a side field a trait stands for -> that trait
    if pair is not None:
        diffs = _split_engine(diffs, pair)
        aliases = {t.field: t.qualified for t in pair.active if t.field}
    for v in cand.variants:
        if v not in ref.variants:
            diffs.append(Factor(v, "variant", False, True, False, _per_layer(v)))
    for v in ref.variants:
        if v not in cand.variants:
            diffs.append(Factor(v, "variant_removed", True, False, False))
    if only is None:
        return diffs, []
    by_name = {f.name: f for f in diffs}
    chosen: list[Factor] = []
    engine_part = [f for f in diffs if f.kind in ("engine", "trait")]
    for name in only:
        if engine_part and (name == "engine" or name in aliases or by_name.get(name) in engine_part):
            chosen += [f for f in engine_part if f not in chosen]  # the engine is searched as its traits
            continue
        if name in FIELDS:
            if name not in by_name:
                raise BadInput(f"--factors: '{name}' is the same on both sides ({getattr(ref, name)}); "
                               f"settings that differ: {', '.join(by_name) or 'none'}")
            factor = by_name[name]
        elif name in by_name:
            factor = by_name[name]
        else:
            spec = str(parse(name, cand.engine))  # BadInput for unknown variants
            factor = by_name.get(spec) or Factor(spec, "variant", False, True, False, get_variant(parse(spec).name).per_layer)
        if factor not in chosen:
            chosen.append(factor)
    held = [f for f in diffs if f not in chosen]
    return chosen, held


def _split_engine(diffs: list[Factor], pair: "engine_traits.TraitSet") -> list[Factor]:
    """The ``engine`` field replaced by the candidate engine's active traits plus ``engine`` (the
    rest); a trait realised by a side field (the faster engine's ``cache``) takes that field's place."""
    engine = next(f for f in diffs if f.name == "engine")
    fields_taken = {t.field for t in pair.active if t.field}
    out = [Factor("engine", "engine", engine.reference, engine.candidate, True)]
    for t in pair.active:
        field_factor = next((f for f in diffs if t.field and f.name == t.field), None)
        out.append(Factor(t.qualified, "trait", False, True, field_factor.load_time if field_factor else False))
    return out + [f for f in diffs if f.name != "engine" and f.name not in fields_taken]


class TraitSpace:
    """How configurations over the candidate engine's traits are closed and built (one bisect)."""

    def __init__(self, reference: Side, candidate: Side, pair: "engine_traits.TraitSet"):
        self.reference, self.candidate, self.pair = reference, candidate, pair

    def close(self, names: set[str]) -> set[str]:
        """``names`` with everything its traits require (see :func:`parity.traits.closure`)."""
        return engine_traits.closure(names, self.pair.active)

    def without(self, names: set[str], dropped: set[str]) -> set[str]:
        """The largest closed subset of ``names`` that contains nothing of ``dropped``."""
        return {n for n in names if not (self.close({n}) & dropped)}

    def side(self, on: set[str]) -> Side:
        """The reference, or the candidate engine, with exactly the ``on`` traits the candidate's."""
        return engine_traits.realize(self.reference, self.candidate, on, self.pair.active)

    def records(self) -> list[dict]:
        """The typed trait records of this bisect (active and inactive), for bisect.json."""
        rows = []
        for row in engine_traits.listing(self.reference, self.candidate):
            if row["trait"].startswith(f"{self.pair.engine}."):
                rows.append(BisectTrait(row["trait"], row["summary"], row["directions"], row["realised_by"],
                                        row["requires"], row["state"]).to_json())
        return rows


def _per_layer(spec: str) -> bool:
    from parity.variants import get_variant, parse

    return get_variant(parse(spec).name).per_layer


def configure(ref: Side, factors: Iterable[Factor], extra_variants: Iterable[str] = (),
              space: TraitSpace | None = None) -> Side:
    """The reference with ``factors`` switched to the candidate's value (plus ``extra_variants``);
    with a trait space, the engine and its traits are built by it."""
    factors = list(factors)
    if space is not None:
        ref = space.side({f.name for f in factors if f.kind in ("engine", "trait")})
    changes: dict[str, Any] = {}
    variants = list(ref.variants)
    for f in factors:
        if f.kind in ("engine", "trait"):
            continue
        if f.kind == "field":
            changes[f.name] = f.candidate
        elif f.kind == "variant":
            variants.append(f.name)
        else:
            variants.remove(f.name)
    variants += list(extra_variants)
    return replace(ref, **changes, variants=tuple(variants))


# -- runs -------------------------------------------------------------------------------------

Outcome = BisectOutcome  # one configuration run; the record lives in parity.results


class Runner:
    """Runs configurations teacher-forced on the cached reference traces; keeps loaded engines
    (one per load-time setting when the engine can be reconfigured in place), counts runs and loads."""

    def __init__(self, recipe: Recipe, prompts: list, steps: int, model_dir, progress: Callable[[str], None] | None = None,
                 host=None):
        from parity.engines.lifecycle import EngineHost

        self.recipe = recipe
        self.host = host or EngineHost(recipe, model_dir, prompts)
        self.prompts = prompts
        self.decoding = replace(recipe.decoding, max_frames=steps)
        self.model_dir = model_dir
        self.tol = recipe.tolerance()
        self.progress = progress or (lambda text: None)
        self.engines: list[Any] = []
        self.loads = 0
        self.runs = 0
        self.reference_traces: dict[str, Any] = {}

    def _engine(self, side: Side):
        """A loaded engine for ``side``: one already loaded that can change to it in place
        (``can_reuse`` + ``reconfigure``), else a fresh load."""
        engine = next((e for e in self.engines if e.side == side), None)
        if engine is None:
            engine = next((e for e in self.engines if hasattr(e, "reconfigure") and e.can_reuse(side)), None)
        if engine is None:
            role = "reference" if side == self.recipe.reference else side.label()
            self.progress(f"load: {side.engine} engine, {side.label()}")
            engine = self.host.load(self.host.make(side, role), role)
            self.loads += 1
            if side.variants and getattr(engine, "applied", None) is None:
                self.host.release(engine, role)
                raise BadInput(f"the {side.engine} engine does not apply variants ({', '.join(side.variants)}); "
                               "bisect them on the reference engine")
            self.engines.append(engine)
        elif engine.side != side:
            engine.reconfigure(side)
        return engine

    def run_reference(self) -> None:
        """The reference's own K-frame trace per prompt: what every configuration is forced on."""
        engine = self._engine(self.recipe.reference)
        self.progress(f"reference: {len(self.prompts)} prompt(s) x {self.decoding.max_frames} frames")
        for p in self.prompts:
            self.reference_traces[p.id] = engine.run(p, self.decoding)

    def execute(self, side: Side, purpose: str, factors: list[str], layers: str | None = None) -> Outcome:
        from parity.analysis import compare_traces

        self.runs += 1
        self.progress(f"run {self.runs} ({purpose}): {side.label()}")
        t0 = time.perf_counter()
        engine = self._engine(side)
        out = Outcome(self.runs, purpose, factors, side.label(), False, layers=layers)
        worst, nonfinite = 0.0, False
        batched = None
        if side.batch > 1:  # every prompt as a row of a batch, forced on its own batch-1 reference
            from parity.batching import run_batched

            batched = run_batched(engine, self.prompts, self.decoding, side.batch, forces=self.reference_traces)
        for p in self.prompts:
            ref = self.reference_traces[p.id]
            cand = batched[p.id] if batched is not None else engine.run(p, self.decoding, force=ref)
            c = compare_traces(cand, ref, self.tol)
            worst = max(worst, c.max_rel_l2 or 0.0)
            nonfinite = nonfinite or c.nonfinite_points > 0
            if c.first_divergence is not None and not out.diverges:
                out.diverges = True
                out.first_divergence, out.prompt = c.first_divergence, p.id
                out.first_nonfinite = c.first_nonfinite
                out.hints = [h["text"] for h in c.hints]
        # A NaN/inf divergence has no finite size: never report it as "max rel L2 0".
        out.max_rel_l2, out.nonfinite = (None if nonfinite and worst == 0.0 else worst), nonfinite
        out.seconds = time.perf_counter() - t0
        return out

    def layer_counts(self) -> dict[str, int]:
        """Decoder layers per component, from the layout the loaded reference engine declares."""
        layout = self._engine(self.recipe.reference).layout()
        return {c.name: c.layers for c in layout.components}

    def close(self) -> None:
        for engine in self.engines:
            self.host.release(engine, engine.side.label())
        self.engines.clear()


# -- the search -------------------------------------------------------------------------------

Execute = Callable[[Side, str, list[str], "str | None"], Outcome]


class Search:
    """Delta debugging over settings with memoised runs, the proof and the layer bisect.
    ``execute(side, purpose, factor names, layers)`` runs one configuration (the Runner's, or a
    fake in tests)."""

    def __init__(self, reference: Side, factors: list[Factor], execute: Execute, layer_counts: Callable[[], dict[str, int]],
                 space: TraitSpace | None = None):
        self.reference = reference
        self.space = space
        self.factors = factors
        self.by_name = {f.name: f for f in factors}
        self._execute = execute
        self._layer_counts = layer_counts
        self.memo: dict[Side, Outcome] = {}
        self.log: list[Outcome] = []

    def test(self, names: Iterable[str], purpose: str, fresh: bool = False) -> Outcome:
        """Run (or recall) the reference with the named settings switched to the candidate's."""
        names = self.close(set(names))
        ordered = [f.name for f in self.factors if f.name in names]
        side = configure(self.reference, [self.by_name[n] for n in ordered], space=self.space)
        return self._run(side, purpose, ordered, fresh)

    def close(self, names: set[str]) -> set[str]:
        """``names`` with what its traits require (unchanged without traits)."""
        return self.space.close(names) if self.space is not None else set(names)

    def _run(self, side: Side, purpose: str, names: list[str], fresh: bool = False, layers: str | None = None) -> Outcome:
        if not fresh and side in self.memo:
            return self.memo[side]
        out = self._execute(side, purpose, names, layers)
        self.memo.setdefault(side, out)
        self.log.append(out)
        return out

    # ddmin: a 1-minimal diverging subset of `names` (which diverges as a whole).
    def minimal_diverging(self, names: list[str]) -> list[str]:
        singles = [n for n in names if self.test([n], "alone").diverges]
        if singles:
            return singles[:1]
        config, n = list(names), 2
        while len(config) >= 2:
            chunks = [config[i * len(config) // n:(i + 1) * len(config) // n] for i in range(n)]
            reduced = False
            for chunk in chunks:
                if chunk and self.test(chunk, "search").diverges:
                    config, n, reduced = chunk, 2, True
                    break
            if not reduced:
                for chunk in chunks:
                    rest = [x for x in config if x not in chunk]
                    if rest and self.test(rest, "search").diverges:
                        config, n, reduced = rest, max(n - 1, 2), True
                        break
            if not reduced:
                if n >= len(config):
                    break
                n = min(len(config), 2 * n)
        return config

    def run(self) -> dict:
        names = [f.name for f in self.factors]
        result: dict[str, Any] = {"factors": [asdict(f) | {"describe": f.describe()} for f in self.factors]}
        full = self.test(names, "candidate")
        result["candidate_run"] = full.to_json()
        if not full.diverges:
            result["verdict"] = "no divergence: the candidate stays within tolerance over these frames; nothing to explain"
            return self._finish(result)
        alone = {n: self.test([n], "alone") for n in names}

        # Independent sources: find a minimal diverging set in `pool` (a set known to diverge: the
        # candidate, then the candidate without the culprits so far and without what needs them),
        # add it, and look again while the candidate without all culprits still diverges. The pool
        # never holds a culprit or anything that needs one, so each round adds new settings and the
        # loop ends.
        culprits: list[str] = []
        without: Outcome | None = None
        pool = list(names)
        while True:
            found = self.minimal_diverging(pool)
            closed = self.close(set(found))
            if closed != set(found):  # what the found traits require came along: minimise that set again
                closed = set(self.shrink([n for n in names if n in closed]))
            if closed <= set(culprits):  # nothing new (cannot happen with a consistent oracle): stop, unproven
                break
            culprits = [n for n in names if n in closed or n in culprits]
            remaining = self.drop(names, culprits)
            if not remaining:
                without = None  # the candidate without every setting is the reference itself
                break
            without = self.test(remaining, "proof", fresh=True)
            if not without.diverges:
                break
            pool = remaining
        dropped_with = [n for n in names if n not in culprits and n not in remaining]
        again = self.test(culprits, "proof", fresh=True)
        holds = again.diverges and (without is None or not without.diverges)
        result["culprits"] = culprits
        result["proof"] = {
            "culprits_alone": again.to_json(),
            "candidate_without": None if without is None else without.to_json(),
            "candidate_without_is_reference": without is None,
            "holds": holds,
        }
        if dropped_with:  # settings that need a culprit go with it (a graph captured around a culprit mask)
            result["proof"]["also_without"] = dropped_with
        elsewhere = _elsewhere(again, full)
        if elsewhere:
            result["proof"]["elsewhere"] = elsewhere
        removed = {n: self.test(self.drop(names, [n]), "removed") for n in names}
        result["alone"] = {n: o.to_json() for n, o in alone.items()}
        result["removed"] = {n: o.to_json() for n, o in removed.items()}
        settings_runs = len(self.log)
        result["layers"] = [self.layer_bisect(c, culprits, alone[c]) for c in culprits if self.by_name[c].per_layer]
        result["verdict"] = (
            f"culprit{'s' if len(culprits) > 1 else ''}: {', '.join(culprits)} (proof holds)" if holds
            else f"proof failed for {', '.join(culprits)}: not reproducible as a set of settings (flaky or interacting)"
        )
        if holds and elsewhere:
            result["verdict"] += f"; {elsewhere}"
        if self.space is not None:
            result.update(self.engine_verdict(culprits, holds))
            if result.get("unexplained"):
                result["verdict"] += f"; {result['unexplained']['text']}"
            elif result.get("engine_note"):
                result["verdict"] += f"; {result['engine_note']}"
        result["settings_runs"] = settings_runs
        return self._finish(result)

    def shrink(self, culprits: list[str]) -> list[str]:
        """A diverging closed set made 1-minimal among closed sets: drop one setting (with what
        needs it) while the rest still diverges."""
        changed = True
        while changed:
            changed = False
            for name in culprits:
                smaller = self.drop(culprits, [name])
                if smaller and self.test(smaller, "search").diverges:
                    culprits, changed = smaller, True
                    break
        return culprits

    def drop(self, names: list[str], dropped: Iterable[str]) -> list[str]:
        """``names`` without ``dropped`` and without whatever needs one of them (with traits)."""
        dropped = set(dropped)
        keep = set(names) - dropped
        if self.space is not None:
            keep = self.space.without(keep, dropped)
        return [n for n in names if n in keep]

    def engine_verdict(self, culprits: list[str], holds: bool) -> dict:
        """What the traits explain. ``engine`` among the culprits is a verdict (``unexplained``)
        only when no combination of traits reproduces the divergence: the candidate engine with
        every trait removed still diverges, or the divergence needs the rest of the engine beside
        traits that could have been applied to the reference. When ``engine`` is there only because
        a culprit trait exists only on the candidate engine (a CUDA graph), the traits explain it."""
        traits = [n for n in culprits if self.by_name[n].kind == "trait"]
        if ENGINE not in culprits:
            return {"explained_by_traits": traits if holds else [], "unexplained": None}
        rest = self.test([ENGINE], "residue")
        engine = self.space.candidate.engine
        by_name = {t.qualified: t for t in self.space.pair.active}
        only_there = [n for n in traits if by_name[n].apply is None and not by_name[n].field]
        if rest.diverges:
            text = (f"engine: no combination of the {engine} engine's traits reproduces the divergence; the {engine} "
                    f"engine with every trait removed still {rest.text()}: something its traits do not describe "
                    f"(run {rest.run})")
        elif only_there:
            return {"explained_by_traits": traits if holds else [], "unexplained": None,
                    "engine_note": (f"engine is among the culprits only because {', '.join(only_there)} can only be "
                                    f"removed from the {engine} engine, not applied to the reference; the {engine} "
                                    f"engine with every trait removed is within tolerance (run {rest.run})")}
        else:
            text = (f"engine: the divergence needs the rest of the {engine} engine together with "
                    f"{', '.join(traits) or 'none of its traits'}: applied to the reference, no combination of its "
                    f"traits reproduces it, and the {engine} engine with every trait removed is within tolerance "
                    f"(run {rest.run})")
        return {"explained_by_traits": [], "unexplained": {"factors": culprits, "text": text,
                                                             "engine_without_traits": rest.to_json()}}

    def layer_bisect(self, name: str, culprits: list[str], alone: Outcome) -> dict:
        """Smallest k such that the culprit applied to the first k positions diverges: the first
        layer where it matters. Positions run in execution order: the talker's decoder layers,
        then (when the culprit takes the whole talker and changes more than its layers) the
        talker's own parts outside them (final norm), then the same for the predictor. Applied to every position it is
        the culprit itself, so that end of the search is known without a run."""
        from parity.variants import get_variant, parse

        spec = parse(name)
        outside = get_variant(spec.name).outside_layers
        base = [] if alone.diverges else [c for c in culprits if c != name]
        counts = self._layer_counts()
        positions: list[tuple[str, int | None]] = []  # (component, layer); layer None = outside the layers
        for component in ("talker", "predictor"):
            if spec.scope.covers(component):
                start, stop = spec.scope.layers or (0, counts[component])
                positions += [(component, i) for i in range(start, min(stop, counts[component]))]
                if spec.scope.layers is None and outside:
                    positions.append((component, None))
        base_side = configure(self.reference, [self.by_name[c] for c in base], space=self.space)
        full_side = configure(self.reference, [self.by_name[c] for c in base + [name]], space=self.space)

        def prefix(k: int) -> Outcome:
            if k == len(positions):
                return self._run(full_side, "layers", base + [name], layers="all")
            layers: dict[str, list[int]] = {}
            whole: set[str] = set()
            for component, i in positions[:k]:
                if i is None:
                    whole.add(component)
                else:
                    layers.setdefault(component, []).append(i)
            specs = [str(spec.with_layers(c, idx[0], idx[-1] + 1)) for c, idx in layers.items() if c not in whole]
            specs += [f"{spec.name}{'=' + spec.arg if spec.arg else ''}@{c}" for c in whole]
            side = replace(base_side, variants=base_side.variants + tuple(specs))
            return self._run(side, "layers", base + [name], layers=", ".join(specs))

        entry: dict[str, Any] = {"factor": name, "with": base, "positions": len(positions), "runs": []}
        lo, hi = 0, len(positions)  # prefix lo is the base (parity), prefix hi is the culprit (diverges)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            out = prefix(mid)
            entry["runs"].append(out.to_json())
            lo, hi = (lo, mid) if out.diverges else (mid, hi)
        component, layer = positions[hi - 1]
        entry["first_layer"] = {"component": component, "layer": layer}
        if layer is None:
            entry["note"] = (f"the {component}'s decoder layers alone stay within tolerance; it matters once its "
                             f"parts outside the layers (final norm) are included")
        else:
            entry["note"] = f"first matters at {component} layer {layer} (applied to the first {hi} of {len(positions)} positions)"
        return entry

    def _finish(self, result: dict) -> dict:
        result["runs"] = [o.to_json() for o in self.log]
        result["counts"] = {
            "runs": len(self.log),
            "settings_runs": result.get("settings_runs", len(self.log)),
            "layer_runs": sum(o.purpose == "layers" for o in self.log),
            "proof_reruns": sum(o.purpose == "proof" for o in self.log),
        }
        result.pop("settings_runs", None)
        return result


def _elsewhere(alone: Outcome, candidate: Outcome) -> str | None:
    """When the culprits alone first diverge at another point (or prompt) than the candidate: a
    sentence saying so, else None. Such a set reproduces *a* divergence, not the candidate's first
    point: what else the candidate does moves where the error shows (e.g. a reference static cache
    differs in the prefill, while the fast engine prefills on a dynamic cache)."""
    a, c = alone.first_divergence, candidate.first_divergence
    if not (alone.diverges and candidate.diverges and a and c):
        return None
    if (alone.prompt, a.component, a.step, a.substep, a.layer) == (candidate.prompt, c.component, c.step, c.substep, c.layer):
        return None
    same = alone.prompt == candidate.prompt
    earlier = same and (a.step, a.substep, a.layer, a.component) < (c.step, c.substep, c.layer, c.component)
    relation = "earlier than" if earlier else "elsewhere than"
    return (f"the culprits alone first diverge at {a.where()}{'' if same else f' ({alone.prompt})'}, {relation} the "
            f"candidate ({c.where()}{'' if same else f', {candidate.prompt}'}): they reproduce a divergence, not the "
            f"candidate's first point, so the candidate's other differences change where it shows")


# -- the command ------------------------------------------------------------------------------

def bisect(prompts_path: Path, recipe: Recipe, factors: list[str] | None, steps: int, out: Path | None,
           progress: Callable[[str], None] | None = None) -> dict:
    """Run ``parity bisect``; returns the result (also written to ``out/bisect.json`` under the
    key ``bisect``)."""
    from parity.prompts import load_prompts
    from parity.run import write_json

    if steps < 1:
        raise BadInput(f"--steps must be at least 1, got {steps}")
    prompts = load_prompts(prompts_path)
    from parity.refclip import check_prompts

    check_prompts(prompts, None, prompts_path)
    chosen, held = find_factors(recipe.reference, recipe.candidate, factors)
    lock = _lock_out(Path(out)) if out is not None else None  # refused here, not after the whole search
    try:
        result = _bisect(prompts, Path(prompts_path), recipe, chosen, held, steps, progress)
        if out is not None:
            from parity.outdir import write_marker

            existed = (Path(out) / "bisect.json").exists()
            write_json(Path(out) / "bisect.json", {"bisect": result})
            if not existed:
                write_marker(Path(out), ["bisect.json"])  # --force may delete what parity wrote
    finally:
        if lock is not None:
            lock.release()
    return result


def _lock_out(out: Path):
    """Check --out before any work (a file, or a directory another run holds, is refused at once)
    and lock it for this bisect."""
    from parity import outdir
    from parity.run import make_out_dir

    if out.exists() and not out.is_dir():
        raise BadInput(f"--out '{out}' exists and is not a directory; choose another path")
    outdir.check_not_locked(out)
    make_out_dir(out)
    return outdir.RunLock(out, "parity bisect").acquire()


def _bisect(prompts, prompts_path: Path, recipe: Recipe, chosen, held, steps: int, progress) -> dict:
    from parity.engines.lifecycle import EngineHost, engine_failure
    from parity.errors import ParityError
    from parity.models import resolve_model

    result: dict[str, Any] = {
        "prompts": [p.id for p in prompts], "steps": steps, "tolerance": recipe.tolerance(),
        "reference": asdict(recipe.reference), "candidate": asdict(recipe.candidate),
        "held_at_reference": [f.describe() for f in held],
    }
    t0 = time.perf_counter()
    if not chosen:
        result.update(verdict="nothing to bisect: the reference and the candidate have the same settings",
                      factors=[], runs=[], counts={"runs": 0, "settings_runs": 0, "layer_runs": 0, "proof_reruns": 0})
        result["counts"].update(reference_runs=0, loads=0, seconds=0.0)
    else:
        model_dir = resolve_model(recipe.model, recipe.model_seed)
        # The same lifecycle as parity run: preflight before any load (prompt fit checked for the
        # bisect's frame count), checkpoint errors exit 2, engine crashes and OOM exit 3.
        host = EngineHost(recipe, model_dir, prompts, Path(prompts_path))
        host.preflight(replace(recipe, decoding=replace(recipe.decoding, max_frames=steps)))
        runner = Runner(recipe, prompts, steps, model_dir, progress, host)
        try:
            runner.run_reference()
            space = trait_space(recipe.reference, recipe.candidate, chosen)
            search = Search(recipe.reference, chosen, runner.execute, runner.layer_counts, space)
            result.update(search.run())
            if space is not None:
                result["traits"] = space.records()
        except ParityError:
            raise
        except Exception as e:
            raise engine_failure(e, f"bisect run {runner.runs}") from e
        finally:
            runner.close()
        result["counts"].update(reference_runs=1, loads=runner.loads, seconds=time.perf_counter() - t0)
        result["peak_memory"] = host.peak
    return result


def trait_space(reference: Side, candidate: Side, factors: list[Factor]) -> TraitSpace | None:
    """The trait space when the engine is searched as its traits (a factor of kind ``engine``)."""
    if not any(f.kind == "engine" for f in factors):
        return None
    return TraitSpace(reference, candidate, engine_traits.between(reference, candidate))


def exit_code(result: dict) -> int:
    """0: a proven culprit set, nothing to bisect or no divergence; 1: the proof did not hold."""
    proof = result.get("proof")
    return 1 if proof is not None and not proof["holds"] else 0


def render(result: dict, console) -> None:
    """The console table: each setting alone on the reference and removed from the candidate,
    then the culprits, their proof, the layer bisect and the run count."""
    from rich.table import Table

    c = result["counts"]
    if not result.get("factors"):
        console.print(result["verdict"])
        return
    if "alone" not in result:  # the candidate does not diverge: no table to fill
        console.print(f"settings that differ: {', '.join(f['describe'] for f in result['factors'])}", markup=False)
        console.print(f"candidate: {_text(result['candidate_run'])}; {c['runs']} run (+{c['reference_runs']} reference), "
                      f"{c['loads']} model loads, {c['seconds']:.1f} s")
        console.print(f"verdict: {result['verdict']}")
        return
    ref, cand = Side(**{**result["reference"], "variants": tuple(result["reference"]["variants"])}), \
        Side(**{**result["candidate"], "variants": tuple(result["candidate"]["variants"])})
    from rich import box

    console.print(f"reference  {ref.label()}\ncandidate  {cand.label()}", markup=False, highlight=False)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, collapse_padding=True)
    # A setting's name (one word: '+kv_quant=int8@talker') and the culprit mark are never broken;
    # the outcome cells wrap at their spaces.
    for col in ("setting", "alone on the ref.", "removed from cand.", "culprit"):
        table.add_column(col, overflow="fold", no_wrap=col in ("setting", "culprit"))
    culprits = set(result.get("culprits", []))
    for f in result["factors"]:
        alone = result.get("alone", {}).get(f["name"])
        removed = result.get("removed", {}).get(f["name"])
        table.add_row(
            f["describe"].replace(" -> ", "→") + (" *" if f["load_time"] else ""),
            _cell(alone, bad_if=True), _cell(removed, bad_if=True),
            "[red]yes[/]" if f["name"] in culprits else "",
        )
    console.print(table)
    console.print(f"{result['steps']} teacher-forced frames, tolerance rel L2 {result['tolerance']:g}; {c['runs']} runs "
                  f"(+{c['reference_runs']} reference), {c['loads']} model loads, {c['seconds']:.1f} s; #n: run number; "
                  "*: the setting needs the model loaded again (engine, dtype, device)", style="dim", markup=False, highlight=False)
    _render_traits(result, console)
    console.print(f"candidate: {_text(result['candidate_run'])}")
    for hint in result["candidate_run"].get("hints", []):
        console.print(f"  {hint}", markup=False, highlight=False)
    if result.get("held_at_reference"):
        console.print(f"held at the reference's value (not in --factors): {', '.join(result['held_at_reference'])}")
    console.print(f"verdict: {result['verdict']}")
    proof = result.get("proof")
    if proof:
        alone = proof["culprits_alone"]
        console.print(f"proof: culprits alone -> {_text(alone)} (run {alone['run']})")
        if proof["candidate_without_is_reference"]:
            console.print("proof: the candidate without them is the reference itself")
        else:
            w = proof["candidate_without"]
            also = f" (and without {', '.join(proof['also_without'])}, which need them)" if proof.get("also_without") else ""
            console.print(f"proof: candidate without them{also} -> {_text(w)} (run {w['run']})")
        if proof.get("elsewhere"):
            console.print(f"proof: {proof['elsewhere']}", markup=False, highlight=False)
    for entry in result.get("layers", []):
        runs = ", ".join(str(r["run"]) for r in entry["runs"])
        console.print(f"layers: {entry['factor']}: {entry['note']} (runs {runs})")


def _render_traits(result: dict, console) -> None:
    """The candidate engine's traits searched in place of ``engine``: each active trait with the
    directions it supports, the inactive ones with why."""
    rows = result.get("traits") or []
    if not rows:
        return
    console.print("engine traits (searched in place of the whole engine): a trait alone is the reference plus that "
                  "trait, or, for one that exists only on the engine, the engine with just it and what it needs; "
                  "removed is the candidate without it (and what needs it)", markup=False, highlight=False)
    for row in rows:
        if row["state"] == "active":
            needs = f"; needs {', '.join(row['requires'])}" if row["requires"] else ""
            console.print(f"  {row['trait']} [{', '.join(row['directions'])}{needs}]: {row['summary']}",
                          markup=False, highlight=False)
    for row in rows:
        if row["state"] != "active":
            console.print(f"  {row['trait']}: not searched, {row['state']}", markup=False, highlight=False)


def _text(o: dict) -> str:
    return Outcome.from_json(o).text()


def _cell(o: dict | None, bad_if: bool) -> str:
    """A table cell at 80 columns: 'diverges talk s0 L0 0.012 #3' / 'parity, max 3e-4 #5' (#: the run)."""
    from parity.report.overview import short_where

    if o is None:
        return "-"
    out = Outcome.from_json(o)
    color = "red" if out.diverges == bad_if else "green"
    d = out.first_divergence
    if out.diverges and d is not None:
        size = "inf" if d.nonfinite else ("-" if d.rel_l2 is None else f"{d.rel_l2:.2g}")
        text = f"diverges {short_where(d)} {size} #{out.run}"
    else:
        size = "inf" if out.nonfinite else ("-" if out.max_rel_l2 is None else f"{out.max_rel_l2:.2g}")
        text = f"parity, max {size} #{out.run}"
    return f"[{color}]{text}[/]"
