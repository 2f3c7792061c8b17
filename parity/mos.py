"""Speech-quality scorers (DNSMOS, UTMOS22 strong), per-clip guards and paired comparison.

Scorers
-------
``dnsmos`` (default): Microsoft's DNSMOS P.835 + P.808 from the ``speechmos`` wheel (weights inside
it, works offline). Audio is resampled to 16 kHz and its RMS is set to -26 dBFS first (OVRL moves
with loudness), with the gain capped so that no sample exceeds full scale. Reports ``ovrl``,
``sig``, ``bak`` and ``p808``.

``utmos``: UTMOS22 strong learner, from a local checkpoint given as ``checkpoint=`` or by the
environment variable ``PARITY_UTMOS_CHECKPOINT``: a **state dict** (``.pt``/``.pth`` via
``torch.load(weights_only=True)``, or ``.safetensors``) of the utmos-pytorch model (keys
``feature_extractors.*``/``output_layers.*``, e.g. the ``utmos_state_dict.pt`` of
``Blinorot/UTMOS-PyTorch``), or a directory holding exactly one such file. The architecture comes
only from the installed PyPI package ``utmos-pytorch``. Keys are checked strictly: any missing or
unexpected key is a ``BadInput`` naming the file, except ``...ssl_model.mask_emb``, the fairseq
pretraining mask embedding that the exported state dict carries and inference never reads. A
Lightning-style ``{"state_dict": {...}}`` wrapper is unwrapped.

Nothing but tensors is ever loaded from a user path: a TorchScript file (a program) is refused,
and a tarepan/SpeechMOS clone's ``hubconf.py`` is never run (its state dict is refused with a
message saying so). The file must be a regular file under a size limit (a FIFO is refused rather
than blocking). Nothing is downloaded. Clips are scored one at a time (batch padding shifts UTMOS
scores).

Guards (:func:`score_clip`) run before any scorer sees audio: empty, NaN/inf, more than one
channel, a rate other than the caller's expected one or below the scorer's rate, and clips shorter
than the scorer's minimum become a per-clip error instead of a score (DNSMOS would loop forever on
an empty array).
"""

from __future__ import annotations

import inspect
import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np

from parity.errors import BadInput

UTMOS_ENV = "PARITY_UTMOS_CHECKPOINT"
UTMOS_HUB_CHECKPOINT = "utmos22_strong_step7459_v1.pt"
TARGET_DBFS = -26.0
_WEIGHT_SUFFIXES = (".pt", ".pth", ".safetensors")
# Present in the exported utmos-pytorch state dict (fairseq keeps it for pretraining masking);
# the fairseq-free model has no such parameter and inference with mask=False never reads it.
_UTMOS_IGNORABLE_KEYS = frozenset({"feature_extractors.0.ssl_model.mask_emb"})
_ACCEPTED = (
    "a utmos-pytorch state dict (.pt/.pth/.safetensors, tensors only; no TorchScript, no hubconf.py), "
    "or a directory holding exactly one such file"
)


class Scorer(Protocol):
    """A speech-quality model that scores one mono clip at a time."""

    name: str
    min_samples: int  # shortest clip accepted, in samples at ``sample_rate``
    sample_rate: int  # the model's native rate; other rates are resampled to it

    def score(self, wav: np.ndarray, sr: int) -> dict[str, float]:
        """Score one finite mono float clip of at least ``min_samples`` (after resampling)."""
        ...


@dataclass
class ClipScore:
    """Outcome of scoring one clip: either ``scores`` or a one-line ``error``."""

    scores: dict[str, float] | None
    error: str | None
    scorer: str = ""

    @property
    def ok(self) -> bool:
        """True when the clip was scored."""
        return self.error is None


def resample(wav: np.ndarray, sr: int, target_sr: int) -> np.ndarray:
    """Resample a mono float waveform to ``target_sr`` (no-op when the rates match)."""
    if sr == target_sr:
        return wav
    import soxr  # what librosa.resample calls by default ("soxr_hq"), without librosa's lazy-import cost

    return soxr.resample(wav, sr, target_sr, quality="HQ")


def normalise_loudness(wav: np.ndarray, dbfs: float = TARGET_DBFS) -> np.ndarray:
    """Scale to an RMS of ``dbfs`` dB full scale, never past a peak of 1.0; silence stays silent."""
    rms = float(np.sqrt(np.mean(np.square(wav, dtype=np.float64))))
    if rms < 1e-10:
        return wav
    peak = float(np.max(np.abs(wav)))
    gain = min(10.0 ** (dbfs / 20.0) / rms, 1.0 / peak)
    return wav * gain


DNSMOS_WINDOW_S = 9.01  # the length DNSMOS scores; speechmos repeats shorter clips up to it


def one_window(audio: np.ndarray, sr: int) -> np.ndarray:
    """A clip shorter than DNSMOS's window, repeated to exactly one window.

    speechmos repeats a short clip by doubling until it passes 9.01 s and then scores every
    1-second hop: a 2 s clip becomes 16 s and 7 windows of the same repeated signal, 7x the
    cost of one. Repeating it to one window scores the same repeated signal once.
    """
    need = int(DNSMOS_WINDOW_S * sr) + 1
    if len(audio) == 0 or len(audio) >= need:
        return audio
    return np.tile(audio, -(-need // len(audio)))[:need]


def dnsmos_melspec(audio: np.ndarray, n_mels: int = 120, frame_size: int = 320, hop_length: int = 160,
                   sr: int = 16000, to_db: bool = True) -> np.ndarray:
    """DNSMOS P.808's input features, computed as speechmos computes them (librosa's centred,
    zero-padded Hann STFT of ``frame_size + 1`` points, power mel spectrogram, ``power_to_db`` with
    ``ref=np.max`` and ``top_db=80``, then ``(dB + 40) / 40``), bit for bit, in numpy.

    Why not librosa's own: the first ``librosa.feature`` call of an install compiles numba kernels
    DNSMOS never uses (about 20 s on a 2-core CPU), on parity's scoring thread, holding the GIL
    while the engines decode the next prompts. Only the mel filterbank comes from librosa (plain numpy).
    """
    from librosa.filters import mel as mel_filters
    from scipy.signal import get_window

    n_fft = frame_size + 1
    y = np.asarray(audio, dtype=np.float32)
    padded = np.pad(y, n_fft // 2, mode="constant")
    n_frames = 1 + (padded.size - n_fft) // hop_length
    frames = np.lib.stride_tricks.as_strided(padded, shape=(n_frames, n_fft),
                                             strides=(padded.strides[0] * hop_length, padded.strides[0]), writeable=False)
    # As librosa: the float64 window times float32 frames, transformed in float64, stored as complex64.
    spectrum = np.fft.rfft(get_window("hann", n_fft, fftbins=True) * frames, axis=-1).astype(np.complex64)
    mel = np.einsum("tf,mf->mt", np.abs(spectrum) ** 2, mel_filters(sr=sr, n_fft=n_fft, n_mels=n_mels), optimize=True)
    if to_db:
        amin, top_db = 1e-10, 80.0
        log = 10.0 * np.log10(np.maximum(amin, mel))
        log -= 10.0 * np.log10(np.maximum(amin, mel.max()))
        mel = (np.maximum(log, log.max() - top_db) + 40) / 40
    return mel.T


class DnsmosScorer:
    """DNSMOS P.835 (OVRL/SIG/BAK) and P.808 from Microsoft's ``speechmos`` package."""

    name = "dnsmos"
    sample_rate = 16000
    # DNSMOS tiles anything under its 9.01 s window by repetition; below half a second the
    # score is mostly of the repetition, and a TTS clip that short is a failure anyway.
    min_samples = 8000

    def __init__(self) -> None:
        try:
            from speechmos import dnsmos
        except ImportError as exc:
            raise BadInput(
                f"scorer 'dnsmos' needs Microsoft's speechmos package ({exc}); "
                "install it with `pip install speechmos==0.0.1.1` (tarepan's SpeechMOS is a "
                "different package with the same import name)"
            ) from None
        # speechmos's own model and scoring loop (dnsmos.run's non-personalised models), with its
        # P.808 features computed without librosa.feature (see dnsmos_melspec).
        models = Path(dnsmos.__file__).parent / "dnsmos_models"
        self._model = dnsmos.DNSMOS(str(models / "sig_bak_ovr.onnx"), str(models / "model_v8.onnx"))
        self._model.audio_melspec = dnsmos_melspec

    def score(self, wav: np.ndarray, sr: int) -> dict[str, float]:
        """Resample to 16 kHz, normalise to -26 dBFS and return ovrl, sig, bak and p808."""
        audio = one_window(normalise_loudness(resample(wav, sr, self.sample_rate)), self.sample_rate)
        out = self._model(audio.astype(np.float32), self.sample_rate, False)
        return {
            "ovrl": float(out["ovrl_mos"]),
            "sig": float(out["sig_mos"]),
            "bak": float(out["bak_mos"]),
            "p808": float(out["p808_mos"]),
        }


class UtmosScorer:
    """UTMOS22 strong learner wrapped around a loaded torch model (see :func:`load_utmos`)."""

    name = "utmos"
    sample_rate = 16000
    min_samples = 400  # shorter inputs fail inside the wav2vec2 feature extractor

    def __init__(self, predict: Callable, layout: str, path: Path, device: str = "cpu") -> None:
        self._predict = predict
        self.layout = layout
        self.path = path
        self.device = device

    def score(self, wav: np.ndarray, sr: int) -> dict[str, float]:
        """Resample to 16 kHz and return ``{"utmos": score}`` for this one clip (batch size 1)."""
        import torch

        audio = resample(wav, sr, self.sample_rate).astype(np.float32)
        with torch.inference_mode():
            out = self._predict(torch.from_numpy(audio).to(self.device).unsqueeze(0))
        return {"utmos": float(torch.as_tensor(out).reshape(-1)[0])}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__


def _check_keys(model_keys: set[str], state: dict, path: Path, ignorable=frozenset()) -> None:
    missing = sorted(model_keys - state.keys())
    unexpected = sorted(state.keys() - model_keys - ignorable)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        raise BadInput(
            f"UTMOS checkpoint {path} does not match the model: {'; '.join(parts)}; "
            f"pass the matching checkpoint ({_ACCEPTED})"
        )


def _load_state_dict(path: Path) -> dict:
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            import warnings

            with warnings.catch_warnings():  # stderr stays one line: no torch serialization notices
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BadInput(
            f"UTMOS checkpoint {path} cannot be read as tensors only "
            f"({_one_line(exc)}); "
            f"pass {_ACCEPTED}"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise BadInput(f"UTMOS checkpoint {path} is not a state dict of tensors; pass {_ACCEPTED}")
    return state


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/__torch__/" in name for name in archive.namelist())


def _load_utmos_pytorch(path: Path, state: dict, device: str) -> Callable:
    try:
        from utmos_pytorch.utmos_torch import UTMOSModel, remove_weight_norm_for_jit
    except ImportError:
        raise BadInput(
            f"UTMOS checkpoint {path} is a state dict; its architecture comes from the package "
            "utmos-pytorch: `pip install utmos-pytorch==0.1.0` (or pass a TorchScript file)"
        ) from None
    import torch

    model = UTMOSModel()
    _check_keys(set(model.state_dict()), state, path, _UTMOS_IGNORABLE_KEYS)
    model.load_state_dict({k: v for k, v in state.items() if k not in _UTMOS_IGNORABLE_KEYS})
    model.eval().to(device)
    remove_weight_norm_for_jit(model)  # folds weight_g/weight_v once instead of every call

    def predict(wave: torch.Tensor) -> torch.Tensor:
        # Same conditioning as utmos_pytorch.UTMOSScoreTorch.forward: domain 0, judge 288.
        out = model(
            wav=wave.unsqueeze(1),
            domains=torch.zeros(1, dtype=torch.int, device=wave.device),
            judge_id=torch.full((1,), 288, dtype=torch.int, device=wave.device),
        )
        return out.mean(dim=1).squeeze(1) * 2 + 3

    return predict


def _directory_weights(directory: Path) -> Path:
    """The one weights file in a checkpoint directory (a SpeechMOS clone included). Nothing else in
    the directory is read, and its hubconf.py is never run."""
    found = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise BadInput(
            f"UTMOS checkpoint directory {directory} holds several checkpoints ({', '.join(p.name for p in found[:4])}); "
            "pass the file itself"
        )
    raise BadInput(f"UTMOS checkpoint directory {directory} holds no .pt/.pth/.safetensors file; pass {_ACCEPTED}")


def load_utmos(checkpoint: str | os.PathLike | None = None, device: str = "cpu") -> UtmosScorer:
    """Load UTMOS22 strong from ``checkpoint`` (or ``$PARITY_UTMOS_CHECKPOINT``).

    Only tensors are loaded from the user's path (safetensors, or ``torch.load(weights_only=True)``)
    into the architecture of the installed ``utmos-pytorch`` package, with strict keys. A directory
    is searched for its one weights file; no code in it (``hubconf.py``) is ever run. TorchScript
    files are programs and are refused. Raises ``BadInput`` for anything else.
    """
    from parity import limits

    source = checkpoint or os.environ.get(UTMOS_ENV)
    if not source:
        raise BadInput(
            f"scorer 'utmos' needs a local checkpoint: set {UTMOS_ENV} or pass checkpoint= "
            f"(--utmos-checkpoint): {_ACCEPTED}"
        )
    path = Path(source).expanduser()
    if not path.exists():
        raise BadInput(f"UTMOS checkpoint {path} does not exist; pass {_ACCEPTED}")
    if path.is_dir():
        path = _directory_weights(path)
    limits.check_readable(path, "UTMOS checkpoint", limits.CHECKPOINT_LIMIT)  # a FIFO would block forever
    if _is_torchscript(path):
        raise BadInput(
            f"UTMOS checkpoint {path} is a TorchScript program; parity loads only tensors from a user path, "
            f"never code: pass {_ACCEPTED}"
        )
    state = _load_state_dict(path)
    if any(k.startswith("wav2vec2.") for k in state) and any(k.startswith("blstm.") for k in state):
        raise BadInput(
            f"UTMOS checkpoint {path} is a tarepan/SpeechMOS state dict, whose architecture parity would have to run "
            "from the clone's own code (it never does); pass the utmos-pytorch state dict (utmos_state_dict.pt)"
        )
    return UtmosScorer(_load_utmos_pytorch(path, state, device), "state-dict", path, device)


_FACTORIES: dict[str, Callable[..., Scorer]] = {"dnsmos": DnsmosScorer, "utmos": load_utmos}
SCORER_NAMES = tuple(_FACTORIES)


def get_scorer(name: str, **options) -> Scorer:
    """Build the scorer ``name`` (``dnsmos`` or ``utmos``); options go to its constructor.

    ``utmos`` takes ``checkpoint=`` and ``device=``; ``dnsmos`` takes none.
    """
    factory = _FACTORIES.get(name)
    if factory is None:
        raise BadInput(f"unknown scorer '{name}'; available: {', '.join(_FACTORIES)}")
    accepted = set(inspect.signature(factory).parameters)
    extra = sorted(set(options) - accepted)
    if extra:
        raise BadInput(
            f"scorer '{name}' has no option {', '.join(repr(k) for k in extra)}; "
            f"it takes: {', '.join(sorted(accepted)) or 'no options'}"
        )
    return factory(**options)


def _as_mono(wav) -> tuple[np.ndarray | None, str | None]:
    audio = np.asarray(wav)
    if audio.dtype.kind in "iu":
        audio = audio.astype(np.float64) / float(np.iinfo(audio.dtype).max + 1)
    elif audio.dtype.kind != "f":
        return None, f"audio of dtype {audio.dtype} is not a float or integer waveform"
    if audio.ndim == 2 and 1 in audio.shape:
        audio = audio.reshape(-1)
    if audio.ndim == 2:
        channels = min(audio.shape)
        return None, f"audio has {channels} channels {audio.shape}; downmix to mono first"
    if audio.ndim != 1:
        return None, f"audio has shape {audio.shape}; expected a mono 1-D waveform"
    return audio, None


def check_clip(
    scorer: Scorer, wav, sr: int, expected_sr: int | None = None
) -> tuple[np.ndarray | None, str | None]:
    """Validate one clip for ``scorer``: return ``(mono float waveform, None)`` or ``(None, error)``."""
    if isinstance(sr, bool) or not isinstance(sr, (int, np.integer)) or sr <= 0:
        return None, f"sample rate {sr!r} is not a positive integer"
    audio, error = _as_mono(wav)
    if error:
        return None, error
    if audio.size == 0:
        return None, "audio is empty (0 samples)"
    bad = ~np.isfinite(audio)
    if bad.any():
        first = int(np.argmax(bad))
        return None, (
            f"audio has {int(bad.sum())} non-finite samples (NaN/inf), the first at sample "
            f"{first} ({first / sr:.3f} s)"
        )
    if expected_sr is not None and sr != expected_sr:
        return None, f"sample rate {sr} Hz, but the engine's output rate is {expected_sr} Hz"
    if sr < scorer.sample_rate:
        return None, (
            f"sample rate {sr} Hz is below {scorer.name}'s {scorer.sample_rate} Hz; "
            "upsampled audio would be scored as band-limited"
        )
    native = audio.size * scorer.sample_rate / sr
    if native < scorer.min_samples:
        return None, (
            f"clip is {audio.size / sr:.3f} s ({int(native)} samples at {scorer.sample_rate} Hz), "
            f"shorter than {scorer.name}'s minimum {scorer.min_samples} samples "
            f"({scorer.min_samples / scorer.sample_rate:.3f} s)"
        )
    return audio, None


def score_clip(scorer: Scorer, wav, sr: int, expected_sr: int | None = None) -> ClipScore:
    """Guard then score one clip; any failure becomes ``ClipScore.error`` so the run goes on.

    ``expected_sr`` is the rate the caller's engine declares; a clip at another rate is an error
    (a mislabelled WAV), while a clip at the expected rate is resampled for the scorer.
    """
    audio, error = check_clip(scorer, wav, sr, expected_sr)
    if error:
        return ClipScore(None, error, scorer.name)
    try:
        scores = scorer.score(audio, int(sr))
    except Exception as exc:  # one bad clip must not end a run of many
        return ClipScore(None, f"{scorer.name} failed: {_one_line(exc)}", scorer.name)
    bad = sorted(k for k, v in scores.items() if not math.isfinite(v))
    if bad:
        return ClipScore(None, f"{scorer.name} returned non-finite {', '.join(bad)}", scorer.name)
    return ClipScore(scores, None, scorer.name)


def paired_stats(
    ref_scores: Sequence[float | None], cand_scores: Sequence[float | None]
) -> dict:
    """Per-pair deltas (candidate - reference) and their mean, spread and worst case.

    Pairs where either side is missing (None/NaN, e.g. a clip that failed its guard) are dropped
    and counted in ``n_dropped``. ``std_delta`` is the sample standard deviation (0 for one pair);
    ``worst_delta`` is the most negative delta and ``best_delta`` the most positive.
    """
    if len(ref_scores) != len(cand_scores):
        raise ValueError(
            f"paired_stats needs equal lengths, got {len(ref_scores)} reference and "
            f"{len(cand_scores)} candidate scores"
        )
    pairs = [
        (float(r), float(c))
        for r, c in zip(ref_scores, cand_scores)
        if r is not None and c is not None and math.isfinite(r) and math.isfinite(c)
    ]
    n = len(pairs)
    ref = np.array([p[0] for p in pairs], dtype=np.float64)
    cand = np.array([p[1] for p in pairs], dtype=np.float64)
    deltas = cand - ref
    return {
        "n": n,
        "n_dropped": len(ref_scores) - n,
        "deltas": deltas.tolist(),
        "mean_ref": float(ref.mean()) if n else None,
        "mean_cand": float(cand.mean()) if n else None,
        "mean_delta": float(deltas.mean()) if n else None,
        "std_delta": float(deltas.std(ddof=1)) if n > 1 else (0.0 if n else None),
        "worst_delta": float(deltas.min()) if n else None,
        "best_delta": float(deltas.max()) if n else None,
    }


def check_gate(
    stats: dict, min_mean_delta: float | None = None, min_worst_delta: float | None = None
) -> tuple[bool, str]:
    """Apply a recipe gate to :func:`paired_stats` output: ``(passed, one-line reason)``.

    The gate passes when the mean delta is at least ``min_mean_delta`` and the worst delta at
    least ``min_worst_delta`` (each checked only when given). No scored pairs never passes.
    """
    if min_mean_delta is None and min_worst_delta is None:
        return True, "no MOS gate set"
    if not stats.get("n"):
        return False, "no paired scores to gate on (every pair failed or was missing)"
    failures, passes = [], []
    for label, key, bound in (
        ("mean delta", "mean_delta", min_mean_delta),
        ("worst delta", "worst_delta", min_worst_delta),
    ):
        if bound is None:
            continue
        value = stats[key]
        (passes if value >= bound else failures).append(
            f"{label} {value:+.3f} {'>=' if value >= bound else '<'} {bound:+.3f}"
        )
    if failures:
        return False, "; ".join(failures) + f" (n={stats['n']})"
    return True, "; ".join(passes) + f" (n={stats['n']})"
