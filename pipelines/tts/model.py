"""The Marvis / Sesame-CSM network in MLX: two Llama-3.2-style transformers without token embeddings.

What is notable here:
- A backbone position is a 33-column row (32 Mimi codebooks + 1 text token); its input is the sum of the
  embeddings of the columns its mask switches on.
- The backbone's last hidden state gives codebook 0 (`codebook0_head`); the depth decoder then runs inside
  one frame: positions [0, 1] = projection([h, emb(c0)]), then one codebook a step, 31 steps, each read out
  through its own slice of `audio_head` (stored (in, out), unlike a Linear).
- RoPE is Llama-3 scaled and applied to interleaved pairs (mlx_lm's `traditional=True`), as in the original
  checkpoints; `weights.py` converts the transformers port's rotate-half layout back.
No sampling and no I/O here: that is `generator.py`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache
from mlx_lm.models.llama import ModelArgs as LlamaArgs
from mlx_lm.models.llama import TransformerBlock

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

# torchtune flavours: (layers, heads, kv heads, dim, mlp dim); head_dim = dim // heads.
FLAVOURS: dict[str, tuple[int, int, int, int, int]] = {
    "llama-1B": (16, 32, 8, 2048, 8192),
    "llama-100M": (4, 8, 2, 1024, 8192),
    "llama-250M": (6, 12, 3, 1536, 8192),
    "llama-60M": (4, 8, 2, 1024, 4096),
}

PRESETS: dict[str, dict[str, Any]] = {
    "marvis-250m": {"backbone_flavor": "llama-250M", "decoder_flavor": "llama-60M", "text_vocab_size": 49152},
    "marvis-100m": {"backbone_flavor": "llama-100M", "decoder_flavor": "llama-60M", "text_vocab_size": 49152},
    "csm-1b": {"backbone_flavor": "llama-1B", "decoder_flavor": "llama-100M", "text_vocab_size": 128256},
}


@dataclass
class TransformerArgs:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    embed_dim: int
    intermediate_dim: int
    head_dim: int | None = None
    norm_eps: float = 1e-5
    rope_base: float = 500_000.0
    rope_scaling: dict[str, Any] | None = field(default_factory=lambda: dict(LLAMA3_ROPE))
    max_seq_len: int = 2048

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.embed_dim // self.num_heads

    @classmethod
    def from_flavour(cls, name: str) -> "TransformerArgs":
        if name not in FLAVOURS:
            raise ValueError(f"unknown transformer flavour {name!r}; known: {', '.join(FLAVOURS)}")
        layers, heads, kv_heads, dim, mlp = FLAVOURS[name]
        return cls(layers, heads, kv_heads, dim, mlp)

    def to_llama(self) -> LlamaArgs:
        return LlamaArgs(
            model_type="llama",
            hidden_size=self.embed_dim,
            num_hidden_layers=self.num_layers,
            intermediate_size=self.intermediate_dim,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.norm_eps,
            vocab_size=1,  # unused: these transformers have no token embedding
            rope_theta=self.rope_base,
            rope_traditional=True,
            rope_scaling=self.rope_scaling,
            max_position_embeddings=self.max_seq_len,
        )


@dataclass
class ModelArgs:
    backbone: TransformerArgs
    decoder: TransformerArgs
    text_vocab_size: int = 49152
    audio_vocab_size: int = 2051
    audio_num_codebooks: int = 32
    max_seq_len: int = 2048

    @classmethod
    def preset(cls, name: str) -> "ModelArgs":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
        return cls.from_dict(PRESETS[name])

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "ModelArgs":
        """Original Marvis/CSM config (`backbone_flavor`...), our own `to_dict`, or a transformers CSM config."""
        if cfg.get("model_type") == "csm" or "depth_decoder_config" in cfg:
            return cls._from_transformers(cfg)
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in cfg.items() if k in known and k not in ("backbone", "decoder")}
        for part in ("backbone", "decoder"):
            if isinstance(cfg.get(part), dict):
                kw[part] = TransformerArgs(**cfg[part])
            elif f"{part}_flavor" in cfg:
                kw[part] = TransformerArgs.from_flavour(cfg[f"{part}_flavor"])
            else:
                raise ValueError(f"config has neither '{part}' nor '{part}_flavor'")
        return cls(**kw)

    @classmethod
    def _from_transformers(cls, cfg: dict[str, Any]) -> "ModelArgs":
        def part(c: dict[str, Any]) -> TransformerArgs:
            rope = c.get("rope_scaling") or c.get("rope_parameters") or dict(LLAMA3_ROPE)
            rope = {k: v for k, v in rope.items() if k != "rope_theta"}
            base = c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta") or 500_000.0
            if rope.get("rope_type", rope.get("type")) in (None, "default"):
                rope = None
            return TransformerArgs(
                num_layers=c["num_hidden_layers"],
                num_heads=c["num_attention_heads"],
                num_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
                embed_dim=c["hidden_size"],
                intermediate_dim=c["intermediate_size"],
                head_dim=c.get("head_dim"),
                norm_eps=c.get("rms_norm_eps", 1e-5),
                rope_base=float(base),
                rope_scaling=rope,
            )

        return cls(
            backbone=part(cfg),
            decoder=part(cfg["depth_decoder_config"]),
            text_vocab_size=cfg.get("text_vocab_size", 128256),
            audio_vocab_size=cfg.get("vocab_size", 2051),
            audio_num_codebooks=cfg.get("num_codebooks", 32),
            max_seq_len=cfg.get("max_position_embeddings", 2048),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Transformer(nn.Module):
    """A stack of Llama blocks + final norm, fed embeddings (no token embedding, no output head)."""

    def __init__(self, args: TransformerArgs):
        super().__init__()
        llama = args.to_llama()
        self.layers = [TransformerBlock(llama) for _ in range(args.num_layers)]
        self.norm = nn.RMSNorm(args.embed_dim, eps=args.norm_eps)

    def __call__(self, h: mx.array, cache: list[KVCache]) -> mx.array:
        mask = create_attention_mask(h, cache[0])
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, c)
        return self.norm(h)

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.layers]


class ColumnLinear(nn.Module):
    """A bias-free fp32 Linear computed as `(W @ x.T).T`: the same weight (name, shape, layout) and the same
    products as `nn.Linear`, handed to BLAS with the weight on the left (see `Model.prepare_for_cpu`)."""

    def __init__(self, weight: mx.array):
        super().__init__()
        self.weight = weight

    def __call__(self, x: mx.array) -> mx.array:
        rows = x.reshape(-1, x.shape[-1])
        return (self.weight @ rows.T).T.reshape(*x.shape[:-1], self.weight.shape[0])


def _columns(parent: nn.Module, name: str) -> None:
    """Swap every bias-free fp32 `nn.Linear` at or under `parent.name` for a `ColumnLinear` of its weight."""

    def swap(module):
        if isinstance(module, nn.Linear) and "bias" not in module and module.weight.dtype == mx.float32:
            return ColumnLinear(module.weight)
        if isinstance(module, nn.Module):
            for key, child in module.children().items():
                if isinstance(child, list):
                    module[key] = [swap(c) for c in child]
                else:
                    module[key] = swap(child)
        return module

    setattr(parent, name, swap(getattr(parent, name)))


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        bdim, ddim = args.backbone.embed_dim, args.decoder.embed_dim
        K, V = args.audio_num_codebooks, args.audio_vocab_size
        self.backbone = Transformer(args.backbone)
        self.decoder = Transformer(args.decoder)
        self.text_embeddings = nn.Embedding(args.text_vocab_size, bdim)
        self.audio_embeddings = nn.Embedding(V * K, bdim)  # codebook k, token t at row t + k * V
        self.projection = nn.Linear(bdim, ddim, bias=False)
        self.codebook0_head = nn.Linear(bdim, V, bias=False)
        scale = 1.0 / math.sqrt(ddim)
        self.audio_head = mx.random.uniform(-scale, scale, (K - 1, ddim, V))  # (in, out) per codebook 1..K-1
        self._codebook_offsets = mx.arange(K) * V
        self._cpu_layout = False  # see prepare_for_cpu

    @property
    def num_codebooks(self) -> int:
        return self.args.audio_num_codebooks

    def embed_rows(self, tokens: mx.array, mask: mx.array) -> mx.array:
        """tokens, mask: [B, T, K+1] (K codebooks + text) -> [B, T, D] summed masked embeddings."""
        text = self.text_embeddings(tokens[..., -1])  # [B, T, D]
        audio = self.audio_embeddings(tokens[..., :-1] + self._codebook_offsets)  # [B, T, K, D]
        m = mask.astype(text.dtype)
        return text * m[..., -1:] + (audio * m[..., :-1, None]).sum(axis=2)

    def backbone_hidden(self, tokens: mx.array, mask: mx.array, cache: list[KVCache]) -> mx.array:
        """Run the rows through the backbone (cache advances by T); returns the last position [B, D]."""
        return self.backbone(self.embed_rows(tokens, mask), cache)[:, -1, :]

    def embed_audio(self, codebook: int, codes: mx.array) -> mx.array:
        """codes [B] of codebook k -> [B, 1, D_backbone]."""
        return self.audio_embeddings(codes + codebook * self.args.audio_vocab_size)[:, None, :]

    def decoder_hidden(self, embeds: mx.array, cache: list[KVCache]) -> mx.array:
        """Backbone-space embeddings [B, L, D_backbone] -> decoder hidden of the last position [B, D_decoder]."""
        return self.decoder(self.projection(embeds), cache)[:, -1, :]

    def codebook_logits(self, h: mx.array, codebook: int) -> mx.array:
        """Decoder hidden [B, D_decoder] -> logits [B, V] of codebook 1..K-1.

        The head is taken as a range slice, a view of `audio_head`: MLX indexes with a Python int by a Gather,
        which copies the whole [D, V] slice (8 MB fp32 for Marvis-250M) on every step of every frame; that
        copy was 15 % of an MLX frame on a CPU."""
        return h @ self.audio_head[codebook - 1 : codebook].squeeze(0)

    def prepare_for_cpu(self) -> "Model":
        """On the CPU, lay out each fp32 Linear for the one-row products of generation. A no-op on the GPU.

        MLX's CPU matmul hands fp32 products to BLAS sgemm, and for one input row (M = 1) OpenBLAS's speed
        depends on which operand is transposed, by shape (docs/performance.md, section 6, 2 cores):
        - The depth decoder and its input projection (31 steps a frame, 75 % of it) become `ColumnLinear`s:
          `(W @ x.T).T`, the weight untouched. At their widths this is the fastest form: 16 % off a frame.
        - The backbone's Linears and codebook 0's head keep their [out, in] view but over an [in, out]
          buffer (`x @ W`); at their widths no form wins on every shape, and the column form measured no
          faster over a frame.
        bf16/fp16 go through MLX's own kernel, where neither pays, so they are left alone. Same values,
        names and shapes, so checkpoints and `parameters()` are unaffected; the products agree with
        `x @ W.T` to float32 rounding (the same sums in another order): logits against transformers and greedy
        codes against the plain layout are tested (`tests/test_tts_parity.py`, `tests/test_mlx_frame_work.py`).
        """
        if mx.default_device() != mx.cpu or self._cpu_layout:
            return self
        for name in ("decoder", "projection"):
            _columns(self, name)
        for _, module in [*self.backbone.named_modules(), ("codebook0_head", self.codebook0_head)]:
            if isinstance(module, nn.Linear) and module.weight.dtype == mx.float32:
                module.weight = mx.contiguous(module.weight.T).T
                mx.eval(module.weight)  # one at a time: never two copies of the whole model
        self._cpu_layout = True
        return self

    def make_backbone_cache(self) -> list[KVCache]:
        return self.backbone.make_cache()

    def make_decoder_cache(self) -> list[KVCache]:
        return self.decoder.make_cache()
