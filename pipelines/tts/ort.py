"""Marvis on ONNX Runtime: the same network as `model.py`, one ONNX graph per frame, built from its args and weights.

What is notable here:
- There is no second model definition to keep in step: the pieces (row embedding, backbone, one depth-decoder
  step, each audio head) are emitted with `pipelines.ortgraph.llama_blocks` from a `model.Model`'s args and
  parameters, so the parity tests of the MLX model carry over.
- A frame is ONE session run: the pieces are quantised one by one (each weight once) and then inlined into a
  `frame` graph that embeds the rows, runs the backbone, samples codebook 0 and unrolls the 31 depth steps,
  each with its head and its sampler. No Python, no numpy copy and no session round trip between depth steps:
  on two cores those were a third of a frame at 4-bit.
- Sampling happens inside the graph by the rule of `generator.sample_sorted` (top-k sorted by logit, the
  inverse CDF of one host-drawn uniform per codebook), so a seed gives the same codes as the host sampler;
  temperature 0 is argmax. `forced` codes (teacher forcing) and the per-codebook logits make every step of
  the graph testable against the MLX model.
- The backbone's KV cache is a buffer of max_seq_len positions per layer that ONNX Runtime's
  GroupQueryAttention writes in place (the same OrtValue bound as past and present): a frame costs the same at
  any context length, and trimming the cache is moving its offset.
- Why ONNX Runtime: on a CPU its MLAS kernels read weights fast, fp32 and blockwise 8/4-bit alike
  (`MatMulNBits`), where MLX's Linux CPU low-precision kernels are not vectorised.
- Built once per checkpoint and precision into `cache_dir`, then loaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipelines.ortgraph import Graph, OrtNet, Precision, float_params, llama_blocks

FORMAT_VERSION = 3  # bump when the graphs change: cached builds of another version are rebuilt


# ---- building ----------------------------------------------------------------------------------------------

def gqa_fits(args) -> bool:
    """GroupQueryAttention's rotary kernel takes head sizes in multiples of 16 (every real flavour: 64, 128);
    smaller test models use the standard Attention op instead."""
    return args.head_dim % 16 == 0


def build_pieces(model) -> dict[str, object]:
    """The fp32 ONNX pieces of a `model.Model`: row embedding, backbone, one depth step, one graph per head."""
    from onnx import TensorProto as TP

    a = model.args
    K, V, D = a.audio_num_codebooks, a.audio_vocab_size, a.backbone.embed_dim
    params = float_params(model)
    pieces = {}

    g = Graph("embed")  # rows [T, K+1] (32 codebooks + text) -> the sum of their masked embeddings [1, T, D]
    tokens = g.input("tokens", TP.INT64, ["T", K + 1])
    mask = g.input("mask", TP.FLOAT, ["T", K + 1])
    text_ids = g.op("Gather", [tokens, g.const("embed.text_col", np.array(K, np.int64))], axis=1)  # [T]
    text = g.op("Mul", [g.op("Gather", [g.init("text_embeddings", params["text_embeddings.weight"]), text_ids]),
                        g.op("Slice", [mask, g.const("embed.k", np.array([K], np.int64)),
                                       g.const("embed.k1", np.array([K + 1], np.int64)),
                                       g.const("embed.axis1", np.array([1], np.int64))])])  # [T, D]
    audio_cols = g.op("Slice", [tokens, g.const("embed.zero", np.array([0], np.int64)), "embed.k", "embed.axis1"])
    audio_ids = g.op("Add", [audio_cols, g.const("embed.offsets", np.arange(K, dtype=np.int64) * V)])  # [T, K]
    audio_mask = g.op("Unsqueeze", [g.op("Slice", [mask, "embed.zero", "embed.k", "embed.axis1"]),
                                    g.const("embed.axis2", np.array([2], np.int64))])  # [T, K, 1]
    audio = g.op("Mul", [g.op("Gather", [g.init("audio_embeddings", params["audio_embeddings.weight"]), audio_ids]),
                         audio_mask])  # [T, K, D]
    rows = g.op("Add", [text, g.op("ReduceSum", [audio, "embed.axis1"], keepdims=0)])
    g.output("x", g.op("Unsqueeze", [rows, g.const("embed.axis0", np.array([0], np.int64))]), TP.FLOAT, [1, "T", D])
    pieces["embed"] = g.model()

    g = Graph("backbone")  # shared in-place cache: see llama_blocks
    x = g.input("x", TP.FLOAT, [1, "T", D])
    h = llama_blocks(g, "backbone", a.backbone, params, x, cache="shared")
    g.output("hidden", h, TP.FLOAT, [1, D])
    g.output("logits", g.op("MatMul", [h, g.init("codebook0_head", params["codebook0_head.weight"].T)]), TP.FLOAT,
             [1, V])
    pieces["backbone"] = g.model()

    g = Graph("decoder")  # one depth step: its cache is a few positions and lives inside one frame
    x = g.input("x", TP.FLOAT, [1, "T", D])
    x = g.op("MatMul", [x, g.init("projection", params["projection.weight"].T)])
    if gqa_fits(a.decoder):
        h = llama_blocks(g, "decoder", a.decoder, params, x, cache="gqa")
    else:
        h = llama_blocks(g, "decoder", a.decoder, params, x, g.input("pos", TP.INT64, [1, "T"]))
    g.output("hidden", h, TP.FLOAT, [1, a.decoder.embed_dim])
    pieces["decoder"] = g.model()

    for k in range(1, K):  # a head per codebook: each its own MatMul, so only the one a step needs is read
        g = Graph(f"head{k}")
        h = g.input("hidden", TP.FLOAT, [1, a.decoder.embed_dim])
        g.output("logits", g.op("MatMul", [h, g.init(f"audio_head.{k}", params["audio_head"][k - 1])]), TP.FLOAT, [1, V])
        pieces[f"head{k}"] = g.model()
    return pieces


def _sample(g: Graph, logits: str, k: int, inputs: dict[str, str]) -> str:
    """Codebook k's token [1] from logits [1, V] by `generator.sample_sorted`, or the forced one."""
    def const(name, value):
        return g.const(f"s.{name}", value)

    vals, idx = g.op("TopK", [logits, inputs["top_k"]], n_out=2, axis=-1, largest=1, sorted=1)  # [1, k]
    first = [const("zero", np.array([0], np.int64)), const("one", np.array([1], np.int64)), const("ax1", np.array([1], np.int64))]
    greedy = g.op("Slice", [idx, *first])  # [1, 1]
    t = g.op("Max", [inputs["temperature"], const("tiny", np.array(1e-5, np.float32))])
    p = g.op("Exp", [g.op("Div", [g.op("Sub", [vals, g.op("Slice", [vals, *first])]), t])])
    cdf = g.op("CumSum", [p, const("last", np.array(-1, np.int64))])
    total = g.op("Slice", [cdf, const("m1", np.array([-1], np.int64)), const("big", np.array([2**62], np.int64)), first[2]])
    u = g.op("Slice", [inputs["uniforms"], const(f"k{k}", np.array([k], np.int64)), const(f"k{k + 1}", np.array([k + 1], np.int64))])
    below = g.op("Cast", [g.op("LessOrEqual", [cdf, g.op("Mul", [u, total])])], to=7)  # int64
    j = g.op("Min", [g.op("ReduceSum", [below, first[2]], keepdims=1), g.op("Sub", [inputs["top_k"], first[1]])])
    drawn = g.op("GatherElements", [idx, j], axis=1)
    token = g.op("Where", [g.op("Greater", [inputs["temperature"], const("zero_f", np.array(0, np.float32))]), drawn, greedy])
    forced = g.op("Slice", [inputs["forced"], f"s.k{k}", f"s.k{k + 1}"])
    return g.op("Where", [inputs["force"], forced, g.op("Reshape", [token, first[1]])])  # [1]


def compose_frame(pieces: dict[str, object], args) -> dict[str, object]:
    """The pieces (quantised or not) inlined into one `frame` graph: rows + cache -> codes [K], logits [K, V]."""
    from onnx import TensorProto as TP

    K, V = args.audio_num_codebooks, args.audio_vocab_size
    b, d = args.backbone, args.decoder
    g = Graph("frame")
    inputs = {
        "tokens": g.input("tokens", TP.INT64, ["T", K + 1]),
        "mask": g.input("mask", TP.FLOAT, ["T", K + 1]),
        "uniforms": g.input("uniforms", TP.FLOAT, [K]),
        "temperature": g.input("temperature", TP.FLOAT, []),
        "top_k": g.input("top_k", TP.INT64, [1]),
        "forced": g.input("forced", TP.INT64, [K]),
        "force": g.input("force", TP.BOOL, []),
    }
    cache = {"backbone.seqlens_k": g.input("backbone.seqlens_k", TP.INT32, [1]),
             "backbone.total_len": g.input("backbone.total_len", TP.INT32, [])}
    for i in range(b.num_layers):
        for kv in "kv":
            cache[f"backbone.past_{kv}{i}"] = g.input(f"backbone.past_{kv}{i}", TP.FLOAT, [1, b.num_kv_heads, b.max_seq_len, b.head_dim])
            g.output(f"backbone.present_{kv}{i}", None, TP.FLOAT, [1, b.num_kv_heads, b.max_seq_len, b.head_dim])

    x = g.inline(pieces["embed"], "emb", {"tokens": inputs["tokens"], "mask": inputs["mask"]})["x"]
    presents = {f"backbone.present_{kv}{i}": f"backbone.present_{kv}{i}" for i in range(b.num_layers) for kv in "kv"}
    out = g.inline(pieces["backbone"], "bb", {"x": x, **cache}, presents)
    logits = [out["logits"]]
    codes = [_sample(g, out["logits"], 0, inputs)]

    def embed_audio(k: int, token: str) -> str:  # [1] -> [1, 1, D]
        ids = g.op("Add", [token, g.const(f"dec.offset{k}", np.array([k * V], np.int64))])
        return g.op("Unsqueeze", [g.op("Gather", ["audio_embeddings", ids]), g.const("dec.axis0", np.array([0], np.int64))])

    hidden = g.op("Unsqueeze", [out["hidden"], g.const("dec.axis0", np.array([0], np.int64))])
    x = g.op("Concat", [hidden, embed_audio(0, codes[0])], axis=1)  # [1, 2, D]: positions 0, 1
    empty = g.const("dec.empty_kv", np.zeros((1, d.num_kv_heads, 0, d.head_dim), np.float32))
    past = {f"decoder.past_{kv}{i}": empty for i in range(d.num_layers) for kv in "kv"}
    for k in range(1, K):
        if gqa_fits(d):
            lengths = {"decoder.seqlens_k": g.const(f"dec.seqlens{k}", np.array([k], np.int32)),  # positions 0..k
                       "decoder.total_len": g.const(f"dec.total{k}", np.array(k + 1, np.int32))}
        else:
            lengths = {"pos": g.const(f"dec.pos{k}", np.array([[0, 1]] if k == 1 else [[k]], np.int64))}
        step = g.inline(pieces["decoder"], f"d{k}", {"x": x, **lengths, **past})
        past = {f"decoder.past_{kv}{i}": step[f"decoder.present_{kv}{i}"] for i in range(d.num_layers) for kv in "kv"}
        logits.append(g.inline(pieces[f"head{k}"], f"h{k}", {"hidden": step["hidden"]})["logits"])
        codes.append(_sample(g, logits[-1], k, inputs))
        if k < K - 1:
            x = embed_audio(k, codes[-1])
    g.output("codes", g.op("Concat", codes, axis=0), TP.INT64, [K])
    g.output("logits", g.op("Concat", logits, axis=0), TP.FLOAT, [K, V])
    return {"frame": g.model()}


# ---- running -----------------------------------------------------------------------------------------------

class OrtCache:
    """The backbone's KV cache: per layer a (k, v) pair of [1, KVH, max_len, hd] buffers, valid up to `offset`."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, max_len: int):
        import onnxruntime as ort

        self.max_len = max_len
        self._arrays = [np.zeros((1, kv_heads, max_len, head_dim), np.float32) for _ in range(2 * layers)]
        values = [ort.OrtValue.ortvalue_from_numpy(a) for a in self._arrays]  # share the numpy memory
        self.k, self.v = values[0::2], values[1::2]
        self.offset = 0

    def trim(self, n: int) -> int:
        n = min(n, self.offset)
        self.offset -= n
        return n

    def keys(self, layer: int) -> np.ndarray:
        """The valid part of a layer's keys [1, KVH, offset, hd] (a view, for tests)."""
        return self._arrays[2 * layer][:, :, :self.offset]


class OrtFrameModel:
    """The same Marvis network executed by ONNX Runtime, a frame a session run; numpy in, numpy out."""

    def __init__(self, model, precision: Precision = Precision(), cache_dir: Path | None = None,
                 threads: int | None = None, progress: bool = False, profile: bool = False):
        a = model.args
        self.args = a
        self.precision = precision
        self.quantization = precision.bits
        self.num_codebooks = a.audio_num_codebooks
        self.vocab = a.audio_vocab_size
        self.block = precision.block if precision.bits else None
        # two sessions of the one graph: a pool that sleeps, and one that spins inside a run. On two cores with
        # another program busy on one, a spinning pool waited at every op for its descheduled thread (126 ms a frame
        # vs 71 sleeping); on idle cores it is the faster (50 vs 59: docs/performance.md §4). `spin` chooses, at
        # each frame (the TTS stage sets it from the cores other programs leave free); the same numbers either way
        net = OrtNet(cache_dir, FORMAT_VERSION, precision, lambda: build_pieces(model), ("frame",),
                     f"building the ONNX TTS ({precision.label}, once per checkpoint)" if progress else None,
                     compose=lambda pieces: compose_frame(pieces, a), threads=threads, spin=False, profile=profile,
                     also_spinning=("frame",))
        self.built, self.session = net.built, net.sessions["frame"]
        self.spinning = net.spinning.get("frame", self.session)
        self.spin = False
        self._codes = np.zeros(self.num_codebooks, np.int64)
        self._logits = np.zeros((self.num_codebooks, self.vocab), np.float32)
        import onnxruntime as ort

        self._outputs = {"codes": ort.OrtValue.ortvalue_from_numpy(self._codes),
                         "logits": ort.OrtValue.ortvalue_from_numpy(self._logits)}

    def make_cache(self) -> OrtCache:
        b = self.args.backbone
        return OrtCache(b.num_layers, b.num_kv_heads, b.head_dim, b.max_seq_len)

    def run(self, tokens: np.ndarray, mask: np.ndarray, cache: OrtCache, uniforms: np.ndarray | None = None,
            temperature: float = 0.0, top_k: int = 0, forced: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Rows [T, K+1] -> (codes [K], logits [K, V]) of one frame; the cache advances by T. `uniforms` [K] in
        [0, 1) drive the sampler (temperature 0: argmax); `forced` codes replace the sampled ones (teacher
        forcing). The arrays returned are reused by the next call."""
        T, start, K = len(tokens), cache.offset, self.num_codebooks
        if start + T > cache.max_len:
            raise ValueError(f"the TTS cache holds {cache.max_len} positions; {start} + {T} rows do not fit")
        session = self.spinning if self.spin else self.session
        bind = session.io_binding()
        feeds = {
            "tokens": np.ascontiguousarray(tokens, np.int64),
            "mask": np.ascontiguousarray(mask, np.float32),
            "uniforms": np.zeros(K, np.float32) if uniforms is None else np.ascontiguousarray(uniforms, np.float32),
            "temperature": np.array(temperature, np.float32),
            "top_k": np.array([top_k if 0 < top_k < self.vocab else self.vocab], np.int64),
            "forced": np.zeros(K, np.int64) if forced is None else np.ascontiguousarray(forced, np.int64),
            "force": np.array(forced is not None),
            "backbone.seqlens_k": np.array([start + T - 1], np.int32),
            "backbone.total_len": np.array(start + T, np.int32),
        }
        for name, value in feeds.items():
            bind.bind_cpu_input(name, value)
        for i, (k, v) in enumerate(zip(cache.k, cache.v)):  # the same buffer in and out: written in place
            bind.bind_ortvalue_input(f"backbone.past_k{i}", k)
            bind.bind_ortvalue_output(f"backbone.present_k{i}", k)
            bind.bind_ortvalue_input(f"backbone.past_v{i}", v)
            bind.bind_ortvalue_output(f"backbone.present_v{i}", v)
        for name, value in self._outputs.items():
            bind.bind_ortvalue_output(name, value)
        session.run_with_iobinding(bind)
        cache.offset = start + T
        return self._codes.astype(np.int32), self._logits

    def prefill(self, tokens: np.ndarray, mask: np.ndarray, cache: OrtCache) -> None:
        """Run rows into the cache; the frame it also computes is dropped."""
        self.run(tokens, mask, cache)

    def end_profiling(self) -> str:
        """The JSON trace of every node run since load (a model built with profile=True)."""
        return self.session.end_profiling()
