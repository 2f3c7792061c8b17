"""Report audio encoded ahead on the prompt worker: the same bytes as encoding at the end, never stale."""

from __future__ import annotations

import os

import numpy as np
import pytest
import soundfile as sf

from parity.report import audio


@pytest.fixture(autouse=True)
def empty_memo():
    audio._AHEAD.clear()
    yield
    audio._AHEAD.clear()


def _wav(path, freq: float) -> None:
    t = np.arange(24000) / 24000
    sf.write(str(path), (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), 24000)


def test_a_clip_encoded_ahead_is_the_clip_encoded_at_the_end(tmp_path):
    wav = tmp_path / "a.wav"
    _wav(wav, 440)
    at_the_end = audio.data_uri(wav)
    audio.encode_ahead(wav)
    assert len(audio._AHEAD) == 1
    assert audio.data_uri(wav) == at_the_end and at_the_end.startswith("data:audio/mpeg;base64,")
    assert not audio._AHEAD  # taken once: the memory goes with it


def test_a_rewritten_clip_is_never_served_from_the_memo(tmp_path):
    wav = tmp_path / "a.wav"
    _wav(wav, 440)
    audio.encode_ahead(wav)
    _wav(wav, 880)
    st = wav.stat()
    os.utime(wav, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a rewrite within the clock's resolution
    assert audio.data_uri(wav) == audio._encode(wav)
    _wav(tmp_path / "b.wav", 880)
    assert audio.data_uri(wav) == audio.data_uri(tmp_path / "b.wav")


def test_encoding_ahead_stops_at_about_one_report(tmp_path, monkeypatch):
    first, second = tmp_path / "a.wav", tmp_path / "b.wav"
    _wav(first, 440)
    _wav(second, 660)
    audio.encode_ahead(first)
    monkeypatch.setattr(audio, "AHEAD_CHARS", len(next(iter(audio._AHEAD.values()))))
    audio.encode_ahead(second)
    assert len(audio._AHEAD) == 1
    assert audio.data_uri(second) == audio._encode(second)  # still embedded, encoded when asked
    audio.encode_ahead(tmp_path / "missing.wav")  # a file that is gone is not an error


def test_a_clip_that_fails_to_encode_ahead_fails_nothing(tmp_path, monkeypatch):
    wav = tmp_path / "a.wav"
    _wav(wav, 440)

    def broken(path):
        raise MemoryError("no room")

    monkeypatch.setattr(audio, "_encode", broken)
    audio.encode_ahead(wav)  # on the prompt worker: a failure here must not fail the prompt
    assert not audio._AHEAD
    monkeypatch.undo()
    assert audio.data_uri(wav).startswith("data:audio/mpeg;base64,")  # the report encodes it itself
