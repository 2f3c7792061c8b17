"""Scorers, guards, UTMOS checkpoint layouts and paired statistics (parity.mos)."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from parity import mos
from parity.errors import BadInput
from parity.mos import ClipScore, check_gate, get_scorer, paired_stats, score_clip

TIMEOUT_S = 60.0


def call_with_timeout(fn, *args, timeout: float = TIMEOUT_S, **kwargs):
    """Run fn in a daemon thread; fail the test (instead of hanging) if it does not return."""
    result: dict = {}

    def target():
        try:
            result["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # re-raised in the test thread
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        pytest.fail(f"{getattr(fn, '__name__', fn)} did not return within {timeout} s")
    if "error" in result:
        raise result["error"]
    return result["value"]


@pytest.fixture(scope="module")
def dnsmos():
    return get_scorer("dnsmos")


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> tuple[np.ndarray, int]:
    """About 5 s of espeak-ng speech at its native 22.05 kHz."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng; see .ci/apt-packages.txt)")
    out = tmp_path_factory.mktemp("speech") / "speech.wav"
    text = "The quick brown fox jumps over the lazy dog. Numerical parity matters for speech."
    subprocess.run([exe, "-w", str(out), text], check=True, capture_output=True, timeout=60)
    wav, sr = sf.read(out, dtype="float32")
    return wav, sr


# -- DNSMOS -------------------------------------------------------------------------------------


def test_dnsmos_ranks_speech_above_noise_and_silence(dnsmos, speech):
    wav, sr = speech
    rng = np.random.default_rng(0)
    noise = (0.1 * rng.standard_normal(wav.size)).astype(np.float32)
    silence = np.zeros(wav.size, dtype=np.float32)
    results = {
        name: call_with_timeout(score_clip, dnsmos, clip, sr)
        for name, clip in (("speech", wav), ("noise", noise), ("silence", silence))
    }
    for name, result in results.items():
        assert result.ok, f"{name}: {result.error}"
        assert set(result.scores) == {"ovrl", "sig", "bak", "p808"}
    ovrl = {name: r.scores["ovrl"] for name, r in results.items()}
    assert ovrl["speech"] > ovrl["silence"] + 0.3, ovrl
    assert ovrl["speech"] > ovrl["noise"] + 0.3, ovrl


def test_dnsmos_features_are_speechmos_own_bit_for_bit(speech):
    import librosa

    wav, sr = speech
    clip = mos.normalise_loudness(mos.resample(wav, sr, 16000)).astype(np.float32)
    noise = np.clip(np.random.default_rng(0).standard_normal(16000) * 0.1, -1, 1).astype(np.float32)
    for audio in (clip, clip[:4999], noise, np.zeros(800, dtype=np.float32)):
        ref = librosa.feature.melspectrogram(y=audio, sr=16000, n_fft=321, hop_length=160, n_mels=120)
        ref = ((librosa.power_to_db(ref, ref=np.max) + 40) / 40).T
        ours = mos.dnsmos_melspec(audio)
        assert ours.dtype == ref.dtype and ours.shape == ref.shape
        assert np.array_equal(ours, ref)


def test_dnsmos_scores_are_speechmos_run_exactly(dnsmos, speech):
    from speechmos import dnsmos as speechmos_dnsmos

    wav, sr = speech
    audio = mos.one_window(mos.normalise_loudness(mos.resample(wav, sr, 16000)), 16000).astype(np.float32)
    theirs = speechmos_dnsmos.run(audio, 16000)
    ours = dnsmos.score(wav, sr)
    assert ours == {"ovrl": float(theirs["ovrl_mos"]), "sig": float(theirs["sig_mos"]),
                    "bak": float(theirs["bak_mos"]), "p808": float(theirs["p808_mos"])}


def test_dnsmos_scoring_leaves_librosa_feature_unimported():
    # librosa.feature compiles numba kernels on an install's first use (about 20 s, GIL held).
    code = textwrap.dedent("""
        import sys
        import numpy as np
        from parity.mos import get_scorer
        t = np.arange(32000) / 16000
        print(get_scorer("dnsmos").score((0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000)["ovrl"])
        print(sorted(m for m in sys.modules if m.startswith(("librosa.feature", "librosa.sequence"))))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True).stdout
    score, modules = out.strip().splitlines()
    assert 1.0 <= float(score) <= 5.0
    assert modules == "[]"


def test_dnsmos_normalises_loudness(dnsmos, speech):
    """Without the -26 dBFS step a 40 dB quieter copy scores about 1 OVRL point lower."""
    wav, sr = speech
    loud = call_with_timeout(score_clip, dnsmos, wav / np.abs(wav).max(), sr)
    quiet = call_with_timeout(score_clip, dnsmos, 0.01 * wav / np.abs(wav).max(), sr)
    assert loud.ok and quiet.ok
    assert abs(loud.scores["ovrl"] - quiet.scores["ovrl"]) < 0.05


def test_normalise_loudness_hits_target_and_never_clips():
    rng = np.random.default_rng(1)
    quiet = 1e-3 * rng.standard_normal(16000)
    out = mos.normalise_loudness(quiet)
    assert 20 * np.log10(np.sqrt(np.mean(out**2))) == pytest.approx(-26.0, abs=0.01)
    spiky = np.zeros(16000)
    spiky[::4000] = 0.5  # crest factor too high to reach -26 dBFS without passing full scale
    out = mos.normalise_loudness(spiky)
    assert np.max(np.abs(out)) == pytest.approx(1.0)
    assert not mos.normalise_loudness(np.zeros(100)).any()


# -- guards -------------------------------------------------------------------------------------


class RecordingScorer:
    """A Scorer that records what reaches it, to prove the guards run first."""

    name = "recorder"
    sample_rate = 16000
    min_samples = 400

    def __init__(self, fail: bool = False):
        self.calls: list[tuple[int, int]] = []
        self.fail = fail

    def score(self, wav: np.ndarray, sr: int) -> dict[str, float]:
        self.calls.append((wav.size, sr))
        if self.fail:
            raise RuntimeError("model exploded\nsecond line")
        return {"x": float(np.mean(np.abs(wav)))}


BAD_CLIPS = {
    "empty": (np.zeros(0, dtype=np.float32), 16000, None, "empty"),
    "nan": (np.r_[np.zeros(8000), np.nan, np.zeros(8000)], 16000, None, "non-finite"),
    "inf": (np.r_[np.zeros(8000), np.inf, np.zeros(8000)], 16000, None, "non-finite"),
    "stereo": (np.zeros((2, 16000), dtype=np.float32), 16000, None, "2 channels"),
    "stereo-last": (np.zeros((16000, 2), dtype=np.float32), 16000, None, "2 channels"),
    "wrong-rate": (np.zeros(22050, dtype=np.float32), 22050, 24000, "22050 Hz"),
    "narrowband": (np.zeros(8000, dtype=np.float32), 8000, None, "below"),
    "bad-rate": (np.zeros(16000, dtype=np.float32), 0, None, "positive integer"),
    "3-d": (np.zeros((1, 2, 16000), dtype=np.float32), 16000, None, "shape"),
}


@pytest.mark.parametrize("case", sorted(BAD_CLIPS))
def test_guards_stop_bad_clips_before_the_scorer(case):
    wav, sr, expected_sr, message = BAD_CLIPS[case]
    scorer = RecordingScorer()
    result = call_with_timeout(score_clip, scorer, wav, sr, expected_sr=expected_sr)
    assert isinstance(result, ClipScore)
    assert result.scores is None and not result.ok
    assert message in result.error
    assert scorer.calls == []


@pytest.mark.parametrize("case", ["empty", "nan", "stereo", "wrong-rate"])
def test_guards_on_dnsmos_never_hang(dnsmos, case):
    wav, sr, expected_sr, message = BAD_CLIPS[case]
    result = call_with_timeout(score_clip, dnsmos, wav, sr, expected_sr=expected_sr, timeout=30)
    assert message in result.error


def test_dnsmos_rejects_a_tenth_of_a_second(dnsmos):
    result = call_with_timeout(score_clip, dnsmos, np.zeros(1600, dtype=np.float32), 16000)
    assert "shorter than dnsmos's minimum" in result.error
    assert "0.100 s" in result.error


def test_min_length_is_counted_at_the_scorer_rate():
    scorer = RecordingScorer()  # 400 samples at 16 kHz = 600 at 24 kHz
    assert "shorter" in score_clip(scorer, np.ones(599) * 0.1, 24000).error
    assert score_clip(scorer, np.ones(600) * 0.1, 24000).ok


def test_mono_column_and_int16_are_accepted():
    scorer = RecordingScorer()
    assert score_clip(scorer, np.full((16000, 1), 0.1, dtype=np.float32), 16000).ok
    result = score_clip(scorer, np.full(16000, 16384, dtype=np.int16), 16000)
    assert result.scores["x"] == pytest.approx(0.5)


def test_22k_clip_at_its_declared_rate_is_resampled_and_scored(dnsmos, speech):
    wav, sr = speech
    assert sr == 22050
    result = call_with_timeout(score_clip, dnsmos, wav, sr, expected_sr=22050)
    assert result.ok, result.error


def test_scorer_exception_becomes_a_clip_error():
    result = score_clip(RecordingScorer(fail=True), np.ones(16000) * 0.1, 16000)
    assert result.error == "recorder failed: RuntimeError: model exploded"


def test_non_finite_score_is_an_error():
    class NanScorer(RecordingScorer):
        def score(self, wav, sr):
            return {"x": math.nan}

    assert "non-finite x" in score_clip(NanScorer(), np.ones(16000) * 0.1, 16000).error


# -- registry -----------------------------------------------------------------------------------


def test_unknown_scorer_lists_the_available_ones():
    with pytest.raises(BadInput, match=r"unknown scorer 'x'; available: dnsmos, utmos"):
        get_scorer("x")


def test_unknown_option_is_rejected():
    with pytest.raises(BadInput, match="no option 'checkpoint'"):
        get_scorer("dnsmos", checkpoint="/tmp/x.pt")


def test_utmos_without_checkpoint_names_the_env_var(monkeypatch):
    monkeypatch.delenv(mos.UTMOS_ENV, raising=False)
    with pytest.raises(BadInput, match=mos.UTMOS_ENV) as info:
        get_scorer("utmos")
    assert "\n" not in str(info.value)
    assert "TorchScript" in str(info.value) and "hubconf.py" in str(info.value)


def test_utmos_missing_path(tmp_path):
    with pytest.raises(BadInput, match="does not exist"):
        get_scorer("utmos", checkpoint=str(tmp_path / "nope.pt"))


def test_utmos_directory_without_weights(tmp_path):
    with pytest.raises(BadInput, match="holds no .pt/.pth/.safetensors file"):
        get_scorer("utmos", checkpoint=str(tmp_path))


def test_utmos_refuses_pickled_objects_without_running_them(tmp_path):
    import torch

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(BadInput, match="tensors only"):
        get_scorer("utmos", checkpoint=str(path))
    assert not marker.exists()


def test_tarepan_state_dict_is_refused_without_running_a_clone(tmp_path):
    import torch

    path = tmp_path / "utmos22_strong_step7459_v1.pt"
    torch.save({"wav2vec2.layer_norm.weight": torch.ones(2), "blstm.weight_ih_l0": torch.ones(2)}, path)
    with pytest.raises(BadInput, match="tarepan/SpeechMOS state dict.*never does"):
        get_scorer("utmos", checkpoint=str(path))


# -- UTMOS checkpoint layouts (random weights, real UTMOS22-strong architecture) -----------------

HUBCONF = '''
dependencies = ["torch"]

from speechmos.utmos22.strong.model import UTMOS22Strong


def utmos22_strong(progress=True, pretrained=True):
    if pretrained:
        raise RuntimeError("tests never download")
    return UTMOS22Strong().eval()
'''

# Stands in for tarepan's model file (not on PyPI): same network, tarepan's forward(wave, sr).
CLONE_MODEL = '''
import torch
from utmos_pytorch.utmos_torch import UTMOSModel


class UTMOS22Strong(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = UTMOSModel()

    def forward(self, wave, sr):
        assert sr == 16000
        bsz = wave.shape[0]
        out = self.net(wave.unsqueeze(1), torch.zeros(bsz, dtype=torch.int),
                       torch.full((bsz,), 288, dtype=torch.int))
        return out.mean(dim=1).squeeze(1) * 2 + 3
'''


@pytest.fixture(scope="module")
def utmos_files(tmp_path_factory) -> dict[str, Path]:
    """One random-weight UTMOS22 strong saved in every supported layout, plus broken variants."""
    pytest.importorskip(
        "utmos_pytorch", reason="utmos-pytorch is not installed (pip install utmos-pytorch==0.1.0)"
    )
    import torch
    from safetensors.torch import save_file
    from utmos_pytorch import UTMOSScoreTorch
    from utmos_pytorch.utmos_torch import UTMOSModel

    root = tmp_path_factory.mktemp("utmos")
    torch.manual_seed(0)
    state = UTMOSModel().state_dict()
    files = {"state-dict": root / "utmos_state_dict.pt", "safetensors": root / "utmos.safetensors"}
    # The published export also carries fairseq's unused mask embedding.
    exported = {**state, "feature_extractors.0.ssl_model.mask_emb": torch.zeros(768)}
    torch.save(exported, files["state-dict"])
    save_file({k: v.contiguous() for k, v in state.items()}, str(files["safetensors"]))

    # TorchScript made the way utmos-pytorch makes utmos_scripted.pt.
    files["torchscript"] = root / "utmos_scripted.pt"
    scripted = torch.jit.script(UTMOSScoreTorch(ckpt_path=str(files["state-dict"])))
    scripted.save(str(files["torchscript"]))

    clone = root / "SpeechMOS"
    package = clone / "speechmos" / "utmos22" / "strong"
    package.mkdir(parents=True)
    for init in (clone / "speechmos", clone / "speechmos" / "utmos22", package):
        (init / "__init__.py").write_text("")
    (package / "model.py").write_text(textwrap.dedent(CLONE_MODEL))
    (clone / "hubconf.py").write_text(textwrap.dedent(HUBCONF))
    torch.save({f"net.{k}": v for k, v in state.items()}, clone / mos.UTMOS_HUB_CHECKPOINT)
    files["hub"] = clone

    missing = dict(state)
    del missing["output_layers.1.net.3.bias"]
    files["missing"] = root / "missing.pt"
    torch.save(missing, files["missing"])
    files["unexpected"] = root / "unexpected.safetensors"
    save_file({"extra.weight": torch.ones(3), **{k: v.contiguous() for k, v in state.items()}},
              str(files["unexpected"]))
    return files


@pytest.fixture(scope="module")
def probe_clip() -> np.ndarray:
    rng = np.random.default_rng(3)
    t = np.arange(16000) / 16000
    return (0.2 * np.sin(2 * np.pi * 220 * t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture(scope="module")
def utmos_scorers(utmos_files, dnsmos) -> dict:
    """Each layout loaded once, after Microsoft's speechmos is imported (the name-clash case)."""
    return {
        layout: get_scorer("utmos", checkpoint=str(utmos_files[layout]))
        for layout in ("state-dict", "safetensors")
    }


def test_utmos_every_layout_loads_and_gives_the_same_score(utmos_scorers, probe_clip):
    scores = {}
    for layout, scorer in utmos_scorers.items():
        result = call_with_timeout(score_clip, scorer, probe_clip, 16000)
        assert result.ok, f"{layout}: {result.error}"
        scores[layout] = result.scores["utmos"]
    # Both hold the same weights: a wrong conditioning or scale in any path would show here.
    assert max(scores.values()) - min(scores.values()) < 1e-4, scores


def test_utmos_layout_is_detected(utmos_scorers):
    assert {k: s.layout for k, s in utmos_scorers.items()} == {"state-dict": "state-dict", "safetensors": "state-dict"}


def test_torchscript_and_clones_are_never_run(utmos_files, tmp_path):
    """A TorchScript file is a program and a clone's hubconf.py is code: neither is run (issue 14)."""
    with pytest.raises(BadInput, match="is a TorchScript program"):
        get_scorer("utmos", checkpoint=str(utmos_files["torchscript"]))
    clone = tmp_path / "clone"
    shutil.copytree(utmos_files["hub"], clone)
    marker = tmp_path / "ran"
    (clone / "hubconf.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    with pytest.raises(BadInput):  # its weights are not a utmos-pytorch state dict
        get_scorer("utmos", checkpoint=str(clone))
    assert not marker.exists()


def test_a_directory_with_one_state_dict_loads_without_running_its_code(utmos_files, tmp_path):
    clone = tmp_path / "clone"
    clone.mkdir()
    shutil.copy(utmos_files["safetensors"], clone / "utmos.safetensors")
    marker = tmp_path / "ran"
    (clone / "hubconf.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    assert get_scorer("utmos", checkpoint=str(clone)).path == clone / "utmos.safetensors"
    assert not marker.exists()


def test_utmos_env_var_is_used(utmos_files, monkeypatch):
    monkeypatch.setenv(mos.UTMOS_ENV, str(utmos_files["safetensors"]))
    assert get_scorer("utmos").path == utmos_files["safetensors"]


def test_utmos_rejects_clips_under_400_samples(utmos_scorers):
    result = score_clip(utmos_scorers["state-dict"], np.full(399, 0.1), 16000)
    assert "minimum 400 samples" in result.error


@pytest.mark.parametrize(
    "variant, message", [("missing", "1 missing keys"), ("unexpected", "1 unexpected keys")]
)
def test_utmos_rejects_mismatched_keys(utmos_files, variant, message):
    with pytest.raises(BadInput, match=message) as info:
        get_scorer("utmos", checkpoint=str(utmos_files[variant]))
    assert str(utmos_files[variant]) in str(info.value)
    assert info.value.exit_code == 2


def test_torchscript_of_another_model_is_refused_unrun(tmp_path):
    import torch

    class TwoScores(torch.nn.Module):
        def forward(self, wave: torch.Tensor) -> torch.Tensor:
            return torch.stack([wave.mean(), wave.std()])

    path = tmp_path / "other.pt"
    torch.jit.script(TwoScores()).save(str(path))
    with pytest.raises(BadInput, match="TorchScript program"):
        get_scorer("utmos", checkpoint=str(path))


# -- paired statistics and gate -----------------------------------------------------------------


def test_paired_stats_on_fixed_numbers():
    stats = paired_stats([4.0, 4.2, 3.8, 4.1], [3.9, 4.3, 3.2, 4.1])
    assert stats["n"] == 4 and stats["n_dropped"] == 0
    assert stats["deltas"] == pytest.approx([-0.1, 0.1, -0.6, 0.0])
    assert stats["mean_delta"] == pytest.approx(-0.15)
    assert stats["std_delta"] == pytest.approx(np.std([-0.1, 0.1, -0.6, 0.0], ddof=1))
    assert stats["std_delta"] == pytest.approx(0.3109126, abs=1e-6)
    assert stats["worst_delta"] == pytest.approx(-0.6)
    assert stats["best_delta"] == pytest.approx(0.1)
    assert stats["mean_ref"] == pytest.approx(4.025)
    assert stats["mean_cand"] == pytest.approx(3.875)


def test_paired_stats_drops_failed_pairs():
    stats = paired_stats([4.0, None, 3.0, float("nan")], [3.5, 4.0, None, 4.0])
    assert stats["n"] == 1 and stats["n_dropped"] == 3
    assert stats["mean_delta"] == pytest.approx(-0.5) and stats["std_delta"] == 0.0


def test_paired_stats_length_mismatch():
    with pytest.raises(ValueError, match="equal lengths"):
        paired_stats([1.0, 2.0], [1.0])


def test_gate():
    stats = paired_stats([4.0, 4.2, 3.8, 4.1], [3.9, 4.3, 3.2, 4.1])  # mean -0.15, worst -0.6
    assert check_gate(stats) == (True, "no MOS gate set")
    passed, reason = check_gate(stats, min_mean_delta=-0.2)
    assert passed and "mean delta -0.150 >= -0.200" in reason
    passed, reason = check_gate(stats, min_mean_delta=-0.1)
    assert not passed and "mean delta -0.150 < -0.100" in reason
    passed, reason = check_gate(stats, min_mean_delta=-0.2, min_worst_delta=-0.5)
    assert not passed and "worst delta -0.600 < -0.500" in reason and "mean" not in reason
    passed, _ = check_gate(stats, min_mean_delta=-0.2, min_worst_delta=-0.6)
    assert passed
    passed, reason = check_gate(paired_stats([None], [4.0]), min_mean_delta=-0.1)
    assert not passed and "no paired scores" in reason
