"""The engine registry, the trace layout engines declare, the shared lifecycle, and bringing
your own engine: a third-party engine registered through a ``parity.engines`` entry point and
the worked example engine, each run through ``parity run`` with the divergence found where
it was planted."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
THIRD_PARTY = REPO / "tests" / "third_party"


def _site_with_entry_point(root: Path) -> Path:
    """A directory that, on sys.path, makes importlib.metadata see an installed distribution
    declaring ``noisy-predictor`` in the ``parity.engines`` group: what pip writes for a
    package with ``[project.entry-points."parity.engines"]``."""
    dist = root / "parity_noisy_engine-0.1.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: parity-noisy-engine\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[parity.engines]\nnoisy-predictor = parity_noisy_engine:NoisyPredictorEngine\n")
    return root


def parity(*args: str, extra_path: list[Path] = (), env: dict | None = None) -> subprocess.CompletedProcess:
    paths = [str(p) for p in extra_path] + [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "parity.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env=full_env, timeout=600)


def _recipe(tmp_path: Path, candidate_engine: str, frames: int = 4) -> Path:
    """Both sides fp32/sdpa/dynamic: only the engine differs, so everything before the planted
    point must be bit-identical."""
    path = tmp_path / f"{candidate_engine}.toml"
    same = 'dtype = "float32"\nattention = "sdpa"\ncache = "dynamic"\n'
    path.write_text(f'name = "plugin"\nmodel = "random:tiny"\n[reference]\nengine = "reference"\n{same}'
                    f'[candidate]\nengine = "{candidate_engine}"\n{same}[decoding]\nmax_frames = {frames}\n'
                    '[gates]\nhidden_within_tolerance = true\n')
    return path


def _prompts(tmp_path: Path) -> Path:
    path = tmp_path / "p.txt"
    path.write_text("Hello, this is a quick parity check.\n")
    return path


def _first_divergence(out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    return summary["prompts"][0]["comparison"]["first_divergence"]


def _points_before(out: Path, where: dict) -> pd.DataFrame:
    """Every compared point before the first divergence, in execution order."""
    with gzip.open(out / "points" / "p000.csv.gz", "rt") as f:
        points = pd.read_csv(f)
    hit = points.index[(points.component == where["component"]) & (points.step == where["step"])
                       & (points.substep == where["substep"]) & (points.point == where["point"])]
    assert len(hit) == 1
    return points.iloc[: hit[0]]


# -- the registry ----------------------------------------------------------------------------

def test_builtins_are_lazy_entries_and_entry_points_are_found(tmp_path, monkeypatch):
    from parity.engines import registry

    assert registry.BUILTIN_ENGINES["reference"] == "parity.engines.reference:ReferenceEngine"
    assert "noisy-predictor" not in registry.available()
    monkeypatch.syspath_prepend(str(THIRD_PARTY))
    monkeypatch.syspath_prepend(str(_site_with_entry_point(tmp_path / "site")))
    found = registry.available()
    assert found["noisy-predictor"].target == "parity_noisy_engine:NoisyPredictorEngine"
    assert found["noisy-predictor"].source == "entry point (parity-noisy-engine)"
    cls = registry.engine_class("noisy-predictor")
    assert cls.__name__ == "NoisyPredictorEngine" and registry.variant_family("noisy-predictor") == "reference"


def test_an_entry_point_cannot_take_a_builtin_name(tmp_path, monkeypatch):
    from parity.engines import registry

    dist = tmp_path / "evil-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: evil\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[parity.engines]\nreference = os:path\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert registry.available()["reference"].source == "built-in"
    assert any(e.shadowed and e.name == "reference" for e in registry.entries())


def test_a_registration_that_is_not_an_engine_is_bad_input(tmp_path, monkeypatch):
    from parity.engines import registry
    from parity.errors import BadInput

    dist = tmp_path / "broken-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[parity.engines]\nnot-an-engine = json:dumps\nmissing = no_such_module_x:E\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(BadInput, match="not a parity.engines.base.Engine subclass"):
        registry.engine_class("not-an-engine")
    with pytest.raises(BadInput, match="'no_such_module_x' does not import"):
        registry.engine_class("missing")


def test_unknown_engine_is_one_line_exit_2_listing_what_exists(tmp_path):
    proc = parity("run", str(_prompts(tmp_path)), "--out", str(tmp_path / "out"), "--set", "candidate.engine=nope")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "unknown engine 'nope'; available: reference, faster, faster-qwen3-tts-batch, example-perturbed" in lines[0]
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_parity_engines_lists_entry_points(tmp_path):
    proc = parity("engines", extra_path=[_site_with_entry_point(tmp_path / "site"), THIRD_PARTY])
    assert proc.returncode == 0, proc.stderr
    assert "noisy-predictor" in proc.stdout and "parity-noisy-engine" in proc.stdout
    assert "example-perturbed" in proc.stdout


def test_variants_on_an_engine_that_applies_none_are_refused():
    from parity.errors import BadInput
    from parity.recipe import Side, _validate_side

    with pytest.raises(BadInput, match="applies to the faster engine only"):  # reference variants are fine on a reference wrapper
        _validate_side("r.toml [candidate]", Side(engine="example-perturbed", variants=("cuda_graphs=off",)))
    assert _validate_side("r", Side(engine="example-perturbed", variants=("rope_lowp",))).variants == ("rope_lowp",)


# -- bringing your own engine, end to end ------------------------------------------------------

def test_third_party_engine_via_entry_point_divergence_found_where_planted(tmp_path):
    site = _site_with_entry_point(tmp_path / "site")
    out = tmp_path / "out"
    proc = parity("run", str(_prompts(tmp_path)), "--recipe", str(_recipe(tmp_path, "noisy-predictor")), "--out", str(out),
                  "--mos", "none", extra_path=[site, THIRD_PARTY])
    assert proc.returncode == 1, proc.stderr  # the hidden_within_tolerance gate fails: a real divergence
    first = _first_divergence(out)
    # Planted at predictor frame 1, sub-step 3, layer 0 (NoisyPredictorEngine.FRAME/SUBSTEP/LAYER).
    assert (first["component"], first["step"], first["substep"], first["point"]) == ("predictor", 1, 3, "layer0")
    before = _points_before(out, first)
    assert len(before) > 20 and (before["max_abs"] == 0).all()  # bit-identical up to the planted point
    run = json.loads((out / "run.json").read_text())
    assert run["sides"]["candidate"]["engine"] == "noisy-predictor"


def test_worked_example_engine_divergence_found_where_planted(tmp_path):
    from parity.engines.example_perturbed import PerturbedEngine

    out = tmp_path / "out"
    proc = parity("run", str(_prompts(tmp_path)), "--recipe", str(_recipe(tmp_path, "example-perturbed")), "--out", str(out),
                  "--mos", "none")
    assert proc.returncode == 1, proc.stderr
    first = _first_divergence(out)
    assert (first["component"], first["step"], first["point"]) == ("talker", PerturbedEngine.STEP, f"layer{PerturbedEngine.LAYER}")
    assert (_points_before(out, first)["max_abs"] == 0).all()


# -- the trace layout ------------------------------------------------------------------------

def test_reference_engine_declares_the_layout_its_traces_have(tiny_dir, prompt):
    from parity.engines.reference import ReferenceEngine
    from parity.recipe import Decoding, Side

    engine = ReferenceEngine(Side(device="cpu"), tiny_dir)
    with engine:
        layout = engine.layout()
        trace = engine.run(prompt, Decoding(max_frames=3))
    talker, pred = layout.component("talker"), layout.component("predictor")
    assert (talker.substeps, pred.substeps, layout.codebooks) == (1, 15, 16)
    assert trace.talker_hidden.shape[1] == talker.layers + 1 and trace.pred_hidden.shape[1:3] == (pred.substeps, pred.layers + 1)
    assert trace.layout == layout
    trace.meta.pop("layout")
    assert trace.layout == layout  # read off the shapes for traces saved before layouts were declared


def test_logits_only_candidate_is_compared_on_its_logits(tiny_dir, prompt):
    """An engine that cannot hook its layers records only logits and tokens: compare still finds
    the first logit divergence and the first token flip."""
    from parity import compare
    from parity.engines.reference import ReferenceEngine
    from parity.recipe import Decoding, Side

    with ReferenceEngine(Side(device="cpu"), tiny_dir) as engine:
        ref = engine.run(prompt, Decoding(max_frames=4))
    cand = type(ref)(**{**ref.__dict__, "talker_hidden": torch.zeros(0), "pred_hidden": torch.zeros(0)})
    cand.pred_logits = ref.pred_logits.clone()
    cand.pred_logits[2, 5] += 0.5 * ref.pred_logits[2, 5].std()
    points = compare.point_frame(cand, ref, 1e-5)
    assert set(points["point"]) == {"logits"}
    over = points[points["over"]]
    assert (over.iloc[0]["component"], over.iloc[0]["step"], over.iloc[0]["substep"]) == ("predictor", 2, 5)


# -- the lifecycle ---------------------------------------------------------------------------

class _LoadFails:
    """Stands in for an engine's load only (the lifecycle's error mapping is under test)."""

    def __init__(self, error: BaseException):
        from parity.recipe import Side

        self.side, self.error, self.closed = Side(device="cpu"), error, False

    def load(self):
        raise self.error

    def close(self):
        self.closed = True


@pytest.mark.parametrize("error, exit_code, needle", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), 3, "out of memory while loading"),
    (OSError("Error no file named model.safetensors"), 2, "does not load"),
])
def test_load_errors_map_to_exit_codes_and_close_the_half_loaded_engine(tiny_dir, error, exit_code, needle):
    from parity.engines.lifecycle import EngineHost
    from parity.recipe import default_recipe

    host = EngineHost(default_recipe(), tiny_dir, [])
    host.checked = True
    engine = _LoadFails(error)
    with pytest.raises(Exception) as info:
        host.load(engine, "candidate")
    assert info.value.exit_code == exit_code and needle in str(info.value) and "[candidate]" in str(info.value)
    assert engine.closed


def test_bisect_runs_preflight_now(tmp_path, tiny_dir):
    """bisect used to load models without preflight: a prompt too long for the candidate's cache
    is now refused in one line, exit 2, before any model loads."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("word " * 60 + "\n")
    proc = parity("bisect", str(prompts), "--recipe", "recipes/bisect-smoke.toml", "--set", "candidate.cache=static:32",
                  "--steps", "2", "--out", str(tmp_path / "b"))
    assert proc.returncode == 2, proc.stderr
    assert "needs at least" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_bisect_engine_crash_is_exit_3_one_line(tmp_path):
    """A candidate engine that crashes mid-bisect: one line, exit 3 (was a traceback)."""
    site = _site_with_entry_point(tmp_path / "site")
    crash = tmp_path / "crash"
    crash.mkdir()
    (crash / "parity_noisy_engine.py").write_text(
        "from parity.engines.reference import ReferenceEngine\n"
        "class NoisyPredictorEngine(ReferenceEngine):\n"
        "    name = 'noisy-predictor'\n    variant_family = 'reference'\n"
        "    def run(self, *a, **k):\n        raise RuntimeError('kernel exploded')\n")
    proc = parity("bisect", str(_prompts(tmp_path)), "--recipe", str(_recipe(tmp_path, "noisy-predictor")),
                  "--set", "candidate.dtype=bfloat16", "--steps", "2", "--out", str(tmp_path / "b"), extra_path=[site, crash])
    assert proc.returncode == 3, proc.stderr
    assert "kernel exploded" in proc.stderr and "Traceback" not in proc.stderr


def test_small_models_run_with_one_cpu_thread(tiny_dir, tmp_path, monkeypatch):
    from parity.engines.lifecycle import THREADS_ENV, cpu_threads
    from parity.errors import BadInput

    monkeypatch.delenv(THREADS_ENV, raising=False)
    assert cpu_threads(tiny_dir) == 1  # hidden size 64
    big = tmp_path / "big"
    big.mkdir()
    config = json.loads((Path(tiny_dir) / "config.json").read_text())
    config["talker_config"]["hidden_size"] = 1024
    (big / "config.json").write_text(json.dumps(config))
    assert cpu_threads(big) is None  # torch's default for real model sizes
    monkeypatch.setenv(THREADS_ENV, "3")
    assert cpu_threads(tiny_dir) == 3
    monkeypatch.setenv(THREADS_ENV, "many")
    with pytest.raises(BadInput, match=THREADS_ENV):
        cpu_threads(tiny_dir)
