"""Each stage is built in one place (pipelines.{asr,llm,tts}.load) from its config section and one Placement:
a precision is honoured on the backend it runs on, and cache folders are named by `Precision.tag`."""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import mlx.nn as nn

from conftest import require_checkpoints, tiny_llama
from pipelines.ortgraph import Placement, Precision, cache_folder, quantize_mlx, weights_key


def quantised(model) -> dict[str, tuple[int, int]]:
    """name -> (bits, group size) of every quantised layer."""
    return {name: (m.bits, m.group_size) for name, m in model.named_modules()
            if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))}


def test_cache_folders_are_named_by_the_precision_tag(tmp_path):
    assert cache_folder(tmp_path, "llm-abc", Precision()) == tmp_path / "llm-abc-fp32"
    assert cache_folder(tmp_path, "llm-abc", Precision(8)) == tmp_path / "llm-abc-q8b32"
    assert cache_folder(tmp_path, "abc", Precision(4, 64)).name == "abc-" + Precision(4, 64).tag == "abc-q4b64"


def test_quantize_mlx_honours_bits_and_group_and_requantises_another_precision():
    model = tiny_llama()
    quantize_mlx(model, Precision())
    assert quantised(model) == {}
    quantize_mlx(model, Precision(4, 64))
    layers = quantised(model)
    # every Linear whose input is a multiple of 64 wide, and the (tied) embedding; the 96-wide down_proj is not
    assert set(layers.values()) == {(4, 64)} and "model.embed_tokens" in layers
    assert not any(name.endswith("down_proj") for name in layers)
    same = model.layers[0].self_attn.q_proj
    quantize_mlx(model, Precision(4, 64))
    assert model.layers[0].self_attn.q_proj is same  # already at that precision: left as it is
    quantize_mlx(model, Precision(8, 32))
    layers = quantised(model)
    assert set(layers.values()) == {(8, 32)} and any(name.endswith("down_proj") for name in layers)
    logits = model(mx.array([[1, 2, 3]]))
    assert logits.shape == (1, 3, 300) and bool(mx.isfinite(logits).all())


def test_quantize_mlx_can_leave_embeddings():
    model = tiny_llama()
    quantize_mlx(model, Precision(8, 32), embeddings=False)
    layers = quantised(model)
    assert layers and "model.embed_tokens" not in layers


@dataclasses.dataclass
class Section:  # an [llm] config section's fields, as pipelines.llm.load reads them
    model: str = "checkpoints/smollm2-135m-instruct"
    system_prompt: str = "Be brief."
    examples: list = dataclasses.field(default_factory=list)
    no_repeat_ngram: int = 0
    max_tokens: int = 8
    max_history_turns: int = 2
    temperature: float = 0.0
    seed: int = 0
    backend: str = "mlx"
    quantization: str = "auto"
    ort_cache: str = "checkpoints/.ort"


def test_llm_on_onnx_caches_its_graphs_by_the_precision_tag(tmp_path, monkeypatch):
    import pipelines.llm.reply as reply
    from pipelines.llm.load import llm_placement, load_llm

    model = tmp_path / "llm"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    made = {}
    monkeypatch.setattr(reply, "ReplyLLM", lambda model_dir, system_prompt, **kw: made.update(kw, dir=model_dir))
    section = Section(model="llm", backend="onnx", quantization="4", ort_cache="cache")
    load_llm(section, root=tmp_path)
    assert made["placement"] == llm_placement(section) == Placement("onnx", Precision(4))
    assert made["dir"] == model
    assert made["ort_cache"] == tmp_path / "cache" / f"llm-{weights_key(model)}-q4b32"
    load_llm(dataclasses.replace(section, backend="mlx"), root=tmp_path)
    assert made["placement"] == Placement("mlx", Precision(4)) and made["ort_cache"] is None


def test_llm_quantization_is_honoured_on_mlx():
    from agent.config import ROOT
    from pipelines.llm.load import load_llm

    require_checkpoints("smollm2-135m-instruct")
    llm = load_llm(Section(backend="mlx", quantization="4"), root=ROOT)
    layers = quantised(llm.model)
    assert len(layers) > 100 and set(layers.values()) == {(4, 32)}
    assert "".join(llm.stream("What is the capital of France?")).strip()
    fp32 = load_llm(Section(backend="mlx", quantization="none"), root=ROOT)
    assert quantised(fp32.model) == {}


def test_tts_on_mlx_honours_quantization_and_quant_block(tiny_marvis, tmp_path):
    from pipelines.tts.load import TTSConfig, load_tts

    def layers(**config):
        tts = load_tts(TTSConfig(checkpoint=str(tiny_marvis), mimi=str(tmp_path / "none"), backend="mlx", **config),
                       log=lambda m: None)
        return quantised(tts.frames.backend.model), tts.frames.backend.quantization

    assert layers(quantization="none") == ({}, None)
    fine, bits = layers(quantization="8", quant_block=32)
    assert bits == 8 and set(fine.values()) == {(8, 32)}
    coarse, bits = layers(quantization="4", quant_block=128)
    assert bits == 4 and set(coarse.values()) == {(4, 128)} and len(coarse) < len(fine)  # 128-wide inputs only
