"""Whisper's encoder and text decoder on ONNX Runtime give mlx-whisper's numbers and, so, its transcripts."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import ROOT, require_checkpoints
from pipelines.audio import load_audio
from pipelines.ortgraph import Placement

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_dir():
    return require_checkpoints("whisper-tiny.en")


@pytest.fixture(scope="module")
def parts(tiny_dir, jfk_path, tmp_path_factory):
    """(MLX model, ORT encoder, ORT decoder, jfk mel [1, 3000, 80]), built into a cache folder."""
    import mlx.core as mx
    from mlx_whisper.audio import N_SAMPLES, log_mel_spectrogram
    from mlx_whisper.load_models import load_model

    from pipelines.asr.ort import load

    model = load_model(str(tiny_dir), mx.float32)
    mlx_encoder, mlx_decoder = model.encoder, model.decoder
    encoder, decoder = load(mlx_encoder, mlx_decoder, model.dims, tmp_path_factory.mktemp("asr") / "cache")
    mel = log_mel_spectrogram(load_audio(jfk_path, 16000), padding=N_SAMPLES)[:3000][None]
    return mlx_encoder, mlx_decoder, encoder, decoder, mel


def _relative(got, ref) -> float:
    got, ref = np.array(got), np.array(ref)
    assert got.shape == ref.shape
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def test_encoder_features_match_mlx(parts):
    mlx_encoder, _, encoder, _, mel = parts
    ref = mlx_encoder(mel)
    assert ref.shape == (1, 1500, 384)
    assert _relative(encoder(mel), ref) < 1e-4


@pytest.mark.parametrize("audio_positions", [1500, 400])  # the full window and a trimmed one
def test_decoder_logits_match_mlx_over_cached_steps(parts, audio_positions):
    import mlx.core as mx

    mlx_encoder, mlx_decoder, _, decoder, mel = parts
    features = mlx_encoder(mel)[:, :audio_positions]
    tokens = mx.array([[50257, 50362]])  # <|startoftranscript|> <|notimestamps|>
    ref, ref_cache, _ = mlx_decoder(tokens, features)
    got, cache, cross_qk = decoder(tokens, features)
    assert len(cross_qk) == len(mlx_decoder.blocks)
    assert _relative(got, ref) < 1e-4
    for _ in range(6):  # greedy: the same token into both, each with its own cache
        tokens = mx.argmax(ref[:, -1:], axis=-1)
        ref, ref_cache, _ = mlx_decoder(tokens, features, kv_cache=ref_cache)
        got, cache, _ = decoder(tokens, features, kv_cache=cache)
        assert got.shape == (1, 1, 51864)
        assert _relative(got, ref) < 1e-4
    assert cache["past_k0"].shape[2] == 2 + 6
    # no cache: a new run (mlx-whisper's Inference.reset), whatever ran before
    again, _, _ = decoder(mx.array([[50257, 50362]]), features)
    assert _relative(again, mlx_decoder(mx.array([[50257, 50362]]), features)[0]) < 1e-4


def test_transcripts_are_the_same(tiny_dir, jfk_path, tmp_path):
    from agent.session import read_session
    from pipelines.asr.whisper import WhisperASR
    from pipelines.vad import Endpointer, SpeechEnded

    data = read_session(ROOT / "sessions" / "demo")
    vad = Endpointer(input_rate=data.rate)
    turns = [e.utterance.audio for e in vad.process(data.mic) + vad.flush() if isinstance(e, SpeechEnded)]
    clips = [load_audio(jfk_path, 16000)] + turns
    mlx_asr = WhisperASR(tiny_dir, placement=Placement("mlx"))
    ort_asr = WhisperASR(tiny_dir, placement=Placement("onnx"), ort_cache=tmp_path / "asr")
    for clip in clips:
        a, b = mlx_asr.transcribe(clip).text, ort_asr.transcribe(clip).text
        assert a == b and a
    assert type(ort_asr._network().decoder).__name__ == "OrtWhisperDecoder"
    assert type(mlx_asr._network().decoder).__name__ == "TextDecoder"  # each stage owns its network
    assert "my fellow americans" in ort_asr.transcribe(clips[0]).text.lower()
    # the trimmed window: MLX's encoder parts, then the ORT decoder over fewer audio positions
    mlx_trim = WhisperASR(tiny_dir, placement=Placement("mlx"), trim=True)
    ort_trim = WhisperASR(tiny_dir, placement=Placement("onnx"), trim=True, ort_cache=tmp_path / "asr")
    assert mlx_trim.transcribe(clips[0]).text == ort_trim.transcribe(clips[0]).text


def test_int8_encoder_stays_within_its_bound_of_fp32(tiny_dir, jfk_path, tmp_path):
    """`asr.quantization = "8"` (the encoder's and cross projection's matrices in int8 arithmetic, the decoder's
    weights 8-bit) is a fast path, so it carries its bound: on real speech the features move under 6 % (relative
    norm; measured 3.5 %, and 9 % with ONNX Runtime's own one-scale quantiser), and over jfk and the shipped turns
    it makes at most 4 word errors more than fp32 (measured 31 against 32 in 134 words)."""
    import mlx.core as mx
    import onnx
    from mlx_whisper.audio import N_SAMPLES, log_mel_spectrogram

    from pipelines.asr.whisper import WhisperASR
    from pipelines.ortgraph import Precision
    from test_asr import shipped_utterances, word_errors

    fp32 = WhisperASR(tiny_dir, placement=Placement("onnx"), ort_cache=tmp_path / "fp32")
    int8 = WhisperASR(tiny_dir, placement=Placement("onnx", Precision(8, dynamic=True)), ort_cache=tmp_path / "dq8")
    int8._network()  # builds its graphs
    ops = {name: {n.op_type for n in onnx.load(str(tmp_path / "dq8" / f"{name}.onnx"), load_external_data=False).graph.node}
           for name in ("encoder", "cross", "decoder")}
    assert "MatMulInteger" in ops["encoder"] and "MatMulInteger" in ops["cross"], ops
    assert "MatMulNBits" in ops["decoder"] and not {"MatMul", "MatMulInteger"} & ops["decoder"], ops["decoder"]

    mel = log_mel_spectrogram(load_audio(jfk_path, 16000), padding=N_SAMPLES)[:3000][None]
    ref, got = np.array(fp32._network().encoder(mel)), np.array(int8._network().encoder(mel.astype(mx.float32)))
    moved = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    assert 0 < moved < 0.06, moved

    items = shipped_utterances()
    errors = {}
    for label, asr in (("fp32", fp32), ("int8", int8)):
        heard = [asr.transcribe(audio).text for audio, _ in items]
        errors[label] = sum(word_errors(text, h) for (_, text), h in zip(items, heard))
        assert "my fellow americans" in heard[0].lower(), (label, heard[0])
    assert errors["int8"] <= errors["fp32"] + 4, errors
