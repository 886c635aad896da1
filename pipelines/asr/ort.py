"""Whisper on ONNX Runtime: the mlx-whisper model's own weights as graphs, behind its `encoder` and `decoder`.

An utterance's ASR here is the encoder over Whisper's whole 30 s window (1500 positions; encoding fewer costs
accuracy, measured in tests/test_asr.py) and then the text decoder, one token at a time; on MLX's CPU path
both are slow (~1.6 s encoder, ~46 ms a token). Both run through ONNX Runtime's kernels instead, emitted from
the mlx-whisper `AudioEncoder` / `TextDecoder` parameters. They stand in for mlx-whisper's encoder and decoder, so
its `DecodingTask` can run them; the stage's greedy windows call `features` / `start` / `step` with numpy instead
(pipelines/asr/greedy.py: the same rules without MLX's per-token bookkeeping). Notable:
- Encoder fp32: its features equal MLX's to float rounding.
- The decoder is two graphs: `cross` projects the audio features to every block's cross-attention K/V once per
  decoding run (the first call, when mlx-whisper's `Inference` passes no cache), laid out by head as the
  attention reads them (fed [B, T, D], ORT's Attention transposed 2 x 1500 x D floats a block every token: a
  tiny.en step took 6.3 ms instead of 5.0); `decoder` takes tokens, their
  positions, the self-attention cache and those K/V and returns logits for every token plus the grown cache.
  The cache mlx-whisper holds between calls is that graph's feed dict. The token embedding is stored once,
  transposed [n_state, n_vocab]: a Gather on axis 1 embeds, a MatMul projects to logits.
- `cross_qk` (word timestamps only) is not computed: a list of None.
- fp32, or with `asr.quantization = "8"` every matrix in int8. ORT's 8-bit MatMulNBits halves a decoder step
  (the logits projection reads the whole 51864 x 384 embedding each token) but hardly speeds up the encoder (its
  weights are read once for 1500 positions: arithmetic, not bytes, bounds it), so the encoder and the cross
  projection multiply in int8 instead (`int8_matmul`, activations quantised a row at a time as the run goes).
  On real weights (tiny.en, base) that changed 1 and 4 of 29 transcripts, with 44 and 36 word errors in 244
  against fp32's 45 and 35, in ~0.65 of the time (scripts/bench_asr_precision.py, docs/performance.md).
- All graphs are one cached build (folder + stamp), loaded from there afterwards.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipelines.ortgraph import (
    QUANT_BLOCK,
    Graph,
    OrtNet,
    Precision,
    empty_kv,
    float_params,
    int8_matmul,
    kv_names,
    quantize,
)

FORMAT_VERSION = 3  # 2: encoder + decoder graphs in one folder; 3: cross K/V by head


def _linear(g: Graph, p: dict, name: str, h: str, int8: bool = False) -> str:
    w = p[f"{name}.weight"].T
    out = int8_matmul(g, h, w, name) if int8 else g.op("MatMul", [h, g.init(f"{name}.w", w)])
    return g.op("Add", [out, g.init(f"{name}.b", p[f"{name}.bias"])]) if f"{name}.bias" in p else out


def _norm(g: Graph, p: dict, name: str, h: str) -> str:
    return g.op("LayerNormalization", [h, g.init(f"{name}.s", p[f"{name}.weight"]),
                                       g.init(f"{name}.o", p[f"{name}.bias"])], axis=-1, epsilon=1e-5)


def _mlp(g: Graph, p: dict, b: str, x: str, int8: bool = False) -> str:
    h = g.op("Gelu", [_linear(g, p, f"{b}.mlp1", _norm(g, p, f"{b}.mlp_ln", x), int8)], approximate="none")
    return g.op("Add", [x, _linear(g, p, f"{b}.mlp2", h, int8)])


def build_encoder(encoder, n_head: int, int8: bool = False):
    """The ONNX graph of an mlx-whisper AudioEncoder: mel [1, 2 * n_ctx, n_mels] -> [1, n_ctx, n_state]; fp32, or
    with `int8` its blocks' projections in int8 arithmetic (`int8_matmul`; the convolutions stay fp32)."""
    import mlx.core as mx
    from onnx import TensorProto as TP

    p = float_params(encoder)
    positions = np.array(encoder._positional_embedding.astype(mx.float32))  # [n_ctx, n_state], not a parameter
    n_ctx, n_state = positions.shape
    n_mels = p["conv1.weight"].shape[2]
    g = Graph("whisper_encoder")
    mel = g.input("mel", TP.FLOAT, [1, 2 * n_ctx, n_mels])
    x = g.op("Transpose", [mel], perm=[0, 2, 1])  # MLX convolves channels-last; ONNX wants [B, C, T]
    for name, stride in (("conv1", 1), ("conv2", 2)):
        w = g.init(f"{name}.w", p[f"{name}.weight"].transpose(0, 2, 1))  # MLX [out, k, in] -> ONNX [out, in, k]
        x = g.op("Conv", [x, w, g.init(f"{name}.b", p[f"{name}.bias"])], pads=[1, 1], strides=[stride])
        x = g.op("Gelu", [x], approximate="none")
    x = g.op("Add", [g.op("Transpose", [x], perm=[0, 2, 1]), g.init("positions", positions[None])])
    for i in range(len(encoder.blocks)):
        b = f"blocks.{i}"
        h = _norm(g, p, f"{b}.attn_ln", x)
        q, k, v = (_linear(g, p, f"{b}.attn.{n}", h, int8) for n in ("query", "key", "value"))
        attn = g.op("Attention", [q, k, v], q_num_heads=n_head, kv_num_heads=n_head)
        x = _mlp(g, p, b, g.op("Add", [x, _linear(g, p, f"{b}.attn.out", attn, int8)]), int8)
    g.output("features", _norm(g, p, "ln_post", x), TP.FLOAT, [1, n_ctx, n_state])
    return g.model()


def _heads(g: Graph, x: str, n_head: int, head_dim: int) -> str:
    """[B, T, n_head * head_dim] -> [B, n_head, T, head_dim]."""
    shape = g.const(f"heads_{n_head}x{head_dim}", np.array([0, -1, n_head, head_dim], np.int64))
    return g.op("Transpose", [g.op("Reshape", [x, shape])], perm=[0, 2, 1, 3])


def build_cross(decoder, n_head: int, int8: bool = False):
    """Audio features [B, n_audio, n_state] -> every block's cross-attention K and V, by head: [B, n_head,
    n_audio, head_dim] each. Laid out once per utterance the way the decoder's attention reads them, so a decoder
    step does not transpose 2 x n_audio x n_state floats a block (the 3-D form made ORT do that every token).
    `int8`: the projections in int8 arithmetic (`int8_matmul`)."""
    from onnx import TensorProto as TP

    p = float_params(decoder, ("blocks.",))
    n_state = p["blocks.0.cross_attn.key.weight"].shape[0]
    g = Graph("whisper_cross_kv")
    features = g.input("features", TP.FLOAT, ["batch", "audio", n_state])
    split = g.init("split", np.array([n_state, n_state], np.int64))
    for i in range(len(decoder.blocks)):
        a = f"blocks.{i}.cross_attn"
        kv_w = np.concatenate([p[f"{a}.key.weight"].T, p[f"{a}.value.weight"].T], axis=1)  # [D, 2D]
        kv_b = np.concatenate([np.zeros(n_state, np.float32), p[f"{a}.value.bias"]])  # the key has no bias
        product = int8_matmul(g, features, kv_w, f"{a}.kv") if int8 else g.op("MatMul", [features, g.init(f"{a}.kv.w", kv_w)])
        kv = g.op("Add", [product, g.init(f"{a}.kv.b", kv_b)])
        k, v = g.op("Split", [kv, split], n_out=2, axis=-1)
        head_dim = n_state // n_head
        g.output(f"cross_k{i}", _heads(g, k, n_head, head_dim), TP.FLOAT, ["batch", n_head, "audio", head_dim])
        g.output(f"cross_v{i}", _heads(g, v, n_head, head_dim), TP.FLOAT, ["batch", n_head, "audio", head_dim])
    return g.model()


def build_decoder(decoder, n_head: int):
    """tokens [B, T], positions [T], self-attention past, cross K/V -> logits [B, T, n_vocab], present."""
    from onnx import TensorProto as TP

    p = float_params(decoder)
    n_vocab, n_state = p["token_embedding.weight"].shape
    head_dim = n_state // n_head
    g = Graph("whisper_decoder")
    tokens = g.input("tokens", TP.INT64, ["batch", "tokens"])
    positions = g.input("positions", TP.INT64, ["tokens"])
    embedding_t = g.init("token_embedding_t", p["token_embedding.weight"].T)  # [D, V]: embeds and projects
    x = g.op("Transpose", [g.op("Gather", [embedding_t, tokens], axis=1)], perm=[1, 2, 0])  # [D, B, T] -> [B, T, D]
    x = g.op("Add", [x, g.op("Gather", [g.init("positional_embedding", p["positional_embedding"]), positions])])
    split = g.init("split_qkv", np.array([n_state] * 3, np.int64))
    merge = g.const("merge_heads", np.array([0, 0, n_state], np.int64))
    for i in range(len(decoder.blocks)):
        b = f"blocks.{i}"
        past_k = g.input(f"past_k{i}", TP.FLOAT, ["batch", n_head, "past", head_dim])
        past_v = g.input(f"past_v{i}", TP.FLOAT, ["batch", n_head, "past", head_dim])
        cross_k = g.input(f"cross_k{i}", TP.FLOAT, ["batch", n_head, "audio", head_dim])
        cross_v = g.input(f"cross_v{i}", TP.FLOAT, ["batch", n_head, "audio", head_dim])
        h = _norm(g, p, f"{b}.attn_ln", x)
        qkv_w = np.concatenate([p[f"{b}.attn.{n}.weight"].T for n in ("query", "key", "value")], axis=1)
        qkv_b = np.concatenate([p[f"{b}.attn.query.bias"], np.zeros(n_state, np.float32), p[f"{b}.attn.value.bias"]])
        qkv = g.op("Add", [g.op("MatMul", [h, g.init(f"{b}.attn.qkv.w", qkv_w)]), g.init(f"{b}.attn.qkv.b", qkv_b)])
        q, k, v = g.op("Split", [qkv, split], n_out=3, axis=-1)
        attn, present_k, present_v = g.op("Attention", [q, k, v, "", past_k, past_v], n_out=3,
                                          q_num_heads=n_head, kv_num_heads=n_head, is_causal=1)
        g.output(f"present_k{i}", present_k, TP.FLOAT, ["batch", n_head, "total", head_dim])
        g.output(f"present_v{i}", present_v, TP.FLOAT, ["batch", n_head, "total", head_dim])
        x = g.op("Add", [x, _linear(g, p, f"{b}.attn.out", attn)])
        q = _linear(g, p, f"{b}.cross_attn.query", _norm(g, p, f"{b}.cross_attn_ln", x))
        attn = g.op("Attention", [_heads(g, q, n_head, head_dim), cross_k, cross_v])  # [B, n_head, T, head_dim]
        attn = g.op("Reshape", [g.op("Transpose", [attn], perm=[0, 2, 1, 3]), merge])
        x = _mlp(g, p, b, g.op("Add", [x, _linear(g, p, f"{b}.cross_attn.out", attn)]))
    logits = g.op("MatMul", [_norm(g, p, "ln", x), embedding_t])
    g.output("logits", logits, TP.FLOAT, ["batch", "tokens", n_vocab])
    return g.model()


def load(encoder, decoder, dims, cache_dir: Path | None = None, threads: int | None = None,
         precision: Precision = Precision()) -> tuple[OrtWhisperEncoder, OrtWhisperDecoder]:
    """Drop-ins for an mlx-whisper model's (MLX) `encoder` and `decoder`, built into `cache_dir` once. With a
    `dynamic` precision every matrix is int8: the graphs that run over all 1500 audio positions (the encoder and
    the cross projection, bound by arithmetic) quantise their activations a row at a time (`int8_matmul`); the
    decoder (one token a step, bound by the bytes of its weights) is `MatMulNBits` 8-bit, blocks of 32."""
    if precision.bits is not None and not precision.dynamic:
        raise ValueError(f"Whisper on ONNX Runtime runs fp32 or dynamic int8, not {precision.label}")
    int8 = precision.dynamic

    def build() -> dict:
        return {"encoder": build_encoder(encoder, dims.n_audio_head, int8),
                "cross": build_cross(decoder, dims.n_text_head, int8),
                "decoder": build_decoder(decoder, dims.n_text_head)}

    def compose(models: dict) -> dict:
        return {**models, "decoder": quantize(models["decoder"], 8, QUANT_BLOCK)}

    sessions = OrtNet(cache_dir, FORMAT_VERSION, precision, build, ("encoder", "cross", "decoder"),
                      threads=threads, compose=compose if int8 else None).sessions
    return (OrtWhisperEncoder(encoder, sessions["encoder"]),
            OrtWhisperDecoder(decoder, sessions["cross"], sessions["decoder"], dims.n_text_head))


class OrtWhisperEncoder:
    """Drop-in for an mlx-whisper model's `encoder`: mx mel [1, 3000, n_mels] -> mx features."""

    def __init__(self, mlx_encoder, encoder_session):
        self.mlx_encoder, self.session = mlx_encoder, encoder_session

    def __call__(self, mel):
        import mlx.core as mx

        return mx.array(self.features(np.asarray(mel.astype(mx.float32))))

    def features(self, mel: np.ndarray) -> np.ndarray:
        """mel [1, 3000, n_mels] float32 -> features [1, 1500, n_state] float32."""
        return self.session.run(["features"], {"mel": mel})[0]


class OrtWhisperDecoder:
    """Drop-in for an mlx-whisper model's `decoder`: (tokens [B, T], features [B, n_audio, D], kv_cache) ->
    (logits [B, T, n_vocab], kv_cache, cross_qk), mx arrays; `kv_cache` None starts a new run."""

    def __init__(self, mlx_decoder, cross_session, decoder_session, n_head: int):
        self.mlx_decoder, self.cross, self.session = mlx_decoder, cross_session, decoder_session
        self.n_layer, self.n_head = len(mlx_decoder.blocks), n_head
        self._cross_outputs = [o.name for o in cross_session.get_outputs()]  # cross_k0, cross_v0, ...
        self._outputs = [o.name for o in decoder_session.get_outputs()]  # logits, present_k0, present_v0, ...

    def __call__(self, tokens, audio_features, kv_cache: dict | None = None):
        import mlx.core as mx

        tokens = np.array(tokens, dtype=np.int64)
        if kv_cache is None:
            kv_cache = self.start(np.asarray(audio_features.astype(mx.float32)), batch=tokens.shape[0])
        logits, kv_cache = self.step(tokens, kv_cache)
        return mx.array(logits), kv_cache, [None] * self.n_layer

    def start(self, features: np.ndarray, batch: int = 1) -> dict:
        """A decoding run's cache: the cross-attention K/V of `features` [B, positions, n_state] and an empty
        self-attention past."""
        cache = dict(zip(self._cross_outputs, self.cross.run(self._cross_outputs, {"features": features})))
        cache.update(zip(kv_names(self.n_layer), empty_kv(self.n_layer, self.n_head,
                                                          features.shape[-1] // self.n_head, batch=batch)))
        return cache

    def step(self, tokens: np.ndarray, cache: dict) -> tuple[np.ndarray, dict]:
        """tokens [B, T] int64 after the cache's -> (logits [B, T, n_vocab] float32, the grown cache)."""
        offset = cache["past_k0"].shape[2]
        feeds = {**cache, "tokens": tokens, "positions": np.arange(offset, offset + tokens.shape[1], dtype=np.int64)}
        out = dict(zip(self._outputs, self.session.run(self._outputs, feeds)))
        cache = {**cache, **{past: out[present] for past, present in
                             zip(kv_names(self.n_layer), kv_names(self.n_layer, kind="present"))}}
        return out["logits"], cache
