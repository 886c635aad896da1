"""The ONNX Runtime executor == the MLX model of record (== transformers' CSM), and what quantisation costs.

Tiny random models of the real layout; the graphs are built from the same `Model` the MLX tests use.
"""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.ortgraph import Precision, rope_periods
from pipelines.tts.generator import (
    FrameGenerator,
    GenerationConfig,
    MLXFrames,
    OrtFrames,
    PrefixCache,
    sample_sorted,
)
from pipelines.tts.ort import OrtFrameModel
from pipelines.tts.prompt import Prompt
from pipelines.tts.weights import random_model
from tts_helpers import (
    K,
    assert_dequantised_on_onnx,
    greedy,
    ort_step_logits,
    our_logits,
    two_context_prompt,
)

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tiny_args):
    return random_model(tiny_args, seed=0)


@pytest.fixture(scope="module")
def onnx_fp32(tiny, tmp_path_factory):
    return OrtFrameModel(tiny.model, cache_dir=tmp_path_factory.mktemp("ort") / "fp32")


def test_rope_periods_match_mlx_lm(tiny_args):
    """Our numpy Llama-3 RoPE periods are mlx_lm's (the MLX model's) to float precision."""
    from mlx_lm.models.rope_utils import Llama3RoPE

    args = tiny_args.backbone
    ref = Llama3RoPE(args.head_dim, traditional=True, base=args.rope_base, scaling_config=args.rope_scaling)
    np.testing.assert_allclose(rope_periods(args), np.array(ref._freqs), rtol=1e-5)


def test_fp32_logits_match_the_mlx_model(tiny, onnx_fp32):
    tokens, mask = two_context_prompt(np.random.default_rng(1))
    forced = greedy(MLXFrames(tiny.model), tokens, mask, 3)
    ours = ort_step_logits(onnx_fp32, tokens, mask, forced)
    ref = our_logits(tiny.model, tokens, mask, forced)
    for f, (a, b) in enumerate(zip(ours, ref)):
        assert a.shape == b.shape == (K, 2051)
        err = np.abs(a - b).max() / np.abs(b).max()
        assert err <= 1e-4, f"frame {f}: max relative logit error {err:.2e}"


def test_fp32_greedy_codes_match_mlx_and_transformers(reference, transformers_dir, tmp_path):
    """12 greedy frames with two context segments: ONNX == MLX == transformers' CSM, code for code."""
    from pipelines.tts.weights import load_checkpoint
    from tts_helpers import prompt_rows, reference_frames

    ck = load_checkpoint(transformers_dir)
    tokens, mask = prompt_rows(np.random.default_rng(2))
    n = 12
    ref_frames, _ = reference_frames(reference, tokens, mask, n_frames=n)
    onnx_frames = greedy(OrtFrames(OrtFrameModel(ck.model, cache_dir=tmp_path / "g")), tokens, mask, n)
    np.testing.assert_array_equal(onnx_frames, ref_frames)
    np.testing.assert_array_equal(onnx_frames, greedy(MLXFrames(ck.model), tokens, mask, n))
    assert len(np.unique(ref_frames)) > 50  # not degenerate: the comparison means something


def test_cache_equivalence_and_trim(onnx_fp32):
    """Prefill + one-row steps == the whole rows at once; trim() then the same rows == a fresh prefill. The cache
    is written in place: its buffers never change size, only the offset moves."""
    rng = np.random.default_rng(3)
    tokens, mask = two_context_prompt(rng)
    extra = np.c_[rng.integers(0, 2048, (4, K)), np.zeros(4)].astype(np.int32)
    all_tokens = np.concatenate([tokens, extra])
    all_mask = np.concatenate([mask, np.tile(np.r_[np.ones(K, bool), False], (4, 1))])
    n = len(tokens)
    cache = onnx_fp32.make_cache()
    buffers = [id(a) for a in cache._arrays]
    onnx_fp32.prefill(tokens, mask, cache)
    for i in range(n, len(all_tokens)):
        _, step = onnx_fp32.run(all_tokens[i:i + 1], all_mask[i:i + 1], cache)
    step = step.copy()
    fresh = onnx_fp32.make_cache()
    _, full = onnx_fp32.run(all_tokens, all_mask, fresh)
    np.testing.assert_allclose(step, full, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(cache.keys(0), fresh.keys(0), atol=2e-5, rtol=1e-4)
    assert cache.offset == len(all_tokens) and [id(a) for a in cache._arrays] == buffers
    assert cache.trim(3) == 3 and cache.offset == len(all_tokens) - 3
    _, again = onnx_fp32.run(all_tokens[-3:], all_mask[-3:], cache)
    np.testing.assert_allclose(again, full, atol=2e-5, rtol=1e-4)


def test_cache_overflow_is_a_clear_error(onnx_fp32):
    cache = onnx_fp32.make_cache()
    cache.offset = cache.max_len - 1
    tokens, mask = two_context_prompt(np.random.default_rng(3))
    with pytest.raises(ValueError, match="cache holds"):
        onnx_fp32.run(tokens, mask, cache)


def test_in_graph_sampler_follows_the_host_rule(onnx_fp32):
    """The frame graph's sampler == `sample_sorted` on its own logits with the same uniforms, at several
    temperatures and top-k (0 = no cut); temperature 0 is argmax."""
    rng = np.random.default_rng(11)
    tokens, mask = two_context_prompt(rng)
    checked = 0
    for temperature, top_k in ((0.9, 50), (1.5, 0), (0.3, 5), (0.0, 50)):
        cache = onnx_fp32.make_cache()
        rows, rmask = tokens, mask
        for _ in range(3):
            u = rng.random(K, dtype=np.float32)
            codes, logits = onnx_fp32.run(rows, rmask, cache, u, temperature, top_k)
            want = [sample_sorted(logits[k], temperature, top_k, u[k]) for k in range(K)]
            np.testing.assert_array_equal(codes, want)
            checked += K
            rows = np.r_[codes, 0][None].astype(np.int32)
            rmask = np.r_[np.ones(K, bool), False][None]
    assert checked == 4 * 3 * K


def test_host_sampler_rule():
    logits = np.array([0.0, 3.0, 1.0, 2.0], np.float32)
    assert sample_sorted(logits, 0.0, 0, 0.99) == 1  # greedy
    assert sample_sorted(logits, 1.0, 1, 0.99) == 1  # top-1 is greedy at any temperature
    assert sample_sorted(logits, 1.0, 0, 0.0) == 1  # u = 0: the most likely
    assert sample_sorted(logits, 1.0, 0, 0.9999) == 0  # u near 1: the least likely survives with no cut
    assert sample_sorted(logits, 1.0, 2, 0.9999) == 3  # ... and is cut by top-2
    draws = [sample_sorted(logits, 1.0, 0, u) for u in np.linspace(0, 1, 10000, endpoint=False)]
    p = np.exp(logits) / np.exp(logits).sum()
    np.testing.assert_allclose(np.bincount(draws, minlength=4) / len(draws), p, atol=1e-3)


def test_built_graphs_are_cached(tiny, onnx_fp32, tmp_path):
    folder = tmp_path / "cache"
    first = OrtFrameModel(tiny.model, Precision(8), cache_dir=folder)
    again = OrtFrameModel(tiny.model, Precision(8), cache_dir=folder)
    assert first.built and not again.built  # the second load found the finished build
    assert (folder / "ready.json").is_file() and not list(tmp_path.glob(".building-*"))
    tokens, mask = two_context_prompt(np.random.default_rng(4))
    np.testing.assert_array_equal(greedy(OrtFrames(first), tokens, mask, 3), greedy(OrtFrames(again), tokens, mask, 3))


@pytest.mark.parametrize("bits", [8, 4])
def test_quantised_logits_stay_close_to_fp32(tiny, onnx_fp32, tmp_path, bits):
    """Blockwise int8/int4 cannot be identical to fp32: bound the error and report the agreement."""
    q = OrtFrameModel(tiny.model, Precision(bits), cache_dir=tmp_path / f"q{bits}")
    tokens, mask = two_context_prompt(np.random.default_rng(5))
    forced = greedy(OrtFrames(onnx_fp32), tokens, mask, 6)
    ref = np.stack(ort_step_logits(onnx_fp32, tokens, mask, forced))  # [F, K, V]
    got = np.stack(ort_step_logits(q, tokens, mask, forced))
    rel = np.abs(got - ref).max(axis=(0, 2)) / np.abs(ref).max(axis=(0, 2))  # per codebook
    agree = (got.argmax(-1) == ref.argmax(-1)).mean()
    print(f"int{bits}: max relative logit error per codebook {rel.max():.3g} (median {np.median(rel):.3g}), "
          f"argmax agreement {agree:.1%}")
    # measured here on this tiny random model: int8 4.7% / 96% agreement, int4 44% / 68%; a broken quantisation
    # (wrong weights, wrong layout) gives errors of order 100% and chance agreement
    assert rel.max() < (0.1 if bits == 8 else 0.6)
    assert agree > (0.85 if bits == 8 else 0.5)
    assert not np.allclose(got, ref, atol=1e-7)  # it really is the quantised graph


def test_prefix_reuse_on_onnx(tiny, onnx_fp32):
    """The PrefixCache works on ONNX caches too: a generation after a shared prefix runs only the new rows and
    gives the frames of a cold start."""
    tokens, mask = two_context_prompt(np.random.default_rng(6))
    gen = FrameGenerator(OrtFrames(onnx_fp32))
    prefix = PrefixCache()
    n_context = 21  # the two context segments
    assert gen.prefill(tokens[:n_context], mask[:n_context], prefix) == n_context
    cfg = GenerationConfig(temperature=0.0, stop_on_eos=False)
    warm = np.array(list(gen.frames(Prompt(tokens, mask, 0, 4), cfg, prefix)))
    assert gen.last_prefill_rows == len(tokens) - n_context
    np.testing.assert_array_equal(warm, greedy(OrtFrames(onnx_fp32), tokens, mask, 4))


def test_sampling_is_seeded(onnx_fp32):
    tokens, mask = two_context_prompt(np.random.default_rng(7))
    gen = FrameGenerator(OrtFrames(onnx_fp32))

    def run(seed):
        cfg = GenerationConfig(temperature=0.9, top_k=50, seed=seed, stop_on_eos=False)
        return np.array(list(gen.frames(Prompt(tokens, mask, 0, 4), cfg)))

    a, b, c = run(1), run(1), run(2)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any() and a.min() >= 0 and a.max() < 2051


def test_mlx_quantised_checkpoint_runs_on_onnx(tiny_args, tmp_path):
    """An MLX 8-bit checkpoint (as Marvis-AI publishes for Macs) is dequantised into the fp32 graphs: the same
    numbers as the MLX quantised model computes."""
    import mlx.nn as nn

    ck = random_model(tiny_args, seed=1)
    nn.quantize(ck.model, group_size=32, bits=8, class_predicate=lambda _, m: isinstance(m, nn.Linear))
    assert_dequantised_on_onnx(ck.model, tmp_path / "dq")


def test_depth_decoder_on_group_query_attention_matches_mlx(tiny_args, tmp_path):
    """Real flavours' heads (multiples of 16) run the depth steps on GroupQueryAttention, not the standard
    Attention op the tiny model falls back to: the same logits as the MLX model."""
    import dataclasses

    from pipelines.tts.ort import gqa_fits

    args = dataclasses.replace(tiny_args, decoder=dataclasses.replace(tiny_args.decoder, embed_dim=64, head_dim=16))
    assert gqa_fits(args.decoder) and not gqa_fits(tiny_args.decoder)
    ck = random_model(args, seed=3)
    tokens, mask = two_context_prompt(np.random.default_rng(9))
    forced = greedy(MLXFrames(ck.model), tokens, mask, 3)
    ours = ort_step_logits(OrtFrameModel(ck.model, cache_dir=tmp_path / "gqa"), tokens, mask, forced)
    for a, b in zip(ours, our_logits(ck.model, tokens, mask, forced)):
        assert np.abs(a - b).max() / np.abs(b).max() <= 1e-4


def test_cpu_default_is_4_bit_block_64_and_the_block_is_checked():
    from pipelines.tts.load import TTSConfig, resolve_backend

    assert resolve_backend(TTSConfig(backend="onnx")) == ("onnx", Precision(4, 64))
    assert resolve_backend(TTSConfig(backend="onnx", quantization="8")) == ("onnx", Precision(8, 64))
    assert resolve_backend(TTSConfig(backend="onnx", quantization="none")).precision.bits is None
    assert resolve_backend(TTSConfig(backend="onnx", quantization="4", quant_block=128)).precision.tag == "q4b128"
    assert TTSConfig().quant_block == 64
    with pytest.raises(ValueError, match="quant_block"):
        TTSConfig(quant_block=48)
    with pytest.raises(ValueError, match="block"):
        Precision(4, 48)  # the one type every ONNX stage's precision is


def test_bench_byte_count_is_the_models_weights(tiny_args, tiny):
    """`bench tts`'s byte limit counts what a frame reads: at fp32, 4 bytes for each weight of the backbone's
    matmuls and codebook-0 head, 31 x the depth step's (projection included) and the 31 heads."""
    from mlx.utils import tree_flatten

    from agent.bench.tts import frame_bytes

    sizes = {k: v.size for k, v in tree_flatten(tiny.model.parameters())}
    matmul = lambda prefix: sum(n for k, n in sizes.items() if k.startswith(prefix) and k.endswith("proj.weight"))  # noqa: E731
    want = 4 * (matmul("backbone.") + sizes["codebook0_head.weight"]
                + 31 * (matmul("decoder.") + sizes["projection.weight"]) + sizes["audio_head"])
    assert frame_bytes(tiny_args, None, 32)["total"] == want
    q4 = frame_bytes(tiny_args, 4, 64)["total"]
    assert q4 == pytest.approx(want / 4 * (0.5 + 4 / 64))  # half a byte a weight + a 4-byte scale per 64


def test_a_build_finished_meanwhile_by_another_process_is_kept(tmp_path):
    """Agents started together (the live tests start several) build the same graphs at once. The one that finishes
    second must not delete the first one's folder, which that process may be loading its sessions from; a stale
    build (another stamp) is replaced."""
    import json

    import onnx
    from onnx import TensorProto, helper

    from pipelines.ortgraph import build_cached

    folder, stamp = tmp_path / "graphs", {"format": 1, "quantization": None, "block": 32}

    def identity() -> dict:
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
        return {"g": helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])}

    def racing() -> dict:  # while this process builds, another one completes the same build and reads it
        folder.mkdir()
        onnx.save(identity()["g"], folder / "g.onnx")
        (folder / "in-use-by-the-other-process").write_text("")
        (folder / "ready.json").write_text(json.dumps(stamp))
        return identity()

    assert build_cached(folder, stamp, racing, None) == (folder, True)
    assert (folder / "in-use-by-the-other-process").is_file()  # the other process' build was left alone
    assert not list(tmp_path.glob(".building-*"))
    newer = {**stamp, "format": 2}
    assert build_cached(folder, newer, identity, None) == (folder, True)  # a stale build is replaced
    assert json.loads((folder / "ready.json").read_text()) == newer
    assert not (folder / "in-use-by-the-other-process").exists() and (folder / "g.onnx").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["graphs"]  # no building or stale folders left behind
    assert build_cached(folder, newer, identity, None) == (folder, False)
