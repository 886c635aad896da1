"""MLX checkpoints written by mlx-audio's own converter (`mlx_audio.convert.convert`, the path that made the
published `*-MLX-*bit` Marvis repos): 4-, 6-, 8-bit and a mixed 4/6 recipe, from an original-format (torchtune
names) folder, loaded by `load_checkpoint` and run on MLX and, dequantised, on ONNX Runtime.

mlx-audio's `sesame` model fetches Mimi and a watermarker from the Hugging Face Hub when it is built, and neither
is written to the checkpoint: both are stubbed so the converter runs offline. Its domain is given (`tts`): auto
detection imports every mlx-audio model, and one of them downloads a codec at import.
"""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from conftest import tiny_tokenizer_dir
from pipelines.tts.generator import MLXFrames
from pipelines.tts.weights import load_checkpoint, random_model
from tts_helpers import assert_dequantised_on_onnx, greedy, two_context_prompt

pytest.importorskip("mlx_audio")

_TORCHTUNE = [(".self_attn.o_proj.", ".attn.output_proj."), (".self_attn.", ".attn."),
              (".input_layernorm.weight", ".sa_norm.scale"), (".post_attention_layernorm.weight", ".mlp_norm.scale"),
              (".mlp.gate_proj.", ".mlp.w1."), (".mlp.down_proj.", ".mlp.w2."), (".mlp.up_proj.", ".mlp.w3."),
              ("backbone.norm.weight", "backbone.norm.scale"), ("decoder.norm.weight", "decoder.norm.scale")]
RECIPES = {"4": dict(q_bits=4), "6": dict(q_bits=6), "8": dict(q_bits=8), "mixed_4_6": dict(quant_predicate="mixed_4_6")}


def _hf_config(args, tokenizer: str) -> dict:
    """The config.json of the original Marvis repos (what mlx-audio's `sesame` model reads)."""
    def part(t, **extra):
        return dict(num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
                    hidden_size=t.embed_dim, intermediate_size=t.intermediate_dim, head_dim=t.head_dim,
                    rms_norm_eps=t.norm_eps, rope_theta=t.rope_base, rope_scaling=dict(t.rope_scaling),
                    max_position_embeddings=2048, attention_bias=False, mlp_bias=False, hidden_act="silu",
                    initializer_range=0.02, use_cache=True, **extra)

    return {"model_type": "sesame", "backbone_flavor": "llama-250M", "decoder_flavor": "llama-60M",
            "text_vocab_size": args.text_vocab_size, "audio_vocab_size": args.audio_vocab_size,
            "audio_num_codebooks": args.audio_num_codebooks, "vocab_size": args.audio_vocab_size,
            "num_codebooks": args.audio_num_codebooks, "text_tokenizer": tokenizer, **part(args.backbone),
            "depth_decoder_config": part(args.decoder, backbone_hidden_size=args.backbone.embed_dim,
                                         vocab_size=args.audio_vocab_size, num_codebooks=args.audio_num_codebooks,
                                         model_type="csm_depth_decoder_model", attention_dropout=0.0),
            "attention_dropout": 0.0, "audio_eos_token_id": 128003, "audio_token_id": 128002, "bos_token_id": 128000,
            "codebook_eos_token_id": 0, "codebook_pad_token_id": 2050, "pad_token_id": 128002,
            "tie_codebooks_embeddings": True, "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def source(tiny_args, tmp_path_factory):
    """An original-format folder (torchtune names, HF config) and the fp model it holds."""
    root = tmp_path_factory.mktemp("mlx_audio")
    tok = tiny_tokenizer_dir(root / "tok")  # mlx-audio reads it with AutoTokenizer, which wants its own folder
    (tok / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    folder = tiny_tokenizer_dir(root / "src")  # its tokenizer.json is copied along by the converter
    model = random_model(tiny_args, seed=1).model
    weights = {}
    for key, value in tree_flatten(model.parameters()):
        for ours, theirs in _TORCHTUNE:
            key = key.replace(ours, theirs)
        weights[key] = value
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps(_hf_config(tiny_args, str(tok))))
    return folder, model


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory):
    """recipe -> the folder mlx-audio's converter wrote."""
    import mlx_audio.tts.models.sesame.sesame as sesame
    from mlx_audio.codec.models.mimi.mimi import mimi_202407
    from mlx_audio.convert import convert

    out = {}
    root = tmp_path_factory.mktemp("mlx_audio_out")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sesame.Mimi, "from_pretrained", classmethod(lambda cls, *a, **k: cls(mimi_202407(32))))
        mp.setattr(sesame, "load_watermarker", lambda: None)
        for name, recipe in RECIPES.items():
            convert(str(source[0]), str(root / name), quantize=True, model_domain="tts", **recipe)
            out[name] = root / name
    return out


def _mlx_audio_predicate(path, module):  # what mlx-audio's converter quantises: layers whose rows split into groups of 64
    return hasattr(module, "to_quantized") and module.weight.shape[-1] % 64 == 0


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_mlx_audio_quantised_checkpoint_loads_and_runs(bits, converted, source, tiny_args):
    folder = converted[str(bits)]
    assert json.loads((folder / "config.json").read_text())["quantization"] == {"group_size": 64, "bits": bits,
                                                                               "mode": "affine"}
    ck = load_checkpoint(folder)
    assert ck.format == "mlx" and ck.args == tiny_args and ck.tokenizer_dir == folder
    quantised = {n: m.bits for n, m in ck.model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))}
    assert "backbone.layers.0.self_attn.q_proj" in quantised and set(quantised.values()) == {bits}

    # the same fp weights quantised here the way mlx-audio does: the loaded model computes exactly the same frames
    ref = random_model(tiny_args, seed=1).model
    nn.quantize(ref, group_size=64, bits=bits, class_predicate=_mlx_audio_predicate)
    tokens, mask = two_context_prompt(np.random.default_rng(4))
    frames = greedy(MLXFrames(ck.model), tokens, mask, 3)
    np.testing.assert_array_equal(frames, greedy(MLXFrames(ref), tokens, mask, 3))
    assert len(np.unique(frames)) > 20


@pytest.mark.parametrize("bits", [4, 6])
def test_mlx_audio_quantised_checkpoint_runs_on_onnx(bits, converted, tmp_path):
    """ONNX Runtime runs the dequantised weights: the same numbers as the MLX quantised model."""
    assert_dequantised_on_onnx(load_checkpoint(converted[str(bits)]).model, tmp_path / "dq")


def test_mlx_audio_mixed_recipe_keeps_each_layers_bits(converted, source):
    """`mixed_4_6` stores per-layer settings under mlx-audio's `model.` names; each layer gets its own bits."""
    from pipelines.ortgraph import float_params

    quant = json.loads((converted["mixed_4_6"] / "config.json").read_text())["quantization"]
    per_layer = {k[len("model."):]: v["bits"] for k, v in quant.items() if isinstance(v, dict)}
    assert set(per_layer.values()) == {4, 6}
    ck = load_checkpoint(converted["mixed_4_6"])
    loaded = {n: m.bits for n, m in ck.model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))}
    assert loaded == {n: b for n, b in per_layer.items() if n in loaded} and set(loaded.values()) == {4, 6}
    # dequantised (as the ONNX backend reads them), the 6-bit layers are closer to the fp weights than the 4-bit ones
    fp = dict(tree_flatten(source[1].parameters()))
    deq = float_params(ck.model)
    err = {b: np.mean([np.abs(deq[f"{n}.weight"] - np.array(fp[f"{n}.weight"])).mean() for n, nb in loaded.items()
                       if nb == b]) for b in (4, 6)}
    assert err[6] < err[4] / 2


def test_tts_command_on_mlx_audio_6bit(converted, tmp_path, capsys):
    import soundfile as sf

    from agent.cli import main

    out = tmp_path / "q6.wav"
    assert main(["tts", "hello there", "-o", str(out), "--checkpoint", str(converted["6"]), "--seed", "2",
                 "--max-ms", "400"]) == 0
    audio, rate = sf.read(out)
    assert rate == 24000 and len(audio) == 5 * 1920
    assert f"model={converted['6']}" in capsys.readouterr().err
