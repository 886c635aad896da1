"""Checkpoint loading: formats, dtypes, quantised MLX weights, and one clear error for a bad checkpoint."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from pipelines.errors import CheckpointError
from pipelines.tts.model import ModelArgs
from pipelines.tts.weights import infer_args, load_checkpoint, random_model, save_checkpoint


def _logits(model, seed=0):
    rng = np.random.default_rng(seed)
    tokens = np.zeros((1, 6, 33), np.int32)
    tokens[0, :, -1] = rng.integers(3, 40, 6)
    mask = np.zeros_like(tokens, bool)
    mask[..., -1] = True
    h = model.backbone_hidden(mx.array(tokens), mx.array(mask), model.make_backbone_cache())
    return np.array(model.codebook0_head(h).astype(mx.float32))


def test_our_format_round_trip_and_shape_inference(tiny_args, tmp_path):
    ck = random_model(tiny_args, seed=4)
    folder = save_checkpoint(ck.model, tmp_path / "ours")
    loaded = load_checkpoint(folder)
    assert loaded.format == "mlx" and loaded.args == tiny_args
    np.testing.assert_array_equal(_logits(loaded.model), _logits(ck.model))
    # a single file without a config beside it carries its config in the safetensors metadata
    single = tmp_path / "single.safetensors"
    shutil.copy(folder / "model.safetensors", single)
    assert load_checkpoint(single).args == tiny_args
    # and a file with neither: the shape is inferred from the tensors
    bare = tmp_path / "bare.safetensors"
    mx.save_safetensors(str(bare), dict(tree_flatten(ck.model.parameters())))
    inferred = load_checkpoint(bare)
    assert inferred.args.backbone.num_layers == 2 and inferred.args.decoder.embed_dim == 32
    assert inferred.args.text_vocab_size == tiny_args.text_vocab_size


def test_presets_have_the_documented_shapes():
    m250 = ModelArgs.preset("marvis-250m")
    assert (m250.backbone.num_layers, m250.backbone.num_heads, m250.backbone.num_kv_heads,
            m250.backbone.embed_dim, m250.backbone.head_dim) == (6, 12, 3, 1536, 128)
    assert (m250.decoder.num_layers, m250.decoder.embed_dim, m250.decoder.intermediate_dim) == (4, 1024, 4096)
    assert m250.text_vocab_size == 49152
    assert ModelArgs.preset("csm-1b").backbone.head_dim == 64
    # a real-shape model built from a preset has about 569M parameters (docs/performance.md §1)
    args = ModelArgs.preset("marvis-250m")
    from pipelines.tts.model import Model

    n = sum(v.size for _, v in tree_flatten(Model(args).parameters()))
    assert 560e6 < n < 580e6


def test_inferred_flavour_matches_preset():
    args = ModelArgs.preset("marvis-100m")
    fake = {}
    for part, t in (("backbone", args.backbone), ("decoder", args.decoder)):
        for i in range(t.num_layers):
            fake[f"{part}.layers.{i}.self_attn.q_proj.weight"] = mx.zeros((t.num_heads * t.head_dim, 1))
            fake[f"{part}.layers.{i}.self_attn.k_proj.weight"] = mx.zeros((t.num_kv_heads * t.head_dim, 1))
            fake[f"{part}.layers.{i}.mlp.gate_proj.weight"] = mx.zeros((t.intermediate_dim, 1))
        fake[f"{part}.norm.weight"] = mx.zeros((t.embed_dim,))
    fake["audio_embeddings.weight"] = mx.zeros((2051 * 32, 1))
    fake["audio_head"] = mx.zeros((31, 1, 2051))
    fake["text_embeddings.weight"] = mx.zeros((49152, 1))
    assert infer_args(fake) == args


def test_bf16_and_quantised(tiny_args, tmp_path):
    ck = random_model(tiny_args, seed=5)
    ref = _logits(ck.model)
    bf16 = load_checkpoint(save_checkpoint(ck.model, tmp_path / "fp"), dtype=mx.bfloat16)
    assert bf16.model.backbone.layers[0].self_attn.q_proj.weight.dtype == mx.bfloat16
    assert np.corrcoef(_logits(bf16.model).ravel(), ref.ravel())[0, 1] > 0.99

    # an MLX-quantised checkpoint (8-bit, as the Marvis -MLX-8bit repos) with config.json
    nn.quantize(ck.model, group_size=32, bits=8)
    folder = save_checkpoint(ck.model, tmp_path / "q8")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization"] = {"group_size": 32, "bits": 8}
    (folder / "config.json").write_text(json.dumps(cfg))
    q8 = load_checkpoint(folder)
    assert isinstance(q8.model.backbone.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert np.corrcoef(_logits(q8.model).ravel(), ref.ravel())[0, 1] > 0.99
    # the quantised checkpoint without its settings is refused with a reason
    cfg.pop("quantization")
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="quantization"):
        load_checkpoint(folder)


def test_bad_checkpoints_get_one_clear_error(tiny_args, tmp_path):
    ck = random_model(tiny_args, seed=6)
    weights = dict(tree_flatten(ck.model.parameters()))
    weights.pop("decoder.norm.weight")
    weights["backbone.layers.0.mlp.up_proj.weight"] = mx.zeros((3, 3))
    weights["stray.tensor"] = mx.zeros((2,))
    folder = tmp_path / "bad"
    folder.mkdir()
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps(tiny_args.to_dict() if hasattr(tiny_args, "to_dict") else {}))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(folder)
    msg = str(err.value)
    assert "\n" not in msg
    assert "missing 1: decoder.norm.weight" in msg and "unexpected 1: stray.tensor" in msg
    assert "mis-shaped 1: backbone.layers.0.mlp.up_proj.weight (3, 3) != (128, 64)" in msg

    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "model.pt").write_bytes(b"\x80\x02pickle")
    with pytest.raises(CheckpointError, match="pickles are refused"):
        load_checkpoint(tmp_path / "model.pt")
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes((folder / "model.safetensors").read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(trunc)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no .safetensors"):
        load_checkpoint(empty)
