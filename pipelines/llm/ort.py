"""The reply LLM's forward pass on ONNX Runtime: an mlx-lm Llama's own weights as one graph.

SmolLM2-135M decodes one token by reading all of its weights: 540 MB in fp32, ~80 ms a token on these two
cores with MLX (memory-bound; MLX's int8/int4 CPU kernels are slower still, docs/performance.md §2). The same network
through ONNX Runtime's blockwise int8 `MatMulNBits` reads a quarter of that. The graph is emitted from the
mlx-lm model's args and parameters by `pipelines.ortgraph.llama_blocks` (rotate-half RoPE, as mlx-lm's
non-traditional RoPE), so greedy decoding in fp32 gives mlx-lm's tokens (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.ortgraph import (
    Graph,
    LazyParams,
    OrtNet,
    Precision,
    empty_kv,
    float_params,
    kv_feeds,
    kv_names,
    llama_blocks,
)

FORMAT_VERSION = 1


@dataclass
class LlamaShape:
    """mlx-lm's Llama args in the names `llama_blocks` reads."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    embed_dim: int
    intermediate_dim: int
    norm_eps: float
    rope_base: float
    rope_scaling: dict | None
    max_seq_len: int
    vocab_size: int
    tied: bool


def supported(model) -> LlamaShape | None:
    """The shape of an mlx-lm model this module can run, or None (another architecture, biases, a RoPE scaling
    other than Llama 3's, which `pipelines.ortgraph.rope_periods` applies as mlx-lm's `Llama3RoPE` does)."""
    args = getattr(model, "args", None)
    if getattr(args, "model_type", None) != "llama" or getattr(args, "rope_traditional", False):
        return None
    if getattr(args, "attention_bias", False) or getattr(args, "mlp_bias", False):
        return None
    scaling = getattr(args, "rope_scaling", None)
    if scaling and scaling.get("rope_type", scaling.get("type")) != "llama3":
        return None
    head_dim = getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads
    return LlamaShape(args.num_hidden_layers, args.num_attention_heads, args.num_key_value_heads or
                      args.num_attention_heads, head_dim, args.hidden_size, args.intermediate_size, args.rms_norm_eps,
                      args.rope_theta, scaling or None, args.max_position_embeddings or 4096, args.vocab_size,
                      args.tie_word_embeddings)


def build_graph(model, shape: LlamaShape) -> dict:
    from onnx import TensorProto as TP

    params = LazyParams(model, ("model.layers", "model.norm", "model.embed_tokens", "lm_head"))  # one at a time
    head = params["model.embed_tokens.weight"] if shape.tied else params["lm_head.weight"]
    g = Graph("llm")
    x = g.input("x", TP.FLOAT, [1, "T", shape.embed_dim])
    pos = g.input("pos", TP.INT64, [1, "T"])
    h = llama_blocks(g, "model", shape, params, x, pos, interleaved=False)
    g.output("logits", g.op("MatMul", [h, g.init("lm_head", head.T)]), TP.FLOAT, [1, shape.vocab_size])
    return {"llm": g.model()}


class OrtLlama:
    """Token ids in, next-token logits out, with a KV cache kept as numpy arrays; `tokens` is the reply stage's
    `TokenNet` (pipelines.llm.reply): the same next-token stream as mlx-lm's, sampled in numpy."""

    name = "onnx"

    def __init__(self, model, shape: LlamaShape, precision: Precision = Precision(), cache_dir: Path | None = None,
                 threads: int | None = None, progress: bool = False):
        self.shape = shape
        self.precision = precision
        self.embeddings = float_params(model, ("model.embed_tokens",))["model.embed_tokens.weight"]
        # the pool sleeps, never spins: with another program busy on one of two cores, a pool spinning inside a
        # run waited at every op for its descheduled thread (SmolLM2 int8, ms a streamed delta: 12.5 idle, 22-26
        # with one core taken; sleeping 13.4 and 16-18; one thread idle 17.3: scripts/bench_threads.py), and it
        # takes cores from the TTS speaking the reply's first sentence while the LLM writes the next
        net = OrtNet(cache_dir, FORMAT_VERSION, precision, lambda: build_graph(model, shape), ("llm",),
                     f"building the ONNX reply LLM ({precision.label}, once)" if progress else None,
                     threads=threads, spin=False)
        self.built, self.session = net.built, net.sessions["llm"]
        self._outputs = ["logits", *kv_names(shape.num_layers, "model.", "present")]

    def new_cache(self) -> list[np.ndarray]:
        return empty_kv(self.shape.num_layers, self.shape.num_kv_heads, self.shape.head_dim)

    def forward(self, ids: list[int], cache: list[np.ndarray]) -> np.ndarray:
        """Feed `ids` after what `cache` holds (updated in place); logits [V] of the next token."""
        start = cache[0].shape[2]
        feeds = {"x": self.embeddings[np.asarray(ids)][None],
                 "pos": np.arange(start, start + len(ids), dtype=np.int64)[None], **kv_feeds(cache, "model.")}
        out = self.session.run(self._outputs, feeds)
        cache[:] = out[1:]
        return out[0][0]

    logits = forward

    def length(self, cache: list[np.ndarray]) -> int:
        return cache[0].shape[2]

    def trim(self, cache: list[np.ndarray], keep: int) -> None:
        cache[:] = [a[:, :, :keep] for a in cache]

    def tokens(self, ids, cache, max_tokens, temperature, seed, ban):
        """Sampled next tokens; each is fed into `cache` only when the one after it is asked for."""
        rng = np.random.default_rng(seed) if temperature > 0 else None
        logits = self.forward(ids, cache)
        reply: list[int] = []
        for _ in range(max_tokens):
            banned = ban(reply, logits) if ban else None
            if banned:
                logits = logits.copy()
                logits[banned] = -np.inf
            if rng is None:
                token = int(np.argmax(logits))
            else:
                z = logits.astype(np.float64) / temperature
                p = np.exp(z - z.max())
                token = int(rng.choice(len(p), p=p / p.sum()))
            yield token
            reply.append(token)
            logits = self.forward([token], cache)
