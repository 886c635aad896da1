"""Marvis on ONNX Runtime: the same network as `model.py`, as graphs built from its args and weights.

What is notable here:
- There is no second model definition to keep in step: `build_graphs` emits the backbone and the depth decoder
  with `pipelines.ortgraph.llama_blocks` from a `model.Model`'s args and parameters, so the parity tests of
  the MLX model carry over. Embedding lookups stay in numpy (a gather per row is cheap; tables stay fp32).
- Why ONNX Runtime: on a CPU its MLAS kernels read weights fast, fp32 and blockwise 8/4-bit alike
  (`MatMulNBits`), where MLX's Linux CPU low-precision kernels are not vectorised (DESIGN.md §5).
- The graphs: the backbone (rows -> last hidden + codebook-0 logits, cache in/out), the depth decoder
  (embeddings -> last hidden, cache in/out) and one per audio head: a session runs its whole graph, so
  31 heads in one graph would read all of them at every step.
- Built once per checkpoint and precision into `cache_dir`, then loaded.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipelines.ortgraph import QUANT_BLOCK, Graph, build_cached, float_params, llama_blocks, session
from pipelines.ortgraph import rope_periods  # noqa: F401  (re-exported for the parity tests)

FORMAT_VERSION = 2  # bump when the graphs change: cached builds of another version are rebuilt


def build_graphs(model) -> dict[str, object]:
    """The fp32 ONNX models of a `model.Model`: backbone, decoder, one per audio head."""
    from onnx import TensorProto as TP

    a = model.args
    params = float_params(model, ("backbone", "decoder", "projection", "codebook0_head", "audio_head"))
    models = {}

    g = Graph("backbone")
    x = g.input("x", TP.FLOAT, [1, "T", a.backbone.embed_dim])
    pos = g.input("pos", TP.INT64, [1, "T"])
    h = llama_blocks(g, "backbone", a.backbone, params, x, pos)
    g.output("hidden", h, TP.FLOAT, [1, a.backbone.embed_dim])
    logits = g.op("MatMul", [h, g.init("codebook0_head", params["codebook0_head.weight"].T)])
    g.output("logits", logits, TP.FLOAT, [1, a.audio_vocab_size])
    models["backbone"] = g.model()

    g = Graph("decoder")
    x = g.input("x", TP.FLOAT, [1, "T", a.backbone.embed_dim])
    pos = g.input("pos", TP.INT64, [1, "T"])
    x = g.op("MatMul", [x, g.init("projection", params["projection.weight"].T)])
    h = llama_blocks(g, "decoder", a.decoder, params, x, pos)
    g.output("hidden", h, TP.FLOAT, [1, a.decoder.embed_dim])
    models["decoder"] = g.model()

    for k in range(1, a.audio_num_codebooks):  # one graph a head: a session runs all of its graph
        g = Graph(f"head{k}")
        h = g.input("hidden", TP.FLOAT, [1, a.decoder.embed_dim])
        g.output("logits", g.op("MatMul", [h, g.init(f"audio_head.{k}", params["audio_head"][k - 1])]), TP.FLOAT,
                 [1, a.audio_vocab_size])
        models[f"head{k}"] = g.model()
    return models


class OrtCache:
    """The backbone's KV cache: one (k, v) pair of [1, KVH, positions, hd] arrays per layer."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int):
        empty = np.zeros((1, kv_heads, 0, head_dim), np.float32)
        self.k, self.v = [empty] * layers, [empty] * layers

    @property
    def offset(self) -> int:
        return self.k[0].shape[2]

    def trim(self, n: int) -> int:
        n = min(n, self.offset)
        keep = self.offset - n
        self.k = [a[:, :, :keep] for a in self.k]
        self.v = [a[:, :, :keep] for a in self.v]
        return n


class OrtFrameModel:
    """The same Marvis network executed by ONNX Runtime; numpy in, numpy out."""

    def __init__(self, model, quantization: int | None = None, cache_dir: Path | None = None,
                 threads: int | None = None, progress: bool = False):
        if quantization not in (None, 8, 4):
            raise ValueError(f"quantization must be None, 8 or 4, not {quantization!r}")
        a = model.args
        self.args = a
        self.quantization = quantization
        self.num_codebooks = a.audio_num_codebooks
        self.vocab = a.audio_vocab_size
        params = float_params(model, ("text_embeddings", "audio_embeddings"))
        self.text_embeddings = params["text_embeddings.weight"]
        self.audio_embeddings = params["audio_embeddings.weight"]
        del params
        self.offsets = np.arange(a.audio_num_codebooks) * a.audio_vocab_size
        self.built = False
        stamp = {"format": FORMAT_VERSION, "quantization": quantization, "block": QUANT_BLOCK}
        what = "fp32" if quantization is None else f"{quantization}-bit"
        folder, self.built = build_cached(cache_dir, stamp, lambda: build_graphs(model),
                                          f"building the ONNX TTS ({what}, once per checkpoint)" if progress else None)
        threads = threads or os.cpu_count() or 1
        # Thread pools that spin while idle steal the cores from the one that works: only the depth decoder's
        # pool spins (it runs 31 times back to back, and waking sleeping workers costs ~1.5 ms a step); the
        # backbone's sleeps between frames, and a head (one small matmul) runs on the calling thread.
        self.sessions = {"backbone": session(folder / "backbone.onnx", threads),
                         "decoder": session(folder / "decoder.onnx", threads, spin=True)}
        for k in range(1, a.audio_num_codebooks):
            self.sessions[f"head{k}"] = session(folder / f"head{k}.onnx", 1)
        if cache_dir is None:
            shutil.rmtree(folder, ignore_errors=True)
        self._backbone_out = ["hidden", "logits"] + [f"backbone.present_{kv}{i}" for i in range(a.backbone.num_layers) for kv in "kv"]
        self._decoder_out = ["hidden"] + [f"decoder.present_{kv}{i}" for i in range(a.decoder.num_layers) for kv in "kv"]

    # ---- running -------------------------------------------------------------------------------------------

    def make_cache(self) -> OrtCache:
        b = self.args.backbone
        return OrtCache(b.num_layers, b.num_kv_heads, b.head_dim)

    def embed_rows(self, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """tokens, mask [T, K+1] -> summed masked embeddings [1, T, D]."""
        text = self.text_embeddings[tokens[:, -1]] * mask[:, -1:]
        audio_mask = mask[:, :-1]
        rows, cols = np.nonzero(audio_mask)
        out = text.astype(np.float32, copy=True)
        if rows.size:
            ids = tokens[rows, cols] + self.offsets[cols]
            np.add.at(out, rows, self.audio_embeddings[ids])
        return out[None]

    def backbone(self, tokens: np.ndarray, mask: np.ndarray, cache: OrtCache) -> tuple[np.ndarray, np.ndarray]:
        """rows [T, K+1] -> (last hidden [D], codebook-0 logits [V]); the cache advances by T."""
        T, start = len(tokens), cache.offset
        feeds = {"x": self.embed_rows(tokens, mask), "pos": np.arange(start, start + T, dtype=np.int64)[None]}
        for i, (k, v) in enumerate(zip(cache.k, cache.v)):
            feeds[f"backbone.past_k{i}"], feeds[f"backbone.past_v{i}"] = k, v
        out = self.sessions["backbone"].run(self._backbone_out, feeds)
        cache.k, cache.v = out[2::2], out[3::2]
        return out[0][0], out[1][0]

    def decoder_step(self, embeds: np.ndarray, cache: list[np.ndarray], codebook: int) -> np.ndarray:
        """Backbone-space embeddings [L, D] -> logits [V] of `codebook` (1..K-1); `cache` is updated in place."""
        L, start = len(embeds), cache[0].shape[2]
        feeds = {"x": embeds[None].astype(np.float32, copy=False), "pos": np.arange(start, start + L, dtype=np.int64)[None]}
        for i in range(len(cache) // 2):
            feeds[f"decoder.past_k{i}"], feeds[f"decoder.past_v{i}"] = cache[2 * i], cache[2 * i + 1]
        out = self.sessions["decoder"].run(self._decoder_out, feeds)
        cache[:] = out[1:]
        return self.sessions[f"head{codebook}"].run(None, {"hidden": out[0]})[0][0]

    def new_decoder_cache(self) -> list[np.ndarray]:
        d = self.args.decoder
        empty = np.zeros((1, d.num_kv_heads, 0, d.head_dim), np.float32)
        return [empty] * (2 * d.num_layers)

    def frame(self, tokens: np.ndarray, mask: np.ndarray, cache: OrtCache,
              sample: Callable[[np.ndarray, int], int]) -> np.ndarray:
        """One frame: backbone over the rows, codebook 0, then the depth decoder's K-1 steps -> codes [K]."""
        K, V = self.num_codebooks, self.vocab
        h, logits = self.backbone(tokens, mask, cache)
        codes = np.zeros(K, np.int32)
        codes[0] = sample(logits, 0)
        dcache = self.new_decoder_cache()
        x = np.stack([h, self.audio_embeddings[codes[0]]])  # [2, D]: positions 0, 1
        for k in range(1, K):
            codes[k] = sample(self.decoder_step(x, dcache, k), k)
            x = self.audio_embeddings[codes[k] + k * V][None]
        return codes
