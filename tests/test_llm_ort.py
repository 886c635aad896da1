"""The reply LLM on ONNX Runtime == mlx-lm, number for number in fp32 (and token for token on SmolLM2)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from pipelines.llm.ort import OrtLlama, supported

ROOT = Path(__file__).resolve().parents[1]
SMOLLM = ROOT / "checkpoints" / "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def tiny_llama():
    from mlx_lm.models.llama import Model, ModelArgs

    mx.random.seed(0)
    args = ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=96,
                     num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=300,
                     rope_theta=10000.0, tie_word_embeddings=True, max_position_embeddings=256)
    model = Model(args)
    mx.eval(model.parameters())
    return model


def test_fp32_logits_match_mlx_lm(tiny_llama, tmp_path):
    from mlx_lm.models.cache import make_prompt_cache

    shape = supported(tiny_llama)
    assert shape is not None
    ort = OrtLlama(tiny_llama, shape, cache_dir=tmp_path / "llm")
    ids = [5, 17, 42, 7, 99, 3]
    mlx_cache, ort_cache = make_prompt_cache(tiny_llama), ort.new_cache()
    feeds = [ids, [11], [250], [64]]  # a prompt, then one token at a time against the cache
    for step in feeds:
        ref = np.array(tiny_llama(mx.array([step]), cache=mlx_cache)[0, -1])
        got = ort.forward(step, ort_cache)
        assert got.shape == ref.shape == (300,)
        assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4
    assert ort_cache[0].shape[2] == sum(len(s) for s in feeds)


def test_other_architectures_are_refused(tiny_llama):
    import dataclasses

    class Other:
        args = dataclasses.replace(tiny_llama.args, rope_traditional=True)

    assert supported(Other()) is None  # interleaved RoPE here would be computed wrongly: not taken


@pytest.mark.slow
def test_smollm2_replies_are_the_same_on_onnx_fp32():
    if not (SMOLLM / "config.json").is_file():
        pytest.skip("checkpoints/smollm2-135m-instruct is not prepared (scripts/bootstrap.sh does it)")
    from pipelines.llm.reply import ReplyLLM

    prompt = "You are a helpful assistant. Answer in one short sentence."
    questions = ["Hello there, what is the capital of France?", "What color is the sky on a clear day?"]
    mlx_llm = ReplyLLM(SMOLLM, prompt, max_tokens=24)
    ort_llm = ReplyLLM(SMOLLM, prompt, max_tokens=24, backend="onnx")
    for q in questions:
        a, b = "".join(mlx_llm.stream(q)), "".join(ort_llm.stream(q))
        assert a == b and len(a) > 10
    q8 = ReplyLLM(SMOLLM, prompt, max_tokens=24, backend="onnx", quantization=8)
    assert "Paris" in "".join(q8.stream(questions[0]))  # 8-bit answers the same question the same way
