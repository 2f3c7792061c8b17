"""Property: a damaged run directory never gives a traceback (issue 14).

Hypothesis damages a copy of a real finished run (random bytes, truncation, deletion, or a JSON
value anywhere in a JSON file replaced by a random one: huge integers, NaN, wrong types, deep
nesting) and feeds it to ``parity report`` and ``parity run --resume``. Each must either succeed
(exit 0/1, nothing on stderr, a report/summary written) or refuse with exit 2 and one line on
stderr; and nothing outside the run directory may change.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_reliability_hostile import FAST, PROMPTS, as_process, fingerprint

pytestmark = pytest.mark.slow

FILES = ["summary.json", "run.json", "results/p000.json", "results/p001.json", "points/p000.csv.gz",
         "traces/p000.reference.json", "traces/p000.reference.safetensors", "traces/p000.candidate.forced.safetensors",
         "traces/p001.candidate.free.json", ".parity-run.json", "audio/p000.reference.wav"]
JSON_FILES = [f for f in FILES if f.endswith(".json")]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10 ** 400), max_value=10 ** 400)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=30)
    | st.sampled_from(["../../etc/passwd", "ok", "not_run", "talker", "inf"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)

mutations = st.one_of(
    st.tuples(st.just("bytes"), st.sampled_from(FILES), st.binary(max_size=300)),
    st.tuples(st.just("truncate"), st.sampled_from(FILES), st.floats(0, 0.99)),
    st.tuples(st.just("delete"), st.sampled_from(FILES), st.none()),
    st.tuples(st.just("json"), st.sampled_from(JSON_FILES), st.tuples(st.lists(st.integers(0, 50), max_size=6), json_values)),
)


def _set_somewhere(data, path: list[int], value):
    """Replace the node reached by following ``path`` (indices into keys/items) with ``value``."""
    if not path or not isinstance(data, (dict, list)) or not data:
        return value
    if isinstance(data, dict):
        key = list(data)[path[0] % len(data)]
        data[key] = _set_somewhere(data[key], path[1:], value)
    else:
        i = path[0] % len(data)
        data[i] = _set_somewhere(data[i], path[1:], value)
    return data


def damage(out: Path, mutation) -> None:
    kind, name, arg = mutation
    path = out / name
    if kind != "bytes" and not path.is_file():  # deleted by an earlier damage of the same run
        return
    if kind == "bytes":
        path.write_bytes(arg)
    elif kind == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * arg)])
    elif kind == "delete":
        path.unlink()
    else:
        where, value = arg
        try:  # an earlier damage may already have made it unreadable: that damage then stands alone
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        path.write_text(json.dumps(_set_somewhere(data, where, value)))


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_dir) -> Path:
    root = tmp_path_factory.mktemp("finished-props")
    (root / "p.txt").write_text(PROMPTS)
    outcome = as_process(["run", str(root / "p.txt"), "--out", str(root / "out"), *FAST])
    assert outcome.code in (0, 1), outcome.stderr
    return root


def _run_main(argv: list[str], capfd) -> tuple[int, str]:
    from parity import cli

    saved = sys.argv
    sys.argv = ["parity", *argv]
    capfd.readouterr()
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = saved
    return code, capfd.readouterr().err


def _judge(code: int, err: str, world: Path, out: Path, before: dict, written: str) -> None:
    assert "Traceback" not in err, err
    # Off a terminal a run logs its progress to stderr ("parity: [  0.5 s] ..."): not error lines.
    lines = [ln for ln in err.strip("\n").splitlines() if not ln.startswith("parity: [")]
    if code == 2:
        assert len(lines) == 1 and lines[0].startswith("parity: error: "), err
    else:
        assert code in (0, 1) and lines == [], (code, err)
        assert (out / written).is_file()
    assert fingerprint(world, out) == before


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(mutations, min_size=1, max_size=3))
def test_report_on_a_damaged_run(finished, capfd, muts):
    with tempfile.TemporaryDirectory() as tmp:
        world = Path(tmp)
        out = world / "out"
        shutil.copytree(finished / "out", out)
        for m in muts:
            if (out / m[1]).exists():
                damage(out, m)
        (out / "report.html").unlink(missing_ok=True)
        before = fingerprint(world, out)
        code, err = _run_main(["report", str(out)], capfd)
        _judge(code, err, world, out, before, "report.html")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(mutations, min_size=1, max_size=2))
def test_resume_on_a_damaged_run(finished, capfd, muts):
    with tempfile.TemporaryDirectory() as tmp:
        world = Path(tmp)
        out = world / "out"
        shutil.copytree(finished / "out", out)
        shutil.copy(finished / "p.txt", world / "p.txt")
        for m in muts:
            if (out / m[1]).exists():
                damage(out, m)
        before = fingerprint(world, out)
        code, err = _run_main(["run", str(world / "p.txt"), "--out", str(out), *FAST, "--resume"], capfd)
        _judge(code, err, world, out, before, "summary.json")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(mutations, min_size=1, max_size=2))
def test_compare_on_a_damaged_run(finished, capfd, muts):
    """`parity compare` re-judges from the saved traces: damage anywhere is one line and exit 2, or a
    valid re-analysis written inside the run directory (its default --out, RUN/compare)."""
    with tempfile.TemporaryDirectory() as tmp:
        world = Path(tmp)
        out = world / "out"
        shutil.copytree(finished / "out", out)
        for m in muts:
            if (out / m[1]).exists():
                damage(out, m)
        before = fingerprint(world, out)
        code, err = _run_main(["compare", str(out)], capfd)
        _judge(code, err, world, out, before, "compare/summary.json")
