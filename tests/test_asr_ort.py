"""Whisper's encoder on ONNX Runtime gives mlx-whisper's features and, so, its transcripts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipelines.audio import load_audio

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "checkpoints" / "whisper-tiny.en"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_dir():
    if not (TINY / "config.json").is_file():
        pytest.skip("checkpoints/whisper-tiny.en is not prepared (scripts/bootstrap.sh does it)")
    return TINY


def test_encoder_features_match_mlx(tiny_dir, jfk_path, tmp_path):
    import mlx.core as mx
    from mlx_whisper.audio import N_SAMPLES, log_mel_spectrogram
    from mlx_whisper.transcribe import ModelHolder

    from pipelines.asr.ort import OrtWhisperEncoder

    model = ModelHolder.get_model(str(tiny_dir), mx.float32)
    encoder = getattr(model.encoder, "mlx_encoder", model.encoder)
    mel = log_mel_spectrogram(load_audio(jfk_path, 16000), padding=N_SAMPLES)[:3000][None]
    ref = np.array(encoder(mel))
    got = np.array(OrtWhisperEncoder(encoder, model.dims.n_audio_head, tmp_path / "enc")(mel))
    assert got.shape == ref.shape == (1, 1500, 384)
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4


def test_transcripts_are_the_same(tiny_dir, jfk_path, tmp_path):
    from agent.session import read_session
    from pipelines.asr.whisper import WhisperASR
    from pipelines.vad import Endpointer, SpeechEnded

    data = read_session(ROOT / "sessions" / "demo")
    vad = Endpointer(input_rate=data.rate)
    turns = [e.utterance.audio for e in vad.process(data.mic) + vad.flush() if isinstance(e, SpeechEnded)]
    clips = [load_audio(jfk_path, 16000)] + turns
    mlx_asr = WhisperASR(tiny_dir, backend="mlx")
    ort_asr = WhisperASR(tiny_dir, backend="onnx", ort_cache=tmp_path / "asr")
    for clip in clips:
        a, b = mlx_asr.transcribe(clip).text, ort_asr.transcribe(clip).text
        assert a == b and a
    assert "my fellow americans" in ort_asr.transcribe(clips[0]).text.lower()
