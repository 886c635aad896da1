"""Llama blocks as ONNX graphs for ONNX Runtime, built from a model's own args and weights.

Both the TTS (Marvis' backbone and depth decoder) and the reply LLM (SmolLM2) are Llama-style stacks. MLX
stays their model of record; on CPUs where MLX's kernels are slow, these graphs run the same numbers through
ONNX Runtime's MLAS kernels, fp32 or blockwise int8/int4 (`MatMulNBits`, from ORT's own quantiser).
What is notable here:
- Standard ONNX, opset 23: RMSNormalization, RotaryEmbedding (interleaved pairs or rotate-half), Attention with
  grouped KV heads, a past cache in and the present cache out, and a causal mask that accounts for the past.
- Nothing is hand-copied: a stack is emitted from its args and its parameters by name, so the parity tests of
  the MLX model carry over.
- A build is written once into a cache folder (atomically, stamped) and loaded from there afterwards.

The seam every stage plugs ONNX Runtime in by (TTS, reply LLM, Whisper): `resolve` turns a stage's config
strings into a `Placement` once (backend + `Precision`), which the stage is built with and picks its network
object from (the stage's own loop runs over either); `OrtNet` builds a network's graphs for that precision
into its cache folder (or finds them there) and opens their sessions; `empty_kv` / `kv_feeds` are the
past-cache feeds of a stack these graphs emit.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

OPSET = 23
QUANT_BLOCK = 32  # weights per scale in blockwise int8/int4, unless a stamp says otherwise
QUANT_BLOCKS = (32, 64, 128)
MS_OPS = {"GroupQueryAttention", "MatMulNBits"}  # ONNX Runtime's own operators (domain com.microsoft)


@dataclass(frozen=True)
class Precision:
    """How a network's weights run on ONNX Runtime: fp32 (`bits` None), or blockwise int8/int4 with `block`
    weights a scale (`MatMulNBits`), or `dynamic`: int8 weights times activations quantised to 8 bits as each
    run goes (`int8_matmul`), in the graphs the network's builder picks. Checked when made: a bad value is one
    clear error."""

    bits: int | None = None
    block: int = QUANT_BLOCK
    dynamic: bool = False

    def __post_init__(self):
        if self.bits not in (None, 8, 4):
            raise ValueError(f"quantization must be None, 8 or 4, not {self.bits!r}")
        if self.block not in QUANT_BLOCKS:
            raise ValueError(f"quantization block must be one of {QUANT_BLOCKS}, not {self.block!r}")
        if self.dynamic and self.bits != 8:
            raise ValueError(f"dynamic quantization is 8-bit, not {self.bits!r}")

    @property
    def label(self) -> str:
        return "fp32" if self.bits is None else f"{self.bits}-bit" + (" dynamic" if self.dynamic else "")

    @property
    def tag(self) -> str:
        """For cache folder names (`cache_folder`): fp32, q8b32, q4b64, dq8..."""
        if self.dynamic:
            return "dq8"
        return "fp32" if self.bits is None else f"q{self.bits}b{self.block}"

    def stamp(self, fmt: int) -> dict:
        """What a build records and is matched against: the graphs' format version and this precision."""
        if self.dynamic:
            return {"format": fmt, "quantization": self.bits, "dynamic": "per-row"}
        return {"format": fmt, "quantization": self.bits, "block": self.block}


class Placement(NamedTuple):
    """Where a stage's network runs: `mlx` (the model of record) or `onnx`, and at what precision. Every stage is
    given one (TTS, reply LLM, Whisper) and picks its network object from it once: MLXFrames / OrtFrames,
    MLXTokens / OrtLlama, mlx-whisper's encoder and decoder / their ONNX drop-ins."""

    backend: str = "mlx"
    precision: Precision = Precision()

    def check(self, what: str) -> Placement:
        if self.backend not in ("mlx", "onnx"):
            raise ValueError(f"{what} backend must be mlx or onnx, not {self.backend!r}")
        return self


def cache_folder(cache_root: Path, name: str, precision: Precision) -> Path:
    """Where a network's graphs are cached: `{cache_root}/{name}-{precision.tag}`, `name` saying which weights
    (e.g. `llm-<weights hash>`). The one place a cache folder is named."""
    return Path(cache_root) / f"{name}-{precision.tag}"


def quantize_mlx(model, precision: Precision, embeddings: bool = True) -> None:
    """An MLX model's Linear (and, with `embeddings`, Embedding) layers at `precision`: `bits` with a scale every
    `block` weights (MLX's group size), in place. Layers quantised otherwise (a quantised checkpoint) are
    dequantised and quantised again; already at `precision`, the model is left as it is. fp32: nothing."""
    import mlx.nn as nn
    from mlx_lm.utils import dequantize_model

    if precision.bits is None:
        return
    bits, group = precision.bits, precision.block
    held = [m for _, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    if held and all(m.bits == bits and m.group_size == group for m in held):
        return
    if held:
        dequantize_model(model)
    kinds = (nn.Linear, nn.Embedding) if embeddings else (nn.Linear,)
    nn.quantize(model, group_size=group, bits=bits,
                class_predicate=lambda _, m: isinstance(m, kinds) and m.weight.shape[-1] % group == 0)


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


class Graph:
    """A small onnx.helper wrapper: named initializers, nodes with unique output names."""

    def __init__(self, name: str):
        self.name, self.nodes, self.inits, self.inputs, self.outputs = name, [], [], [], []
        self._n = 0
        self._consts: set[str] = set()

    def init(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        array = np.asarray(array)  # (np.ascontiguousarray would turn a scalar into shape [1])
        self.inits.append(numpy_helper.from_array(array if array.flags.c_contiguous else np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, outs: list[str] | None = None, **attrs):
        """One node; its outputs get fresh names unless `outs` names them (a graph output written in place)."""
        from onnx import helper

        self._n += 1
        outs = outs or [f"{op_type.lower()}_{self._n}_{i}" for i in range(n_out)]
        domain = "com.microsoft" if op_type in MS_OPS else None
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=f"{op_type}_{self._n}", domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def input(self, name: str, elem, shape) -> str:
        from onnx import helper

        self.inputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    def output(self, name: str, source: str | None, elem, shape=None) -> None:
        """A graph output: `source` copied under `name`, or (source None) a tensor a node already writes as `name`."""
        from onnx import helper

        if source is not None:
            self.nodes.append(helper.make_node("Identity", [source], [name], name=f"out_{name}"))
        self.outputs.append(helper.make_tensor_value_info(name, elem, shape))

    def fresh(self, stem: str) -> str:
        self._n += 1
        return f"{stem}_{self._n}"

    def const(self, name: str, value) -> str:
        """A small constant initializer, added once however often it is asked for."""
        if name not in self._consts:
            self._consts.add(name)
            self.init(name, np.asarray(value))
        return name

    def inline(self, piece, prefix: str, inputs: dict[str, str], outputs: dict[str, str] | None = None) -> dict[str, str]:
        """Copy the graph of ONNX model `piece` into this one, as a call: its inputs read `inputs[name]`, its
        outputs are written as `outputs[name]` (or a name under `prefix`), every other tensor is renamed under
        `prefix`, initializers are shared by name (each added once). Returns piece output -> tensor here."""
        import copy

        g, outputs = piece.graph, outputs or {}
        weights = {t.name for t in g.initializer}
        for t in g.initializer:
            if t.name not in self._consts:
                self._consts.add(t.name)
                self.inits.append(t)
        names = {**{i.name: inputs[i.name] for i in g.input if i.name not in weights}, **{w: w for w in weights}}
        names[""] = ""
        for o in g.output:
            names[o.name] = outputs.get(o.name, f"{prefix}/{o.name}")

        def rename(n: str) -> str:
            return names.setdefault(n, f"{prefix}/{n}")

        for node in g.node:
            node = copy.deepcopy(node)
            node.name = f"{prefix}/{node.name}"
            node.input[:] = [rename(n) for n in node.input]
            node.output[:] = [rename(n) for n in node.output]
            self.nodes.append(node)
        return {o.name: names[o.name] for o in g.output}

    def model(self):
        from onnx import helper

        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.inits)
        self.inits = []  # copied into the graph: one copy of a large model's weights is held, not two
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                        helper.make_opsetid("com.microsoft", 1)])
        model.ir_version = 10
        return model


def llama_blocks(g: Graph, prefix: str, args, params: dict[str, np.ndarray], x: str, pos: str | None = None,
                 interleaved: bool = True, cache: str = "concat") -> str:
    """Llama blocks + final norm of the LAST position: x [1, T, D] -> [1, D]; caches as graph inputs/outputs.

    `args`: num_layers, num_heads, num_kv_heads, head_dim, embed_dim, intermediate_dim, norm_eps, rope_base,
    rope_scaling, max_seq_len; parameters under `{prefix}.layers.N.*` and `{prefix}.norm.weight` (mlx-lm names).

    Three kinds of cache:
    - "concat": positions `pos` [1, T], the standard RotaryEmbedding + Attention ops; past [1, KVH, P, hd] in,
      past + new out (a new array every call).
    - "gqa": ONNX Runtime's GroupQueryAttention on the packed q|k|v projection (rotary inside: one node for
      four); past and present as with "concat"; the positions follow from inputs `{prefix}.seqlens_k` [1]
      (valid positions after this call, minus one) and `{prefix}.total_len` (scalar).
    - "shared": as "gqa", over a buffer of max_seq_len positions that the caller binds as both past and present:
      the new rows are written in place, so a step costs the same at any context length.
    """
    from onnx import TensorProto as TP

    if cache not in ("concat", "gqa", "shared") or (pos is None) != (cache != "concat"):
        raise ValueError(f"cache {cache!r}: 'concat' takes positions, 'gqa' and 'shared' do not")
    H, KVH, hd, D = args.num_heads, args.num_kv_heads, args.head_dim, args.embed_dim
    periods = rope_periods(args)
    angles = np.arange(args.max_seq_len, dtype=np.float64)[:, None] / periods[None, :]  # [positions, hd/2]
    cos = g.init(f"{prefix}.rope_cos", np.cos(angles).astype(np.float32))
    sin = g.init(f"{prefix}.rope_sin", np.sin(angles).astype(np.float32))
    split_mlp = g.init(f"{prefix}.split_mlp", np.array([args.intermediate_dim] * 2, np.int64))
    if cache == "concat":
        split_qkv = g.init(f"{prefix}.split_qkv", np.array([H * hd, KVH * hd, KVH * hd], np.int64))
    else:
        seqlens = g.input(f"{prefix}.seqlens_k", TP.INT32, [1])
        total = g.input(f"{prefix}.total_len", TP.INT32, [])
    past = args.max_seq_len if cache == "shared" else "past"

    def w(name: str) -> np.ndarray:
        return params[f"{prefix}.{name}"]

    for i in range(args.num_layers):
        p = f"layers.{i}"
        past_k = g.input(f"{prefix}.past_k{i}", TP.FLOAT, [1, KVH, past, hd])
        past_v = g.input(f"{prefix}.past_v{i}", TP.FLOAT, [1, KVH, past, hd])
        h = g.op("RMSNormalization", [x, g.init(f"{prefix}.{p}.norm1", w(f"{p}.input_layernorm.weight"))],
                 epsilon=args.norm_eps, axis=-1)
        qkv_w = np.concatenate([w(f"{p}.self_attn.{n}_proj.weight").T for n in "qkv"], axis=1)  # [D, (H+2KVH)hd]
        qkv = g.op("MatMul", [h, g.init(f"{prefix}.{p}.qkv", qkv_w)])
        if cache != "concat":
            present = [f"{prefix}.present_k{i}", f"{prefix}.present_v{i}"]
            attn = g.op("GroupQueryAttention", [qkv, "", "", past_k, past_v, seqlens, total, cos, sin],
                        outs=[g.fresh("gqa"), *present], num_heads=H, kv_num_heads=KVH, do_rotary=1,
                        rotary_interleaved=int(interleaved))[0]
            for name in present:
                g.output(name, None, TP.FLOAT, [1, KVH, past if cache == "shared" else "present", hd])
        else:
            q, k, v = g.op("Split", [qkv, split_qkv], n_out=3, axis=-1)
            q = g.op("RotaryEmbedding", [q, cos, sin, pos], interleaved=int(interleaved), num_heads=H)
            k = g.op("RotaryEmbedding", [k, cos, sin, pos], interleaved=int(interleaved), num_heads=KVH)
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


def float_params(model, names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """Parameters (all, or those `names` start with) as fp32 numpy under their checkpoint names; MLX-quantised
    layers are dequantised first (ONNX Runtime quantises again, in its own kernels' layout)."""
    params = LazyParams(model, names)
    return {name: params[name] for name in params}


class LazyParams(Mapping):
    """`float_params` one parameter at a time, on demand: a graph builder that copies each weight into its graph
    then holds it once, not twice (Llama-3.2-1B in fp32 is 5 GB). A parameter read twice is computed twice."""

    def __init__(self, model, names: tuple[str, ...] | None = None):
        import mlx.nn as nn
        from mlx.utils import tree_flatten

        self._modules = {f"{n}.weight": m for n, m in model.named_modules()
                         if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))}
        self._arrays = {n: v for n, v in tree_flatten(model.parameters())
                        if not n.endswith((".scales", ".biases")) and n not in self._modules}
        self._names = [n for n in [*self._modules, *self._arrays] if names is None or n.startswith(names)]

    def __getitem__(self, name: str) -> np.ndarray:
        import mlx.core as mx

        if name not in self._names:
            raise KeyError(name)
        m = self._modules.get(name)
        value = (mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits) if m is not None
                 else self._arrays[name])
        return np.array(value.astype(mx.float32))

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def quantize(onnx_model, bits: int, block: int = QUANT_BLOCK):
    """fp32 MatMuls with constant weights -> ONNX Runtime's blockwise `MatMulNBits` (its own quantiser)."""
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # it logs every node it visits
    quantizer = MatMulNBitsQuantizer(onnx_model, bits=bits, block_size=block, is_symmetric=True, accuracy_level=4)
    quantizer.process()
    return quantizer.model.model


def int8_matmul(g: Graph, x: str, w: np.ndarray, name: str) -> str:
    """x [..., K] float times the constant w [K, N] in int8 arithmetic, -> float [..., N]: w is stored int8 with a
    scale per output column, x is quantised to 8 bits with a scale per row (each position's own largest value) as
    the run goes, and ONNX Runtime's `MatMulInteger` (uint8 x int8: VNNI/AVX2 kernels) multiplies them. A scale
    per row, unlike ONNX Runtime's own dynamic quantiser (one scale for the whole activation tensor), keeps a loud
    position from flattening the quiet ones: on Whisper base's encoder the features moved ~16 % (relative norm)
    with one scale, less with one a row (scripts/bench_asr_precision.py)."""
    from onnx import TensorProto as TP

    scale = np.abs(w).max(axis=0) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    wq = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
    amax = g.op("ReduceMax", [g.op("Abs", [x]), g.const("int8_axes", np.array([-1], np.int64))], keepdims=1)
    row = g.op("Max", [g.op("Mul", [amax, g.const("int8_inv127", np.float32(1 / 127))]),
                       g.const("int8_tiny", np.float32(1e-30))])  # an all-zero row keeps a finite scale
    q = g.op("Cast", [g.op("Add", [g.op("Round", [g.op("Div", [x, row])]), g.const("int8_offset", np.float32(128))])],
             to=TP.UINT8)  # |x / row| <= 127: 1..255, zero point 128
    product = g.op("MatMulInteger", [q, g.init(f"{name}.wq", wq), g.const("int8_zero", np.uint8(128))])
    return g.op("Mul", [g.op("Mul", [g.op("Cast", [product], to=TP.FLOAT), row]), g.init(f"{name}.wscale", scale)])


def save(onnx_model, path: Path) -> None:
    import onnx

    onnx.save_model(onnx_model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)


def _ready(folder: Path, stamp: dict) -> bool:
    try:
        return json.loads((folder / "ready.json").read_text()) == stamp
    except (OSError, ValueError):
        return False


def build_cached(folder: Path | None, stamp: dict, build: Callable[[], dict], progress: str | None,
                 compose: Callable[[dict], dict] | None = None) -> tuple[Path, bool]:
    """The folder holding the built graphs: `folder` if a build with this `stamp` is complete there, else a new
    build (into a temporary folder, renamed into place). `build()` returns name -> fp32 ONNX model; a stamp
    with `quantization` bits quantises each; `compose` then turns the (quantised) pieces into the models that
    are saved (pieces that share weights are quantised once, before they are put together).
    Returns (folder, whether it was built now)."""
    from tqdm import tqdm

    if folder is not None:
        folder = Path(folder)
        if _ready(folder, stamp):
            return folder, False
        folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=folder.parent if folder else None))
    try:
        models = build()
        bar = tqdm(total=len(models), desc=progress, unit="graph", disable=None if progress else True, leave=False)
        # blockwise bits are applied here, a graph at a time; dynamic int8 the builder wrote into its graphs
        blockwise = bool(stamp.get("quantization")) and not stamp.get("dynamic")
        if blockwise:
            for name in list(models):
                models[name] = quantize(models[name], stamp["quantization"], stamp.get("block", QUANT_BLOCK))
                bar.update()
        if compose is not None:
            models = compose(models)
        for name in list(models):
            save(models.pop(name), tmp / f"{name}.onnx")
            if not blockwise:
                bar.update()
        bar.close()
        (tmp / "ready.json").write_text(json.dumps(stamp))
        if folder is None:
            return tmp, True
        if _ready(folder, stamp):  # another process finished the same build meanwhile, and may be reading it
            shutil.rmtree(tmp, ignore_errors=True)
            return folder, True
        if folder.exists():  # a stale or half-written build: moved aside first, so the name is free at once
            stale = Path(tempfile.mkdtemp(prefix=".stale-", dir=folder.parent))
            try:
                folder.rename(stale / folder.name)
            except OSError:  # another process moved it first
                pass
            shutil.rmtree(stale, ignore_errors=True)
        try:
            tmp.rename(folder)
        except OSError:  # another process put its build in place first
            shutil.rmtree(tmp, ignore_errors=True)
        return folder, True
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def weights_key(path: Path) -> str:
    """A short hash of a checkpoint's weight files, remembered beside them by (size, mtime) so it is read once."""
    files = [path] if path.is_file() else sorted([*path.glob("*.safetensors"), *path.glob("*.npz")])
    stamp = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    memo = (path.parent if path.is_file() else path) / ".weights-hash.json"
    try:
        saved = json.loads(memo.read_text())
        if saved.get("stamp") == json.loads(json.dumps(stamp)):
            return saved["hash"]
    except (OSError, ValueError, AttributeError):
        pass
    h = hashlib.blake2b(digest_size=8)
    for f in files:
        with open(f, "rb") as fh:
            while block := fh.read(1 << 24):
                h.update(block)
    key = h.hexdigest()
    try:
        memo.write_text(json.dumps({"stamp": stamp, "hash": key}))
    except OSError:
        pass  # a read-only checkpoint folder: hash again next time
    return key


def prefer_onnx() -> bool:
    """Should `auto` pick ONNX Runtime here? On a CPU, yes (MLX's CPU kernels are the slow part); where MLX has
    Metal, no; and never without onnxruntime installed."""
    import importlib.util
    import platform

    import mlx.core as mx

    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        return False
    return not (mx.default_device() == mx.gpu and platform.system() == "Darwin")


def resolve(backend: str, quantization: str, auto_bits: str = "8", block: int = QUANT_BLOCK) -> Placement:
    """A stage's config strings (`auto|mlx|onnx`, `auto|none|8|4`), resolved once for this machine; auto bits on
    ONNX: `auto_bits`."""
    if backend == "auto":
        backend = "onnx" if prefer_onnx() else "mlx"
    if quantization == "auto":
        quantization = auto_bits if backend == "onnx" else "none"
    return Placement(backend, Precision(None if quantization == "none" else int(quantization), block))


class OrtNet:
    """A network's graphs on ONNX Runtime: built by `build()` (name -> fp32 model; `compose` puts quantised pieces
    together) for `precision`, cached in `cache_dir` under a stamp of `fmt` and the precision (None: a temporary
    build), and opened as one CPU session per name in `names` (`spin`, `profile`: see `session`)."""

    def __init__(self, cache_dir: Path | None, fmt: int, precision: Precision, build: Callable[[], dict],
                 names: tuple[str, ...], progress: str | None = None, compose: Callable[[dict], dict] | None = None,
                 threads: int | None = None, spin: bool | str = False, profile: bool = False,
                 also_spinning: tuple[str, ...] = ()):
        self.precision = precision
        folder, self.built = build_cached(cache_dir, precision.stamp(fmt), build, progress, compose=compose)
        threads = threads or os.cpu_count() or 1
        self.sessions = {name: session(folder / f"{name}.onnx", threads, spin=spin, profile=profile)
                         for name in names}
        # `spinning`: a second session of the graphs named in `also_spinning`, whose pool spins inside a run
        self.spinning = {name: session(folder / f"{name}.onnx", threads, spin="run")
                         for name in also_spinning} if not profile else {}
        if cache_dir is None:
            shutil.rmtree(folder, ignore_errors=True)


def empty_kv(layers: int, heads: int, head_dim: int, batch: int = 1) -> list[np.ndarray]:
    """An empty past cache for `layers` attention layers: [k0, v0, k1, v1, ...], each [batch, heads, 0, head_dim]."""
    return [np.zeros((batch, heads, 0, head_dim), np.float32)] * (2 * layers)


def kv_names(layers: int, prefix: str = "", kind: str = "past") -> list[str]:
    """The cache's graph names in `empty_kv` order: `{prefix}{kind}_k0`, `{prefix}{kind}_v0`, ..."""
    return [f"{prefix}{kind}_{kv}{i}" for i in range(layers) for kv in "kv"]


def kv_feeds(cache: list[np.ndarray], prefix: str = "") -> dict[str, np.ndarray]:
    """The feeds of a past cache held in `empty_kv` order."""
    return dict(zip(kv_names(len(cache) // 2, prefix), cache))


def session(path: Path, threads: int, spin: bool = False, profile: bool = False):
    """A CPU session; `spin`: may its idle workers busy-wait (fast for back-to-back runs, costly beside others);
    `profile`: record every node's time (`end_profiling()` writes the trace)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if profile:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tempfile.gettempdir()) / "voice-agent-ort-profile")
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if spin == "run":  # spin inside a run (many small ops), sleep as soon as it ends (others get the cores)
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
