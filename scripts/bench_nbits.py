"""How fast ONNX Runtime's blockwise `MatMulNBits` reads a batch-1 decoder step's weights, by bit width, block size,
accuracy level, thread count and total size (below and above this CPU's last-level cache), in one run.

    .venv/bin/python scripts/bench_nbits.py [--widths 1024,2048,4096,6144] [--bits 2,4,8] [--threads 1,2]
                                            [--blocks 32,64,128] [--levels 0,4] [--reps 5]

The graph is one step of Marvis's depth decoder's products (`llama-60M`: four layers of q 1024x1024, k and v
1024x256, o 1024x1024, gate and up 1024xW, down Wx1024; W = 4096 is the real MLP width), random weights, one
input row, quantised by ONNX Runtime's own `MatMulNBitsQuantizer` (symmetric, as the TTS graph is). A MLP width
other than 4096 only moves the weight bytes, to see whether weights that stay in the cache run faster. Printed:
the packed weight bytes, the best and median time of a step (a frame runs 31 of them), and the bytes read per second
beside this host's plain memory read rate measured in the same run (agent.bench.tts.read_bandwidth_gbs). Each
setting runs in its own session after 50 warm-up steps; the default sweep's order alternates so that a slow moment
of a shared host does not land on one setting only.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import numpy as np

DIM, KV = 1024, 256
LAYERS = 4


def step_graph(width: int, seed: int = 0):
    """fp32 ONNX model of one depth step's products: x [1, DIM] -> the last layer's down projection, plus the k/v
    products as outputs (so none is pruned)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    nodes, inits, outputs = [], [], []

    def product(x: str, n_in: int, n_out: int, name: str) -> str:
        w = (rng.standard_normal((n_in, n_out)) * 0.02).astype(np.float32)
        inits.append(helper.make_tensor(name, TensorProto.FLOAT, (n_in, n_out), w.tobytes(), raw=True))
        nodes.append(helper.make_node("MatMul", [x, name], [name + ".out"]))
        return name + ".out"

    x = "x"
    for layer in range(LAYERS):
        q = product(x, DIM, DIM, f"q{layer}")
        for side in ("k", "v"):
            out = product(x, DIM, KV, f"{side}{layer}")
            outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, KV]))
        o = product(q, DIM, DIM, f"o{layer}")
        gated = f"gu{layer}"
        nodes.append(helper.make_node("Mul", [product(o, DIM, width, f"g{layer}"), product(o, DIM, width, f"u{layer}")],
                                      [gated]))
        x = product(gated, width, DIM, f"d{layer}")
    graph = helper.make_graph(nodes, "step", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, DIM])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, DIM]), *outputs],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    return model


def quantised(model, bits: int, block: int, level: int):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block, is_symmetric=True, accuracy_level=level)
    quantizer.process()
    return quantizer.model.model


def weight_bytes(model) -> int:
    from onnx import numpy_helper

    return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


def time_step(model, threads: int, reps: int) -> tuple[float, float]:
    """(best, median) seconds of one step over `reps` rounds of 100, in a sleeping pool of `threads`."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feed = {"x": np.random.default_rng(1).standard_normal((1, DIM)).astype(np.float32)}
    for _ in range(50):
        session.run(None, feed)
    rounds = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(100):
            session.run(None, feed)
        rounds.append((time.perf_counter() - start) / 100)
    return min(rounds), statistics.median(rounds)


def ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"expected comma-separated integers, got {text!r}") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--widths", default="1024,2048,4096,6144", help="MLP widths (4096: Marvis's decoder)")
    ap.add_argument("--bits", default="4", help="2, 4 and/or 8 (what ONNX Runtime's quantiser takes)")
    ap.add_argument("--blocks", default="64", help="weights per scale")
    ap.add_argument("--levels", default="4", help="accuracy levels: 4 multiplies in int8, 0-3 in float")
    ap.add_argument("--threads", default="2")
    ap.add_argument("--reps", type=int, default=5)
    opts = ap.parse_args()
    widths, bits, blocks, levels, threads = (ints(v) for v in (opts.widths, opts.bits, opts.blocks, opts.levels,
                                                               opts.threads))
    if any(b not in (2, 4, 8) for b in bits):
        raise SystemExit("--bits: ONNX Runtime's quantiser takes 2, 4 or 8")
    if opts.reps < 1 or not all((widths, bits, blocks, levels, threads)):
        raise SystemExit("every list needs a value, and --reps at least 1")

    from agent.bench.tts import read_bandwidth_gbs

    settings = [(w, b, k, lv, t) for w in widths for b in bits for k in blocks for lv in levels for t in threads]
    settings = settings[::2] + settings[1::2][::-1]  # alternated: a slow stretch of the host spreads over settings
    print(f"# {len(settings)} settings; host memory read {read_bandwidth_gbs():.1f} GB/s (2 threads) at start")
    print(f"{'width':>6} {'bits':>4} {'block':>5} {'level':>5} {'threads':>7} {'weights MB':>10} "
          f"{'best ms':>8} {'median ms':>9} {'GB/s':>6}")
    rows = []
    for width, b, block, level, t in settings:
        model = quantised(step_graph(width), b, block, level)
        size = weight_bytes(model)
        best, median = time_step(model, t, opts.reps)
        rows.append((width, b, block, level, t, size, best, median))
    for width, b, block, level, t, size, best, median in sorted(rows):
        print(f"{width:>6} {b:>4} {block:>5} {level:>5} {t:>7} {size / 1e6:>10.1f} {1000 * best:>8.3f} "
              f"{1000 * median:>9.3f} {size / best / 1e9:>6.1f}")
    print(f"# host memory read {read_bandwidth_gbs():.1f} GB/s (2 threads) at the end")


if __name__ == "__main__":
    main()
