"""The reply LLM on ONNX Runtime == mlx-lm, number for number in fp32 (and token for token on SmolLM2)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import conftest
from conftest import require_checkpoints
from pipelines.llm.ort import OrtLlama, supported
from pipelines.ortgraph import Placement, Precision

ROOT = Path(__file__).resolve().parents[1]
SMOLLM = ROOT / "checkpoints" / "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def tiny_llama():
    return conftest.tiny_llama()


# Llama 3's RoPE scaling (Llama-3.2-1B's, the fetched reply model), with a short original context so that the tiny
# model's 8 rotated pairs fall in all three of its bands (kept, smoothed, divided by the factor)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


@pytest.mark.parametrize("rope", ["plain", "llama3"])
def test_fp32_logits_match_mlx_lm(rope, tmp_path):
    from mlx_lm.models.cache import make_prompt_cache

    tiny_llama = conftest.tiny_llama(LLAMA3_ROPE if rope == "llama3" else None)
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
    Other.args = dataclasses.replace(tiny_llama.args, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    assert supported(Other()) is None  # a scaling the graph does not apply: not taken


@pytest.mark.slow
def test_smollm2_replies_are_the_same_on_onnx_fp32():
    require_checkpoints("smollm2-135m-instruct")
    from pipelines.llm.reply import ReplyLLM

    prompt = "You are a helpful assistant. Answer in one short sentence."
    questions = ["Hello there, what is the capital of France?", "What color is the sky on a clear day?"]
    mlx_llm = ReplyLLM(SMOLLM, prompt, max_tokens=24)
    ort_llm = ReplyLLM(SMOLLM, prompt, max_tokens=24, placement=Placement("onnx"))
    for q in questions:
        a, b = "".join(mlx_llm.stream(q)), "".join(ort_llm.stream(q))
        assert a == b and len(a) > 10
    q8 = ReplyLLM(SMOLLM, prompt, max_tokens=24, placement=Placement("onnx", Precision(8)))
    assert "Paris" in "".join(q8.stream(questions[0]))  # 8-bit answers the same question the same way


def _stream(net, ids, max_tokens, ban=None, keep=None):
    """Greedy tokens from a TokenNet, the cache trimmed as the reply stage does when it stops after `keep`."""
    cache, out = net.new_cache(), []
    tokens = net.tokens(ids, cache, max_tokens, 0.0, None, ban)
    for token in tokens:
        out.append(token)
        if len(out) == keep:
            break
    tokens.close()
    held = len(ids) + len(out)
    assert held - 1 <= net.length(cache) <= held + 1  # fed up to the last token handed out, or one ahead
    net.trim(cache, held - 1)  # as the prompt cache does: the last token is fed again, for its logits
    return out, cache


def test_both_networks_give_the_same_token_stream(tiny_llama, tmp_path):
    """The reply stage's one generate loop sees the same greedy tokens from mlx-lm's `generate_step` (MLXTokens) and
    from ONNX Runtime (OrtLlama), with and without the no-repeat ban, and a cache trimmed after an early stop
    continues as a fresh prefill would."""
    from pipelines.llm.reply import MLXTokens, banned_tokens

    mlx_net, ort_net = MLXTokens(tiny_llama), OrtLlama(tiny_llama, supported(tiny_llama), cache_dir=tmp_path / "llm")
    ids = [5, 17, 42, 7, 99, 3]
    plain = _stream(mlx_net, ids, 24)[0]
    assert plain == _stream(ort_net, ids, 24)[0] and len(plain) == 24
    ban = lambda reply, logits: banned_tokens(reply, 2)  # noqa: E731
    banned = _stream(mlx_net, ids, 24, ban)[0]
    assert banned == _stream(ort_net, ids, 24, ban)[0]
    pairs = list(zip(banned, banned[1:]))
    assert len(pairs) == len(set(pairs))  # no bigram twice
    assert len(set(zip(plain, plain[1:]))) < len(plain) - 1  # a random model loops without the ban: the ban did work
    for net in (mlx_net, ort_net):
        head, cache = _stream(net, ids, 24, keep=5)
        assert head == plain[:5]
        assert net.length(cache) == len(ids) + 4
        assert list(net.tokens([head[-1]], cache, 8, 0.0, None, None)) == plain[5:13], net.name
