"""The MLX frame's shape of work (what a GPU would pay, counted on a CPU) and its CPU layout's parity.

- `agent.bench.mlxwork.HostSyncs` counts host waits and primitives; it must see an implicit sync (numpy
  conversion of an unevaluated array) and must not count an array already evaluated.
- A frame of our MLX loop is one host sync.
- The per-codebook audio head is a view, not a Gather copy (the 15 % regression of issue #29's mechanism).
- `Model.prepare_for_cpu` (ColumnLinear decoder, [in, out] backbone) gives the same hidden states to fp32
  rounding and the same greedy frames as the plain layout.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from agent.bench.mlxwork import HostSyncs, graph_ops
from pipelines.tts.generator import FrameGenerator, GenerationConfig, MLXFrames
from pipelines.tts.model import ColumnLinear
from pipelines.tts.prompt import Prompt
from pipelines.tts.weights import random_model

K = 32


def rows(text_vocab: int, n: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = np.zeros((n, K + 1), np.int32)
    tokens[:, -1] = rng.integers(3, text_vocab, n)
    mask = np.zeros_like(tokens, dtype=bool)
    mask[:, -1] = True
    return tokens, mask


def test_host_syncs_sees_implicit_waits_and_not_evaluated_arrays():
    a = mx.ones((4, 4))
    mx.eval(a)
    with HostSyncs() as work:
        np.array(a)  # evaluated: no work
        b = a @ a + 1
        np.array(b)  # an implicit sync
        c = (b * 2).sum()
        c.item()  # another
        mx.eval(c)  # nothing left
    assert work.syncs == 2
    assert work.ops["Matmul"] == 1 and work.ops["Multiply"] == 1
    assert np.array(a).shape == (4, 4)  # numpy restored


def test_an_mlx_frame_is_one_host_sync(tiny_args):
    ck = random_model(tiny_args, seed=0)
    backend = MLXFrames(ck.model)
    tokens, mask = rows(tiny_args.text_vocab_size)
    cfg = GenerationConfig(temperature=0.9, top_k=50, seed=1, stop_on_eos=False)
    frames = FrameGenerator(backend).frames(Prompt(tokens, mask, 0, 3), cfg)
    next(frames)
    with HostSyncs() as work:
        next(frames)
    assert work.syncs == 1
    layers = tiny_args.backbone.num_layers + (K - 1) * tiny_args.decoder.num_layers
    assert work.ops["Matmul"] >= 7 * layers  # every Linear of every step is in the one graph


def test_the_audio_head_is_a_view_not_a_gather(tiny_args):
    model = random_model(tiny_args, seed=0).model
    h = mx.ones((1, tiny_args.decoder.embed_dim))
    mx.eval(h)
    assert graph_ops(h @ model.audio_head[2])["Gather"] == 1  # what integer indexing costs: the counter sees it
    ops = graph_ops(model.codebook_logits(h, 3))
    assert ops["Gather"] == 0 and ops["Matmul"] == 1
    np.testing.assert_array_equal(np.array(model.codebook_logits(h, 3)), np.array(h @ model.audio_head[2]))


def test_cpu_layout_keeps_the_numbers_and_the_greedy_frames(tiny_args):
    plain = random_model(tiny_args, seed=3).model
    fast = random_model(tiny_args, seed=3).model.prepare_for_cpu()
    assert isinstance(fast.decoder.layers[0].self_attn.q_proj, ColumnLinear)
    assert isinstance(fast.projection, ColumnLinear)
    assert isinstance(fast.backbone.layers[0].mlp.up_proj, nn.Linear)
    assert set(dict(tree_flatten(plain.parameters()))) == set(dict(tree_flatten(fast.parameters())))
    x = mx.random.normal((1, 3, tiny_args.backbone.embed_dim), key=mx.random.key(0))
    a = plain.decoder_hidden(x, plain.make_decoder_cache())
    b = fast.decoder_hidden(x, fast.make_decoder_cache())
    np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-5)
    tokens, mask = rows(tiny_args.text_vocab_size, seed=1)
    cfg = GenerationConfig(temperature=0.0, stop_on_eos=False)

    def greedy(model):
        backend = MLXFrames(model, cpu_layout=False)  # each model as it is
        return np.array(list(FrameGenerator(backend).frames(Prompt(tokens, mask, 0, 6), cfg)))

    np.testing.assert_array_equal(greedy(plain), greedy(fast))


def test_the_peers_frame_is_counted_the_same_way(tiny_args):
    """`bench tts` counts mlx-audio's frame as ours: one sync, and its integer-indexed heads show as Gathers."""
    sesame = pytest.importorskip("mlx_audio.tts.models.sesame.sesame", reason="mlx-audio is the peer compared with")
    from mlx_audio.lm.sample_utils import make_sampler

    from agent.bench.tts import mlx_audio_frames, mlx_work, sesame_config

    ck = random_model(tiny_args, seed=0)
    peer = sesame.SesameModel(sesame_config(tiny_args))
    peer.load_weights(tree_flatten(ck.model.parameters()), strict=True)
    peer.setup_caches(1)
    tokens, mask = rows(tiny_args.text_vocab_size)
    theirs = mlx_work(mlx_audio_frames(peer, tokens, mask, 2, make_sampler(temp=0.9, top_k=50)))
    ours_gen = FrameGenerator(MLXFrames(ck.model)).frames(Prompt(tokens, mask, 0, 3),
                                                          GenerationConfig(temperature=0.9, top_k=50, seed=1))
    ours = mlx_work(ours_gen)
    assert theirs["host_syncs"] == ours["host_syncs"] == 1
    assert theirs["ops_by_kind"]["Matmul"] == ours["ops_by_kind"]["Matmul"]
    assert theirs["ops_by_kind"]["Gather"] >= ours["ops_by_kind"]["Gather"] + (K - 1)
