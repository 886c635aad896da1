"""Shape-true stand-ins: random-weight checkpoints of exactly the published shapes of the models `voice-agent fetch`
gets (Whisper small.en, Llama-3.2-1B-Instruct 4-bit), written in the formats those downloads have, so the same
loaders load them and every matmul costs what the real model's does. Their words mean nothing: a stand-in folder
holds `STAND_IN` (read by the loaders, which then say UNTRAINED), and the agent runs them teacher-forced on a
session's scripted words (`WhisperASR.transcribe_forced`, `ReplyLLM.stream(forced=)`).

The facts below are the published configs (Whisper's model dimensions for small.en; Llama-3.2-1B's config.json and
mlx-community's 4-bit quantisation: groups of 64). The stand-in LLM has no Llama 3 tokenizer (none ships offline):
it carries SmolLM2's, whose ids all fall inside Llama's vocabulary; Llama's own BOS/EOS ids are left out of its
config for that reason. A turn's prompt is then a few tokens longer than Llama 3's would be (a 49k vocabulary
against 128k), and shorter than its chat template, which adds a dated header: the prefill is about the same.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

STAND_IN = "stand-in.json"  # in a stand-in folder: what it stands in for; its weights are random (UNTRAINED)

WHISPER_SMALL_EN = {  # mlx-community/whisper-small.en-mlx config.json (OpenAI's ModelDimensions for small.en)
    "n_mels": 80, "n_vocab": 51864, "n_audio_ctx": 1500, "n_audio_state": 768, "n_audio_head": 12,
    "n_audio_layer": 12, "n_text_ctx": 448, "n_text_state": 768, "n_text_head": 12, "n_text_layer": 12,
}
WHISPER_SMALL_EN_DTYPE = "float16"  # the mlx-community conversion's weights
WHISPER_BASE_EN = {  # mlx-community/whisper-base.en-mlx-fp32 config.json (OpenAI's ModelDimensions for base.en)
    "n_mels": 80, "n_vocab": 51864, "n_audio_ctx": 1500, "n_audio_state": 512, "n_audio_head": 8,
    "n_audio_layer": 6, "n_text_ctx": 448, "n_text_state": 512, "n_text_head": 8, "n_text_layer": 6,
}

LLAMA_32_1B = {  # meta-llama/Llama-3.2-1B-Instruct config.json (token ids left out: see above)
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 2048, "intermediate_size": 8192,
    "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
    "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False, "hidden_act": "silu",
}
LLAMA_32_1B_QUANT = {"group_size": 64, "bits": 4}  # mlx-community/Llama-3.2-1B-Instruct-4bit

# Published parameter counts, the check that a stand-in has the shape: Llama-3.2-1B's 1,235,814,400 (tied
# embeddings counted once); Whisper's as mlx-whisper holds them: transformers' counts (small.en 241,734,144,
# base.en 72,593,408) less the encoder's 1500-position table, which mlx-whisper computes instead of storing.
PARAMETERS = {"whisper-small.en": 240_582_144, "whisper-base.en": 71_825_408, "llama-3.2-1b-instruct": 1_235_814_400}


def _write_folder(dst: Path, fill, what: str) -> Path:
    """`fill(folder)` into `dst.partial`, marked as the stand-in of `what`, then renamed to `dst`: a folder that
    is there is whole."""
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fill(tmp)
    (tmp / STAND_IN).write_text(json.dumps({"stands_in_for": what, "weights": "random (seeded): UNTRAINED",
                                            "written_by": "voice-agent models stand-in"}, indent=2) + "\n")
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return dst


def is_stand_in(folder: Path) -> bool:
    return (Path(folder) / STAND_IN).is_file()


def whisper_model(dims: dict = WHISPER_SMALL_EN, dtype: str = WHISPER_SMALL_EN_DTYPE, seed: int = 0):
    """mlx-whisper's `Whisper` of `dims`, random weights in `dtype`."""
    import mlx.core as mx
    from mlx.utils import tree_map
    from mlx_whisper.whisper import ModelDimensions, Whisper

    mx.random.seed(seed)
    model = Whisper(ModelDimensions(**dims), getattr(mx, dtype))
    model.update(tree_map(lambda a: a.astype(getattr(mx, dtype)) if mx.issubdtype(a.dtype, mx.floating) else a,
                          model.parameters()))
    return model


def write_whisper(dst: Path, dims: dict = WHISPER_SMALL_EN, dtype: str = WHISPER_SMALL_EN_DTYPE,
                  what: str = "mlx-community/whisper-small.en-mlx", seed: int = 0) -> Path:
    """An mlx-whisper folder (config.json + weights.safetensors) of `dims`, random weights in `dtype`."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    model = whisper_model(dims, dtype, seed)

    def fill(folder: Path) -> None:
        (folder / "config.json").write_text(json.dumps({**dims, "model_type": "whisper"}, indent=2) + "\n")
        weights = {k: v for k, v in tree_flatten(model.parameters()) if k != "alignment_heads"}  # not a weight
        mx.save_safetensors(str(folder / "weights.safetensors"), weights)

    return _write_folder(dst, fill, what)


def llama_model(config: dict = LLAMA_32_1B, quantization: dict | None = LLAMA_32_1B_QUANT, seed: int = 0):
    """mlx-lm's Llama of `config`, random weights, quantised as mlx-lm quantises (embedding included)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_map
    from mlx_lm.models.llama import Model, ModelArgs

    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(config))
    model.update(tree_map(lambda a: a.astype(mx.bfloat16), model.parameters()))  # the published weights' dtype
    if quantization:
        nn.quantize(model, group_size=quantization["group_size"], bits=quantization["bits"])
    mx.eval(model.parameters())
    return model


def write_llama(dst: Path, tokenizer_from: Path, config: dict = LLAMA_32_1B,
                quantization: dict | None = LLAMA_32_1B_QUANT,
                what: str = "mlx-community/Llama-3.2-1B-Instruct-4bit", seed: int = 0) -> Path:
    """An `mlx_lm.load` folder of `config` with random weights (quantised like the published repo), carrying the
    tokenizer files of `tokenizer_from`."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    model = llama_model(config, quantization, seed)

    def fill(folder: Path) -> None:
        stored = {**config, **({"quantization": quantization} if quantization else {})}
        (folder / "config.json").write_text(json.dumps(stored, indent=2) + "\n")
        mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())),
                            metadata={"format": "mlx"})
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (Path(tokenizer_from) / name).is_file():
                shutil.copy(Path(tokenizer_from) / name, folder / name)

    return _write_folder(dst, fill, what)


def parameter_count(model) -> int:
    """Parameters as the published counts are given: a quantised matrix counts its unquantised weights (packed
    words times values per word), not its scales and biases; integer tables that are not weights (mlx-whisper's
    `alignment_heads`) do not count."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    flat = dict(tree_flatten(model.parameters()))
    count = 0
    for name, array in flat.items():
        if name.endswith((".scales", ".biases")) and name.rsplit(".", 1)[0] + ".weight" in flat:
            continue
        packed = name.endswith(".weight") and name.rsplit(".", 1)[0] + ".scales" in flat
        if not packed and not mx.issubdtype(array.dtype, mx.floating):
            continue
        bits = getattr(_owner(model, name), "bits", 32) if packed else 32
        count += array.size * (32 // bits)
    return count


def _owner(model, name: str):
    obj = model
    for part in name.split(".")[:-1]:
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj
