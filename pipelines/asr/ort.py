"""Whisper's audio encoder on ONNX Runtime: the mlx-whisper model's own weights as one graph.

The encoder is most of an utterance's ASR time here: it always runs Whisper's whole 30 s window (1500
positions), ~1.6 s for tiny.en with MLX on two CPU cores, whatever the utterance's length. Encoding fewer
positions costs accuracy (measured: tests/test_asr.py), so instead the same full window runs through ONNX
Runtime's fp32 kernels. The graph is emitted from the mlx-whisper `AudioEncoder`'s parameters (convolutions,
exact GELU, pre-norm blocks, LayerNorm), fp32, so its features equal MLX's to float rounding and the decoder
(still mlx-whisper's) sees the same numbers: transcripts are unchanged (tested).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from pipelines.ortgraph import Graph, build_cached, float_params, session

FORMAT_VERSION = 1


def build_encoder(encoder, n_head: int) -> dict:
    """The fp32 ONNX graph of an mlx-whisper AudioEncoder: mel [1, 2 * n_ctx, n_mels] -> [1, n_ctx, n_state]."""
    from onnx import TensorProto as TP

    p = float_params(encoder)
    positions = np.array(encoder._positional_embedding.astype(_f32()))  # [n_ctx, n_state], not a parameter
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

    def linear(name: str, h: str) -> str:
        out = g.op("MatMul", [h, g.init(f"{name}.w", p[f"{name}.weight"].T)])
        return g.op("Add", [out, g.init(f"{name}.b", p[f"{name}.bias"])]) if f"{name}.bias" in p else out

    def norm(name: str, h: str) -> str:
        return g.op("LayerNormalization", [h, g.init(f"{name}.s", p[f"{name}.weight"]),
                                           g.init(f"{name}.o", p[f"{name}.bias"])], axis=-1, epsilon=1e-5)

    for i in range(len(encoder.blocks)):
        b = f"blocks.{i}"
        h = norm(f"{b}.attn_ln", x)
        q, k, v = (linear(f"{b}.attn.{n}", h) for n in ("query", "key", "value"))
        attn = g.op("Attention", [q, k, v], q_num_heads=n_head, kv_num_heads=n_head)
        x = g.op("Add", [x, linear(f"{b}.attn.out", attn)])
        h = g.op("Gelu", [linear(f"{b}.mlp1", norm(f"{b}.mlp_ln", x))], approximate="none")
        x = g.op("Add", [x, linear(f"{b}.mlp2", h)])
    g.output("features", norm("ln_post", x), TP.FLOAT, [1, n_ctx, n_state])
    return {"encoder": g.model()}


def _f32():
    import mlx.core as mx

    return mx.float32


class OrtWhisperEncoder:
    """Drop-in for an mlx-whisper model's `encoder`: mx mel [1, 3000, n_mels] -> mx features, via ONNX Runtime."""

    def __init__(self, encoder, n_head: int, cache_dir: Path | None = None, threads: int | None = None):
        self.mlx_encoder = encoder
        folder, self.built = build_cached(cache_dir, {"format": FORMAT_VERSION}, lambda: build_encoder(encoder, n_head),
                                          None)
        self.session = session(folder / "encoder.onnx", threads or os.cpu_count() or 1)
        if cache_dir is None:
            shutil.rmtree(folder, ignore_errors=True)

    def __call__(self, mel):
        import mlx.core as mx

        features = self.session.run(["features"], {"mel": np.asarray(mel.astype(mx.float32))})[0]
        return mx.array(features)
