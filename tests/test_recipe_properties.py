"""Property tests for the recipe parser: any TOML text, any table, any --set either gives a valid
Recipe or a one-line BadInput, never another exception."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parity.errors import BadInput
from parity.recipe import (
    ATTENTIONS, DEVICES, DTYPES, ENGINES, Decoding, Gates, Recipe, Side, apply_overrides, default_recipe, from_dict,
    parse_override, parse_recipe_text, validate,
)

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SECTIONS = {"reference": Side, "candidate": Side, "truth": Side, "decoding": Decoding, "gates": Gates}
KEYS = {name: [f for f in cls.__dataclass_fields__] for name, cls in SECTIONS.items()}
TOP_KEYS = ["name", "model", "model_seed", "tolerances", "bogus"]


def outcome(fn, *args) -> Recipe | BadInput:
    """Call the parser; a BadInput is a fine outcome, any other exception fails the test."""
    try:
        recipe = fn(*args)
    except BadInput as e:
        message = str(e)
        assert message and len(message.splitlines()) == 1, message
        assert e.exit_code == 2
        return e
    assert isinstance(recipe, Recipe)
    return recipe


def assert_valid(recipe: Recipe) -> None:
    """What every accepted recipe guarantees to the rest of parity."""
    assert validate(recipe, "test") == recipe
    for side in (recipe.reference, recipe.candidate):
        assert side.engine in ENGINES and side.dtype in DTYPES and side.attention in ATTENTIONS and side.device in DEVICES
        assert side.static_len is None or 0 < side.static_len <= 1 << 20
    d = recipe.decoding
    assert 1 <= d.max_frames <= 100000 and 0 <= d.seed and d.temperature > 0 and 0 < d.top_p <= 1
    for x in (d.temperature, d.top_p, d.repetition_penalty):
        assert math.isfinite(x)
    assert all(0 < t < 10 for t in recipe.tolerances.values())
    g = recipe.gates
    assert g.max_rel_l2 is None or (math.isfinite(g.max_rel_l2) and g.max_rel_l2 > 0)
    assert g.min_token_agreement is None or 0 <= g.min_token_agreement <= 1
    recipe.tolerance()  # defined for every accepted pair of dtypes


# TOML scalars (incl. nan/inf and the odd types), and values that are plausible for our keys.
toml_scalar = st.one_of(
    st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(lambda f: "nan" if math.isnan(f) else ("inf" if f == math.inf else ("-inf" if f == -math.inf else repr(f)))),
    st.booleans().map(lambda b: "true" if b else "false"),
    st.sampled_from([*DTYPES, *ATTENTIONS, *DEVICES, *ENGINES, "dynamic", "static:16", "static:0", "static:x", "", "random:tiny",
                     "rmsnorm_lowp@talker:0-1", "nope"]).map(lambda s: f'"{s}"'),
    st.text(max_size=12).map(lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'),
    st.just("1979-05-27T07:32:00Z"),
    st.just("[1, 2]"), st.just('["a", "b"]'), st.just("{ x = 1 }"), st.just("[]"),
)


@st.composite
def toml_documents(draw) -> str:
    """Recipe-shaped TOML: top-level keys, then [section] tables with known and unknown keys."""
    lines = []
    for _ in range(draw(st.integers(0, 3))):
        lines.append(f"{draw(st.sampled_from(TOP_KEYS[:-2] + ['bogus']))} = {draw(toml_scalar)}")
    for _ in range(draw(st.integers(0, 4))):
        section = draw(st.sampled_from([*SECTIONS, "tolerances", "extra"]))
        lines.append(f"[{section}]")
        keys = KEYS.get(section, list(DTYPES) if section == "tolerances" else ["k"])
        for _ in range(draw(st.integers(0, 4))):
            key = draw(st.one_of(st.sampled_from(keys), st.sampled_from(["unknown", "dtyp"])))
            lines.append(f"{key} = {draw(toml_scalar)}")
    return "\n".join(lines) + "\n"


@FAST
@given(toml_documents())
def test_recipe_shaped_toml_parses_or_is_bad_input(text):
    result = outcome(parse_recipe_text, text, "r.toml")
    if isinstance(result, Recipe):
        assert_valid(result)


@FAST
@given(st.text(max_size=200))
def test_any_text_parses_or_is_bad_input(text):
    result = outcome(parse_recipe_text, text, "r.toml")
    if isinstance(result, Recipe):
        assert_valid(result)


json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
    | st.sampled_from([*DTYPES, *ATTENTIONS, "static:32", "dynamic", "reference", "faster"]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)


@st.composite
def recipe_dicts(draw) -> dict:
    """Parsed-TOML-like dicts: known keys with any values, plus unknown keys."""
    data = {}
    for key in draw(st.lists(st.sampled_from(TOP_KEYS + list(SECTIONS)), max_size=5, unique=True)):
        if key in SECTIONS and draw(st.booleans()):
            data[key] = {k: draw(json_like) for k in draw(st.lists(st.sampled_from(KEYS[key] + ["x"]), max_size=4, unique=True))}
        elif key == "tolerances" and draw(st.booleans()):
            data[key] = {k: draw(json_like) for k in draw(st.lists(st.sampled_from([*DTYPES, "fp8"]), max_size=3, unique=True))}
        else:
            data[key] = draw(json_like)
    return data


@FAST
@given(recipe_dicts())
def test_any_table_gives_a_recipe_or_bad_input(data):
    result = outcome(from_dict, data, "recipe 'r.toml'")
    if isinstance(result, Recipe):
        assert_valid(result)


override_text = st.one_of(
    st.text(max_size=40),
    st.builds(lambda k, v: f"{k}={v}",
              st.one_of(st.sampled_from([f"{s}.{k}" for s, ks in KEYS.items() for k in ks] + ["tolerances", "tolerances.bfloat16",
                                         "model", "name", "a.b.c", "decoding", ".x", "tolerances.fp8"]), st.text(max_size=10)),
              st.one_of(toml_scalar, st.text(max_size=10))),
)


@FAST
@given(st.lists(override_text, max_size=4))
def test_any_set_overrides_give_a_recipe_or_bad_input(texts):
    def apply():
        return apply_overrides(default_recipe(), [parse_override(t) for t in texts])

    result = outcome(apply)
    if isinstance(result, Recipe):
        assert_valid(result)


valid_sides = st.builds(
    Side, engine=st.just("reference"), dtype=st.sampled_from(DTYPES), attention=st.sampled_from(ATTENTIONS),
    cache=st.one_of(st.just("dynamic"), st.integers(1, 1 << 20).map(lambda n: f"static:{n}")),
    tf32=st.booleans(), device=st.sampled_from(DEVICES),
)
valid_recipes = st.builds(
    Recipe, name=st.text("abc-_.", min_size=1, max_size=8), model=st.just("random:tiny"), model_seed=st.integers(0, 1000),
    reference=valid_sides, candidate=valid_sides,
    decoding=st.builds(Decoding, do_sample=st.booleans(), seed=st.integers(0, 1 << 40), max_frames=st.integers(1, 100000),
                       temperature=st.floats(0.01, 5), top_k=st.integers(0, 1000), top_p=st.floats(0.01, 1.0),
                       repetition_penalty=st.floats(0.1, 3)),
    gates=st.builds(Gates, hidden_within_tolerance=st.booleans(), max_rel_l2=st.none() | st.floats(1e-9, 1e3),
                    min_token_agreement=st.none() | st.floats(0, 1), no_nonfinite=st.booleans()),
)


@FAST
@given(valid_recipes)
def test_valid_recipes_round_trip_through_a_table(recipe):
    """Every valid recipe is accepted back from its own table (nothing valid is refused)."""
    data = recipe.to_dict()
    data = {k: v for k, v in data.items() if v is not None}
    for side in ("reference", "candidate"):
        data[side] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in data[side].items()}
    data["gates"] = {k: v for k, v in data["gates"].items() if v is not None}
    assert from_dict(data, "test") == recipe


@pytest.mark.parametrize("text,needle", [
    ('name = "x"\n[decoding\n', "line 2"),
    ("[decoding]\ntemperature = nan\n", "finite"),
    ("[gates]\nmax_rel_l2 = inf\n", "finite"),
    ("[decoding]\nrepetition_penalty = -inf\n", "finite"),
    ("[decoding]\nseed = -1\n", "seed must be between 0"),
    ("model_seed = -5\n", "model_seed must be between 0"),
    ('[candidate]\ncache = "static:2000000"\n', "0 < N <= 1048576"),
    ("x = " + "[" * 2000 + "]" * 2000 + "\n", "r.toml"),
    ("[decoding]\nmax_frames = 3\n[decoding]\nseed = 1\n", "line 3"),
])
def test_recipe_errors_name_the_problem(text, needle):
    with pytest.raises(BadInput) as info:
        parse_recipe_text(text, "r.toml")
    assert needle in str(info.value) and len(str(info.value).splitlines()) == 1


def test_set_tolerances_needs_a_dtype():
    with pytest.raises(BadInput, match="tolerances.bfloat16"):
        apply_overrides(default_recipe(), [parse_override("tolerances=5")])
