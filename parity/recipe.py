"""Recipes: which two sides to compare, how to decode, which tolerances and gates apply.

A recipe is a TOML file (see ``recipes/``). Every key is checked: unknown keys, wrong types and
out-of-range values are ``BadInput`` errors naming the file and key. Command-line overrides use
the same dotted names (``candidate.attention=sdpa``) and the same checks.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from parity.errors import BadInput

DTYPES = ("float32", "bfloat16", "float16")
ATTENTIONS = ("eager", "sdpa")
DEVICES = ("auto", "cpu", "cuda")
ENGINES = ("reference", "faster")  # the engines of the Qwen3-TTS comparison; every registered name is accepted (parity.engines.registry)
MAX_STATIC_LEN = 1 << 20  # positions; beyond any TTS prompt + audio, and a typo guard against huge allocations
MAX_SEED = (1 << 63) - 1

# Relative L2 error above which a point counts as diverged, keyed by the lower-precision side's
# dtype: a few unit roundoffs (fp32 2^-24, fp16 2^-11, bf16 2^-8), the error of a handful of
# roundings, not of a broken kernel. Measured on the tiny model: fp32 eager vs sdpa 2e-7,
# bf16 vs fp32 3e-3 at the embedding growing to ~1e-2 at the last layer.
PROBE_LEVELS = ("layers", "sublayers")  # the recipe's ``probes``
DEFAULT_TOLERANCES = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}


@dataclass(frozen=True)
class Side:
    """One engine and its numeric settings."""

    engine: str = "reference"
    dtype: str = "float32"
    attention: str = "sdpa"
    cache: str = "dynamic"  # "dynamic" or "static:N" (a StaticCache padded to N positions)
    tf32: bool = False
    device: str = "auto"
    # Divergence sources applied on top (parity.variants), e.g. ("rmsnorm_lowp@talker:0-4", "kv_quant=fp8").
    variants: tuple[str, ...] = ()
    # Decode each prompt as one row of a left-padded batch of N prompts of the file (parity.batching).
    batch: int = 1
    # Engine traits (parity.traits): "faster.decode_mask" applies another engine's trait to this
    # side, "-faster.sampler" removes one of this side's own engine's traits.
    traits: tuple[str, ...] = ()
    # What the engine probes: "layers" (each decoder layer's output) or "sublayers" (also each op
    # inside every layer). Set for all sides at once by the recipe's top-level ``probes``.
    probes: str = "layers"

    @property
    def static_len(self) -> int | None:
        return int(self.cache.split(":", 1)[1]) if self.cache.startswith("static:") else None

    def label(self) -> str:
        return (f"{self.engine} {self.dtype}/{self.attention}/{self.cache}" + ("/tf32" if self.tf32 else "")
                + (f"/batch{self.batch}" if self.batch > 1 else "") + "".join(f" +{v}" for v in self.variants)
                + "".join(f" {t}" if t.startswith("-") else f" +{t}" for t in self.traits))


@dataclass(frozen=True)
class Decoding:
    """How both sides decode: greedy or seeded sampling, and how many frames at most."""

    do_sample: bool = False
    seed: int = 0
    max_frames: int = 24
    temperature: float = 0.9
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0


@dataclass(frozen=True)
class Gates:
    """What makes a run fail (exit 1). Each gate is evaluated per prompt."""

    hidden_within_tolerance: bool = True  # no point may exceed its tolerance
    max_rel_l2: float | None = None  # no point's relative L2 error may exceed this
    min_token_agreement: float | None = None  # free-running code agreement, 0..1
    no_nonfinite: bool = True  # NaN/inf anywhere on the candidate side fails
    # Under greedy decoding the same logits must give the same token: fails when the candidate's
    # choice is not what the reference's sampler picks from the candidate's own logits.
    sampler_agrees: bool = True
    # Fails when, at a step where the reference's stop (EOS) probability is >= 1e-3, the
    # candidate's is more than this factor lower (teacher-forced); 0 turns the check off.
    stop_prob_ratio: float | None = 10.0
    no_runaway: bool = True  # fails when the free-running candidate hits max_frames where the reference stopped


@dataclass(frozen=True)
class Mos:
    """Audio quality of both sides' free-running audio (DNSMOS by default, UTMOS from a local
    checkpoint). With seeded sampling each side runs ``seeds`` times (seeds decoding.seed + k)
    and the gates apply to the paired deltas (candidate - reference) of the first scorer."""

    scorers: tuple[str, ...] = ("dnsmos",)
    seeds: int = 1
    utmos_checkpoint: str | None = None
    min_mean_delta: float | None = None  # gate: mean MOS delta must be at least this (e.g. -0.1)
    min_worst_delta: float | None = None  # gate: every seed's delta must be at least this
    audible_db: float = 6.0  # log-mel distance (dB) from which a segment counts as audibly different


@dataclass(frozen=True)
class Recipe:
    """A whole run configuration."""

    name: str = "custom"
    model: str = "random:tiny"
    model_seed: int = 0
    traces: str = "full"  # "full": every probed tensor on disk; "tokens": tokens and codes only
    # "layers" (default) or "sublayers": also probe each op inside every decoder layer, split the
    # first diverging layer into the op that adds the error, and replay that layer across sides.
    probes: str = "layers"
    reference: Side = field(default_factory=Side)
    candidate: Side = field(default_factory=lambda: Side(dtype="bfloat16", attention="eager", cache="static:2048"))
    decoding: Decoding = field(default_factory=Decoding)
    tolerances: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_TOLERANCES))
    gates: Gates = field(default_factory=Gates)
    mos: Mos = field(default_factory=Mos)
    # Optional third side to judge both against (e.g. the reference in fp32, TF32 off): tells a
    # candidate that is merely different from one that is further from the truth.
    truth: Side | None = None

    def tolerance(self) -> float:
        """The relative-L2 tolerance for this pair: that of the lower-precision side."""
        order = {"float32": 0, "float16": 1, "bfloat16": 2}
        dtype = max(self.reference.dtype, self.candidate.dtype, key=order.__getitem__)
        return self.tolerances[dtype]

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        for role in ("reference", "candidate", "truth"):  # a side's probes is the top-level key's copy
            if isinstance(data.get(role), dict):
                data[role].pop("probes", None)
        return data


_SECTIONS = {"reference": Side, "candidate": Side, "truth": Side, "decoding": Decoding, "gates": Gates, "mos": Mos}
_TOP = {"name": str, "model": str, "model_seed": int, "traces": str, "probes": str}
_TOP_ONLY = {"probes"}  # Side fields set from the top level, not per side


def _check_value(where: str, key: str, value: Any, typ: Any) -> Any:
    """Type- and range-check one value; return it converted (ints accepted for floats)."""
    optional = typ in ("float | None", "int | None", "bool | None", "str | None")
    base = typ.replace(" | None", "") if isinstance(typ, str) else typ.__name__
    if value is None and optional:
        return None
    if base == "bool":
        if not isinstance(value, bool):
            raise BadInput(f"{where}: {key!r} must be true or false, got {value!r}")
        return value
    if base == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadInput(f"{where}: {key!r} must be an integer, got {value!r}")
        return value
    if base == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise BadInput(f"{where}: {key!r} must be a finite number, got {value!r}")
        return float(value)
    if base == "str":
        if not isinstance(value, str):
            raise BadInput(f"{where}: {key!r} must be a string, got {value!r}")
        return value
    if base.startswith("tuple[str"):
        if isinstance(value, str):  # --set candidate.variants=a,b
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise BadInput(f"{where}: {key!r} must be a list of strings, got {value!r}")
        return tuple(value)
    if base.startswith("dict"):
        if not isinstance(value, dict):
            raise BadInput(f"{where}: {key!r} must be a table")
        return value
    raise AssertionError(f"unhandled type {typ}")


def _validate_side(where: str, side: Side) -> Side:
    """Range checks on one side; returns it with its variant specs in canonical form."""
    from parity.engines.registry import BATCHING_BUILTINS, check_name, decodes_batches, variant_family

    check_name(side.engine, where)
    if side.dtype not in DTYPES:
        raise BadInput(f"{where}: dtype {side.dtype!r} is not one of {', '.join(DTYPES)}")
    if side.attention not in ATTENTIONS:
        raise BadInput(f"{where}: attention {side.attention!r} is not one of {', '.join(ATTENTIONS)}")
    if side.device not in DEVICES:
        raise BadInput(f"{where}: device {side.device!r} is not one of {', '.join(DEVICES)}")
    if side.cache != "dynamic" and not (re.fullmatch(r"static:[1-9][0-9]{0,6}", side.cache) and side.static_len <= MAX_STATIC_LEN):
        raise BadInput(f"{where}: cache {side.cache!r} must be 'dynamic' or 'static:N' with 0 < N <= {MAX_STATIC_LEN} (e.g. static:2048)")
    from parity.batching import MAX_BATCH

    if not 1 <= side.batch <= MAX_BATCH:
        raise BadInput(f"{where}: batch must be between 1 and {MAX_BATCH}, got {side.batch}")
    if side.batch > 1 and not decodes_batches(side.engine):
        raise BadInput(f"{where}: batch = {side.batch} needs an engine that decodes batches ({', '.join(BATCHING_BUILTINS)}; "
                       f"the {side.engine} engine decodes one prompt at a time); set batch = 1 or another engine")
    if side.traits:
        from parity.traits import check_side

        side = replace(side, traits=check_side(side, where))
    if not side.variants:
        return side
    from parity.variants import parse_all

    try:
        family = variant_family(side.engine)
        if family is None:
            raise BadInput(f"the {side.engine} engine applies no variants; remove 'variants' from this side")
        specs = parse_all(side.variants, family)
    except BadInput as e:
        raise BadInput(f"{where}: {e}") from None
    return replace(side, variants=tuple(str(s) for s in specs))


def validate(recipe: Recipe, where: str) -> Recipe:
    """Range checks across the whole recipe; returns it (sides synced to the top-level ``probes``)
    or raises BadInput."""
    if recipe.probes not in PROBE_LEVELS:
        raise BadInput(f"{where}: probes must be one of {', '.join(PROBE_LEVELS)}, got {recipe.probes!r}")
    recipe = replace(
        recipe,
        reference=replace(recipe.reference, probes=recipe.probes),
        candidate=replace(recipe.candidate, probes=recipe.probes),
        truth=None if recipe.truth is None else replace(recipe.truth, probes=recipe.probes),
    )
    recipe = replace(
        recipe,
        reference=_validate_side(f"{where} [reference]", recipe.reference),
        candidate=_validate_side(f"{where} [candidate]", recipe.candidate),
        truth=None if recipe.truth is None else _validate_side(f"{where} [truth]", recipe.truth),
    )
    for role in ("reference", "truth"):
        side = getattr(recipe, role)
        if side is not None and side.batch != 1:
            raise BadInput(f"{where} [{role}]: batch must be 1 on the {role} side (rows are compared against the batch-1 "
                           "reference); set batch on [candidate]")
    if not 0 <= recipe.model_seed <= MAX_SEED:
        raise BadInput(f"{where}: model_seed must be between 0 and 2**63-1, got {recipe.model_seed}")
    d = recipe.decoding
    if not 0 <= d.seed <= MAX_SEED:
        raise BadInput(f"{where} [decoding]: seed must be between 0 and 2**63-1, got {d.seed}")
    if not 1 <= d.max_frames <= 100000:
        raise BadInput(f"{where} [decoding]: max_frames must be between 1 and 100000, got {d.max_frames}")
    if not MIN_TEMPERATURE <= d.temperature <= MAX_TEMPERATURE:  # 1e-30 divides logits into inf/NaN
        raise BadInput(f"{where} [decoding]: temperature must be between {MIN_TEMPERATURE} and {MAX_TEMPERATURE}, "
                       f"got {d.temperature}")
    if d.top_k < 0:
        raise BadInput(f"{where} [decoding]: top_k must be >= 0, got {d.top_k}")
    if not 0 < d.top_p <= 1:
        raise BadInput(f"{where} [decoding]: top_p must be in (0, 1], got {d.top_p}")
    if not 0 < d.repetition_penalty <= MAX_REPETITION_PENALTY:
        raise BadInput(f"{where} [decoding]: repetition_penalty must be in (0, {MAX_REPETITION_PENALTY}], got {d.repetition_penalty}")
    for dtype, tol in recipe.tolerances.items():
        if dtype not in DTYPES:
            raise BadInput(f"{where} [tolerances]: unknown dtype {dtype!r}; use {', '.join(DTYPES)}")
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < 10:  # NaN fails too
            raise BadInput(f"{where} [tolerances]: {dtype} must be a number in (0, 10), got {tol!r}")
    g = recipe.gates
    if g.min_token_agreement is not None and not 0 <= g.min_token_agreement <= 1:
        raise BadInput(f"{where} [gates]: min_token_agreement must be in [0, 1], got {g.min_token_agreement}")
    if g.stop_prob_ratio is not None and g.stop_prob_ratio != 0 and g.stop_prob_ratio <= 1:
        raise BadInput(f"{where} [gates]: stop_prob_ratio must be a factor > 1 (or 0 to turn the check off), got {g.stop_prob_ratio}")
    if g.max_rel_l2 is not None and g.max_rel_l2 <= 0:
        raise BadInput(f"{where} [gates]: max_rel_l2 must be > 0, got {g.max_rel_l2}")
    if recipe.traces not in ("full", "tokens"):
        raise BadInput(f"{where}: traces must be 'full' or 'tokens', got {recipe.traces!r}")
    m = recipe.mos
    from parity.mos import SCORER_NAMES

    for name in m.scorers:
        if name not in SCORER_NAMES:
            raise BadInput(f"{where} [mos]: unknown scorer {name!r}; available: {', '.join(SCORER_NAMES)}")
    if not 1 <= m.seeds <= 100:
        raise BadInput(f"{where} [mos]: seeds must be between 1 and 100, got {m.seeds}")
    if not m.scorers and (m.min_mean_delta is not None or m.min_worst_delta is not None):
        raise BadInput(f"{where} [mos]: a MOS gate needs at least one scorer in 'scorers'")
    if not 0 < m.audible_db < 100:
        raise BadInput(f"{where} [mos]: audible_db must be in (0, 100), got {m.audible_db}")
    return recipe


def from_dict(data: dict, where: str) -> Recipe:
    """Build a recipe from a parsed TOML table, rejecting unknown keys and wrong types."""
    recipe = Recipe()
    for key, value in data.items():
        if key in _TOP:
            recipe = replace(recipe, **{key: _check_value(where, key, value, _TOP[key].__name__)})
        elif key in _SECTIONS:
            if not isinstance(value, dict):
                raise BadInput(f"{where}: {key!r} must be a table ([{key}])")
            recipe = _apply_section(recipe, key, value, where)
        elif key == "tolerances":
            if not isinstance(value, dict):
                raise BadInput(f"{where}: 'tolerances' must be a table ([tolerances])")
            recipe = replace(recipe, tolerances={**recipe.tolerances, **value})
        else:
            allowed = ", ".join([*_TOP, *_SECTIONS, "tolerances"])
            raise BadInput(f"{where}: unknown key {key!r}; allowed: {allowed}")
    return validate(recipe, where)


def _apply_section(recipe: Recipe, section: str, values: dict, where: str) -> Recipe:
    current = getattr(recipe, section)
    if current is None:  # an optional side ([truth]) starts from the default side
        current = _SECTIONS[section]()
    types = {f.name: f.type for f in fields(current) if not (isinstance(current, Side) and f.name in _TOP_ONLY)}
    changes = {}
    for key, value in values.items():
        if key not in types:
            raise BadInput(f"{where} [{section}]: unknown key {key!r}; allowed: {', '.join(types)}")
        changes[key] = _check_value(f"{where} [{section}]", key, value, types[key])
    return replace(recipe, **{section: replace(current, **changes)})


def default_recipe() -> Recipe:
    """The built-in default: the same settings as recipes/smoke.toml (works without the repo)."""
    return Recipe(
        name="smoke",
        tolerances={**DEFAULT_TOLERANCES, "bfloat16": 5e-3},
        gates=Gates(hidden_within_tolerance=False, max_rel_l2=0.1, no_nonfinite=True),
    )


# Sampling settings beyond these only produce inf/NaN logits (an engine crash) or nothing useful.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0
MAX_REPETITION_PENALTY = 100.0


def load_recipe(path: str | Path | None) -> Recipe:
    """Load a recipe TOML (``None`` gives the built-in default, the smoke recipe's settings)."""
    if path is None:
        return validate(default_recipe(), "default recipe")
    from parity import limits

    path = Path(path)
    if not path.exists():
        raise BadInput(f"recipe '{path}' does not exist or is not a file; see recipes/ for examples")
    # A pipe is fine (--recipe <(...)); a device or a huge file is not.
    text = limits.read_text(path, "recipe", limits.RECIPE_LIMIT, allow_pipe=True)
    return parse_recipe_text(text, path)


def parse_recipe_text(text: str, path: str | Path = "recipe.toml") -> Recipe:
    """Parse recipe TOML text: a Recipe, or BadInput naming the file and the line or key."""
    path = Path(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:  # the message ends with "(at line N, column M)"
        raise BadInput(f"recipe '{path}': TOML syntax error: {e}; fix the TOML at that line") from None
    except RecursionError:
        raise BadInput(f"recipe '{path}': TOML nested too deeply; a recipe needs only flat [section] tables") from None
    data.setdefault("name", path.stem)
    return from_dict(data, f"recipe '{path}'")


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``section.key=value`` with a TOML value (bare words are taken as strings)."""
    if "=" not in text:
        raise BadInput(f"--set {text!r} must look like section.key=value (e.g. candidate.attention=sdpa)")
    key, raw = (s.strip() for s in text.split("=", 1))
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def apply_overrides(recipe: Recipe, overrides: list[tuple[str, Any]]) -> Recipe:
    """Apply dotted-key overrides (from the command line) with the same checks as the TOML."""
    data: dict[str, Any] = {}
    for key, value in overrides:
        parts = key.split(".")
        if len(parts) == 1:
            data[key] = value
        elif len(parts) == 2:
            data.setdefault(parts[0], {})
            if not isinstance(data[parts[0]], dict):
                raise BadInput(f"--set {key!r}: {parts[0]!r} is not a section")
            data[parts[0]][parts[1]] = value
        else:
            raise BadInput(f"--set {key!r}: use section.key (one dot)")
    merged = recipe
    for key, value in data.items():
        if key in _TOP:
            merged = replace(merged, **{key: _check_value("--set", key, value, _TOP[key].__name__)})
        elif key in _SECTIONS:
            if not isinstance(value, dict):
                raise BadInput(f"--set {key!r}: give a key inside it, e.g. {key}.dtype=...")
            merged = _apply_section(merged, key, value, "--set")
        elif key == "tolerances":
            if not isinstance(value, dict):
                raise BadInput("--set 'tolerances': give a dtype inside it, e.g. tolerances.bfloat16=1e-2")
            merged = replace(merged, tolerances={**merged.tolerances, **value})
        else:
            raise BadInput(f"--set: unknown key {key!r}; allowed: {', '.join([*_TOP, *_SECTIONS, 'tolerances'])}")
    return validate(merged, "--set")
