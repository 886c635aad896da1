"""Marvis on ONNX Runtime: the same network as `model.py`, as graphs built from its args and weights.

What is notable here:
- There is no second model definition to keep in step: `build_graphs` walks a `model.Model`'s args and
  parameters and emits standard ONNX (opset 23: RMSNormalization, RotaryEmbedding with interleaved pairs,
  Attention with grouped KV heads, a past cache and a causal mask), so the parity tests of the MLX model
  carry over. Embedding lookups stay in numpy (a gather per row is cheap; the tables stay fp32).
- Why ONNX Runtime: on a CPU its MLAS kernels read weights fast, fp32 and blockwise 8/4-bit alike
  (`MatMulNBits`, produced by ORT's own quantiser), where MLX's Linux CPU low-precision kernels are not
  vectorised (DESIGN.md §5).
- The graphs: the backbone (rows -> last hidden + codebook-0 logits, cache in/out), the depth decoder
  (embeddings -> last hidden, cache in/out) and one per audio head: a session runs its whole graph, so
  31 heads in one graph would read all of them at every step.
- The graphs are built once per checkpoint and precision into `cache_dir` (atomically), then loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

OPSET = 23
FORMAT_VERSION = 2  # bump when the graphs change: cached builds of another version are rebuilt
QUANT_BLOCK = 32


def rope_periods(args) -> np.ndarray:
    """Per rotated pair, the period p_i of the angle pos / p_i (mx.fast.rope's `freqs`), Llama-3 scaled."""
    dims = args.head_dim
    periods = args.rope_base ** (np.arange(0, dims, 2, dtype=np.float64) / dims)
    scaling = args.rope_scaling
    if not scaling or scaling.get("rope_type", scaling.get("type")) != "llama3":
        return periods
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old = scaling.get("original_max_position_embeddings", 8192)
    wavelens = 2 * np.pi * periods
    scaled = np.where(wavelens > old / low, periods * factor, periods)
    medium = (wavelens > old / high) & (wavelens < old / low)
    smooth = (old / wavelens - low) / (high - low)
    return np.where(medium, scaled / ((1 - smooth) / factor + smooth), scaled)


class _Graph:
    """A small onnx.helper wrapper: named initializers, nodes with unique output names."""

    def __init__(self, name: str):
        self.name, self.nodes, self.inits, self.inputs, self.outputs = name, [], [], [], []
        self._n = 0

    def init(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs):
        from onnx import helper

        self._n += 1
        outs = [f"{op_type.lower()}_{self._n}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=f"{op_type}_{self._n}", **attrs))
        return outs[0] if n_out == 1 else outs

    def input(self, name: str, elem, shape) -> str:
        from onnx import helper

        self.inputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    def output(self, name: str, source: str, elem, shape=None) -> None:
        from onnx import helper

        self.nodes.append(helper.make_node("Identity", [source], [name], name=f"out_{name}"))
        self.outputs.append(helper.make_tensor_value_info(name, elem, shape))

    def model(self):
        from onnx import helper

        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                        helper.make_opsetid("com.microsoft", 1)])
        model.ir_version = 10
        return model


def _transformer(g: _Graph, prefix: str, args, params: dict[str, np.ndarray], x: str, pos: str) -> str:
    """Llama blocks + final norm of the LAST position: x [1, T, D] -> [1, D]; caches as graph inputs/outputs."""
    from onnx import TensorProto as TP

    H, KVH, hd, D = args.num_heads, args.num_kv_heads, args.head_dim, args.embed_dim
    periods = rope_periods(args)
    angles = np.arange(args.max_seq_len, dtype=np.float64)[:, None] / periods[None, :]  # [positions, hd/2]
    cos = g.init(f"{prefix}.rope_cos", np.cos(angles).astype(np.float32))
    sin = g.init(f"{prefix}.rope_sin", np.sin(angles).astype(np.float32))
    split_qkv = g.init(f"{prefix}.split_qkv", np.array([H * hd, KVH * hd, KVH * hd], np.int64))
    split_mlp = g.init(f"{prefix}.split_mlp", np.array([args.intermediate_dim] * 2, np.int64))

    def w(name: str) -> np.ndarray:
        return params[f"{prefix}.{name}"]

    for i in range(args.num_layers):
        p = f"layers.{i}"
        past_k = g.input(f"{prefix}.past_k{i}", TP.FLOAT, [1, KVH, "past", hd])
        past_v = g.input(f"{prefix}.past_v{i}", TP.FLOAT, [1, KVH, "past", hd])
        h = g.op("RMSNormalization", [x, g.init(f"{prefix}.{p}.norm1", w(f"{p}.input_layernorm.weight"))],
                 epsilon=args.norm_eps, axis=-1)
        qkv_w = np.concatenate([w(f"{p}.self_attn.{n}_proj.weight").T for n in "qkv"], axis=1)  # [D, (H+2KVH)hd]
        q, k, v = g.op("Split", [g.op("MatMul", [h, g.init(f"{prefix}.{p}.qkv", qkv_w)]), split_qkv], n_out=3, axis=-1)
        q = g.op("RotaryEmbedding", [q, cos, sin, pos], interleaved=1, num_heads=H)
        k = g.op("RotaryEmbedding", [k, cos, sin, pos], interleaved=1, num_heads=KVH)
        attn, present_k, present_v = g.op("Attention", [q, k, v, "", past_k, past_v], n_out=3,
                                          q_num_heads=H, kv_num_heads=KVH, is_causal=1)
        g.output(f"{prefix}.present_k{i}", present_k, TP.FLOAT)
        g.output(f"{prefix}.present_v{i}", present_v, TP.FLOAT)
        o = g.op("MatMul", [attn, g.init(f"{prefix}.{p}.o", w(f"{p}.self_attn.o_proj.weight").T)])
        x = g.op("Add", [x, o])
        h = g.op("RMSNormalization", [x, g.init(f"{prefix}.{p}.norm2", w(f"{p}.post_attention_layernorm.weight"))],
                 epsilon=args.norm_eps, axis=-1)
        gu_w = np.concatenate([w(f"{p}.mlp.gate_proj.weight").T, w(f"{p}.mlp.up_proj.weight").T], axis=1)
        gate, up = g.op("Split", [g.op("MatMul", [h, g.init(f"{prefix}.{p}.gate_up", gu_w)]), split_mlp], n_out=2, axis=-1)
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
        x = g.op("Add", [x, g.op("MatMul", [act, g.init(f"{prefix}.{p}.down", w(f"{p}.mlp.down_proj.weight").T)])])
    last = g.op("Slice", [x, g.init(f"{prefix}.last_start", np.array([-1], np.int64)),
                          g.init(f"{prefix}.last_end", np.array([2 ** 62], np.int64)),
                          g.init(f"{prefix}.last_axis", np.array([1], np.int64))])
    last = g.op("Reshape", [last, g.init(f"{prefix}.flat", np.array([1, D], np.int64))])
    return g.op("RMSNormalization", [last, g.init(f"{prefix}.norm", w("norm.weight"))], epsilon=args.norm_eps, axis=-1)


def build_graphs(model) -> dict[str, object]:
    """The fp32 ONNX models of a `model.Model`: backbone, decoder, one per audio head."""
    from onnx import TensorProto as TP

    a = model.args
    params = float_params(model, ("backbone", "decoder", "projection", "codebook0_head", "audio_head"))
    models = {}

    g = _Graph("backbone")
    x = g.input("x", TP.FLOAT, [1, "T", a.backbone.embed_dim])
    pos = g.input("pos", TP.INT64, [1, "T"])
    h = _transformer(g, "backbone", a.backbone, params, x, pos)
    g.output("hidden", h, TP.FLOAT, [1, a.backbone.embed_dim])
    logits = g.op("MatMul", [h, g.init("codebook0_head", params["codebook0_head.weight"].T)])
    g.output("logits", logits, TP.FLOAT, [1, a.audio_vocab_size])
    models["backbone"] = g.model()

    g = _Graph("decoder")
    x = g.input("x", TP.FLOAT, [1, "T", a.backbone.embed_dim])
    pos = g.input("pos", TP.INT64, [1, "T"])
    x = g.op("MatMul", [x, g.init("projection", params["projection.weight"].T)])
    h = _transformer(g, "decoder", a.decoder, params, x, pos)
    g.output("hidden", h, TP.FLOAT, [1, a.decoder.embed_dim])
    models["decoder"] = g.model()

    for k in range(1, a.audio_num_codebooks):  # one graph a head: a session runs all of its graph
        g = _Graph(f"head{k}")
        h = g.input("hidden", TP.FLOAT, [1, a.decoder.embed_dim])
        g.output("logits", g.op("MatMul", [h, g.init(f"audio_head.{k}", params["audio_head"][k - 1])]), TP.FLOAT,
                 [1, a.audio_vocab_size])
        models[f"head{k}"] = g.model()
    return models


def _f32():
    import mlx.core as mx

    return mx.float32


def float_params(model, names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """Parameters (all, or those `names` start with) as fp32 numpy under their checkpoint names; MLX-quantised
    layers are dequantised first (ONNX Runtime quantises again, in its own kernels' layout)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    def wanted(name: str) -> bool:
        return names is None or name.startswith(names)

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)) and wanted(name):
            w = mx.dequantize(module.weight, module.scales, module.biases, module.group_size, module.bits)
            out[f"{name}.weight"] = np.array(w.astype(mx.float32))
    for name, value in tree_flatten(model.parameters()):
        if name.endswith((".scales", ".biases")) or name in out or not wanted(name):
            continue
        out[name] = np.array(value.astype(mx.float32))
    return out


def _quantize(onnx_model, bits: int):
    """fp32 MatMuls with constant weights -> ONNX Runtime's blockwise `MatMulNBits` (its own quantiser)."""
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # it logs every node it visits
    quantizer = MatMulNBitsQuantizer(onnx_model, bits=bits, block_size=QUANT_BLOCK, is_symmetric=True, accuracy_level=4)
    quantizer.process()
    return quantizer.model.model


def _save(onnx_model, path: Path) -> None:
    import onnx

    onnx.save_model(onnx_model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)


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
        import onnxruntime as ort

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
        folder = self._ensure_built(model, quantization, cache_dir, progress)
        threads = threads or os.cpu_count() or 1

        def session(name: str, n_threads: int, spin: bool = False):
            opts = ort.SessionOptions()
            opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
            opts.intra_op_num_threads = n_threads
            opts.inter_op_num_threads = 1
            opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            return ort.InferenceSession(str(folder / f"{name}.onnx"), opts, providers=["CPUExecutionProvider"])

        # Thread pools that spin while idle steal the cores from the one that works: only the depth decoder's
        # pool spins (it runs 31 times back to back, and waking sleeping workers costs ~1.5 ms a step); the
        # backbone's sleeps between frames, and a head (one small matmul) runs on the calling thread.
        self.sessions = {"backbone": session("backbone", threads), "decoder": session("decoder", threads, spin=True)}
        for k in range(1, a.audio_num_codebooks):
            self.sessions[f"head{k}"] = session(f"head{k}", 1)
        if cache_dir is None:
            shutil.rmtree(folder, ignore_errors=True)
        self._backbone_out = ["hidden", "logits"] + [f"backbone.present_{kv}{i}" for i in range(a.backbone.num_layers) for kv in "kv"]
        self._decoder_out = ["hidden"] + [f"decoder.present_{kv}{i}" for i in range(a.decoder.num_layers) for kv in "kv"]

    def _ensure_built(self, model, quantization, cache_dir: Path | None, progress: bool) -> Path:
        stamp = {"format": FORMAT_VERSION, "quantization": quantization, "block": QUANT_BLOCK}
        if cache_dir is not None:
            cache_dir = Path(cache_dir)
            try:
                if json.loads((cache_dir / "ready.json").read_text()) == stamp:
                    return cache_dir
            except (OSError, ValueError):
                pass
            cache_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=cache_dir.parent if cache_dir else None))
        try:
            self._build(model, quantization, tmp, progress)
            (tmp / "ready.json").write_text(json.dumps(stamp))
            if cache_dir is None:
                return tmp
            if cache_dir.exists():
                shutil.rmtree(cache_dir)
            try:
                tmp.rename(cache_dir)
            except OSError:  # another process finished the same build first
                shutil.rmtree(tmp, ignore_errors=True)
            return cache_dir
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _build(self, model, quantization, folder: Path, progress: bool) -> None:
        from tqdm import tqdm

        what = "fp32" if quantization is None else f"{quantization}-bit"
        models = build_graphs(model)
        bar = tqdm(total=len(models), desc=f"building the ONNX TTS ({what}, once per checkpoint)", unit="graph",
                   disable=None if progress else True, leave=False)
        for name in list(models):
            m = models.pop(name)
            if quantization is not None:
                m = _quantize(m, quantization)
            _save(m, folder / f"{name}.onnx")
            del m
            bar.update()
        bar.close()
        self.built = True

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
