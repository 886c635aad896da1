"""Every Marvis/CSM checkpoint format -> our parameter names (`model.py`), with one loader path.

Formats:
- original (torchtune): `backbone.layers.N.attn.q_proj.weight`, `sa_norm.scale`, `mlp.w1`...
- transformers (`CsmForConditionalGeneration`): `backbone_model.*`, `depth_decoder.model.*`, q/k stored
  permuted for rotate-half RoPE.
- MLX (ours or mlx-audio's, maybe quantised with `.scales`/`.biases`): our names, maybe under `model.`.
A checkpoint is a single `.safetensors` file (config beside it or inferred from shapes) or a directory
with `config.json`, one or more `*.safetensors` and the text tokenizer. Never unpickled.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from pipelines.errors import CheckpointError
from pipelines.tts.model import FLAVOURS, Model, ModelArgs, TransformerArgs

_TORCHTUNE_RENAMES = [
    (".attn.output_proj.", ".self_attn.o_proj."),
    (".attn.", ".self_attn."),
    (".sa_norm.scale", ".input_layernorm.weight"),
    (".mlp_norm.scale", ".post_attention_layernorm.weight"),
    (".mlp.w1.", ".mlp.gate_proj."),
    (".mlp.w2.", ".mlp.down_proj."),
    (".mlp.w3.", ".mlp.up_proj."),
    ("backbone.norm.scale", "backbone.norm.weight"),
    ("decoder.norm.scale", "decoder.norm.weight"),
]

_TRANSFORMERS_RENAMES = [
    ("backbone_model.embed_tokens.embed_audio_tokens.weight", "audio_embeddings.weight"),
    # tied with the backbone's; save_pretrained keeps only one of the two (this one, in transformers 5)
    ("depth_decoder.model.embed_tokens.weight", "audio_embeddings.weight"),
    ("depth_decoder.model.inputs_embeds_projector.weight", "projection.weight"),
    ("depth_decoder.codebooks_head.weight", "audio_head"),
    ("embed_text_tokens.weight", "text_embeddings.weight"),
    ("lm_head.weight", "codebook0_head.weight"),
    ("backbone_model.", "backbone."),
    ("depth_decoder.model.", "decoder."),
]

# The transformers port carries its own codec (`codec_model.*`); the TTS network leaves it to codec.py.
_TRANSFORMERS_DROPPED = ("codec_model.",)


def detect_format(keys: list[str], where: str = "checkpoint") -> str:
    if any(k.startswith(("backbone_model.", "depth_decoder.")) for k in keys):
        return "transformers"
    if any(".sa_norm." in k or ".attn.q_proj" in k for k in keys):
        return "torchtune"
    if any(k.startswith(("encoder.blocks.", "model.encoder.layers.", "decoder.blocks.")) for k in keys):
        raise CheckpointError(f"{where}: this is a Whisper model, not Marvis; pass it as the ASR model, not --checkpoint")
    if any(re.match(r"(model\.)?layers\.\d+\.self_attn\.", k) for k in keys):
        raise CheckpointError(f"{where}: this is a text LLM, not Marvis; pass it as the reply LLM, not the TTS checkpoint")
    if any(".self_attn.q_proj" in k for k in keys):
        return "mlx"
    raise CheckpointError(f"{where}: no Marvis/CSM tensors (expected backbone/decoder layers)")


def rotate_half_to_interleaved(w, num_heads: int):
    """A q/k projection [heads * head_dim, in] from rotate-half RoPE order to interleaved pairs: transformers stores
    each head's rows as [even dims..., odd dims...]; the original checkpoints, our RoPE and moshi's pair them
    (even, odd, even, odd...). An MLX array or a torch tensor (the Mimi of a transformers repo)."""
    out_dim, in_dim = w.shape
    return w.reshape(num_heads, 2, out_dim // num_heads // 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)


def sanitize(weights: dict[str, mx.array], args: ModelArgs, fmt: str) -> dict[str, mx.array]:
    out: dict[str, mx.array] = {}
    for key, value in weights.items():
        if key.startswith("model."):  # mlx-audio nests the network under `model.`
            key = key[len("model."):]
        if fmt == "transformers":
            if key.startswith(_TRANSFORMERS_DROPPED):
                continue
            for old, new in _TRANSFORMERS_RENAMES:
                if key.startswith(old) or key == old:
                    key = new + key[len(old):]
                    break
            m = re.match(r"(backbone|decoder)\.layers\.\d+\.self_attn\.([qk])_proj\.weight$", key)
            if m:
                part = args.backbone if m.group(1) == "backbone" else args.decoder
                heads = part.num_heads if m.group(2) == "q" else part.num_kv_heads
                value = rotate_half_to_interleaved(value, heads)
        elif fmt == "torchtune":
            for old, new in _TORCHTUNE_RENAMES:
                key = key.replace(old, new)
        out[key] = value
    return out


def _guess_transformer(weights: dict[str, mx.array], part: str) -> TransformerArgs:
    layer_ids = {int(m.group(1)) for k in weights if (m := re.match(rf"{part}\.layers\.(\d+)\.", k))}
    if not layer_ids:
        raise CheckpointError(f"cannot infer the {part} shape: no {part}.layers.* tensors")
    q = weights[f"{part}.layers.0.self_attn.q_proj.weight"]
    k = weights[f"{part}.layers.0.self_attn.k_proj.weight"]
    mlp = weights[f"{part}.layers.0.mlp.gate_proj.weight"]
    dim = weights[f"{part}.norm.weight"].shape[0]
    layers, q_out, k_out, mlp_dim = len(layer_ids), q.shape[0], k.shape[0], mlp.shape[0]
    for n_layers, heads, kv, d, m in FLAVOURS.values():
        hd = d // heads
        if (n_layers, d, m, heads * hd, kv * hd) == (layers, dim, mlp_dim, q_out, k_out):
            return TransformerArgs(n_layers, heads, kv, d, m)
    # not a known flavour: the largest usual head size that divides both projections
    head_dim = next((hd for hd in (128, 64, 32, 16, 8) if q_out % hd == 0 and k_out % hd == 0), 1)
    return TransformerArgs(layers, q_out // head_dim, k_out // head_dim, dim, mlp_dim, head_dim=head_dim)


def infer_args(weights: dict[str, mx.array]) -> ModelArgs:
    """Model shape from sanitized (our-named, unquantised) tensors, for a checkpoint without a config."""
    if any(k.endswith(".scales") for k in weights):
        raise CheckpointError("a quantised checkpoint needs its config.json (quantization settings) beside it")
    audio = weights["audio_embeddings.weight"]
    head = weights["audio_head"]
    return ModelArgs(
        backbone=_guess_transformer(weights, "backbone"),
        decoder=_guess_transformer(weights, "decoder"),
        text_vocab_size=weights["text_embeddings.weight"].shape[0],
        audio_vocab_size=head.shape[2],
        audio_num_codebooks=audio.shape[0] // head.shape[2],
    )


def check_fit(expected: dict, got: dict, what: str) -> None:
    """Tensors `got` (name -> tensor) against the `expected` ones: one `CheckpointError`, "`what`; missing N: ...;
    unexpected N: ...; mis-shaped N: name (got) != (expected)", naming the first few of each; nothing if they fit."""
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    shapes = [f"{k} {tuple(got[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
              if k in got and tuple(got[k].shape) != tuple(v.shape)]

    def few(items: list[str]) -> str:
        return ", ".join(items[:6]) + (f" (+{len(items) - 6} more)" if len(items) > 6 else "")

    problems = [f"{kind} {len(items)}: {few(items)}"
                for kind, items in (("missing", missing), ("unexpected", extra), ("mis-shaped", shapes)) if items]
    if problems:
        raise CheckpointError(f"{what}; " + "; ".join(problems))


def check_weights(model: nn.Module, weights: dict[str, mx.array], where: str) -> None:
    """One error that lists every missing, unexpected and mis-shaped tensor."""
    check_fit(dict(tree_flatten(model.parameters())), weights, f"{where}: checkpoint does not fit the model")


def check_tokenizer(tokenizer_dir: Path, args: ModelArgs) -> None:
    """A tokenizer whose ids run past the text embedding would index out of it: refuse it by name."""
    from tokenizers import Tokenizer

    file = Path(tokenizer_dir) / "tokenizer.json"
    try:
        size = Tokenizer.from_file(str(file)).get_vocab_size(with_added_tokens=True)
    except Exception as exc:
        raise CheckpointError(f"{file}: cannot read the tokenizer ({exc})") from None
    if size > args.text_vocab_size:
        raise CheckpointError(f"{file}: the tokenizer has {size} tokens but the model's text embedding has "
                              f"{args.text_vocab_size}; use the tokenizer that came with this checkpoint")


@dataclass
class LoadedCheckpoint:
    model: Model | None  # None once another backend holds the weights (load.py, ONNX)
    args: ModelArgs
    source: str  # what was loaded, for logs and labels
    format: str
    tokenizer_dir: Path | None  # where tokenizer.json is, if the checkpoint carries one
    random_weights: bool = False
    codec_files: tuple[Path, ...] = ()  # files holding a transformers Mimi (`codec_model.*`), for codec.py
    codec_config: dict | None = None  # its config (config.json's `codec_config`)


def _read_safetensors(files: list[Path]) -> tuple[dict[str, mx.array], dict[str, str]]:
    weights: dict[str, mx.array] = {}
    metadata: dict[str, str] = {}
    for f in files:
        try:
            tensors, meta = mx.load(str(f), return_metadata=True)
        except Exception as exc:
            raise CheckpointError(f"{f}: cannot read safetensors ({exc}); the file may be truncated") from None
        weights.update(tensors)
        metadata.update(meta or {})
    return weights, metadata


def _checkpoint_files(path: Path) -> tuple[list[Path], dict | None, Path | None]:
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint; run `voice-agent fetch` or pass --checkpoint")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: unsupported checkpoint file (use .safetensors; pickles are refused)")
        folder, files = path.parent, [path]
        config_file = path.with_suffix(".json") if path.with_suffix(".json").is_file() else None
    else:
        folder = path
        files = sorted(f for f in path.glob("*.safetensors"))
        if not files:
            pickles = sorted(f.name for f in path.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            if pickles:
                raise CheckpointError(f"{path}: only pickle files ({', '.join(pickles)}), which are never loaded; "
                                      "convert them to safetensors first")
            raise CheckpointError(f"{path}: no .safetensors files in this checkpoint directory")
        config_file = path / "config.json" if (path / "config.json").is_file() else None
    config = None
    if config_file is not None:
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{config_file}: invalid JSON ({exc})") from None
    tokenizer_dir = folder if (folder / "tokenizer.json").is_file() else None
    return files, config, tokenizer_dir


def load_checkpoint(path: str | Path, dtype: mx.Dtype | None = None) -> LoadedCheckpoint:
    path = Path(path)
    files, config, tokenizer_dir = _checkpoint_files(path)
    raw, metadata = _read_safetensors(files)
    if config is None and "marvis_config" in metadata:  # our single files carry their config
        config = json.loads(metadata["marvis_config"])
    fmt = detect_format(list(raw), str(path))
    if config is not None:
        try:
            args = ModelArgs.from_dict(config)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: config does not describe a Marvis/CSM model ({exc})") from None
        weights = sanitize(raw, args, fmt)
    else:
        if fmt == "transformers":
            raise CheckpointError(f"{path}: a transformers-format checkpoint needs its config.json beside it")
        weights = sanitize(raw, None, fmt)  # type: ignore[arg-type]
        try:
            args = infer_args(weights)
        except KeyError as exc:
            raise CheckpointError(f"{path}: cannot infer the model shape, tensor {exc} is missing") from None
    model = Model(args)
    quant = (config or {}).get("quantization")
    if quant or any(k.endswith(".scales") for k in weights):
        if not quant:
            raise CheckpointError(f"{path}: quantised tensors but no 'quantization' in config.json")

        def layer_quant(p: str, m: nn.Module) -> bool | dict:
            # mlx-audio's mixed recipes (`mixed_4_6`...) give some layers their own settings, under its `model.` names
            if not (isinstance(m, (nn.Linear, nn.Embedding)) and f"{p}.scales" in weights):
                return False
            own = quant.get(p, quant.get(f"model.{p}"))
            return own if isinstance(own, dict) else True

        nn.quantize(model, group_size=quant["group_size"], bits=quant["bits"], mode=quant.get("mode", "affine"),
                    class_predicate=layer_quant)
    check_weights(model, weights, str(path))
    if dtype is not None:
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) and not k.endswith((".scales", ".biases")) else v for k, v in weights.items()}
    model.update(tree_unflatten(list(weights.items())))
    if tokenizer_dir is not None:
        check_tokenizer(tokenizer_dir, args)
    mx.eval(model.parameters())
    codec_files = tuple(files) if any(k.startswith(_TRANSFORMERS_DROPPED) for k in raw) else ()
    return LoadedCheckpoint(model, args, str(path), fmt, tokenizer_dir, codec_files=codec_files,
                            codec_config=(config or {}).get("codec_config"))


def random_model(preset: str | ModelArgs, seed: int = 0, dtype: mx.Dtype | None = None) -> LoadedCheckpoint:
    """The real architecture with seeded random weights: the offline default when no checkpoint exists."""
    args = ModelArgs.preset(preset) if isinstance(preset, str) else preset
    mx.random.seed(seed)
    model = Model(args)
    if dtype is not None:
        model.set_dtype(dtype)
    mx.eval(model.parameters())
    name = preset if isinstance(preset, str) else "custom"
    return LoadedCheckpoint(model, args, f"random:{name} (seed {seed})", "random", None, random_weights=True)


def save_checkpoint(model: Model, folder: str | Path) -> Path:
    """Our MLX format: config.json + model.safetensors with our names."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(model.args.to_dict(), indent=2))
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "mlx", "marvis_config": json.dumps(model.args.to_dict())})
    return folder
