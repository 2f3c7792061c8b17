"""Seconds of CPU wall time per second of scored audio, for each MOS scorer available here.

    python benchmarks/bench_mos.py --out reports/bench_mos_cpu.json

Clips are espeak-ng speech (tiled to length) when espeak-ng is installed, else a synthetic
harmonic signal. Each clip goes through ``parity.mos.score_clip`` (guards, resampling from the
clip's rate, loudness normalisation for DNSMOS), one clip at a time as in a run. UTMOS uses the
checkpoint in ``$PARITY_UTMOS_CHECKPOINT`` when set, else random weights of the real UTMOS22-strong
architecture (utmos-pytorch) loaded through the same public state-dict path: same cost, meaningless
scores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np
import soundfile as sf

from parity.errors import BadInput
from parity.mos import UTMOS_ENV, get_scorer, score_clip

TEXT = (
    "The quick brown fox jumps over the lazy dog. A fast inference engine must sound the same "
    "as the reference implementation, frame after frame, for every prompt in the suite."
)


def make_source(tmp: Path) -> tuple[np.ndarray, int, str]:
    """Speech from espeak-ng if present, else a synthetic voiced signal; returns (wav, sr, kind)."""
    exe = shutil.which("espeak-ng")
    if exe:
        out = tmp / "speech.wav"
        subprocess.run([exe, "-w", str(out), TEXT], check=True, capture_output=True, timeout=60)
        wav, sr = sf.read(out, dtype="float32")
        return wav, sr, "espeak-ng speech"
    sr = 24000
    t = np.arange(10 * sr) / sr
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.5 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    wav = sum(np.sin(k * phase) / k for k in range(1, 12)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    return (0.1 * wav).astype(np.float32), sr, "synthetic harmonic signal (espeak-ng absent)"


def clip_of(source: np.ndarray, sr: int, seconds: float) -> np.ndarray:
    n = int(seconds * sr)
    return np.resize(source, n)  # tiles the source when it is shorter


def bench(scorer, source: np.ndarray, sr: int, durations: list[float], repeats: int) -> dict:
    """Wall time per clip length and overall seconds per audio second (median and best of repeats).

    The best (minimum) is the cost without interference from other processes on the machine; the
    median is what a run sharing the machine saw.
    """
    score_clip(scorer, clip_of(source, sr, 1.0), sr)  # warm-up: sessions, allocators, JIT
    rows = []
    for seconds in durations:
        clip = clip_of(source, sr, seconds)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            result = score_clip(scorer, clip, sr)
            times.append(time.perf_counter() - start)
            if not result.ok:
                raise RuntimeError(f"{scorer.name} failed on a {seconds} s clip: {result.error}")
        median = statistics.median(times)
        rows.append(
            {
                "audio_s": seconds,
                "wall_s_median": round(median, 4),
                "wall_s_min": round(min(times), 4),
                "sec_per_audio_sec": round(median / seconds, 4),
                "scores": {k: round(v, 3) for k, v in result.scores.items()},
            }
        )
    audio = sum(durations)
    return {
        "sec_per_audio_sec": round(sum(r["wall_s_median"] for r in rows) / audio, 4),
        "sec_per_audio_sec_best": round(sum(r["wall_s_min"] for r in rows) / audio, 4),
        "by_length": rows,
    }


def dnsmos_windows(seconds: float) -> int:
    """9.01 s windows speechmos scores for a clip: it doubles short clips past 9.01 s, then hops 1 s."""
    samples = int(seconds * 16000)
    while samples < int(9.01 * 16000):
        samples *= 2
    return int(samples // 16000 - 9.01) + 1


def random_utmos_checkpoint(tmp: Path) -> Path:
    import torch
    from utmos_pytorch.utmos_torch import UTMOSModel

    torch.manual_seed(0)
    path = tmp / "utmos_random_state_dict.pt"
    torch.save(UTMOSModel().state_dict(), path)
    return path


def version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--durations", type=float, nargs="+", default=[2.0, 5.0, 8.0, 10.0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    import torch

    report: dict = {
        "what": "wall seconds per second of scored audio (lower is better), batch size 1",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_start": [round(x, 2) for x in os.getloadavg()],
        },
        "versions": {
            p: version(p) for p in ("torch", "onnxruntime", "speechmos", "utmos-pytorch", "librosa")
        },
        "python": sys.version.split()[0],
        "scorers": {},
    }
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        source, sr, kind = make_source(tmp)
        report["clips"] = {"source": kind, "sample_rate": sr, "durations_s": args.durations,
                           "repeats": args.repeats}

        dnsmos = bench(get_scorer("dnsmos"), source, sr, args.durations, args.repeats)
        for row in dnsmos["by_length"]:
            row["windows_9s"] = dnsmos_windows(row["audio_s"])
        dnsmos["note"] = (
            "cost follows windows_9s, not length: speechmos tiles a short clip by doubling until "
            "it passes 9.01 s and scores every 1 s hop of a 9.01 s window"
        )
        report["scorers"]["dnsmos"] = dnsmos

        checkpoint = os.environ.get(UTMOS_ENV)
        weights = f"checkpoint from ${UTMOS_ENV}"
        if not checkpoint and version("utmos-pytorch"):
            checkpoint = str(random_utmos_checkpoint(tmp))
            weights = ("random weights, real UTMOS22-strong architecture (utmos-pytorch "
                       f"{version('utmos-pytorch')}); timing only, scores meaningless")
        if checkpoint:
            try:
                scorer = get_scorer("utmos", checkpoint=checkpoint)
            except BadInput as exc:
                report["scorers"]["utmos"] = {"skipped": str(exc)}
            else:
                entry = bench(scorer, source, sr, args.durations, args.repeats)
                report["scorers"]["utmos"] = {"weights": weights, "layout": scorer.layout, **entry}
        else:
            report["scorers"]["utmos"] = {
                "skipped": f"no ${UTMOS_ENV} and utmos-pytorch is not installed"
            }
    report["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name, entry in report["scorers"].items():
        if "skipped" in entry:
            print(f"{name:7s} skipped: {entry['skipped']}")
            continue
        per_len = ", ".join(
            f"{r['audio_s']:g} s: {r['wall_s_median']:.3f} s" for r in entry["by_length"]
        )
        print(f"{name:7s} {entry['sec_per_audio_sec']:.3f} s per audio second (median; best "
              f"{entry['sec_per_audio_sec_best']:.3f})  median per clip: {per_len}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
