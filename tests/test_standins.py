"""Stand-ins for the fetched models: the published shapes, loaded by the same loaders, and teacher forcing that runs
the same network as free decoding (the same logits on the same prefix)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import conftest
from conftest import require_checkpoints
from pipelines.audio import load_audio
from pipelines.llm.ort import OrtLlama, supported
from pipelines.llm.reply import MLXTokens, forced_tokens
from pipelines.ortgraph import Placement
from pipelines.standins import (
    LLAMA_32_1B,
    LLAMA_32_1B_QUANT,
    PARAMETERS,
    WHISPER_SMALL_EN,
    llama_model,
    parameter_count,
    whisper_model,
)


def test_whisper_small_en_stand_in_has_the_published_shape():
    from mlx_whisper.whisper import ModelDimensions

    model = whisper_model()
    assert parameter_count(model) == PARAMETERS["whisper-small.en"]
    assert model.dims == ModelDimensions(**WHISPER_SMALL_EN)
    assert model.encoder.blocks[0].attn.query.weight.dtype.size == 2  # float16, as mlx-community ships it
    assert model.decoder.token_embedding.weight.shape == (51864, 768)


@pytest.mark.slow
def test_llama_1b_stand_in_has_the_published_shape():
    model = llama_model()
    assert parameter_count(model) == PARAMETERS["llama-3.2-1b-instruct"]
    args = model.args
    assert (args.hidden_size, args.num_hidden_layers, args.num_attention_heads, args.num_key_value_heads,
            args.intermediate_size, args.vocab_size) == (2048, 16, 32, 8, 8192, 128256)
    layer = model.model.layers[0].mlp.gate_proj
    assert (layer.bits, layer.group_size) == (LLAMA_32_1B_QUANT["bits"], LLAMA_32_1B_QUANT["group_size"])
    assert supported(model).rope_scaling == LLAMA_32_1B["rope_scaling"]  # the ONNX path takes its RoPE


def test_written_stand_ins_load_with_the_real_loaders_and_say_untrained(tmp_path):
    """Small shapes written by the same writers load with WhisperASR and ReplyLLM, which call them untrained."""
    smollm = require_checkpoints("smollm2-135m-instruct")
    from pipelines.asr.whisper import WhisperASR
    from pipelines.llm.reply import ReplyLLM
    from pipelines.standins import write_llama, write_whisper

    dims = {**WHISPER_SMALL_EN, "n_audio_state": 64, "n_audio_head": 2, "n_audio_layer": 1, "n_text_state": 64,
            "n_text_head": 2, "n_text_layer": 1}
    asr = WhisperASR(write_whisper(tmp_path / "whisper", dims), placement=Placement("mlx"))
    assert asr.untrained and asr.fp16
    config = {**LLAMA_32_1B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
    folder = write_llama(tmp_path / "llama", smollm, config)
    assert json.loads((folder / "config.json").read_text())["quantization"] == LLAMA_32_1B_QUANT
    llm = ReplyLLM(folder, "Be brief.", placement=Placement("onnx"), ort_cache=tmp_path / "ort")
    assert llm.untrained
    said = "".join(llm.stream("Hello there", forced="Hi. How can I help?"))
    assert said == "Hi. How can I help?"  # teacher-forced: the script's words, whatever random weights say
    real = ReplyLLM(smollm, "Be brief.", placement=Placement("onnx"), ort_cache=tmp_path / "ort2")
    assert not real.untrained


def _stream_logits(tokens) -> tuple[list[int], list[np.ndarray]]:
    seen: list[np.ndarray] = []

    def spy(reply, logits):
        seen.append(np.array(logits, np.float32).reshape(-1))
        return []

    return [t for t in tokens(spy)], seen


@pytest.mark.parametrize("backend", ["mlx", "onnx"])
def test_a_teacher_forced_reply_runs_the_network_free_decoding_runs(backend, tmp_path):
    model = conftest.tiny_llama()
    net = MLXTokens(model) if backend == "mlx" else OrtLlama(model, supported(model), cache_dir=tmp_path / "llm")
    prompt = [5, 17, 42, 7, 99, 3]
    free, free_logits = _stream_logits(lambda ban: net.tokens(prompt, net.new_cache(), 12, 0.0, None, ban))
    forced, forced_logits = _stream_logits(lambda ban: forced_tokens(net, prompt, net.new_cache(), free, ban))
    # mlx-lm asks for the token after the last one handed out too (it computes one ahead)
    assert forced == free and len(forced_logits) == 12 and len(free_logits) >= 12
    for a, b in zip(free_logits, forced_logits):  # the same logits at every step of the same prefix
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    other = [int(t) + 1 for t in free]  # forced off the model's path: its tokens, not the model's
    assert [t for t in forced_tokens(net, prompt, net.new_cache(), other)] == other


@pytest.mark.slow
def test_teacher_forced_whisper_steps_are_the_free_decoding_steps(jfk_path, tmp_path):
    """Whisper tiny.en (real weights) on ONNX Runtime: forced with the words it heard, each decoder step sees the
    logits free decoding saw on the same prefix, and the transcript is the words forced."""
    tiny = require_checkpoints("whisper-tiny.en")
    from pipelines.asr.whisper import WhisperASR

    asr = WhisperASR(tiny, placement=Placement("onnx"), ort_cache=tmp_path / "asr")
    net = asr._network()
    real_step = net.decoder.step  # every decoder call of the greedy loop (pipelines/asr/greedy.py)
    calls: list[tuple[list[int], np.ndarray]] = []

    def recording(tokens, cache):
        logits, cache = real_step(tokens, cache)
        calls.append((np.array(tokens).reshape(-1).tolist(), np.array(logits)[0, -1]))
        return logits, cache

    net.decoder.step = recording
    audio = load_audio(jfk_path, 16000)
    heard = asr.transcribe(audio).text
    free = list(calls)
    calls.clear()
    asr.reset()
    assert asr.transcribe_forced(audio, 16000, heard).text == heard
    forced = list(calls)
    # the steps agree while both fed the same tokens (the forced end timestamp may differ from the one heard)
    same = 0
    for (fed_a, logits_a), (fed_b, logits_b) in zip(free, forced):
        if fed_a != fed_b:
            break
        np.testing.assert_allclose(logits_a, logits_b, rtol=1e-5, atol=1e-4)
        same += 1
    assert same >= 15, same  # the sot prefill and the words' steps
    calls.clear()
    asr.reset()
    assert asr.transcribe_forced(audio, 16000, "a different sentence").text == "a different sentence"
    assert asr.transcribe_forced(audio, 16000, "").text == ""
